"""Which of SDPA's attention kernels training prefers, by GPU. Used by the training loop and the device check."""

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# On Hopper, cuDNN's fused attention trains 1.7-2.3x faster than the FlashAttention-2 kernels SDPA tries first,
# at the same accuracy, and is slower on Ampere and Blackwell (transformers #48163, measured on six GPUs).
# A priority, not a restriction: a shape cuDNN cannot take falls back to flash. bench/gpu_check.sh times both.
HOPPER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def preferred_backends(device: torch.device) -> list | None:
    """SDPA's backends in the order training prefers them on this device, or None for SDPA's own order."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        return HOPPER
    return None


@contextlib.contextmanager
def preferring(backends):
    """SDPA's backends in this order of preference while a step's forward and backward are made (a compiled
    graph fixes its backend when traced, so the first step's choice holds for the run)."""
    with sdpa_kernel(backends, set_priority=True) if backends else contextlib.nullcontext():
        yield
