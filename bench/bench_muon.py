"""Muon against AdamW at equal tokens: the same model, data, batch, schedule shape and seeds, through
train_accelerate.py itself, on CPU.

    python bench/bench_muon.py      # ~30 min on 2 cores; JSON and plot in bench/results/muon-<date>.*

Protocol: AdamW's peak lr is tuned first (3 values, seed 0; a best value at the grid's edge extends it by
a factor of 2, at most twice), then Muon's likewise (AdamW's part of the model at AdamW's chosen lr); each
optimizer then runs 2 more seeds at its chosen lr. Reported:
final val loss (mean and spread over 3 seeds), tokens-to-target (the tokens Muon needs to reach AdamW's
mean final val loss, read off its val curve by linear interpolation between evaluations), and wall time
per step (the median step of each run). The model is 4 layers x 256 wide with a 8,192-token BPE trained
on the built-in corpus, whose val split is held-out whole documents.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from metrics import read_metrics  # noqa: E402
from report import write_report  # noqa: E402

MODEL = dict(n_layer=4, n_head=4, n_embd=256, n_positions=128)
LEARNING_RATES = {"adamw": [1e-3, 2e-3, 4e-3], "muon": [2e-3, 4e-3, 8e-3]}
SEEDS = [0, 1, 2]


def train(data: Path, config: Path, out: Path, args, optimizer: str, lr: float, adamw_lr: float, seed: int) -> dict:
    """One run of train_accelerate.py; its val curve, final val loss and step times."""
    lrs = ["--learning_rate", str(lr)] if optimizer == "adamw" else ["--learning_rate", str(adamw_lr), "--muon_learning_rate", str(lr)]
    command = [sys.executable, str(REPO / "train_accelerate.py"), "--data_dir", str(data), "--model", str(config),
               "--output_dir", str(out), "--optimizer", optimizer, *lrs, "--seed", str(seed),
               "--seq_len", str(MODEL["n_positions"]), "--per_device_train_batch_size", str(args.batch_size),
               "--max_train_steps", str(args.steps), "--num_warmup_steps", str(args.steps // 20),
               "--eval_steps", str(args.eval_steps), "--eval_iters", "10", "--checkpointing_steps", "0"]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _, rows = read_metrics(out / "metrics.jsonl")
    tokens_per_step = args.batch_size * MODEL["n_positions"]
    curve = [((r["step"] + 1) * tokens_per_step, r["val_loss"]) for r in rows if "val_loss" in r]
    run = {"optimizer": optimizer, "lr": lr, "seed": seed, "val_curve": curve, "final_val_loss": curve[-1][1],
           "step_ms": statistics.median(r["dt_ms"] for r in rows[5:]), "seconds": time.perf_counter() - started}  # fmt: skip
    print(f"{optimizer:>5} lr {lr:g} seed {seed}: val {run['final_val_loss']:.4f}, {run['step_ms']:.0f} ms/step, "
          f"{run['seconds']:.0f} s", flush=True)  # fmt: skip
    return run


def tokens_to_reach(curve, target: float) -> float | None:
    """Tokens at which the val curve first reaches `target`, interpolated linearly between evaluations."""
    for (t0, v0), (t1, v1) in zip([(0, float("inf"))] + curve, curve):
        if v1 <= target:
            return t1 if v0 == float("inf") else t0 + (v0 - target) / (v0 - v1) * (t1 - t0)
    return None


def spread(values) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values), "min": min(values), "max": max(values)}


def plot(runs: list[dict], chosen: dict, target: float, png: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, sweep) = plt.subplots(1, 2, figsize=(12, 4.5))
    for optimizer, color in (("adamw", "tab:blue"), ("muon", "tab:orange")):
        for run in (r for r in runs if r["optimizer"] == optimizer and r["lr"] == chosen[optimizer]):
            tokens, val = zip(*run["val_curve"])
            curves.plot(np.array(tokens) / 1e6, val, color=color, alpha=0.8,
                        label=f"{optimizer} (lr {chosen[optimizer]:g})" if run["seed"] == 0 else None)  # fmt: skip
        swept = sorted((r["lr"], r["final_val_loss"]) for r in runs if r["optimizer"] == optimizer and r["seed"] == 0)
        sweep.plot(*zip(*swept), "o-", color=color, label=optimizer)
    curves.axhline(target, color="gray", linestyle="--", label="AdamW's final val loss (mean)")
    curves.set(xlabel="tokens (M)", ylabel="val loss", title="val loss, 3 seeds each at the chosen lr")
    curves.set_ylim(target - 0.4, target + 1.2)
    sweep.set(xscale="log", xlabel="peak lr (Muon: its matrices' lr)", ylabel="final val loss", title="lr sweep (seed 0)")
    for ax in (curves, sweep):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"Muon vs AdamW: {MODEL['n_layer']} layers x {MODEL['n_embd']}, built-in corpus, 2-core CPU")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--eval_steps", type=int, default=25)
    p.add_argument("--output", default=None, help="default: bench/results/muon-<date>.json (and .png beside it)")
    args = p.parse_args(argv)
    import prepare_data
    from configuration_minigpt import MiniGPTConfig

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = prepare_data.main(["--vocab_size", "8192", "--output_dir", str(tmp / "data"), "--num_proc", "2"])
        meta = json.loads((data / "meta.json").read_text())
        config = tmp / "config.json"
        eot = meta["eot_token_id"]
        MiniGPTConfig(**MODEL, vocab_size=meta["vocab_size"], bos_token_id=eot, eos_token_id=eot).to_json_file(config)

        def run(optimizer, lr, seed, adamw_lr=None):
            return train(data, config, tmp / f"{optimizer}-{lr:g}-{seed}", args, optimizer, lr, adamw_lr, seed)

        runs, chosen = [], {}
        for optimizer in ("adamw", "muon"):  # AdamW first: Muon's runs keep AdamW's chosen lr for the rest
            sweep = [run(optimizer, lr, 0, chosen.get("adamw")) for lr in LEARNING_RATES[optimizer]]
            for _ in range(2):  # a best value at the grid's edge: go one factor of 2 further that way
                best = min(sweep, key=lambda r: r["final_val_loss"])["lr"]
                lrs = sorted(r["lr"] for r in sweep)
                if best not in (lrs[0], lrs[-1]):
                    break
                sweep.append(run(optimizer, best * 2 if best == lrs[-1] else best / 2, 0, chosen.get("adamw")))
            chosen[optimizer] = min(sweep, key=lambda r: r["final_val_loss"])["lr"]
            runs += sweep
        for seed in SEEDS[1:]:
            runs += [run("adamw", chosen["adamw"], seed), run("muon", chosen["muon"], seed, chosen["adamw"])]

    final = {o: [r for r in runs if r["optimizer"] == o and r["lr"] == chosen[o]] for o in ("adamw", "muon")}
    target = statistics.mean(r["final_val_loss"] for r in final["adamw"])
    total_tokens = args.steps * args.batch_size * MODEL["n_positions"]
    reached = [tokens_to_reach(r["val_curve"], target) for r in final["muon"]]
    summary = {
        "chosen_lr": chosen,
        "final_val_loss": {o: spread([r["final_val_loss"] for r in final[o]]) for o in final},
        "adamw_target": target,
        "tokens_per_run": total_tokens,
        "muon_tokens_to_target": reached,
        "muon_tokens_ratio": [t / total_tokens if t else None for t in reached],
        "step_ms": {o: spread([r["step_ms"] for r in runs if r["optimizer"] == o]) for o in final},
        "sweep_minutes": sum(r["seconds"] for r in runs) / 60,
    }
    summary["step_time_ratio_muon_to_adamw"] = summary["step_ms"]["muon"]["mean"] / summary["step_ms"]["adamw"]["mean"]
    print(json.dumps(summary, indent=1))
    path = write_report("muon", {"model": MODEL, "steps": args.steps, "batch_size": args.batch_size, "summary": summary,
                                 "runs": runs}, args.output)  # fmt: skip
    plot(runs, chosen, target, path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
