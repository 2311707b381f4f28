"""Train MiniGPT with a hand-written Accelerate loop.

    python prepare_data.py --vocab_size 8192 && python train_accelerate.py          # CPU quick start
    accelerate launch --config_file accelerate_configs/8xa100.yaml train_accelerate.py \\
        --data_dir data/fineweb-edu --model 124M --total_batch_size 524288 \\
        --per_device_train_batch_size 64 --seq_len 1024 --max_train_steps 19073 --num_warmup_steps 715

One optimizer step sees `--total_batch_size` tokens: micro-batches of `--per_device_train_batch_size`
windows per process, accumulated (DDP syncs only on the last micro-step). AdamW with decay on 2-D
weights (or, with `--optimizer muon`, Muon for the blocks' matrices and AdamW for the rest), clipping,
linear warmup then cosine to 10% of the peak, as GPT-3. Checkpoints hold model, optimizers, every
process's RNG, the step and the data position, so a resumed run continues exactly.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import set_seed
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from tqdm import tqdm
from transformers import AutoTokenizer, GenerationConfig

from checkpoints import (check_shared_filesystem, checkpoint_candidates, load_checkpoint, lock_output_dir,
                         save_checkpoint, save_tied_head_once)  # fmt: skip
from configuration_minigpt import PRESETS, MiniGPTConfig
from eval_hellaswag import evaluate_hellaswag, load_examples, val_loss
from memory_estimate import MARGIN, GiB, estimate_peak_bytes, largest_micro_batch
from export_gpt2 import export_gpt2
from modeling_minigpt import MiniGPTForCausalLM
from token_shards import ShardedTokens, ShardError, read_meta, tokenizer_sha256, verify_shards, write_atomically

OPENAI_GPT2 = {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}  # `--model` names for OpenAI's weights
GPT2_124M_HELLASWAG = 0.2955  # completion-style acc_norm, full val split (build-nanogpt / llm.c)
# Dense bf16 peak per GPU, for MFU, by what torch.cuda.get_device_name says: the first match counts, so the
# H100's PCIe and NVL boards (lower clocks and power) come before the SXM part ("NVIDIA H100 80GB HBM3").
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="data/builtin", help="output of prepare_data.py")
    p.add_argument("--model", default="small",
                   help=f"a preset ({', '.join(PRESETS)}), a config/checkpoint path, or gpt2[-medium|-large|-xl] "
                        "(OpenAI's weights; a local GPT-2 directory works too with --from_gpt2)")  # fmt: skip
    p.add_argument("--from_gpt2", action="store_true", help="--model is a GPT2LMHeadModel directory or Hub id")
    p.add_argument("--pad_vocab_size_multiple", type=int, default=64, help="for new models: 50257 -> 50304")
    p.add_argument("--output_dir", default="runs/minigpt")
    p.add_argument("--seq_len", type=int, default=None, help="tokens per window (default: the model's context)")
    p.add_argument("--per_device_train_batch_size", type=micro_batch, default=16,
                   help="windows per process per micro-step, or auto: the largest whose estimated peak memory fits "
                        "the device (memory_estimate.py), the accumulation then derived from --total_batch_size")  # fmt: skip
    p.add_argument("--device_memory_gib", type=float, default=None,
                   help="memory the micro-batch must fit, per device (default: the GPU's free memory; on CPU "
                        "nothing is checked unless this is given)")  # fmt: skip
    p.add_argument("--total_batch_size", type=int, default=None,
                   help="tokens per optimizer step (524288 for the 124M recipe); sets the accumulation")  # fmt: skip
    p.add_argument("--gradient_accumulation_steps", type=int, default=1, help="used when no --total_batch_size")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="peak (6e-4 for the 124M recipe)")
    p.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine floor, as a fraction of the peak")
    p.add_argument("--weight_decay", type=float, default=0.1, help="decoupled, on 2-D weights (both optimizers)")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw",
                   help="muon: torch.optim.Muon for the blocks' matrices (c_attn, c_proj, c_fc), AdamW for the rest")
    p.add_argument("--muon_learning_rate", type=float, default=None,
                   help="Muon's peak lr (default: --learning_rate, which the match_rms_adamw adjustment carries over)")
    p.add_argument("--muon_momentum", type=float, default=0.95)
    p.add_argument("--muon_adjust_lr", choices=["match_rms_adamw", "original"], default="match_rms_adamw",
                   help="torch's per-shape lr scaling: 0.2 sqrt(max(A, B)) gives Muon's updates AdamW's RMS "
                        "(Moonshot); original: sqrt(max(1, A/B)) (Keller Jordan's, lr ~0.02)")  # fmt: skip
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--num_warmup_steps", type=int, default=15)
    p.add_argument("--max_train_steps", type=int, default=150)
    p.add_argument("--eval_steps", type=int, default=50, help="val loss and samples every N steps (0: only at the end)")
    p.add_argument("--eval_iters", type=int, default=10,
                   help="val batches per evaluation, shared by the processes (the val split must hold them)")  # fmt: skip
    p.add_argument("--hellaswag", default=None,
                   help="HellaSwag at every evaluation: Rowan/hellaswag or a local jsonl (default: none; offline)")  # fmt: skip
    p.add_argument("--hellaswag_limit", type=int, default=None, help="only the first N HellaSwag examples")
    p.add_argument("--sample_prompt", default="The", help="prompt for the generated samples")
    p.add_argument("--checkpointing_steps", type=int, default=50, help="0: no checkpoints")
    p.add_argument("--checkpoints_total_limit", type=int, default=2, help="keep the last K checkpoints")
    p.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint directory, or 'latest'")
    p.add_argument("--with_tracking", action="store_true")
    p.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all, ... (with --with_tracking)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    p.add_argument("--export_gpt2", action="store_true",
                   help="also write output_dir/final-gpt2: a native GPT2LMHeadModel folder (no remote code)")  # fmt: skip
    p.add_argument("--license", default="mit", help="the license the model card declares")
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_model_id", default=None)
    args = p.parse_args(attach_negative_values(sys.argv[1:] if argv is None else argv))
    positive = ["gradient_accumulation_steps", "max_train_steps", "eval_iters", "learning_rate", "max_grad_norm",
                "checkpoints_total_limit"]  # fmt: skip
    non_negative = ["num_warmup_steps", "eval_steps", "checkpointing_steps", "weight_decay"]
    optional_positive = ["seq_len", "total_batch_size", "hellaswag_limit", "muon_learning_rate", "device_memory_gib"]
    if args.per_device_train_batch_size != "auto":
        positive.append("per_device_train_batch_size")
    problems = [f"--{n} must be positive, got {getattr(args, n)}" for n in positive if not getattr(args, n) > 0]
    problems += [f"--{n} must be >= 0, got {getattr(args, n)}" for n in non_negative if not getattr(args, n) >= 0]
    problems += [f"--{n} must be positive, got {getattr(args, n)}" for n in optional_positive
                 if getattr(args, n) is not None and getattr(args, n) <= 0]  # fmt: skip
    if not 0 <= args.muon_momentum < 1:
        problems.append(f"--muon_momentum must be in [0, 1), got {args.muon_momentum}")
    if not 0 <= args.min_lr_ratio <= 1:
        problems.append(f"--min_lr_ratio is a fraction of the peak in [0, 1], got {args.min_lr_ratio}")
    if args.push_to_hub and not args.hub_model_id:
        problems.append("--push_to_hub needs --hub_model_id")
    if problems:
        p.error("; ".join(problems))
    args.output_dir = Path(args.output_dir)
    args.muon_learning_rate = args.muon_learning_rate or args.learning_rate
    return args


def micro_batch(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of windows or auto, got {text!r}") from None


def attach_negative_values(argv: list[str]) -> list[str]:
    """argparse reads `--learning_rate -1e-3` as a flag followed by another flag (it recognises only plain
    negative numbers such as -1 or -0.5); joined as `--learning_rate=-1e-3`, the value reaches validation."""
    joined = []
    for token in argv:
        if joined and joined[-1].startswith("--") and "=" not in joined[-1] and token.startswith("-"):
            try:
                float(token)
                joined[-1] = f"{joined[-1]}={token}"
                continue
            except ValueError:
                pass
        joined.append(token)
    return joined


# --- model and data --------------------------------------------------------------------------------


def build_model(args, meta) -> MiniGPTForCausalLM:
    """The model `--model` names, checked against the data's tokenizer before any step."""
    vocab, eot = meta["vocab_size"], meta["eot_token_id"]
    source = Path(args.model)
    if args.model in PRESETS:
        config = MiniGPTConfig.from_preset(args.model, vocab_size=vocab, bos_token_id=eot, eos_token_id=eot,
                                           pad_vocab_size_multiple=args.pad_vocab_size_multiple)  # fmt: skip
        return MiniGPTForCausalLM(config)
    if args.from_gpt2 or args.model in OPENAI_GPT2:
        hub_id = f"openai-community/{args.model}" if args.model in OPENAI_GPT2 else args.model
        model = MiniGPTForCausalLM.from_gpt2(hub_id)
    elif source.is_file():  # a config.json: a new model of that shape
        model = MiniGPTForCausalLM(MiniGPTConfig.from_json_file(source))
    elif (source / "config.json").exists():
        has_weights = any(source.glob("*.safetensors"))
        if has_weights:
            model = MiniGPTForCausalLM.from_pretrained(source)
        else:
            model = MiniGPTForCausalLM(MiniGPTConfig.from_pretrained(source))
        if has_weights and (source / "tokenizer.json").exists():
            if tokenizer_sha256(AutoTokenizer.from_pretrained(source)) != meta["tokenizer_sha256"]:
                raise ValueError(f"{args.data_dir} was tokenized with another tokenizer than the model {source} used")
    else:
        if source.is_dir():
            raise ValueError(f"--model {args.model} is a directory without config.json: not a saved model or checkpoint")
        raise ValueError(f"--model {args.model!r} is not a preset ({', '.join(PRESETS)}), gpt2*, or a config/checkpoint path")
    if model.config.vocab_size != vocab:
        raise ValueError(
            f"vocabulary mismatch: the model has vocab_size={model.config.vocab_size}, {args.data_dir} was "
            f"tokenized with {vocab} tokens; prepare the data with the model's tokenizer"
        )
    return model


def check_val_split(args, seq_len, world_size):
    """The val split must hold one batch per process and the `--eval_iters` batches evaluation reads."""
    val = ShardedTokens(args.data_dir, "val", args.per_device_train_batch_size, seq_len, 0, world_size)
    windows = sum(val.windows_per_shard)
    if args.eval_iters * args.per_device_train_batch_size > windows:
        raise ValueError(f"--eval_iters {args.eval_iters} x batch {args.per_device_train_batch_size} needs "
                         f"{args.eval_iters * args.per_device_train_batch_size} val windows of {seq_len + 1} tokens; "
                         f"{args.data_dir} has {windows}: lower --eval_iters or prepare more --val_tokens")  # fmt: skip


def accumulation_steps(args, world_size, seq_len) -> int:
    if args.total_batch_size is None:
        return args.gradient_accumulation_steps
    tokens_per_micro_step = args.per_device_train_batch_size * seq_len * world_size
    if args.total_batch_size % tokens_per_micro_step:
        raise ValueError(
            f"--total_batch_size {args.total_batch_size} is not a multiple of per_device_train_batch_size "
            f"{args.per_device_train_batch_size} x seq_len {seq_len} x {world_size} processes = {tokens_per_micro_step}"
        )
    return args.total_batch_size // tokens_per_micro_step


def fit_micro_batch(args, config, seq_len, accelerator) -> int:
    """The micro-batch to train with. `auto`: the largest whose estimated peak (memory_estimate.py) fits the
    device with MARGIN to spare, and that divides the windows of `--total_batch_size`. An explicit one whose
    estimate does not fit is refused, naming the largest that does. Unchecked where the device's memory is
    unknown (CPU without --device_memory_gib)."""
    free = args.device_memory_gib * GiB if args.device_memory_gib else None
    if free is None and accelerator.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(accelerator.device)
    if free is None:
        if args.per_device_train_batch_size == "auto":
            raise ValueError("--per_device_train_batch_size auto needs the device's memory: on CPU pass --device_memory_gib")
        return args.per_device_train_batch_size
    budget = (1 - MARGIN) * free
    world = accelerator.num_processes
    strategy = {DistributedType.FSDP: "fsdp", DistributedType.NO: "single"}.get(accelerator.distributed_type, "ddp")
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    where = f"{free / GiB:.1f} GiB free less {MARGIN:.0%}, {strategy} over {world}, {'compiled' if args.compile else 'eager'}"
    if args.per_device_train_batch_size != "auto":
        peak = estimate_peak_bytes(config, args.per_device_train_batch_size, seq_len, args.compile, strategy, world, autocast)
        if peak > budget:
            largest, _ = largest_micro_batch(config, seq_len, budget, args.compile, strategy, world, autocast)
            raise ValueError(f"--per_device_train_batch_size {args.per_device_train_batch_size} needs an estimated "
                             f"{peak / GiB:.1f} GiB a device, more than fits ({where}): the largest that fits is "
                             f"{largest} (or pass auto)")  # fmt: skip
        return args.per_device_train_batch_size
    largest, peak = largest_micro_batch(config, seq_len, budget, args.compile, strategy, world, autocast)
    if args.total_batch_size is not None and args.total_batch_size % (seq_len * world) == 0:
        windows = args.total_batch_size // (seq_len * world)  # per process per optimizer step
        largest = max((b for b in range(1, min(largest, windows) + 1) if windows % b == 0), default=0)
        peak = estimate_peak_bytes(config, largest, seq_len, args.compile, strategy, world, autocast) if largest else peak
    if largest == 0:
        raise ValueError(f"not even one window of {seq_len} tokens fits ({where}; it needs an estimated "
                         f"{peak / GiB:.1f} GiB): shard the model (FSDP), or shorten --seq_len")  # fmt: skip
    accelerator.print(f"micro-batch auto: {largest} windows, an estimated {peak / GiB:.1f} GiB a device ({where})")
    return largest


MUON_MATRICES = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # the blocks' matmuls


def configure_optimizers(model, args, device_type) -> list[torch.optim.Optimizer]:
    """AdamW, decaying only 2-D weights (matmuls, embeddings): biases and LayerNorm gains are not decayed.
    With --optimizer muon the blocks' matrices go to Muon instead, and AdamW keeps the embeddings (and the
    head tied to them), biases and gains: Muon orthogonalizes hidden layers' updates, not lookups. Each
    parameter group carries its peak lr for the schedule."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    matrices = [p for name, p in named if args.optimizer == "muon" and name.endswith(MUON_MATRICES)]
    rest = [p for name, p in named if not any(p is m for m in matrices)]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device_type == "cuda"  # the fused kernel: one launch for all parameters
    adamw = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    optimizers = [adamw]
    if matrices:
        optimizers.append(torch.optim.Muon(matrices, lr=args.muon_learning_rate, weight_decay=args.weight_decay,
                                           momentum=args.muon_momentum, adjust_lr_fn=args.muon_adjust_lr))  # fmt: skip
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["peak_lr"] = group["lr"]
    return optimizers


def lr_factor(step, args) -> float:
    """The schedule, as a fraction of the peak: linear warmup, then cosine to min_lr_ratio at max_train_steps."""
    if step < args.num_warmup_steps:
        return (step + 1) / args.num_warmup_steps
    progress = (step - args.num_warmup_steps) / max(1, args.max_train_steps - args.num_warmup_steps)
    return args.min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (1 - args.min_lr_ratio)


# --- the loop --------------------------------------------------------------------------------------


def to_device(window: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy from pageable host memory makes CUDA wait for the GPU's queued work; from pinned memory it
    is asynchronous, so the host goes on queueing the micro-step's kernels while the GPU computes."""
    if device.type == "cuda":
        return window.pin_memory().to(device, non_blocking=True)
    return window.to(device)


def train_step(accelerator, model, optimizers, batches, args):
    """One optimizer step over the accumulated micro-batches; returns (mean loss, grad norm)."""
    losses = []
    for _ in range(accelerator.gradient_accumulation_steps):
        window = to_device(next(batches), accelerator.device)
        with accelerator.accumulate(model):
            loss = model(input_ids=window[:, :-1], shift_labels=window[:, 1:]).loss
            accelerator.backward(loss)  # divides by the accumulation steps itself
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            for optimizer in optimizers:
                optimizer.step()  # a no-op until the last micro-step
                optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    mean_loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean")
    return mean_loss.item(), grad_norm.item()


def evaluate(accelerator, model, examples, tokenizer, args, seq_len) -> dict:
    """Val loss over the first `eval_iters` val batches (the same windows every time, shared by the
    processes) and, with --hellaswag, both HellaSwag conventions. Both run the eager model without its
    DDP wrapper: processes do unequal work, and HellaSwag's varying shapes would recompile a compiled one."""
    eager = accelerator.unwrap_model(model)
    with accelerator.autocast():
        results = {"val_loss": val_loss(eager, args.data_dir, args.per_device_train_batch_size, seq_len,
                                        args.eval_iters, accelerator)}  # fmt: skip
        if examples:
            scores = evaluate_hellaswag(eager, tokenizer, examples, accelerator, show_progress=False)
            for convention, prefix in [("completion", "hellaswag"), ("harness", "hellaswag_lm_eval")]:
                results.update({f"{prefix}_{name}": value for name, value in scores[convention].items()})
            results["hellaswag_examples"] = scores["examples"]
    return results


@torch.no_grad()
def generate_samples(model, tokenizer, prompt, seed, n=2, max_new_tokens=40) -> list[str]:
    model.eval()
    inputs = tokenizer([prompt] * n, return_tensors="pt").to(model.device)
    max_new_tokens = min(max_new_tokens, model.config.n_positions - inputs["input_ids"].shape[1])  # stay in context
    # Sampling must not shift training's random streams (dropout): torch.manual_seed reseeds the CPU and every
    # CUDA device, so all their states are restored afterwards.
    cuda_devices = list(range(torch.cuda.device_count())) if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, top_k=50,
                             pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    model.train()
    return tokenizer.batch_decode(out, skip_special_tokens=True)


def model_flops_per_token(config, seq_len) -> float:
    """6N for the matmuls of forward+backward plus the attention scores (PaLM appendix B)."""
    n = 12 * config.n_layer * config.n_embd**2 + config.padded_vocab_size * config.n_embd  # blocks + lm_head
    return 6 * n + 12 * config.n_layer * config.n_embd * seq_len


def peak_flops(accelerator):
    if accelerator.device.type != "cuda":
        return None
    return peak_bf16_flops(torch.cuda.get_device_name(accelerator.device))


def peak_bf16_flops(device_name: str) -> float | None:
    return next((flops for gpu, flops in PEAK_BF16_FLOPS if gpu in device_name), None)


# --- checkpoints -----------------------------------------------------------------------------------


def check_same_model(checkpoint: Path, config: MiniGPTConfig, optimizer: str):
    arguments = checkpoint / "training_args.json"
    saved_optimizer = json.loads(arguments.read_text()).get("optimizer", "adamw") if arguments.exists() else "adamw"
    if saved_optimizer != optimizer:
        raise ValueError(f"cannot resume {checkpoint}, trained with --optimizer {saved_optimizer}, with --optimizer {optimizer}")
    saved = MiniGPTConfig.from_json_file(checkpoint / "config.json")
    fields = ["vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "pad_vocab_size_multiple"]
    differing = [f"{f}: checkpoint {getattr(saved, f)}, now {getattr(config, f)}" for f in fields
                 if getattr(saved, f) != getattr(config, f)]  # fmt: skip
    if differing:
        raise ValueError(f"cannot resume {checkpoint} into a different model ({'; '.join(differing)})")


# --- export ----------------------------------------------------------------------------------------


def export(accelerator, model, args, summary, destination: Path):
    """A folder that `from_pretrained(..., trust_remote_code=True)` and `pipeline` load: weights, code,
    tokenizer, generation config and a model card. Written aside, then renamed into place."""
    temporary = destination.with_name(destination.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    weights = accelerator.get_state_dict(model)  # the full tensors, gathered from every process under FSDP
    # Saved through a weightless model of our own class: under FSDP2 the model's class is torch's generated
    # FSDP subclass, and save_pretrained would copy torch's source files in place of ours as remote code.
    with torch.device("meta"):
        plain = MiniGPTForCausalLM(unwrapped.config)
    if unwrapped.config.tie_word_embeddings:  # gathered tensors share no storage: drop the alias by name
        for alias in plain._tied_weights_keys:
            weights.pop(alias, None)
    plain.save_pretrained(temporary, is_main_process=accelerator.is_main_process, state_dict=weights,
                          save_function=accelerator.save)  # fmt: skip
    if accelerator.is_main_process:
        exported_tokenizer(args.data_dir, unwrapped.config).save_pretrained(temporary)
        eot = unwrapped.config.eos_token_id
        GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, do_sample=True, top_k=50,
                         max_new_tokens=64).save_pretrained(temporary)  # fmt: skip
        model_card(args, summary).save(temporary / "README.md")
        if (args.output_dir / "loss.png").exists():
            shutil.copy(args.output_dir / "loss.png", temporary / "loss.png")
        shutil.rmtree(destination, ignore_errors=True)
        os.replace(temporary, destination)
        if args.export_gpt2:
            export_gpt2(destination, destination.with_name(destination.name + "-gpt2"))
    accelerator.wait_for_everyone()


def exported_tokenizer(data_dir, config):
    """The data's tokenizer, set up for the model: truncation at its context, and a pad token (eot, as
    GPT-2 has none) on the left, where generation needs the padding."""
    tokenizer = AutoTokenizer.from_pretrained(Path(data_dir) / "tokenizer", model_max_length=config.n_positions,
                                              padding_side="left")  # init arguments are what save_pretrained keeps
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_card(args, summary) -> ModelCard:
    """The card's metadata (license, pipeline tag, datasets, base model, and a model-index with the val
    loss and HellaSwag) through huggingface_hub, which the Hub parses; the body is the run's table."""
    meta = read_meta(args.data_dir)
    source = meta["source"]
    hub_dataset = None if source == "builtin" or source.startswith("files:") else source
    base_model = f"openai-community/{args.model}" if args.model in OPENAI_GPT2 else None
    if args.from_gpt2 and not Path(args.model).exists():
        base_model = args.model
    results = [EvalResult(task_type="text-generation", dataset_type=hub_dataset or source, dataset_name=f"{source} (held-out split)",
                          dataset_split="validation", metric_type="loss", metric_name="val loss",
                          metric_value=round(summary["val_loss"], 4))]  # fmt: skip
    if "hellaswag_acc_norm" in summary:
        hellaswag = dict(task_type="multiple-choice", dataset_type="Rowan/hellaswag", dataset_name="HellaSwag",
                         dataset_split="validation")  # fmt: skip
        for convention, prefix in [("completion style", "hellaswag"), ("lm-evaluation-harness style", "hellaswag_lm_eval")]:
            for metric in ("acc", "acc_norm"):
                results.append(EvalResult(**hellaswag, metric_type=metric, metric_value=round(summary[f"{prefix}_{metric}"], 4),
                                          metric_name=f"{metric}, {convention} ({summary['hellaswag_examples']:,} examples)"))  # fmt: skip
    data = ModelCardData(language="en", license=args.license, library_name="transformers", pipeline_tag="text-generation",
                         tags=["minigpt", "gpt2", "text-generation"], datasets=[hub_dataset] if hub_dataset else None,
                         base_model=base_model, model_name=args.hub_model_id or "minigpt", eval_results=results)  # fmt: skip
    lines = [
        "# MiniGPT", "",
        "GPT-2 architecture trained from scratch with minigpt's `train_accelerate.py`. Load with",
        "`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`.", "",
        "| | |", "| --- | --- |",
        f"| model | {args.model}: {summary['parameters']:,} parameters |",
        f"| data | {source} ({meta['tokens']['train']:,} train tokens, tokenizer {meta['tokenizer']}) |",
        f"| recipe | {summary['steps']} steps x {summary['tokens_per_step']:,} tokens, peak lr {args.learning_rate}, "
        f"warmup {args.num_warmup_steps}, cosine to {args.min_lr_ratio:g}x, {optimizer_text(args)}, wd {args.weight_decay} |",
        f"| tokens seen | {summary['tokens_seen']:,} |",
        f"| final train loss | {summary['train_loss']:.4f} |",
        f"| final val loss | {summary['val_loss']:.4f} |",
    ]  # fmt: skip
    if "hellaswag_acc_norm" in summary:
        lines += [
            (f"| HellaSwag ({args.hellaswag}, {summary['hellaswag_examples']:,} examples), completion style | "
             f"acc {summary['hellaswag_acc']:.4f}, acc_norm {summary['hellaswag_acc_norm']:.4f} |"),
            (f"| HellaSwag, lm-evaluation-harness style | "
             f"acc {summary['hellaswag_lm_eval_acc']:.4f}, acc_norm {summary['hellaswag_lm_eval_acc_norm']:.4f} |"),
        ]  # fmt: skip
    body = "\n".join(lines + ["", "![loss](loss.png)", ""])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def optimizer_text(args) -> str:
    if args.optimizer == "adamw":
        return "AdamW"
    return (f"Muon for the blocks' matrices (peak lr {args.muon_learning_rate}, momentum {args.muon_momentum}, "
            f"{args.muon_adjust_lr} lr adjustment) and AdamW for the rest")  # fmt: skip


def plot_losses(metrics_file: Path, png: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = loss_figure([json.loads(line) for line in metrics_file.read_text().splitlines()], title)
    fig.savefig(png, dpi=120)
    plt.close(fig)


def loss_figure(rows: list[dict], title: str):
    """Train/val loss and, when measured, HellaSwag next to OpenAI GPT-2 124M's score, as the seeds plot it.
    The x axis counts optimizer steps done, as the log does ("step 50: val_loss ..." after 50 steps)."""
    import matplotlib.pyplot as plt

    train = [(r["step"] + 1, r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"] + 1, r["val_loss"]) for r in rows if "val_loss" in r]
    hellaswag = [(r["step"] + 1, r["hellaswag_acc_norm"]) for r in rows if "hellaswag_acc_norm" in r]
    fig, axes = plt.subplots(1, 2 if hellaswag else 1, figsize=(12 if hellaswag else 7, 4), squeeze=False)
    loss_ax = axes[0][0]
    loss_ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        loss_ax.plot(*zip(*val), "o-", label="val loss")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    if hellaswag:
        ax = axes[0][1]
        ax.plot(*zip(*hellaswag), "o-", label="ours (completion acc_norm)")
        ax.axhline(GPT2_124M_HELLASWAG, color="red", linestyle="--", label="OpenAI GPT-2 124M (all 10,042)")
        ax.set_xlabel("step")
        ax.set_ylabel("HellaSwag acc_norm")
    for ax in axes[0]:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


class MetricsLog:
    """One JSON object per line. On resume, rows from beyond the checkpoint (the part of the
    interrupted run being redone) are dropped, so the log reads like an uninterrupted run."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        rows = path.read_text().splitlines() if path.exists() and resume_step else []
        kept = "".join(row + "\n" for row in rows if self.step_of(row) < resume_step)
        write_atomically(path, lambda file: file.write(kept.encode()))

    @staticmethod
    def step_of(row: str) -> float:
        """A row's step; a line torn by a kill mid-write counts as beyond any checkpoint (dropped)."""
        try:
            return json.loads(row)["step"]
        except (ValueError, KeyError, TypeError):
            return math.inf

    def write(self, row: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def main(argv=None):
    args = parse_args(argv)
    accelerator = Accelerator(log_with=args.report_to if args.with_tracking else None, project_dir=args.output_dir)
    set_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # Every check runs before the first step, and before anything is written.
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise ValueError(f"--output_dir {args.output_dir} is a file, not a directory")
    if args.optimizer == "muon" and accelerator.distributed_type == DistributedType.FSDP:
        # torch's Muon itself works on FSDP2's DTensor shards (tested equal to DDP); accelerate does not save it.
        raise ValueError("--optimizer muon does not run under FSDP: accelerate saves one optimizer per FSDP model in "
                         "a checkpoint, and Muon is a second one; use DDP (a multi-GPU config without FSDP)")  # fmt: skip
    meta = read_meta(args.data_dir)
    # from_pretrained returns a model in eval mode: it would train without dropout, without the chunked loss,
    # and with a KV cache built at every step.
    model = build_model(args, meta).train()
    seq_len = args.seq_len or model.config.n_positions
    if seq_len > model.config.n_positions:
        raise ValueError(f"--seq_len {seq_len} exceeds the model's context n_positions={model.config.n_positions}")
    args.per_device_train_batch_size = fit_micro_batch(args, model.config, seq_len, accelerator)
    accelerator.gradient_accumulation_steps = accumulation_steps(args, accelerator.num_processes, seq_len)
    batches = ShardedTokens(args.data_dir, "train", args.per_device_train_batch_size, seq_len,
                            accelerator.process_index, accelerator.num_processes, seed=args.seed)  # fmt: skip
    check_val_split(args, seq_len, accelerator.num_processes)
    tokenizer = AutoTokenizer.from_pretrained(Path(args.data_dir) / "tokenizer")
    hellaswag = load_examples(args.hellaswag, args.hellaswag_limit) if args.hellaswag else None
    candidates = checkpoint_candidates(args.resume_from_checkpoint, args.output_dir) if args.resume_from_checkpoint else []
    if candidates:
        check_same_model(candidates[0], model.config, args.optimizer)
    lock = lock_output_dir(args.output_dir) if accelerator.is_main_process else None  # noqa: F841 (held to the end)
    check_shared_filesystem(accelerator, args.output_dir)
    if accelerator.is_local_main_process:  # once per node: the shards are read by every process of a node
        started = time.perf_counter()
        verify_shards(args.data_dir, meta, checksums=True)
        print(f"verified {len(meta['shards'])} shards (sha256, token ids < {meta['vocab_size']}) in "
              f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    accelerator.wait_for_everyone()

    model, *optimizers = accelerator.prepare(model, *configure_optimizers(model, args, accelerator.device.type))
    accelerator.register_save_state_pre_hook(save_tied_head_once)
    start_step = 0
    if candidates:
        checkpoint, state = load_checkpoint(accelerator, candidates)
        batches.load_state_dict(state["data"])
        start_step = state["step"]
        if start_step >= args.max_train_steps:
            raise ValueError(f"{checkpoint} is at step {start_step}, the run's last (--max_train_steps "
                             f"{args.max_train_steps}): raise --max_train_steps to train on")  # fmt: skip
        accelerator.print(f"resumed from {checkpoint} at step {start_step}")
    train_model = torch.compile(model) if args.compile else model

    micro_batch_tokens = args.per_device_train_batch_size * seq_len * accelerator.num_processes
    tokens_per_step = micro_batch_tokens * accelerator.gradient_accumulation_steps
    unwrapped = accelerator.unwrap_model(model)
    flops_per_step = model_flops_per_token(unwrapped.config, seq_len) * tokens_per_step
    peak = peak_flops(accelerator)
    metrics = MetricsLog(args.output_dir / "metrics.jsonl", start_step) if accelerator.is_main_process else None
    if args.with_tracking:
        accelerator.init_trackers("minigpt", config={k: str(v) for k, v in vars(args).items()})
    accelerator.print(
        f"{unwrapped.num_parameters():,} parameters | {tokens_per_step:,} tokens/step = {args.per_device_train_batch_size} "
        f"x {seq_len} x {accelerator.num_processes} processes x {accelerator.gradient_accumulation_steps} accumulation"
        f" | {accelerator.device} {accelerator.mixed_precision} | torch {torch.__version__}"
    )

    bar = tqdm(range(start_step, args.max_train_steps), initial=start_step, total=args.max_train_steps,
               disable=not accelerator.is_main_process, desc="training")  # fmt: skip
    train_loss, evaluation = float("nan"), {}
    for step in bar:
        for group in (group for optimizer in optimizers for group in optimizer.param_groups):
            group["lr"] = group["peak_lr"] * lr_factor(step, args)
        started = time.perf_counter()
        train_loss, grad_norm = train_step(accelerator, train_model, optimizers, batches, args)
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        done = step + 1
        if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
            raise ValueError(f"step {step}: loss {train_loss}, grad norm {grad_norm}: training diverged or the weights "
                             "are corrupt; stopped without checkpointing this state")  # fmt: skip
        row = {"step": step, "loss": train_loss, "lr": args.learning_rate * lr_factor(step, args), "grad_norm": grad_norm,
               "dt_ms": 1000 * seconds, "tokens_per_s": tokens_per_step / seconds}  # fmt: skip
        if args.optimizer == "muon":
            row["muon_lr"] = args.muon_learning_rate * lr_factor(step, args)
        if peak:
            row["mfu"] = flops_per_step / seconds / (peak * accelerator.num_processes)
        bar.set_postfix(loss=f"{train_loss:.4f}", norm=f"{grad_norm:.2f}", tok_s=f"{row['tokens_per_s']:,.0f}")

        last = done == args.max_train_steps
        if last or (args.eval_steps and done % args.eval_steps == 0):
            evaluation = evaluate(accelerator, model, hellaswag, tokenizer, args, seq_len)
            row.update(evaluation)
            # Every process generates (the same tokens: same seed): with sharded weights each forward is collective.
            samples = generate_samples(unwrapped, tokenizer, args.sample_prompt, args.seed)
            if accelerator.is_main_process:
                scores = " | ".join(f"{name} {value:.4f}" for name, value in evaluation.items() if isinstance(value, float))
                bar.write(f"step {done}: {scores}\n" + "\n".join(f"  > {s!r}" for s in samples))
        if accelerator.is_main_process:
            metrics.write(row)
        accelerator.log(row, step=step)
        if args.checkpointing_steps and (done % args.checkpointing_steps == 0 or last):
            save_checkpoint(accelerator, unwrapped.config, args, done, batches.state_dict())

    summary = {
        "steps": args.max_train_steps,
        "tokens_per_step": tokens_per_step,
        "tokens_seen": tokens_per_step * args.max_train_steps,
        "parameters": unwrapped.num_parameters(),
        "train_loss": train_loss,
        **evaluation,  # the last one: val loss and HellaSwag
    }
    if accelerator.is_main_process:
        title = f"MiniGPT {args.model} ({summary['parameters'] / 1e6:.1f}M parameters), {summary['tokens_seen']:,} tokens"
        plot_losses(args.output_dir / "metrics.jsonl", args.output_dir / "loss.png", title)
    export(accelerator, model, args, summary, args.output_dir / "final")
    accelerator.print(f"exported {args.output_dir / 'final'} (val loss {evaluation['val_loss']:.4f})")
    if args.push_to_hub and accelerator.is_main_process:
        from huggingface_hub import create_repo, upload_folder

        # The exported folder as it is (weights, code, tokenizer, card): what `push_to_hub` would upload.
        create_repo(args.hub_model_id, exist_ok=True)
        upload_folder(repo_id=args.hub_model_id, folder_path=args.output_dir / "final", commit_message="minigpt export")
    accelerator.end_training()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, ShardError) as error:
        sys.exit(f"train_accelerate.py: error: {error}")
