"""Speed of MiniGPT against transformers' GPT2LMHeadModel (SDPA attention), measured in one process with
the same config, data, dtype and thread count, in alternating rounds (who goes first alternates).

    python bench/bench_speed.py                       # all CPU benchmarks (~10 min on 2 cores)
    python bench/bench_speed.py --only train_step     # train_step | generate | script | gpu
    python bench/bench_speed.py --only gpu            # GPT-2 124M, T=1024, bf16, eager and compiled (CUDA)

Each benchmark prints a table with the median ratio ours / transformers and its spread over rounds, and
everything goes to bench/results/speed-<date>.json with the machine and versions. Peak memory is the peak RSS
of a fresh process doing the same steps (CPU) or torch.cuda.max_memory_allocated (GPU).
"""

import argparse
import gc
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
from metrics import machine, model_flops_per_token, peak_bf16_flops, read_metrics  # noqa: E402
from report import write_report  # noqa: E402

# The issue's CPU shapes: a small vocabulary, where the blocks dominate, and GPT-2's, where the
# lm_head and the loss do.
SHAPES = {
    "small_vocab": dict(n_layer=4, n_head=4, n_embd=256, vocab_size=8192, n_positions=256),
    "gpt2_vocab": dict(n_layer=6, n_head=6, n_embd=384, vocab_size=50304, n_positions=256),
    "gpt2_124M": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, n_positions=1024),
}
NO_DROPOUT = dict(embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)


def build(kind: str, shape: dict):
    torch.manual_seed(0)
    eot = dict(bos_token_id=shape["vocab_size"] - 1, eos_token_id=shape["vocab_size"] - 1)
    if kind == "ours":
        return MiniGPTForCausalLM(MiniGPTConfig(**shape, **NO_DROPOUT, **eot))
    return GPT2LMHeadModel(GPT2Config(**shape, **NO_DROPOUT, **eot, attn_implementation="sdpa"))


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
    return {"unit": unit, "rates": rates, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


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
        runners = {kind: train_step_runner(build(kind, shape), batch, args.steps) for kind in ("ours", "transformers")}
        rates = alternating(runners, args.rounds)
        memory = {kind: train_step_peak_rss(kind, shape_name, 8, 256) for kind in runners}
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
        runners = {kind: generate_runner(build(kind, shape), input_ids, attention_mask, args.new_tokens)
                   for kind in ("ours", "transformers")}  # fmt: skip
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


# --- 4. GPU ----------------------------------------------------------------------------------------


def gpu_runners(shape, batch_size, compiled, steps) -> dict:
    runners = {}
    for kind in ("ours", "transformers"):
        model = build(kind, shape).cuda()
        batch = torch.randint(0, shape["vocab_size"], (batch_size, 1024))
        runners[kind] = train_step_runner(torch.compile(model) if compiled else model, batch, steps, "cuda", torch.bfloat16)
    return runners


def bench_gpu(args) -> dict:
    """GPT-2 124M, T=1024, bf16 autocast, fused AdamW, eager and torch.compile, the largest micro-batch
    of args.gpu_batches that fits. MFU against the GPU's dense bf16 peak (H100 SXM: 989 TFLOP/s)."""
    if not torch.cuda.is_available():
        print("\n4. GPU: no CUDA device here; skipped")
        return {"skipped": "no CUDA device"}
    name = torch.cuda.get_device_name()
    peak = peak_bf16_flops(name)
    shape = SHAPES["gpt2_124M"]
    flops_per_token = model_flops_per_token(MiniGPTConfig(**shape), 1024)
    results = {"device": name, "peak_flops": peak}
    for compiled in (False, True):
        for batch_size in args.gpu_batches:
            try:
                runners = gpu_runners(shape, batch_size, compiled, args.gpu_steps)
                rates = alternating(runners, args.rounds)
            except torch.OutOfMemoryError:
                runners = None
            if runners is None:  # outside `except`: the failed attempt's tensors are released by now
                gc.collect()
                torch.cuda.empty_cache()
                continue
            memory = {}
            for kind, runner in runners.items():  # what one step needs above the resident weights and states
                resident = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                runner()
                memory[kind] = (torch.cuda.max_memory_allocated() - resident) / 2**30
            mfu = {kind: statistics.median(r) * flops_per_token / peak for kind, r in rates.items()} if peak else {}
            rows = ["step peak above resident memory (GiB): " + ", ".join(f"{k} {v:.1f}" for k, v in memory.items()),
                    "MFU: " + ", ".join(f"{k} {v:.1%}" for k, v in mfu.items())]  # fmt: skip
            mode = "compiled" if compiled else "eager"
            title = f"4. {name}, GPT-2 124M, batch {batch_size} x 1024, bf16 autocast, {mode}"
            results[mode] = {**report(title, rates, "tokens/s", rows), "batch_size": batch_size,
                             "step_peak_gib": memory, "mfu": mfu}  # fmt: skip
            del runners
            break
    return results


BENCHMARKS = {"train_step": bench_train_step, "generate": bench_generate, "script": bench_script, "gpu": bench_gpu}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=list(BENCHMARKS), action="append", help="repeatable (default: all)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=3, help="training steps per round and model (CPU)")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--gpu_steps", type=int, default=10)
    p.add_argument("--gpu_batches", type=int, nargs="+", default=[64, 48, 32, 16, 8])
    p.add_argument("--output", default=None, help="default: bench/results/speed-<date>.json")
    args = p.parse_args()
    info = machine()
    print(f"{info['processor']}, {info['cpu_count']} threads, torch {info['torch']}, transformers {info['transformers']}")
    write_report("speed", {name: BENCHMARKS[name](args) for name in args.only or BENCHMARKS}, args.output)


if __name__ == "__main__":
    main()
