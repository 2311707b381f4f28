"""Peak memory per GPU of a training step, estimated on CPU with no GPU (memory_estimate.py: fake tensors and
torch's MemTracker), for the GPT-2 family against 40 and 80 GB cards.

    python bench/bench_memory.py                      # the table: presets x micro-batches x eager/compiled x DDP/FSDP
    python bench/bench_memory.py --check              # the estimator against peaks measured here, at small sizes

The table assumes the recipe: T = 1024, bf16 autocast, fused AdamW, the chunked loss, DDP over 8 processes
(its gradient buckets included) or FSDP2 over 8. `--check` runs real fp32 steps on this CPU, each in a fresh
process, and compares the rise in its peak resident memory with the estimate for the same step.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configuration_minigpt import MiniGPTConfig  # noqa: E402
from memory_estimate import GiB, per_process, step_memory  # noqa: E402
from report import write_report  # noqa: E402

PRESETS = ("124M", "350M", "774M", "1558M")
CARDS = {"A100 40GB": 40e9, "80 GB (A100/H100)": 80e9}

# A real step on this CPU, in a fresh process: the rise of its resident memory's high-water mark over the
# RSS after the imports. (Not ru_maxrss: a child inherits its parent's across fork and exec, so under a large
# parent, pytest, the rise read 0.) Writing 5 to clear_refs restarts the mark at the current RSS.
MEASURE = """
import sys, torch
sys.path.insert(0, {repo!r})
from configuration_minigpt import MiniGPTConfig
from modeling_minigpt import MiniGPTForCausalLM

def status(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

with open("/proc/self/clear_refs", "w") as marks:
    marks.write("5")
before = status("VmRSS")
model = MiniGPTForCausalLM(MiniGPTConfig(**{config!r})).train()
optimizer = torch.optim.AdamW(model.parameters(), fused=True)
windows = torch.randint(0, {vocab}, ({batch}, {seq_len} + 1))
for _ in range(2):
    model(input_ids=windows[:, :-1], shift_labels=windows[:, 1:]).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
print((status("VmHWM") - before) * 1024)
"""
CHECKS = [  # (config, batch, seq_len): big enough that the allocator's own overhead is small
    (dict(n_layer=4, n_head=4, n_embd=256, n_positions=256, vocab_size=8192, bos_token_id=0, eos_token_id=0), 16, 256),
    (dict(n_layer=6, n_head=6, n_embd=384, n_positions=256, vocab_size=50304, bos_token_id=0, eos_token_id=0), 8, 256),
    (dict(n_layer=6, n_head=6, n_embd=384, n_positions=512, vocab_size=50304, bos_token_id=0, eos_token_id=0), 16, 512),
]


def table(batches: list[int], world_size: int) -> list[dict]:
    rows = []
    for preset in PRESETS:
        config = MiniGPTConfig.from_preset(preset, vocab_size=50257, pad_vocab_size_multiple=64)
        for batch in batches:
            started = time.perf_counter()
            memory = step_memory(config, batch, 1024, compiled=True)
            for compiled in (False, True):
                row = {"preset": preset, "batch": batch, "compiled": compiled}
                for strategy in ("ddp", "fsdp"):
                    row[f"{strategy}_gib"] = per_process(memory, compiled, strategy, world_size) / GiB
                rows.append(row)
                print(f"{preset:>6} {batch:>4} {'compiled' if compiled else 'eager':>9}  DDP {row['ddp_gib']:6.1f} GiB"
                      f"  FSDP/{world_size} {row['fsdp_gib']:6.1f} GiB  ({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    return rows


def measured_and_estimated(config: dict, batch: int, seq_len: int) -> dict:
    script = MEASURE.format(repo=str(REPO), config=config, vocab=config["vocab_size"], batch=batch, seq_len=seq_len)
    measured = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    estimated = per_process(step_memory(MiniGPTConfig(**config), batch, seq_len, autocast=None), False, "single", 1)
    print(f"{config['n_layer']}x{config['n_embd']} V={config['vocab_size']} B={batch} T={seq_len}: measured "
          f"{measured / 2**20:,.0f} MiB, estimated {estimated / 2**20:,.0f} MiB ({estimated / measured:.2f}x)")  # fmt: skip
    return {"config": config, "batch": batch, "seq_len": seq_len, "measured_mib": measured / 2**20,
            "estimated_mib": estimated / 2**20, "ratio": estimated / measured}  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only the estimator against measured CPU peaks")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--world_size", type=int, default=8)
    p.add_argument("--output", default=None, help="default: bench/results/memory-<date>.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # fake tensors do no arithmetic; the real steps of --check are small
    report = {"check": [measured_and_estimated(*check) for check in CHECKS]}
    if not args.check:
        report["table"] = table(args.batches, args.world_size)
        report["cards"] = CARDS
    write_report("memory", report, args.output)


if __name__ == "__main__":
    main()
