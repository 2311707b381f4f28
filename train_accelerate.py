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
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch.distributed.tensor import DTensor
from transformers import AutoTokenizer

from attention_backends import preferred_backends, preferring
from checkpoints import (check_same_model, check_shared_filesystem, checkpoint_candidates, cut_table_padding,
                         load_checkpoint, lock_output_dir, save_checkpoint, save_tied_head_once)  # fmt: skip
from configuration_minigpt import PRESETS, MiniGPTConfig
from eval_hellaswag import evaluate_hellaswag, load_examples
from export import export_model, push_to_hub
from memory_estimate import fit_micro_batch
from metrics import MetricsLog, device_peak_flops, log_line, machine, model_flops_per_token, plot_losses
from modeling_minigpt import MiniGPTForCausalLM
from optimization import configure_optimizers, lr_factor, set_lr, short_schedule_warning
from token_shards import ShardedTokens, read_meta, tokenizer_dir, verify_shards
from validation import (
    bits_per_byte,
    bits_per_byte_note,
    check_same_tokenizer,
    check_seq_len,
    check_val_windows,
    val_loss,
)

OPENAI_GPT2 = {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}  # `--model` names for OpenAI's weights
# DDP keeps the gradients in its all-reduce buckets instead of copying them there (one copy of the gradients
# less: 0.5 GB at 124M), in buckets of 100 MB: five all-reduces a step at 124M instead of DDP's default twenty.
DDP = DistributedDataParallelKwargs(gradient_as_bucket_view=True, bucket_cap_mb=100)


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
    p.add_argument("--export_gguf", default=None, choices=["f32", "f16", "bf16", "q8_0"],
                   help="also write output_dir/final-TYPE.gguf for llama.cpp, Ollama, LM Studio (export_gguf.py)")  # fmt: skip
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
            check_same_tokenizer(args.data_dir, AutoTokenizer.from_pretrained(source), f"the model {source}")
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


def base_model(args) -> str | None:
    """The Hub id of the GPT-2 weights the run started from, for the model card (a local folder has none)."""
    if args.model in OPENAI_GPT2:
        return f"openai-community/{args.model}"
    return args.model if args.from_gpt2 and not Path(args.model).exists() else None


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


# --- the loop --------------------------------------------------------------------------------------


@dataclass
class Run:
    """What the loop works with, made by `setup`."""

    args: argparse.Namespace
    accelerator: Accelerator
    model: torch.nn.Module  # prepared (DDP/FSDP-wrapped): evaluation, checkpoints and export use it
    train_model: torch.nn.Module  # the same, compiled under --compile
    optimizers: list[torch.optim.Optimizer]
    batches: "DeviceBatches"
    tokenizer: object
    hellaswag: list | None
    metrics: MetricsLog | None  # on the main process only
    lock: object  # the output directory's lock, held for the run
    seq_len: int
    start_step: int
    tokens_per_step: int
    flops_per_step: float
    peak_flops: float | None
    attention: list | None  # SDPA's backends in order of preference, or None: its own order

    @property
    def unwrapped(self) -> MiniGPTForCausalLM:
        return self.accelerator.unwrap_model(self.model)


def setup(args) -> Run:
    """Every check runs before the first step and before anything is written; then the model, optimizers
    and data are prepared, and a checkpoint, when asked for, is loaded."""
    accelerator = Accelerator(log_with=args.report_to if args.with_tracking else None, project_dir=args.output_dir,
                              kwargs_handlers=[DDP])  # fmt: skip
    set_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    check_run_args(args, accelerator)
    meta = read_meta(args.data_dir)
    # from_pretrained returns a model in eval mode: it would train without dropout, without the chunked loss,
    # and with a KV cache built at every step.
    model = build_model(args, meta).train()
    seq_len = args.seq_len or model.config.n_positions
    check_seq_len(seq_len, model.config.n_positions, "the model")
    args.per_device_train_batch_size = fit_micro_batch(args, model.config, seq_len, accelerator)
    accelerator.gradient_accumulation_steps = accumulation_steps(args, accelerator.num_processes, seq_len)
    batches = ShardedTokens(args.data_dir, "train", args.per_device_train_batch_size, seq_len,
                            accelerator.process_index, accelerator.num_processes, seed=args.seed)  # fmt: skip
    check_val_windows(args.data_dir, args.per_device_train_batch_size, seq_len, args.eval_iters,
                      f"--eval_iters {args.eval_iters} x batch {args.per_device_train_batch_size}")  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(args.data_dir))
    if args.export_gguf:
        check_gguf_export(tokenizer, tokenizer_dir(args.data_dir))
    hellaswag = load_examples(args.hellaswag, args.hellaswag_limit) if args.hellaswag else None
    candidates = checkpoint_candidates(args.resume_from_checkpoint, args.output_dir) if args.resume_from_checkpoint else []
    if candidates:
        check_same_model(candidates[0], model.config, args.optimizer)
    lock = lock_output_dir(args.output_dir) if accelerator.is_main_process else None
    check_shared_filesystem(accelerator, args.output_dir)
    verify_data(accelerator, args.data_dir, meta)
    for note in (bits_per_byte_note(args.data_dir), short_schedule_warning(args)):
        if note:
            accelerator.print(note)

    config = model.config
    model, *optimizers = accelerator.prepare(model, *configure_optimizers(model, args, accelerator.device.type))
    accelerator.register_save_state_pre_hook(save_tied_head_once)
    start_step = resume(accelerator, candidates, optimizers, batches, args.max_train_steps) if candidates else 0
    attention = preferred_backends(accelerator.device)
    tokens_per_step = (args.per_device_train_batch_size * seq_len * accelerator.num_processes
                       * accelerator.gradient_accumulation_steps)  # fmt: skip
    run_record = {"args": vars(args), "config": config.to_dict(), "machine": machine(), "start_step": start_step,
                  "processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
                  "accumulation": accelerator.gradient_accumulation_steps, "tokens_per_step": tokens_per_step}  # fmt: skip
    metrics = MetricsLog(args.output_dir / "metrics.jsonl", start_step, run_record) if accelerator.is_main_process else None
    if args.with_tracking:
        accelerator.init_trackers("minigpt", config={k: str(v) for k, v in vars(args).items()})
    accelerator.print(
        f"{accelerator.unwrap_model(model).num_parameters():,} parameters | {tokens_per_step:,} tokens/step = "
        f"{args.per_device_train_batch_size} x {seq_len} x {accelerator.num_processes} processes x "
        f"{accelerator.gradient_accumulation_steps} accumulation | {accelerator.device} {accelerator.mixed_precision} "
        f"| torch {torch.__version__}{engaged(model, attention)}"
    )
    return Run(args=args, accelerator=accelerator, model=model, train_model=torch.compile(model) if args.compile else model,
               optimizers=optimizers, batches=DeviceBatches(batches, accelerator.device), tokenizer=tokenizer,
               hellaswag=hellaswag, metrics=metrics, lock=lock, seq_len=seq_len, start_step=start_step,
               tokens_per_step=tokens_per_step, flops_per_step=model_flops_per_token(config, seq_len) * tokens_per_step,
               peak_flops=device_peak_flops(accelerator.device), attention=attention)  # fmt: skip


def engaged(model, attention) -> str:
    """What the prepared model really runs with, read off it, for the start line."""
    parts = []
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        parts.append(f"DDP buckets {model.bucket_bytes_cap / 2**20:.0f} MiB"
                     + (", gradients in them" if model.gradient_as_bucket_view else ""))  # fmt: skip
    if attention:
        parts.append("attention: " + " > ".join(backend.name.lower() for backend in attention))
    return "".join(f" | {part}" for part in parts)


def check_run_args(args, accelerator):
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise ValueError(f"--output_dir {args.output_dir} is a file, not a directory")
    if args.optimizer == "muon" and accelerator.distributed_type == DistributedType.FSDP:
        # torch's Muon itself works on FSDP2's DTensor shards (tested equal to DDP); accelerate does not save it.
        raise ValueError("--optimizer muon does not run under FSDP: accelerate saves one optimizer per FSDP model in "
                         "a checkpoint, and Muon is a second one; use DDP (a multi-GPU config without FSDP)")  # fmt: skip


def check_gguf_export(tokenizer, where):
    """What --export_gguf needs, before any step: the gguf package (not on the GPU images) and a tokenizer
    llama.cpp reads."""
    try:
        from export_gguf import check_tokenizer
    except ModuleNotFoundError as error:
        if error.name != "gguf":
            raise
        raise ValueError("--export_gguf needs the gguf package (llama.cpp's Python library): pip install gguf") from None
    check_tokenizer(tokenizer, where)


def verify_data(accelerator, data_dir, meta):
    """Every shard's checksum and token range, once per node: the shards are read by every process of a node."""
    if accelerator.is_local_main_process:
        started = time.perf_counter()
        verify_shards(data_dir, meta, checksums=True)
        print(f"verified {len(meta['shards'])} shards (sha256, token ids < {meta['vocab_size']}) in "
              f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    accelerator.wait_for_everyone()


def resume(accelerator, candidates, optimizers, batches, max_train_steps) -> int:
    """Load the newest readable checkpoint into the prepared model, optimizers and data; returns its step."""
    checkpoint, state = load_checkpoint(accelerator, candidates)
    cut_table_padding(optimizers)
    batches.load_state_dict(state["data"])
    if state["step"] >= max_train_steps:
        raise ValueError(f"{checkpoint} is at step {state['step']}, the run's last (--max_train_steps "
                         f"{max_train_steps}): raise --max_train_steps to train on")  # fmt: skip
    accelerator.print(f"resumed from {checkpoint} at step {state['step']}")
    return state["step"]


def train(run: Run) -> tuple[dict, dict]:
    """The loop: an optimizer step, its log line and metrics row, evaluation and checkpoints on their
    schedules. Returns the last step's row and the last evaluation.

    Nothing in a step waits for the GPU: a step's loss and norm are read once the next step is queued, so its
    line and row come one step late, and the GPU always has work. A step that is evaluated or checkpointed is
    read at once: a non-finite loss must stop the run before either."""
    args, accelerator = run.args, run.accelerator
    row, evaluation, unread, rows = {}, {}, None, []
    clock = time.perf_counter()  # when the last step was read, or the last pause (evaluation, checkpoint) ended
    for step in range(run.start_step, args.max_train_steps):
        set_lr(run.optimizers, lr_factor(step, args))
        with preferring(run.attention):
            result = StepResult(step, *train_step(accelerator, run.train_model, run.optimizers, run.batches, args),
                                lrs=[optimizer.param_groups[0]["lr"] for optimizer in run.optimizers])  # fmt: skip
        if unread is not None:
            row, clock = read_step(run, unread, clock)
            record(run, row, rows)
        unread = result
        done, last = step + 1, step + 1 == args.max_train_steps
        evaluate_now = last or (args.eval_steps and done % args.eval_steps == 0)
        checkpoint_now = args.checkpointing_steps and (done % args.checkpointing_steps == 0 or last)
        if evaluate_now or checkpoint_now:
            (row, _), unread = read_step(run, result, clock), None
            if evaluate_now:
                evaluation = evaluate(run, done)
                row.update(evaluation)
            record(run, row, rows)
            if checkpoint_now:
                save_checkpoint(accelerator, run.unwrapped.config, args, done, run.batches.state_dict())
            clock = time.perf_counter()  # the pause is no step's time
    accelerator.print(steady_state(rows))
    return row, evaluation


class DeviceBatches:
    """The reader's windows on the training device, each read and its copy queued one micro-step ahead, so the
    host reads the next window while the GPU works on this one. `state_dict` is the position after the last
    window handed out (not the one read ahead), so a checkpoint resumes exactly."""

    def __init__(self, reader: ShardedTokens, device: torch.device):
        self.reader, self.device = reader, device
        self.position = reader.state_dict()
        self.ahead = to_device(next(reader), device)

    def __next__(self) -> torch.Tensor:
        window, self.position = self.ahead, self.reader.state_dict()
        self.ahead = to_device(next(self.reader), self.device)
        return window

    def state_dict(self) -> dict:
        return self.position


def to_device(window: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy from pageable host memory makes CUDA wait for the GPU's queued work; from pinned memory it
    is asynchronous, so the host goes on queueing the micro-step's kernels while the GPU computes."""
    if device.type == "cuda":
        return window.pin_memory().to(device, non_blocking=True)
    return window.to(device)


def train_step(accelerator, model, optimizers, batches, args) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over the accumulated micro-batches, queued; returns (mean loss, grad norm) as
    tensors on the device, not yet read."""
    losses = []
    for _ in range(accelerator.gradient_accumulation_steps):
        window = next(batches)
        with accelerator.accumulate(model):
            loss = model(input_ids=window[:, :-1], shift_labels=window[:, 1:]).loss
            accelerator.backward(loss)  # divides by the accumulation steps itself
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            for optimizer in optimizers:
                optimizer.step()  # a no-op until the last micro-step
                optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    if isinstance(grad_norm, DTensor):  # FSDP2's norm, the same on every process
        grad_norm = grad_norm.full_tensor()
    return accelerator.reduce(torch.stack(losses).mean(), reduction="mean"), grad_norm


class StepResult:
    """A step's loss and gradient norm on their way to the host: on a GPU copied without waiting (into pinned
    memory) with an event marking their arrival; read when wanted. `lrs` are the optimizers' as they applied
    them. `finished` is when the step was done, as the host sees it: on the CPU at once, on a GPU when the
    values arrived."""

    def __init__(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lrs: list[float]):
        self.step, self.lrs = step, lrs
        values = torch.stack([loss.float(), grad_norm.float()])
        self.arrival = None
        if values.is_cuda:
            values, self.arrival = values.to("cpu", non_blocking=True), torch.cuda.Event()
            self.arrival.record()
        self.values, self.finished = values, time.perf_counter()

    def read(self) -> tuple[float, float]:
        if self.arrival is not None:
            self.arrival.synchronize()
            self.arrival, self.finished = None, time.perf_counter()
        loss, grad_norm = self.values.tolist()
        return loss, grad_norm


def read_step(run: Run, result: StepResult, clock: float) -> tuple[dict, float]:
    """The step's metrics row, printed as the log line. A non-finite loss or norm stops the run. Returns the
    row and the step's finishing time."""
    args = run.args
    loss, grad_norm = result.read()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise ValueError(f"step {result.step}: loss {loss}, grad norm {grad_norm}: training diverged or the weights "
                         "are corrupt; stopped without checkpointing this state")  # fmt: skip
    seconds = result.finished - clock
    row = {"step": result.step, "loss": loss, "lr": result.lrs[0], "grad_norm": grad_norm, "dt_ms": 1000 * seconds,
           "tokens_per_s": run.tokens_per_step / seconds}  # fmt: skip
    if len(result.lrs) > 1:
        row["muon_lr"] = result.lrs[1]
    if run.peak_flops:
        row["mfu"] = run.flops_per_step / seconds / (run.peak_flops * run.accelerator.num_processes)
    run.accelerator.print(log_line(row, args.max_train_steps))
    return row, result.finished


def record(run: Run, row: dict, rows: list[dict]):
    """The row into metrics.jsonl and the trackers, and into this start's rows for the steady-state line."""
    if run.accelerator.is_main_process:
        run.metrics.write(row)
    run.accelerator.log(row, step=row["step"])
    rows.append(row)


def steady_state(rows: list[dict]) -> str:
    """The run's speed without its first step, which compiles (and warms the allocator and the optimizer)."""
    if len(rows) < 2:
        return f"steady state: not measured ({len(rows)} step)"
    steady = rows[1:]
    line = (f"steady state: {len(steady)} steps after the first | median dt {statistics.median(r['dt_ms'] for r in steady):.1f} ms "
            f"| tok/s {statistics.median(r['tokens_per_s'] for r in steady):,.0f}")  # fmt: skip
    if "mfu" in rows[0]:
        line += f" | mfu {statistics.median(r['mfu'] for r in steady):.1%}"
    return line + f" | the first step took {rows[0]['dt_ms'] / 1000:.1f} s"


def evaluate(run: Run, done: int) -> dict:
    """Val loss over the first `eval_iters` val batches (the same windows every time, shared by the
    processes), with --hellaswag both HellaSwag conventions, and printed samples. They run the eager
    model without its DDP wrapper: processes do unequal work, and HellaSwag's varying shapes would
    recompile a compiled one."""
    args, accelerator, eager = run.args, run.accelerator, run.unwrapped
    with accelerator.autocast():
        results = {"val_loss": val_loss(eager, args.data_dir, args.per_device_train_batch_size, run.seq_len,
                                        args.eval_iters, accelerator)}  # fmt: skip
        if (bpb := bits_per_byte(results["val_loss"], args.data_dir)) is not None:
            results["val_bpb"] = bpb
        if run.hellaswag:
            scores = evaluate_hellaswag(eager, run.tokenizer, run.hellaswag, accelerator, show_progress=False)
            for convention, prefix in [("completion", "hellaswag"), ("harness", "hellaswag_lm_eval")]:
                results.update({f"{prefix}_{name}": value for name, value in scores[convention].items()})
            results["hellaswag_examples"] = scores["examples"]
    # Every process generates (the same tokens: same seed): with sharded weights each forward is collective.
    samples = generate_samples(eager, run.tokenizer, args.sample_prompt, args.seed)
    scores = " | ".join(f"{name} {value:.4f}" for name, value in results.items() if isinstance(value, float))
    accelerator.print(f"step {done}: {scores}\n" + "\n".join(f"  > {s!r}" for s in samples))
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


def finish(run: Run, last_row: dict, evaluation: dict):
    """The loss plot, the exported model folder (and native GPT-2 folder), the upload."""
    args, accelerator = run.args, run.accelerator
    parameters = run.unwrapped.num_parameters()
    summary = {"steps": args.max_train_steps, "tokens_per_step": run.tokens_per_step, "parameters": parameters,
               "tokens_seen": run.tokens_per_step * args.max_train_steps, "train_loss": last_row["loss"],
               **evaluation}  # fmt: skip
    if accelerator.is_main_process:
        title = f"MiniGPT {args.model} ({parameters / 1e6:.1f}M parameters), {summary['tokens_seen']:,} tokens"
        plot_losses(args.output_dir / "metrics.jsonl", args.output_dir / "loss.png", title)
    export_model(accelerator, run.model, args, summary, args.output_dir / "final", base_model(args))
    accelerator.print(f"exported {args.output_dir / 'final'} (val loss {evaluation['val_loss']:.4f})")
    if args.push_to_hub and accelerator.is_main_process:
        push_to_hub(args.output_dir / "final", args.hub_model_id)
    accelerator.end_training()


def main(argv=None):
    run = setup(parse_args(argv))
    last_row, evaluation = train(run)
    finish(run, last_row, evaluation)


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # ShardError and HellaSwagError among them: bad input, named in one line
        sys.exit(f"train_accelerate.py: error: {error}")
