"""Checkpoints of a training run: one run per output directory, complete-or-absent checkpoints, a
`latest` pointer, fallback past unreadable ones, and our own state as JSON.

A checkpoint `output_dir/checkpoints/step_N/` holds what `accelerator.save_state` writes (model weights
as safetensors, optimizer state, each process's RNG state) plus `training_state.json` (the step and the
data position), `config.json` and `training_args.json`. It is written as `step_N.tmp/` and renamed when
complete; only then does `latest` name it. accelerate reads `optimizer.bin` and `random_states_*.pkl`
with `torch.load(weights_only=True)`, a restricted unpickler that rebuilds tensors and plain containers
but runs no code; our own state is JSON (the custom-object pickle that accelerate loads unrestricted,
`custom_checkpoint_*.pkl`, is never written).
"""

import fcntl
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list, gather_object, load

from atomic_writes import put_in_place, staging_dir, write_text_atomically
from training_settings import SETTINGS_FILE, TrainingSettings

LATEST = "latest"  # file naming the newest complete checkpoint
KEPT = "kept.json"  # the checkpoints kept, oldest first
STATE_FILE = "training_state.json"
LOCK_FILE = ".lock"


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def lock_output_dir(output_dir: Path):
    """An exclusive lock on `output_dir` for this run, held until the process ends. The kernel drops it
    when the holder dies, so a killed run never leaves a stale lock behind a resume."""
    output_dir.mkdir(parents=True, exist_ok=True)
    handle = open(output_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        raise ValueError(f"{output_dir} is in use by another training run (pid {handle.read().strip() or '?'}): "
                         "give this run its own --output_dir") from None  # fmt: skip
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def check_shared_filesystem(accelerator, output_dir: Path) -> None:
    """Checkpoints are written by each node (its processes' RNG states) and renamed by node 0, so every
    node must see the same `output_dir`. Node 0 writes a token there; each node's first process looks."""
    if int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)) == accelerator.num_processes:
        return  # one node (torchrun, under accelerate launch, sets LOCAL_WORLD_SIZE to this node's processes)
    token = [uuid.uuid4().hex if accelerator.is_main_process else None]
    probe = Path(output_dir) / ".shared_filesystem_probe"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text(token[0])
    broadcast_object_list(token)
    accelerator.wait_for_everyone()
    sees = not accelerator.is_local_main_process or (probe.is_file() and probe.read_text() == token[0])
    blind = [rank for rank, ok in enumerate(gather_object([sees])) if not ok]
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink()
    if blind:
        raise ValueError(f"--output_dir {output_dir} is not one shared directory: the processes of rank(s) "
                         f"{', '.join(map(str, blind))} cannot see what rank 0 writes there. Multi-node "
                         "checkpoints need a filesystem shared by every node (NFS, Lustre, a cloud bucket mount)")  # fmt: skip


def save_tied_head_once(models, weights, output_dir):
    """`save_state` pre-hook. A state_dict names the tied head twice (`lm_head.weight`, the embedding);
    safetensors stores a tensor once, so accelerate would drop the alias itself and warn at every save.
    Dropping it here writes the same file; `load_state` (safetensors' `load_model`) re-ties it."""
    for state in weights:
        for head in [name for name in state if name.endswith("lm_head.weight")]:
            embedding = head.replace("lm_head.weight", "transformer.wte.weight")
            if embedding in state and state[head].data_ptr() == state[embedding].data_ptr():
                del state[head]


def save_checkpoint(accelerator, config, settings: TrainingSettings, step: int, data_state: dict) -> None:
    """`save_state` into `step_N.tmp`, our state beside it, renamed when complete; `latest` then names
    it, and only the last `--checkpoints_total_limit` are kept."""
    root = checkpoint_root(settings.output_dir)
    final = root / f"step_{step}"
    temporary = staging_dir(final, clear=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary)
    accelerator.wait_for_everyone()  # save_state returns on each process when its own files are written
    if accelerator.is_main_process:
        config.to_json_file(temporary / "config.json")
        (temporary / SETTINGS_FILE).write_text(settings.to_json())
        (temporary / STATE_FILE).write_text(json.dumps({"step": step, "data": data_state}))
        put_in_place(temporary, final)
        write_text_atomically(root / LATEST, final.name)
        kept = [name for name in read_kept(root) if name != final.name] + [final.name]
        for old in kept[: -settings.checkpoints_total_limit]:
            shutil.rmtree(root / old, ignore_errors=True)
        write_text_atomically(root / KEPT, json.dumps(kept[-settings.checkpoints_total_limit :]))
    accelerator.wait_for_everyone()


def read_kept(root: Path) -> list[str]:
    try:
        return json.loads((root / KEPT).read_text())
    except (OSError, ValueError):
        return []


def checkpoint_candidates(requested: str, output_dir: Path) -> list[Path]:
    """The checkpoints to try, in order. `latest`: the one it names, then the older kept ones (newest
    first), so an unreadable newest checkpoint falls back to the previous complete one. A path: only it."""
    if requested != LATEST:
        path = Path(requested)
        if not (path / "config.json").is_file():
            raise ValueError(f"--resume_from_checkpoint {path} is not a complete checkpoint directory")
        return [path]
    root = checkpoint_root(output_dir)
    named = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else ""
    ordered = ([named] if named else []) + [name for name in reversed(read_kept(root)) if name != named]
    candidates = [root / name for name in ordered if (root / name / "config.json").is_file()]
    if not candidates:
        raise ValueError(f"--resume_from_checkpoint latest: no complete checkpoint in {root}")
    return candidates


def load_checkpoint(accelerator, candidates: list[Path]) -> tuple[Path, dict]:
    """Load the first candidate that every process can read completely; returns it and its state. A
    damaged one (truncated weights, optimizer or state, a missing file) is named and skipped."""
    problems = []
    for checkpoint in candidates:
        try:
            # accelerate skips an unreadable RNG file with an info-level log, which would make the resumed
            # run silently diverge: read this process's first, as accelerate does (weights_only).
            load(checkpoint / f"random_states_{accelerator.process_index}.pkl")["torch_manual_seed"]
            accelerator.load_state(checkpoint)
            state = json.loads((checkpoint / STATE_FILE).read_text())
            state = {"step": int(state["step"]), "data": dict(state["data"])}
            error = None
        except Exception as exception:  # any damage: safetensors, pickle, JSON, missing files
            reason = (str(exception).splitlines() or [""])[0][:200]
            error = f"checkpoint {checkpoint} is unreadable ({type(exception).__name__}: {reason})"
        errors = [e for e in gather_object([error]) if e]  # every process must have loaded it
        if not errors:
            return checkpoint, state
        problems.append(errors[0])
        if checkpoint != candidates[-1]:
            accelerator.print(f"warning: {errors[0]}; falling back to an older checkpoint")
    raise ValueError("; ".join(problems))


def cut_table_padding(optimizers) -> None:
    """Checkpoints written before 2026-12-05 held the two tables padded to `pad_vocab_size_multiple` rows (the
    model cuts its own on load): their optimizer state is cut to the rows of the parameter it belongs to. The
    padding rows were never read, so the run goes on exactly as it would have."""
    for optimizer in optimizers:
        for param, state in optimizer.state.items():
            for name, value in state.items():
                if torch.is_tensor(value) and value.dim() and value.shape[0] > param.shape[0] and value.shape[1:] == param.shape[1:]:
                    state[name] = value[: param.shape[0]].clone()


def check_same_model(checkpoint: Path, config, optimizer: str) -> None:
    """A checkpoint resumes only into the model shape and optimizer it was saved with."""
    saved_settings = checkpoint / SETTINGS_FILE
    saved_optimizer = TrainingSettings.load(saved_settings).optimizer if saved_settings.exists() else "adamw"
    if saved_optimizer != optimizer:
        raise ValueError(f"cannot resume {checkpoint}, trained with --optimizer {saved_optimizer}, with --optimizer {optimizer}")
    saved = type(config).from_json_file(checkpoint / "config.json")  # the defaults filled in, as at save
    fields = ["vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "pad_vocab_size_multiple"]
    differing = [f"{f}: checkpoint {getattr(saved, f)}, now {getattr(config, f)}" for f in fields
                 if getattr(saved, f) != getattr(config, f)]  # fmt: skip
    if differing:
        raise ValueError(f"cannot resume {checkpoint} into a different model ({'; '.join(differing)})")

