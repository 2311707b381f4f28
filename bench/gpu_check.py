"""The Python part of bench/gpu_check.sh: the CUDA branches, and the loss at GPU sizes against the memory
estimate. Every finished step is written to RESULTS/gpu_check.json at once, so a run cut short by its time
limit still leaves what it measured.

    python bench/gpu_check.py --results DIR                        # GPT-2 124M, T = 1024, micro-batch 16/32/64
    python bench/gpu_check.py --results DIR --model tiny --seq_len 32 --batches 2 4    # the CPU dry run
"""

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from configuration_minigpt import MiniGPTConfig  # noqa: E402
from memory_estimate import GiB, estimate_peak_bytes  # noqa: E402
from loss_minigpt import causal_lm_loss  # noqa: E402
from metrics import machine, peak_bf16_flops  # noqa: E402
from modeling_minigpt import MiniGPTForCausalLM  # noqa: E402


class Results:
    """gpu_check.json, rewritten whole after every step (temporary name, then rename)."""

    def __init__(self, directory: Path):
        self.path = directory / "gpu_check.json"
        self.data = {"machine": machine(), "steps": {}}
        self.save()

    def record(self, name: str, run):
        started = time.perf_counter()
        try:
            self.data["steps"][name] = {"ok": True, **run()}
        except Exception as error:  # noqa: BLE001  one failed check must not cost the others their time
            self.data["steps"][name] = {"ok": False, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        self.data["steps"][name]["seconds"] = round(time.perf_counter() - started, 2)
        print(f"{name}: {json.dumps(self.data['steps'][name])[:500]}", flush=True)
        self.save()

    def save(self):
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(self.data, indent=1, default=str))
        temporary.replace(self.path)


def recipe_config(args) -> MiniGPTConfig:
    return MiniGPTConfig.from_preset(args.model, vocab_size=50257, pad_vocab_size_multiple=64)


def model_for(args, device) -> MiniGPTForCausalLM:
    torch.manual_seed(0)
    return MiniGPTForCausalLM(recipe_config(args)).to(device).train()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def environment(device) -> dict:
    info = {"device": str(device), "cuda": torch.version.cuda, "bf16_supported": torch.cuda.is_available() and torch.cuda.is_bf16_supported()}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        free, total = torch.cuda.mem_get_info(device)
        info |= {"name": name, "peak_bf16_flops": peak_bf16_flops(name), "free_gib": free / GiB, "total_gib": total / GiB,
                 "capability": torch.cuda.get_device_capability(device)}  # fmt: skip
    return info


def fused_adamw_equals_default(args, device) -> dict:
    """The optimizer branch the training script takes on CUDA (fused) against the default, five steps."""
    weights = []
    for fused in (True, False):
        model = model_for(args, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=fused)
        for step in range(5):
            x = torch.randint(0, 50257, (2, args.seq_len + 1), generator=torch.Generator().manual_seed(step)).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                model(input_ids=x[:, :-1], shift_labels=x[:, 1:]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    return {"max_abs_difference": (weights[0] - weights[1]).abs().max().item()}


def flash_attention_trains(args, device) -> dict:
    """Training forward and backward with SDPA restricted to FlashAttention: it raises if any call does not
    meet flash's conditions (is_causal, no mask, bf16)."""
    if device.type != "cuda":
        return {"skipped": "FlashAttention is a CUDA kernel"}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = model_for(args, device)
    x = torch.randint(0, 50257, (2, args.seq_len + 1), device=device)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        model(input_ids=x[:, :-1], shift_labels=x[:, 1:]).loss.backward()
    return {"flash": True}


def plain_loss(model, x):
    """The loss through full (B, T, V) logits, as a PEFT-wrapped head or a naive loop computes it."""
    hidden = model.transformer(input_ids=x[:, :-1], use_cache=False).last_hidden_state
    logits = model.lm_head(hidden)[..., : model.config.vocab_size]
    return causal_lm_loss(logits, shift_labels=x[:, 1:])


def losses_at_batch(args, device, batch) -> dict:
    """Chunked (eager), plain and compiled steps at one micro-batch: ms a step, peak memory, the estimate."""
    out = {kind: loss_step(args, device, batch, kind) for kind in ("chunked", "plain", "compiled")}
    for kind in ("chunked", "compiled"):
        out[kind]["estimate_gib"] = estimate_peak_bytes(recipe_config(args), batch, args.seq_len, kind == "compiled") / GiB
    return out


def loss_step(args, device, batch, kind) -> dict:
    model = model_for(args, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_model = torch.compile(model) if kind == "compiled" else model
    x = torch.randint(0, 50257, (batch, args.seq_len + 1), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = plain_loss(model, x) if kind == "plain" else step_model(input_ids=x[:, :-1], shift_labels=x[:, 1:]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(2):  # warm-up: compilation, the optimizer's state
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    synchronize(device)
    seconds = time.perf_counter() - started
    row = {"ms_per_step": 1000 * seconds / args.steps, "tokens_per_s": batch * args.seq_len * args.steps / seconds,
           "loss": loss.item()}  # fmt: skip
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / GiB
    return row  # the model and optimizer go with this frame, before the next kind is built


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="directory for gpu_check.json")
    p.add_argument("--model", default="124M")
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--steps", type=int, default=5, help="timed steps per loss and batch")
    args = p.parse_args(argv)
    Path(args.results).mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    results = Results(Path(args.results))
    results.record("environment", lambda: environment(device))
    results.record("fused_adamw", lambda: fused_adamw_equals_default(args, device))
    results.record("flash_attention", lambda: flash_attention_trains(args, device))
    for batch in args.batches:
        results.record(f"loss_batch_{batch}", lambda: losses_at_batch(args, device, batch))
    failed = [name for name, step in results.data["steps"].items() if not step["ok"]]
    print(f"wrote {results.path}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
