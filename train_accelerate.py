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

import dataclasses
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
from token_shards import ShardedTokens, TokenData, verify_shards
from training_settings import TrainingSettings
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


def parse_args(argv=None) -> TrainingSettings:
    return TrainingSettings.from_command_line(sys.argv[1:] if argv is None else argv, description=__doc__)


# --- model and data --------------------------------------------------------------------------------


def build_model(settings: TrainingSettings, data: TokenData) -> MiniGPTForCausalLM:
    """The model `--model` names, checked against the data's tokenizer before any step."""
    vocab, eot = data.vocab_size, data.eot_token_id
    source = Path(settings.model)
    if settings.model in PRESETS:
        config = MiniGPTConfig.from_preset(settings.model, vocab_size=vocab, bos_token_id=eot, eos_token_id=eot,
                                           pad_vocab_size_multiple=settings.pad_vocab_size_multiple)  # fmt: skip
        return MiniGPTForCausalLM(config)
    if settings.from_gpt2 or settings.model in OPENAI_GPT2:
        hub_id = f"openai-community/{settings.model}" if settings.model in OPENAI_GPT2 else settings.model
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
            check_same_tokenizer(data, AutoTokenizer.from_pretrained(source), f"the model {source}")
    else:
        if source.is_dir():
            raise ValueError(f"--model {settings.model} is a directory without config.json: not a saved model or checkpoint")
        raise ValueError(f"--model {settings.model!r} is not a preset ({', '.join(PRESETS)}), gpt2*, or a config/checkpoint path")
    if model.config.vocab_size != vocab:
        raise ValueError(
            f"vocabulary mismatch: the model has vocab_size={model.config.vocab_size}, {data.dir} was "
            f"tokenized with {vocab} tokens; prepare the data with the model's tokenizer"
        )
    return model


def base_model(settings: TrainingSettings) -> str | None:
    """The Hub id of the GPT-2 weights the run started from, for the model card (a local folder has none)."""
    if settings.model in OPENAI_GPT2:
        return f"openai-community/{settings.model}"
    return settings.model if settings.from_gpt2 and not Path(settings.model).exists() else None


@dataclass(frozen=True)
class BatchPlan:
    """How an optimizer step takes its tokens: on each of `processes`, `accumulation` micro-batches of
    `micro_batch` windows of `seq_len` tokens."""

    micro_batch: int
    accumulation: int
    seq_len: int
    processes: int

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.seq_len * self.processes * self.accumulation

    def describe(self) -> str:
        return (f"{self.tokens_per_step:,} tokens/step = {self.micro_batch} x {self.seq_len} x {self.processes} processes "
                f"x {self.accumulation} accumulation")  # fmt: skip


def plan_batches(settings: TrainingSettings, config, seq_len: int, accelerator) -> BatchPlan:
    """The micro-batch (`auto` resolved to the largest that fits the device) and the accumulation that makes
    `--total_batch_size` tokens a step (else `--gradient_accumulation_steps`)."""
    processes, total = accelerator.num_processes, settings.total_batch_size
    # each process's windows a step, when the total splits into whole windows on every process
    windows = total // (seq_len * processes) if total is not None and total % (seq_len * processes) == 0 else None
    micro_batch = fit_micro_batch(settings, config, seq_len, windows, accelerator)
    if total is None:
        return BatchPlan(micro_batch, settings.gradient_accumulation_steps, seq_len, processes)
    if windows is None or windows % micro_batch:
        raise ValueError(f"--total_batch_size {total} is not a multiple of per_device_train_batch_size {micro_batch} "
                         f"x seq_len {seq_len} x {processes} processes = {micro_batch * seq_len * processes}")  # fmt: skip
    return BatchPlan(micro_batch, windows // micro_batch, seq_len, processes)


# --- the loop --------------------------------------------------------------------------------------


@dataclass
class Run:
    """What the loop works with, made by `setup`."""

    settings: TrainingSettings
    data: TokenData
    plan: BatchPlan
    accelerator: Accelerator
    model: torch.nn.Module  # prepared (DDP/FSDP-wrapped): evaluation, checkpoints and export use it
    train_model: torch.nn.Module  # the same, compiled under --compile
    optimizers: list[torch.optim.Optimizer]
    batches: "DeviceBatches"
    tokenizer: object
    hellaswag: list | None
    metrics: MetricsLog | None  # on the main process only
    lock: object  # the output directory's lock, held for the run
    start_step: int
    flops_per_step: float
    peak_flops: float | None
    attention: list | None  # SDPA's backends in order of preference, or None: its own order

    @property
    def unwrapped(self) -> MiniGPTForCausalLM:
        return self.accelerator.unwrap_model(self.model)


def setup(settings: TrainingSettings) -> Run:
    """Every check runs before the first step and before anything is written; then the model, optimizers
    and data are prepared, and a checkpoint, when asked for, is loaded."""
    accelerator = Accelerator(log_with=settings.report_to if settings.with_tracking else None,
                              project_dir=settings.output_dir, kwargs_handlers=[DDP])  # fmt: skip
    set_seed(settings.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    check_run_settings(settings, accelerator)
    data = TokenData.of(settings.data_dir)
    # from_pretrained returns a model in eval mode: it would train without dropout, without the chunked loss,
    # and with a KV cache built at every step.
    model = build_model(settings, data).train()
    seq_len = settings.seq_len or model.config.n_positions
    check_seq_len(seq_len, model.config.n_positions, "the model")
    plan = plan_batches(settings, model.config, seq_len, accelerator)
    accelerator.gradient_accumulation_steps = plan.accumulation
    batches = ShardedTokens(data, "train", plan.micro_batch, seq_len, accelerator.process_index,
                            accelerator.num_processes, seed=settings.seed)  # fmt: skip
    check_val_windows(data, plan.micro_batch, seq_len, settings.eval_iters,
                      f"--eval_iters {settings.eval_iters} x batch {plan.micro_batch}")  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(data.tokenizer_dir)
    if settings.export_gguf:
        check_gguf_export(tokenizer, data.tokenizer_dir)
    hellaswag = load_examples(settings.hellaswag, settings.hellaswag_limit) if settings.hellaswag else None
    resuming = settings.resume_from_checkpoint
    candidates = checkpoint_candidates(resuming, settings.output_dir) if resuming else []
    if candidates:
        check_same_model(candidates[0], model.config, settings.optimizer)
    lock = lock_output_dir(settings.output_dir) if accelerator.is_main_process else None
    check_shared_filesystem(accelerator, settings.output_dir)
    verify_data(accelerator, data)
    for note in (bits_per_byte_note(data), short_schedule_warning(settings)):
        if note:
            accelerator.print(note)

    config = model.config
    model, *optimizers = accelerator.prepare(model, *configure_optimizers(model, settings, accelerator.device.type))
    accelerator.register_save_state_pre_hook(save_tied_head_once)
    start_step = resume(accelerator, candidates, optimizers, batches, settings.max_train_steps) if candidates else 0
    attention = preferred_backends(accelerator.device)
    run_record = {"args": dataclasses.asdict(settings), "config": config.to_dict(), "machine": machine(),
                  "start_step": start_step, "processes": plan.processes, "mixed_precision": accelerator.mixed_precision,
                  "micro_batch": plan.micro_batch, "accumulation": plan.accumulation,
                  "tokens_per_step": plan.tokens_per_step}  # fmt: skip
    metrics = MetricsLog(settings.output_dir / "metrics.jsonl", start_step, run_record) if accelerator.is_main_process else None
    if settings.with_tracking:
        accelerator.init_trackers("minigpt", config={k: str(v) for k, v in dataclasses.asdict(settings).items()})
    accelerator.print(
        f"{accelerator.unwrap_model(model).num_parameters():,} parameters | {plan.describe()} | {accelerator.device} "
        f"{accelerator.mixed_precision} | torch {torch.__version__}{engaged(model, attention)}"
    )
    return Run(settings=settings, data=data, plan=plan, accelerator=accelerator, model=model,
               train_model=torch.compile(model) if settings.compile else model, optimizers=optimizers,
               batches=DeviceBatches(batches, accelerator.device), tokenizer=tokenizer, hellaswag=hellaswag,
               metrics=metrics, lock=lock, start_step=start_step,
               flops_per_step=model_flops_per_token(config, seq_len) * plan.tokens_per_step,
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


def check_run_settings(settings: TrainingSettings, accelerator):
    if settings.output_dir.exists() and not settings.output_dir.is_dir():
        raise ValueError(f"--output_dir {settings.output_dir} is a file, not a directory")
    if settings.optimizer == "muon" and accelerator.distributed_type == DistributedType.FSDP:
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


def verify_data(accelerator, data: TokenData):
    """Every shard's checksum and token range, once per node: the shards are read by every process of a node."""
    if accelerator.is_local_main_process:
        started = time.perf_counter()
        verify_shards(data.dir, data.meta, checksums=True)
        print(f"verified {len(data.meta['shards'])} shards (sha256, token ids < {data.vocab_size}) in "
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
    schedules. Returns the last step's row and the last evaluation. A step that is evaluated or
    checkpointed is read at once (`StepLog`): a non-finite loss must stop the run before either."""
    settings, accelerator = run.settings, run.accelerator
    log, row, evaluation = StepLog(run), {}, {}
    for step in range(run.start_step, settings.max_train_steps):
        set_lr(run.optimizers, lr_factor(step, settings))
        with preferring(run.attention):
            loss, grad_norm = train_step(accelerator, run.train_model, run.optimizers, run.batches, settings)
        log.add(StepResult(step, loss, grad_norm, lrs=[optimizer.param_groups[0]["lr"] for optimizer in run.optimizers]))
        done, last = step + 1, step + 1 == settings.max_train_steps
        evaluate_now = last or (settings.eval_steps and done % settings.eval_steps == 0)
        checkpoint_now = settings.checkpointing_steps and (done % settings.checkpointing_steps == 0 or last)
        if evaluate_now or checkpoint_now:
            row = log.read_now()
            if evaluate_now:
                evaluation = evaluate(run, done)
                row.update(evaluation)
            log.record(row)
            if checkpoint_now:
                save_checkpoint(accelerator, run.unwrapped.config, settings, done, run.batches.state_dict())
            log.paused()
    accelerator.print(log.steady_state())
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


def train_step(accelerator, model, optimizers, batches, settings) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over the accumulated micro-batches, queued; returns (mean loss, grad norm) as
    tensors on the device, not yet read."""
    losses = []
    for _ in range(accelerator.gradient_accumulation_steps):
        window = next(batches)
        with accelerator.accumulate(model):
            loss = model(input_ids=window[:, :-1], shift_labels=window[:, 1:]).loss
            accelerator.backward(loss)  # divides by the accumulation steps itself
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
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


class StepLog:
    """The steps' clock, their reading and their rows. Nothing in a step waits for the GPU: `add` reads the step
    before (its loss and norm have arrived by the time the next one is queued), so a step's log line and row come
    one step late and the GPU always has work; `read_now` reads the newest at once. A step's time runs from when
    the one before finished (or the last pause ended: evaluation and checkpoints are no step's time) to when its
    values arrived. A non-finite loss or norm stops the run."""

    def __init__(self, run: Run):
        self.run, self.rows, self.unread = run, [], None
        self.clock = time.perf_counter()

    def add(self, result: StepResult) -> None:
        """Queue `result`, reading and recording the step before."""
        if self.unread is not None:
            self.record(self.read(self.unread))
        self.unread = result

    def read_now(self) -> dict:
        """The newest step's row, read and printed, for the caller to complete and `record`."""
        row, self.unread = self.read(self.unread), None
        return row

    def read(self, result: StepResult) -> dict:
        run = self.run
        loss, grad_norm = result.read()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise ValueError(f"step {result.step}: loss {loss}, grad norm {grad_norm}: training diverged or the weights "
                             "are corrupt; stopped without checkpointing this state")  # fmt: skip
        seconds, self.clock = result.finished - self.clock, result.finished
        row = {"step": result.step, "loss": loss, "lr": result.lrs[0], "grad_norm": grad_norm, "dt_ms": 1000 * seconds,
               "tokens_per_s": run.plan.tokens_per_step / seconds}  # fmt: skip
        if len(result.lrs) > 1:
            row["muon_lr"] = result.lrs[1]
        if run.peak_flops:
            row["mfu"] = run.flops_per_step / seconds / (run.peak_flops * run.accelerator.num_processes)
        run.accelerator.print(log_line(row, run.settings.max_train_steps))
        return row

    def record(self, row: dict) -> None:
        """The row into metrics.jsonl and the trackers, and into this start's rows for the steady-state line."""
        if self.run.accelerator.is_main_process:
            self.run.metrics.write(row)
        self.run.accelerator.log(row, step=row["step"])
        self.rows.append(row)

    def paused(self) -> None:
        """A pause (evaluation, a checkpoint) just ended: the next step's time starts now."""
        self.clock = time.perf_counter()

    def steady_state(self) -> str:
        """The run's speed without its first step, which compiles (and warms the allocator and the optimizer)."""
        rows = self.rows
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
    settings, accelerator, eager = run.settings, run.accelerator, run.unwrapped
    with accelerator.autocast():
        results = {"val_loss": val_loss(eager, run.data, run.plan.micro_batch, run.plan.seq_len, settings.eval_iters,
                                        accelerator)}  # fmt: skip
        if (bpb := bits_per_byte(results["val_loss"], run.data)) is not None:
            results["val_bpb"] = bpb
        if run.hellaswag:
            scores = evaluate_hellaswag(eager, run.tokenizer, run.hellaswag, accelerator, show_progress=False)
            for convention, prefix in [("completion", "hellaswag"), ("harness", "hellaswag_lm_eval")]:
                results.update({f"{prefix}_{name}": value for name, value in scores[convention].items()})
            results["hellaswag_examples"] = scores["examples"]
    # Every process generates (the same tokens: same seed): with sharded weights each forward is collective.
    samples = generate_samples(eager, run.tokenizer, settings.sample_prompt, settings.seed)
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
    settings, accelerator, tokens_per_step = run.settings, run.accelerator, run.plan.tokens_per_step
    parameters = run.unwrapped.num_parameters()
    summary = {"steps": settings.max_train_steps, "tokens_per_step": tokens_per_step, "parameters": parameters,
               "tokens_seen": tokens_per_step * settings.max_train_steps, "train_loss": last_row["loss"],
               **evaluation}  # fmt: skip
    output_dir = settings.output_dir
    if accelerator.is_main_process:
        title = f"MiniGPT {settings.model} ({parameters / 1e6:.1f}M parameters), {summary['tokens_seen']:,} tokens"
        plot_losses(output_dir / "metrics.jsonl", output_dir / "loss.png", title)
    export_model(accelerator, run.model, settings, run.data, summary, output_dir / "final", base_model(settings))
    accelerator.print(f"exported {output_dir / 'final'} (val loss {evaluation['val_loss']:.4f})")
    if settings.push_to_hub and accelerator.is_main_process:
        push_to_hub(output_dir / "final", settings.hub_model_id)
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
