"""Speed of MiniGPT against transformers' GPT2LMHeadModel (SDPA attention), measured in one process with
the same config, data, dtype and thread count, in alternating rounds (who goes first alternates).

    python bench/bench_speed.py                       # all CPU benchmarks (~25 min on 2 cores)
    python bench/bench_speed.py --only train_step     # train_step | generate | script | modes
    python bench/bench_speed.py --only modes --before HEAD~3 --nanogpt ../nanoGPT/model.py
                                                      # eager/compiled x fp32/bf16, with peers and the code before
    python bench/bench_speed.py --only train_step --only generate --before HEAD~1
                                                      # also the code before, in the same rounds

On a GPU, bench/gpu_check.sh measures the step (ours against transformers' GPT-2, compiled).

Each benchmark prints a table with the median ratio ours / transformers and its spread over rounds, and
everything goes to bench/results/speed-<date>.json with the machine and versions. Peak memory is the peak RSS
of a fresh process doing the same steps (CPU) or torch.cuda.max_memory_allocated (GPU).
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configuration_minigpt import MiniGPTConfig  # noqa: E402
from modeling_minigpt import MiniGPTForCausalLM  # noqa: E402
from metrics import machine, read_metrics  # noqa: E402
from report import write_report  # noqa: E402

# The issue's CPU shapes: a small vocabulary, where the blocks dominate, and GPT-2's, where the
# lm_head and the loss do.
SHAPES = {
    "small_vocab": dict(n_layer=4, n_head=4, n_embd=256, vocab_size=8192, n_positions=256),
    "gpt2_vocab": dict(n_layer=6, n_head=6, n_embd=384, vocab_size=50304, n_positions=256),
}
NO_DROPOUT = dict(embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)


def build(kind: str, shape: dict, before: str | None = None):
    """"ours", "transformers" (GPT2LMHeadModel, SDPA) or "ours_before" (ours at revision `before`)."""
    torch.manual_seed(0)
    eot = dict(bos_token_id=shape["vocab_size"] - 1, eos_token_id=shape["vocab_size"] - 1)
    if kind == "ours":
        return MiniGPTForCausalLM(MiniGPTConfig(**shape, **NO_DROPOUT, **eot))
    if kind == "ours_before":
        from revision import model_at

        module = model_at(before)
        return module.MiniGPTForCausalLM(module.MiniGPTConfig(**shape, **NO_DROPOUT, **eot))
    return GPT2LMHeadModel(GPT2Config(**shape, **NO_DROPOUT, **eot, attn_implementation="sdpa"))


def kinds(args) -> tuple[str, ...]:
    """The models the training-step and generation benchmarks compare, in alternating rounds."""
    return ("ours", "transformers", "ours_before") if args.before else ("ours", "transformers")


def spread(values) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def alternating(runners: dict, rounds: int) -> dict[str, list[float]]:
    """`runners[name]()` returns a rate; each round runs all of them, the order rotating every round."""
    names, rates = list(runners), {name: [] for name in runners}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            rates[name].append(runners[name]())
    return rates


def report(title, rates, unit, extra_rows=()) -> dict:
    ratios = [o / t for o, t in zip(rates["ours"], rates["transformers"])]  # same round, same conditions
    print(f"\n{title}")
    for name, values in rates.items():
        print(f"  {name:<13} {statistics.median(values):>12,.0f} {unit} (rounds: {', '.join(f'{v:,.0f}' for v in values)})")
    for row in extra_rows:
        print(f"  {row}")
    print(f"  ratio ours / transformers: {spread(ratios)}  (median [min-max] of per-round ratios)")
    result = {"unit": unit, "rates": rates, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
              "ratio_max": max(ratios)}  # fmt: skip
    if "ours_before" in rates:
        before = [b / t for b, t in zip(rates["ours_before"], rates["transformers"])]
        after_before = [o / b for o, b in zip(rates["ours"], rates["ours_before"])]
        print(f"  ratio ours_before / transformers: {spread(before)}; ours / ours_before: {spread(after_before)}")
        result["before"] = {"ratio_median": statistics.median(before), "ratio_min": min(before), "ratio_max": max(before),
                            "after_over_before": statistics.median(after_before)}  # fmt: skip
    return result


# --- 1. training step ------------------------------------------------------------------------------


def train_step_runner(model, batch, steps, device="cpu", autocast=None):
    """Forward + backward + AdamW on `batch` (labels = inputs, the library's API for both models)."""
    model.train().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    batch = batch.to(device)

    def step():
        with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def run() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        return batch.numel() * steps / (time.perf_counter() - started)

    step()  # warm-up: allocator, optimizer state, compilation
    step()
    return run


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from a parent)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024  # KiB


def train_step_peak_rss(kind: str, shape_name: str, batch_size: int, seq_len: int) -> float:
    """Peak RSS of a fresh process that builds the model and runs three training steps."""
    code = (
        f"import sys; sys.argv = ['x']; sys.path.insert(0, {str(REPO / 'bench')!r})\n"
        f"import torch, bench_speed as b\n"
        f"model = b.build({kind!r}, b.SHAPES[{shape_name!r}])\n"
        f"batch = torch.randint(0, b.SHAPES[{shape_name!r}]['vocab_size'], ({batch_size}, {seq_len}))\n"
        f"b.train_step_runner(model, batch, steps=1)()\n"
        f"print(b.peak_rss_mib())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def bench_train_step(args) -> dict:
    results = {}
    for shape_name in ("small_vocab", "gpt2_vocab"):
        shape = SHAPES[shape_name]
        batch = torch.randint(0, shape["vocab_size"], (8, 256), generator=torch.Generator().manual_seed(0))
        runners = {kind: train_step_runner(build(kind, shape, args.before), batch, args.steps) for kind in kinds(args)}
        rates = alternating(runners, args.rounds)
        memory = {kind: train_step_peak_rss(kind, shape_name, 8, 256) for kind in ("ours", "transformers")}
        rows = [f"peak RSS (MiB): ours {memory['ours']:,.0f}, transformers {memory['transformers']:,.0f}"]
        title = f"1. training step, fp32 CPU, {shape_name}: {shape}, batch 8 x 256"
        results[shape_name] = {**report(title, rates, "tokens/s", rows), "peak_rss_mib": memory, "shape": shape}
    return results


# --- 2. generation ---------------------------------------------------------------------------------


def generate_runner(model, input_ids, attention_mask, new_tokens):
    model.eval()
    model.generation_config.eos_token_id = None  # every run makes exactly `new_tokens` tokens

    @torch.no_grad()
    def run() -> float:
        started = time.perf_counter()
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)  # fmt: skip
        assert out.shape[1] == input_ids.shape[1] + new_tokens
        return input_ids.shape[0] * new_tokens / (time.perf_counter() - started)

    run()  # warm-up
    return run


def bench_generate(args) -> dict:
    results = {}
    shape = SHAPES["gpt2_vocab"]
    g = torch.Generator().manual_seed(0)
    for batch_size in (1, 8):
        input_ids = torch.randint(1, shape["vocab_size"], (batch_size, 32), generator=g)
        attention_mask = torch.ones_like(input_ids)
        for row in range(batch_size):  # left padding: prompts of 32, 29, 26, ... tokens
            attention_mask[row, : 3 * row] = 0
        runners = {kind: generate_runner(build(kind, shape, args.before), input_ids, attention_mask, args.new_tokens)
                   for kind in kinds(args)}  # fmt: skip
        title = f"2. generation with KV cache, greedy, {args.new_tokens} new tokens, batch {batch_size} (left-padded), gpt2_vocab"
        results[f"batch_{batch_size}"] = report(title, alternating(runners, args.rounds), "new tokens/s")
    return results


# --- 3. the training script ------------------------------------------------------------------------


def bench_script(args) -> dict:
    """train_accelerate.py end to end (small preset, built-in corpus): steady-state tokens/s from its
    metrics log against the bare training step of the same model and batch, and its peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "run"
        subprocess.run([sys.executable, str(REPO / "prepare_data.py"), "--vocab_size", "8192", "--output_dir", str(data)],
                       check=True, capture_output=True)  # fmt: skip
        steps = 25
        command = [sys.executable, str(REPO / "train_accelerate.py"), "--data_dir", str(data), "--output_dir", str(out),
                   "--model", "small", "--max_train_steps", str(steps), "--eval_steps", "0", "--checkpointing_steps", "0"]  # fmt: skip
        # Run in a process that reports its own peak RSS when the script returns.
        wrapper = (f"import runpy, sys; sys.path.insert(0, {str(REPO / 'bench')!r}); sys.argv = {command[1:]!r}; "
                   "runpy.run_path(sys.argv[0], run_name='__main__'); import bench_speed; print(bench_speed.peak_rss_mib())")  # fmt: skip
        finished = subprocess.run([sys.executable, "-c", wrapper], check=True, capture_output=True, text=True)
        peak = float(finished.stdout.split()[-1])
        _, rows = read_metrics(out / "metrics.jsonl")
        script_rates = [r["tokens_per_s"] for r in rows[5:-1]]  # after warm-up, before the final eval/export

        eot = dict(bos_token_id=8191, eos_token_id=8191)
        config = MiniGPTConfig.from_preset("small", vocab_size=8192, pad_vocab_size_multiple=64, **eot)
        bare = train_step_runner(MiniGPTForCausalLM(config), torch.randint(0, 8192, (16, 256)), steps=5)
        bare_rates = [bare() for _ in range(args.rounds)]
    ratio = statistics.median(script_rates) / statistics.median(bare_rates)
    print("\n3. train_accelerate.py end to end, small preset (6 x 384, vocab 8192), batch 16 x 256, fp32 CPU")
    print(f"  script steady state  {statistics.median(script_rates):>10,.0f} tokens/s  (steps 5-{steps - 2}: {spread(script_rates)})")
    print(f"  bare training step   {statistics.median(bare_rates):>10,.0f} tokens/s")
    print(f"  ratio script / bare step: {ratio:.3f} (what the loop costs: data, accumulate, clipping, logging)")
    print(f"  peak RSS of the training process: {peak:,.0f} MiB")
    return {"script_tokens_per_s": script_rates, "bare_tokens_per_s": bare_rates, "ratio": ratio, "peak_rss_mib": peak}


# --- 4. the training step's modes, with peers and the code before -------------------------------


def peer_models(args, shape) -> dict:
    """The step's peers at GPT-2's vocabulary: ours (50,257 padded to 50,304, as the training script builds
    it), ours at --before, transformers' GPT-2 (50,257) and, given its file, nanoGPT's model.py (50,304, its
    own padding). Each as (model, loss of a batch)."""
    eot = dict(bos_token_id=50256, eos_token_id=50256)
    config = dict(shape, vocab_size=50257, **NO_DROPOUT, **eot)

    def library_loss(model, batch):
        return model(input_ids=batch, labels=batch).loss

    torch.manual_seed(0)
    peers = {"ours": (MiniGPTForCausalLM(MiniGPTConfig(**config, pad_vocab_size_multiple=64)), library_loss)}
    if args.before:
        from revision import model_at

        before = model_at(args.before)
        torch.manual_seed(0)
        peers["ours_before"] = (before.MiniGPTForCausalLM(before.MiniGPTConfig(**config, pad_vocab_size_multiple=64)), library_loss)
    torch.manual_seed(0)
    peers["transformers"] = (GPT2LMHeadModel(GPT2Config(**config, attn_implementation="sdpa")), library_loss)
    if args.nanogpt:
        import importlib.util

        spec = importlib.util.spec_from_file_location("nanogpt_model", args.nanogpt)
        nanogpt = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(nanogpt)
        torch.manual_seed(0)
        gpt = nanogpt.GPT(nanogpt.GPTConfig(block_size=shape["n_positions"], vocab_size=50304, n_layer=shape["n_layer"],
                                            n_head=shape["n_head"], n_embd=shape["n_embd"], dropout=0.0, bias=True))  # fmt: skip

        def nanogpt_loss(model, batch):  # the same 255 predictions a row as the library's shifted labels
            return model(batch, torch.cat([batch[:, 1:], torch.full_like(batch[:, :1], -1)], 1))[1]

        peers["nanogpt"] = (gpt, nanogpt_loss)
    return peers


def mode_runner(model, loss_of, batch, steps, compiled, autocast):
    """Forward + backward + AdamW on `batch`, eager or compiled (a fresh graph, fixed shape), fp32 or bf16."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model, dynamic=False) if compiled else model

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of(forward, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def run() -> float:
        started = time.perf_counter()
        for _ in range(steps):
            step()
        return batch.numel() * steps / (time.perf_counter() - started)

    step()  # warm-up: compilation, the allocator, the optimizer's state
    step()
    return run


def bench_train_modes(args) -> dict:
    """The training step at GPT-2's vocabulary (6 x 384, batch 8 x 256), eager and compiled, fp32 and bf16
    autocast: ours against each peer, in alternating rounds, per mode."""
    shape = SHAPES["gpt2_vocab"]
    batch = torch.randint(0, 50257, (8, 256), generator=torch.Generator().manual_seed(0))
    results = {}
    for compiled in (False, True):
        for autocast in (False, True):
            mode = f"{'compiled' if compiled else 'eager'}_{'bf16' if autocast else 'fp32'}"
            torch._dynamo.reset()
            runners = {name: mode_runner(model, loss_of, batch, args.steps, compiled, autocast)
                       for name, (model, loss_of) in peer_models(args, shape).items()}  # fmt: skip
            rates = alternating(runners, args.rounds)
            print(f"\n4. training step, {mode}, GPT-2's vocabulary (6 x 384), batch 8 x 256")
            for name, values in rates.items():
                print(f"  {name:<13} {statistics.median(values):>8,.0f} tokens/s (rounds: {', '.join(f'{v:,.0f}' for v in values)})")
            ratios = {}
            for peer in [name for name in rates if name != "ours"]:
                per_round = [o / p for o, p in zip(rates["ours"], rates[peer])]
                ratios[peer] = {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round)}
                print(f"  ours / {peer}: {spread(per_round)}")
            results[mode] = {"rates": rates, "ratios": ratios}
            del runners
    return results


BENCHMARKS = {"train_step": bench_train_step, "generate": bench_generate, "script": bench_script, "modes": bench_train_modes}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=list(BENCHMARKS), action="append", help="repeatable (default: all)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=3, help="training steps per round and model (CPU)")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--before", default=None, help="also our model as it was at this git revision (not in script)")
    p.add_argument("--nanogpt", default=None, help="modes: also nanoGPT's model.py, from this path (not shipped)")
    p.add_argument("--output", default=None, help="default: bench/results/speed-<date>.json")
    args = p.parse_args()
    info = machine()
    print(f"{info['processor']}, {info['cpu_count']} threads, torch {info['torch']}, transformers {info['transformers']}")
    write_report("speed", {name: BENCHMARKS[name](args) for name in args.only or BENCHMARKS}, args.output)


if __name__ == "__main__":
    main()
