"""A training run's settings: one typed, frozen object, read from the command line and checked before anything
runs, then handed to every module the run uses (the optimizers, the memory estimate, checkpoints, export). Each
checkpoint keeps them as `training_args.json`, read back with their types.

The fields are the command line: each carries its help, and `parser()` builds argparse from them. (transformers'
HfArgumentParser does the same for its dataclasses, but it cannot take a micro-batch that is a number or `auto`,
and it adds a `--no_X` and a `--X-with-dashes` spelling of every flag.)
"""

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from configuration_minigpt import PRESETS
from token_shards import tokenizer_dir

SETTINGS_FILE = "training_args.json"  # in every checkpoint


def micro_batch(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of windows or auto, got {text!r}") from None


def setting(default, help: str, **parser_options):
    """A field with its command-line help; `parser_options` go to `add_argument` (type, choices). A flag that
    defaults to False is a switch."""
    return field(default=default, metadata={"help": help, **parser_options})


@dataclass(frozen=True)
class TrainingSettings:
    data_dir: str = setting("data/builtin", "output of prepare_data.py")
    model: str = setting("small", f"a preset ({', '.join(PRESETS)}), a config/checkpoint path, or gpt2[-medium|-large|-xl] "
                                  "(OpenAI's weights; a local GPT-2 directory works too with --from_gpt2)")  # fmt: skip
    from_gpt2: bool = setting(False, "--model is a GPT2LMHeadModel directory or Hub id")
    pad_vocab_size_multiple: int = setting(64, "for new models: 50257 -> 50304")
    output_dir: Path = setting(Path("runs/minigpt"), "", type=Path)
    seq_len: int | None = setting(None, "tokens per window (default: the model's context)", type=int)
    per_device_train_batch_size: int | str = setting(
        16, "windows per process per micro-step, or auto: the largest whose estimated peak memory fits the device "
            "(memory_estimate.py), the accumulation then derived from --total_batch_size", type=micro_batch)  # fmt: skip
    device_memory_gib: float | None = setting(None, "memory the micro-batch must fit, per device (default: the GPU's "
                                                    "free memory; on CPU nothing is checked unless this is given)", type=float)  # fmt: skip
    total_batch_size: int | None = setting(None, "tokens per optimizer step (524288 for the 124M recipe); sets the "
                                                 "accumulation", type=int)  # fmt: skip
    gradient_accumulation_steps: int = setting(1, "used when no --total_batch_size")
    learning_rate: float = setting(1e-3, "peak (6e-4 for the 124M recipe)")
    min_lr_ratio: float = setting(0.1, "cosine floor, as a fraction of the peak")
    weight_decay: float = setting(0.1, "decoupled, on 2-D weights (both optimizers)")
    optimizer: str = setting("adamw", "muon: torch.optim.Muon for the blocks' matrices (c_attn, c_proj, c_fc), AdamW "
                                      "for the rest", choices=["adamw", "muon"])  # fmt: skip
    muon_learning_rate: float | None = setting(None, "Muon's peak lr (default: --learning_rate, which the "
                                                     "match_rms_adamw adjustment carries over)", type=float)  # fmt: skip
    muon_momentum: float = setting(0.95, "")
    muon_adjust_lr: str = setting("match_rms_adamw", "torch's per-shape lr scaling: 0.2 sqrt(max(A, B)) gives Muon's "
                                  "updates AdamW's RMS (Moonshot); original: sqrt(max(1, A/B)) (Keller Jordan's, lr ~0.02)",
                                  choices=["match_rms_adamw", "original"])  # fmt: skip
    max_grad_norm: float = setting(1.0, "")
    num_warmup_steps: int = setting(15, "")
    max_train_steps: int = setting(150, "")
    eval_steps: int = setting(50, "val loss and samples every N steps (0: only at the end)")
    eval_iters: int = setting(10, "val batches per evaluation, shared by the processes (the val split must hold them)")
    hellaswag: str | None = setting(None, "HellaSwag at every evaluation: Rowan/hellaswag or a local jsonl (default: "
                                          "none; offline)", type=str)  # fmt: skip
    hellaswag_limit: int | None = setting(None, "only the first N HellaSwag examples", type=int)
    sample_prompt: str = setting("The", "prompt for the generated samples")
    checkpointing_steps: int = setting(50, "0: no checkpoints")
    checkpoints_total_limit: int = setting(2, "keep the last K checkpoints")
    resume_from_checkpoint: str | None = setting(None, "a checkpoint directory, or 'latest'", type=str)
    with_tracking: bool = setting(False, "")
    report_to: str = setting("tensorboard", "tensorboard, wandb, all, ... (with --with_tracking)")
    seed: int = setting(1337, "")
    compile: bool = setting(False, "torch.compile the model for training")
    export_gpt2: bool = setting(False, "also write output_dir/final-gpt2: a native GPT2LMHeadModel folder (no remote code)")
    export_gguf: str | None = setting(None, "also write output_dir/final-TYPE.gguf for llama.cpp, Ollama, LM Studio "
                                            "(export_gguf.py)", type=str, choices=["f32", "f16", "bf16", "q8_0"])  # fmt: skip
    license: str = setting("mit", "the license the model card declares")
    push_to_hub: bool = setting(False, "")
    hub_model_id: str | None = setting(None, "", type=str)

    @property
    def muon_peak_lr(self) -> float:
        return self.muon_learning_rate or self.learning_rate

    def problems(self) -> list[str]:
        """What makes no sense, one phrase each, naming the flag."""
        positive = ["gradient_accumulation_steps", "max_train_steps", "eval_iters", "learning_rate", "max_grad_norm",
                    "checkpoints_total_limit"]  # fmt: skip
        non_negative = ["num_warmup_steps", "eval_steps", "checkpointing_steps", "weight_decay"]
        optional_positive = ["seq_len", "total_batch_size", "hellaswag_limit", "muon_learning_rate", "device_memory_gib"]
        if self.per_device_train_batch_size != "auto":
            positive.append("per_device_train_batch_size")
        given = dataclasses.asdict(self)
        problems = [f"--{n} must be positive, got {given[n]}" for n in positive if not given[n] > 0]
        problems += [f"--{n} must be >= 0, got {given[n]}" for n in non_negative if not given[n] >= 0]
        problems += [f"--{n} must be positive, got {given[n]}" for n in optional_positive if given[n] is not None and given[n] <= 0]
        if not 0 <= self.muon_momentum < 1:
            problems.append(f"--muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"--min_lr_ratio is a fraction of the peak in [0, 1], got {self.min_lr_ratio}")
        if self.push_to_hub and not self.hub_model_id:
            problems.append("--push_to_hub needs --hub_model_id")
        return problems

    @classmethod
    def parser(cls, description: str = None) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        for f in dataclasses.fields(cls):
            options = dict(f.metadata, help=f.metadata["help"] or None)
            if f.default is False:
                p.add_argument(f"--{f.name}", action="store_true", **options)
            else:
                p.add_argument(f"--{f.name}", default=f.default, **{"type": type(f.default), **options})
        return p

    @classmethod
    def from_command_line(cls, argv: list[str], description: str = None) -> "TrainingSettings":
        """The settings `argv` asks for; nonsense ends in argparse's usage and one line naming every problem."""
        p = cls.parser(description)
        settings = cls(**vars(p.parse_args(attach_negative_values(argv))))
        if problems := settings.problems():
            p.error("; ".join(problems))
        return settings

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=str, indent=1)

    @classmethod
    def load(cls, path: Path) -> "TrainingSettings":
        """A checkpoint's `training_args.json`, with the types the command line gives: a setting the file lacks (an
        older run's) takes its default, and one no longer known is dropped."""
        saved = json.loads(Path(path).read_text())
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in saved:
                value, read = saved[f.name], f.metadata.get("type", type(f.default))
                values[f.name] = read(value) if isinstance(value, str) and read is not str else value
        return cls(**values)


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


def find_tokenizer(model_path: str, explicit: str | None) -> str:
    """`--tokenizer`, else the model's own folder or Hub id, else (a training checkpoint, which holds no tokenizer)
    the tokenizer of the data directory it was trained on."""
    if explicit:
        return explicit
    saved = Path(model_path) / SETTINGS_FILE
    if not (Path(model_path) / "tokenizer.json").exists() and saved.exists():
        return str(tokenizer_dir(TrainingSettings.load(saved).data_dir))
    return model_path
