"""The Python parts of bench/gpu_check.sh, one per `--only`: each writes RESULTS/<check>.json when it ends
(temporary name, then rename), so a run cut short keeps what was measured before it.

    python bench/gpu_check.py --results DIR --only kernels      # what bench/roofline.py assumes: GEMMs, HBM
    python bench/gpu_check.py --results DIR --only speed        # ours vs transformers' GPT-2, both compiled
    python bench/gpu_check.py --results DIR --only attention    # the SDPA kernel that runs; cuDNN vs flash
    python bench/gpu_check.py --results DIR --only losses       # the loss kinds: time, memory, the estimate
    python bench/gpu_check.py --results DIR --only estimates --data_dir D --batch 64   # warms the estimate cache
    python bench/gpu_check.py --results DIR --model tiny --seq_len 32 --batch 2 --only speed   # the CPU dry run

GPT-2 124M at T = 1024, bf16 autocast, fused AdamW (on CUDA), one fixed micro-batch per compiled model (a new
compile for each, after a dynamo reset: no dynamic-shape recompiles).
"""

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from attention_backends import preferred_backends, preferring  # noqa: E402
from configuration_minigpt import MiniGPTConfig  # noqa: E402
from loss_minigpt import causal_lm_loss  # noqa: E402
from memory_estimate import Estimates, GiB  # noqa: E402
from metrics import device_peak_flops, machine, model_flops_per_token, peak_bf16_flops  # noqa: E402
from modeling_minigpt import MiniGPTForCausalLM  # noqa: E402


class Results:
    """RESULTS/<check>.json; a failed check is recorded there with its traceback."""

    def __init__(self, directory: Path, name: str):
        self.path = directory / f"{name}.json"
        self.data = {"machine": machine(), "steps": {}}

    def record(self, name: str, run):
        started = time.perf_counter()
        try:
            self.data["steps"][name] = {"ok": True, **run()}
        except Exception as error:  # noqa: BLE001  one failed check must not cost the others their time
            self.data["steps"][name] = {"ok": False, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        self.data["steps"][name]["seconds"] = round(time.perf_counter() - started, 2)
        print(f"{name}: {json.dumps(self.data['steps'][name])[:600]}", flush=True)
        self.save()

    def save(self):
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(self.data, indent=1, default=str))
        temporary.replace(self.path)


def guarded(out: dict, name: str, measure) -> bool:
    """out[name] = measure(), or, where it raises, the error beside the other numbers: one model or mode that fails
    costs the others nothing. True where it ran."""
    try:
        out[name] = measure()
        return True
    except Exception as error:  # noqa: BLE001
        out[name] = {"error": f"{type(error).__name__}: {str(error)[:2000]}", "traceback": traceback.format_exc()[-6000:]}
        print(f"  {name} failed: {out[name]['error'][:400]}", flush=True)
        return False


def recipe_config(args) -> MiniGPTConfig:
    return MiniGPTConfig.from_preset(args.model, vocab_size=50257, pad_vocab_size_multiple=64)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def fresh_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


def stepper(model, args, device, loss_of=None):
    """One optimizer step of `model` on a fixed random batch, as the recipe trains: bf16 autocast, fused AdamW
    (on CUDA), clipping, the training script's attention preference."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = torch.randint(0, 50257, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0)).to(device)
    backends = preferred_backends(device)

    def step():
        with preferring(backends), torch.autocast(device.type, dtype=torch.bfloat16):
            if loss_of is not None:
                loss = loss_of(batch)
            else:
                loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss  # the library's API, both models
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def timed(step, device, steps: int) -> float:
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - started) / steps


def ours(args, device):
    torch.manual_seed(0)
    return MiniGPTForCausalLM(recipe_config(args)).to(device).train()


def theirs(args, device):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = recipe_config(args)
    gpt2 = GPT2Config(vocab_size=50257, n_positions=config.n_positions, n_embd=config.n_embd, n_layer=config.n_layer,
                      n_head=config.n_head, attn_implementation="sdpa")  # fmt: skip
    return GPT2LMHeadModel(gpt2).to(device).train()


def speed(args, device) -> dict:
    """Ours against transformers' GPT2LMHeadModel, both compiled, at one micro-batch, in alternating rounds. Each
    model compiles and times under its own guard: one that fails is recorded with its error, the other timed."""
    out, steps = {"batch": args.batch}, {}
    for name, build in (("ours", ours), ("transformers", theirs)):

        def warm():
            torch._dynamo.reset()
            fresh_peak(device)
            step = stepper(torch.compile(build(args, device)), args, device)
            started = time.perf_counter()
            for _ in range(2):  # compilation, then the optimizer's state
                step()
            synchronize(device)
            steps[name] = step
            return {"compile_and_warmup_s": time.perf_counter() - started, "peak_gib": peak_gib(device)}

        if guarded(out, name, warm):
            print(f"  {name}: compiled and warm in {out[name]['compile_and_warmup_s']:.0f} s, peak {out[name]['peak_gib']} GiB", flush=True)
    seconds = {name: [] for name in steps}
    for r in range(args.rounds):
        for name in list(seconds)[r % 2 :] + list(seconds)[: r % 2]:
            if name in steps:
                try:
                    seconds[name].append(timed(steps[name], device, args.steps))
                except Exception as error:  # noqa: BLE001  the other model's rounds go on
                    out[name]["error"] = f"{type(error).__name__}: {str(error)[:2000]}"
                    del steps[name]
    tokens = args.batch * args.seq_len
    peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    flops = model_flops_per_token(recipe_config(args), args.seq_len)
    for name, values in seconds.items():
        if values:
            rate = tokens / statistics.median(values)
            out[name].update(tokens_per_s=rate, rounds_tokens_per_s=[tokens / v for v in values], mfu=rate * flops / peak if peak else None)
    if len(seconds) == 2 and all(len(v) == args.rounds for v in seconds.values()):
        ratios = [t / o for o, t in zip(seconds["ours"], seconds["transformers"])]
        out["ratio_ours_to_transformers"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    return out


def kernels(args, device) -> dict:
    """What bench/roofline.py assumes, measured: bf16 GEMM efficiency (of the dense bf16 peak) at the training step's
    shapes (the LM head padded to a multiple of 64 and at the vocabulary itself), and the bandwidth an elementwise
    kernel reaches (a bf16 add of two 0.5 GiB tensors: three tensors' bytes)."""
    config = recipe_config(args)
    rows, C, V = args.batch * args.seq_len, config.n_embd, config.vocab_size
    shapes = {"qkv": (rows, C, 3 * C), "attention_proj": (rows, C, C), "mlp_fc": (rows, C, 4 * C),
              "mlp_proj": (rows, 4 * C, C), "head": (rows, C, config.padded_vocab_size), "head_unpadded": (rows, C, V),
              "head_weight_grad": (config.padded_vocab_size, rows, C)}  # fmt: skip
    peak = device_peak_flops(device)
    out = {"peak_bf16_flops": peak}
    repeats, rounds = (10, 3) if device.type == "cuda" else (1, 1)  # the CPU dry run only shows the check runs
    for name, (m, k, n) in shapes.items():
        a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        b = torch.randn(k, n, device=device, dtype=torch.bfloat16)
        seconds = min(timed(lambda: a @ b, device, repeats) for _ in range(rounds))
        out[name] = {"shape": [m, k, n], "tflops": 2 * m * k * n / seconds / 1e12,
                     "efficiency": 2 * m * k * n / seconds / peak if peak else None}  # fmt: skip
    x, y = (torch.randn(2**28 if device.type == "cuda" else 2**20, device=device, dtype=torch.bfloat16) for _ in range(2))
    seconds = min(timed(lambda: x + y, device, repeats) for _ in range(rounds))
    out["elementwise_gb_per_s"] = 3 * x.numel() * x.element_size() / seconds / 1e9
    print(f"  {out}", flush=True)
    return out


def attention(args, device) -> dict:
    """Which SDPA kernel the training step runs (the profiler's kernel names, under the training script's
    preference), and each backend alone at the training shape, forward and backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {"preference": [b.name for b in preferred_backends(device) or []]}
    config = recipe_config(args)
    shape = (args.batch, config.n_head, args.seq_len, config.n_embd // config.n_head)
    q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def fwd_bwd():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                fwd_bwd()
                out[backend.name.lower() + "_ms"] = 1000 * timed(fwd_bwd, device, 10)
        except RuntimeError as error:  # not available on this device or for this shape
            out[backend.name.lower() + "_ms"] = f"unavailable: {str(error).splitlines()[0]}"
    if device.type == "cuda":

        def kernels_that_ran():
            step = stepper(ours(args, device), args, device)
            step()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
                step()
                synchronize(device)
            words = ("flash", "cudnn", "fmha", "attention", "sdpa")
            return sorted({e.name for e in profile.events() if any(w in e.name.lower() for w in words)})[:20]

        guarded(out, "kernels_that_ran", kernels_that_ran)
    return out


def plain_loss(model, batch):
    """The loss through full (B, T, V) logits, as a wrapped head (PEFT) or a naive loop computes it."""
    hidden = model.transformer(input_ids=batch[:, :-1], use_cache=False).last_hidden_state
    return causal_lm_loss(model.lm_head(hidden), shift_labels=batch[:, 1:])


def losses(args, device) -> dict:
    """The loss kinds at one micro-batch: ms a step and peak memory; the chunked ones against the estimate."""
    out = {"batch": args.batch}
    config = recipe_config(args)
    for kind in ("compiled_plain", "chunked", "plain"):

        def measure():
            torch._dynamo.reset()
            fresh_peak(device)
            model = ours(args, device)
            if kind == "compiled_plain":
                compiled = torch.compile(lambda batch: plain_loss(model, batch))
                step = stepper(model, args, device, loss_of=compiled)
            elif kind == "plain":
                step = stepper(model, args, device, loss_of=lambda batch: plain_loss(model, batch))
            else:
                step = stepper(model, args, device, loss_of=lambda batch: model(input_ids=batch[:, :-1], shift_labels=batch[:, 1:]).loss)
            started = time.perf_counter()
            step(), step()
            synchronize(device)
            warm = time.perf_counter() - started
            result = {"ms_per_step": 1000 * timed(step, device, args.steps), "warmup_s": warm, "peak_gib": peak_gib(device)}
            if kind == "chunked":
                result["estimate_gib"] = Estimates(config, args.seq_len)(args.batch) / GiB  # cached by `estimates`
            return result

        if guarded(out, kind, measure):  # each kind alone: one that fails (out of memory) costs the others nothing
            print(f"  {kind}: {out[kind]}", flush=True)
    return out


def estimates(args, device) -> dict:
    """The memory estimates the training runs of the device check will ask for, made ahead (on the CPU, beside
    the GPU's work) so that their starts find them cached."""
    from token_shards import read_meta

    meta = read_meta(args.data_dir)
    eot = meta["eot_token_id"]
    config = MiniGPTConfig.from_preset(args.model, vocab_size=meta["vocab_size"], bos_token_id=eot, eos_token_id=eot,
                                       pad_vocab_size_multiple=64)  # fmt: skip
    out = {}
    for compiled in (True, False):
        estimate = Estimates(config, args.seq_len, compiled, "single", 1, torch.bfloat16)
        out["compiled" if compiled else "eager"] = {"batch": args.batch, "gib": estimate(args.batch) / GiB, "made": estimate.made}
    return out


CHECKS = {"kernels": kernels, "speed": speed, "attention": attention, "losses": losses, "estimates": estimates}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="directory for <check>.json")
    p.add_argument("--only", choices=list(CHECKS), required=True)
    p.add_argument("--model", default="124M")
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data_dir", help="for --only estimates: the shards the training runs read")
    args = p.parse_args(argv)
    Path(args.results).mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    results = Results(Path(args.results), args.only)
    results.record(args.only, lambda: CHECKS[args.only](args, device))
    return 0 if results.data["steps"][args.only]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
