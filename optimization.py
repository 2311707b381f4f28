"""The optimizers and the learning-rate schedule: AdamW (or Muon for the blocks' matrices and AdamW for
the rest), each parameter group carrying its peak lr, and linear warmup then cosine decay, as GPT-3. They read
the run's `TrainingSettings`."""

import math

import torch


MUON_MATRICES = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # the blocks' matmuls


def configure_optimizers(model, settings, device_type) -> list[torch.optim.Optimizer]:
    """AdamW, decaying only 2-D weights (matmuls, embeddings): biases and LayerNorm gains are not decayed.
    With --optimizer muon the blocks' matrices go to Muon instead, and AdamW keeps the embeddings (and the
    head tied to them), biases and gains: Muon orthogonalizes hidden layers' updates, not lookups. Each
    parameter group carries its peak lr for the schedule."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    matrices = [p for name, p in named if settings.optimizer == "muon" and name.endswith(MUON_MATRICES)]
    rest = [p for name, p in named if not any(p is m for m in matrices)]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": settings.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device_type == "cuda"  # the fused kernel: one launch for all parameters
    adamw = torch.optim.AdamW(groups, lr=settings.learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    optimizers = [adamw]
    if matrices:
        optimizers.append(torch.optim.Muon(matrices, lr=settings.muon_peak_lr, weight_decay=settings.weight_decay,
                                           momentum=settings.muon_momentum, adjust_lr_fn=settings.muon_adjust_lr))  # fmt: skip
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["peak_lr"] = group["lr"]
    return optimizers


def lr_factor(step, settings) -> float:
    """The schedule, as a fraction of the peak: linear warmup, then cosine to min_lr_ratio at max_train_steps."""
    if step < settings.num_warmup_steps:
        return (step + 1) / settings.num_warmup_steps
    progress = (step - settings.num_warmup_steps) / max(1, settings.max_train_steps - settings.num_warmup_steps)
    return settings.min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (1 - settings.min_lr_ratio)


def short_schedule_warning(settings) -> str | None:
    """A line for a run that ends inside its warmup: it never reaches its peak lr and never decays. Warned, not
    refused: a short trial run with the default warmup is a common, deliberate thing to do."""
    if settings.num_warmup_steps < settings.max_train_steps:
        return None
    last = lr_factor(settings.max_train_steps - 1, settings)
    return (f"warning: --num_warmup_steps {settings.num_warmup_steps} is not below --max_train_steps {settings.max_train_steps}: "
            f"the learning rate only warms up, to {last:.0%} of its peak ({last * settings.learning_rate:.3g} of "
            f"{settings.learning_rate:g}) at the last step, and never decays")  # fmt: skip


def set_lr(optimizers, factor: float) -> None:
    """Every group's lr to `factor` times its own peak (AdamW's and Muon's peaks differ)."""
    for group in (group for optimizer in optimizers for group in optimizer.param_groups):
        group["lr"] = group["peak_lr"] * factor
