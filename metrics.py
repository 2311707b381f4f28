"""What a run measures and records: model FLOPs per token, the GPUs' bf16 peaks and MFU, the environment
(versions, hardware), the per-step log line, the metrics log and the loss plot. Used by training and by
the benchmarks."""

import datetime
import json
import math
import platform
from pathlib import Path

import accelerate
import torch
import transformers

from atomic_writes import write_text_atomically

GPT2_124M_HELLASWAG = 0.2955  # completion-style acc_norm, full val split (build-nanogpt / llm.c)
# Dense bf16 peak per GPU, by what torch.cuda.get_device_name says: the first match counts, so the PCIe and NVL
# boards (lower clocks and power) come before the SXM parts ("NVIDIA H100 80GB HBM3", "NVIDIA H200").
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200 NVL", 835e12), ("H200", 989e12),
                   ("A100", 312e12)]  # fmt: skip


def model_flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token (PaLM, appendix B): 6 per parameter of a matmul (2 forward, 4 backward) over
    the blocks (12 n_embd^2 a layer: qkv 3, output 1, MLP 8) and the head, plus 12 n_layer n_embd seq_len
    for the attention scores and their weighted sum. Embedding lookups do no matmul and count nothing."""
    matmul_parameters = 12 * config.n_layer * config.n_embd**2 + config.padded_vocab_size * config.n_embd
    return 6 * matmul_parameters + 12 * config.n_layer * config.n_embd * seq_len


def peak_bf16_flops(device_name: str) -> float | None:
    return next((flops for gpu, flops in PEAK_BF16_FLOPS if gpu in device_name), None)


def device_peak_flops(device: torch.device) -> float | None:
    """The bf16 peak of this process's GPU; None on CPU or an unlisted GPU (then no MFU is reported)."""
    return peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> dict:
    """The date, versions and hardware a number was measured on."""
    info = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_count": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info |= {"gpu": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(), "cuda": torch.version.cuda}
    return info


def log_line(row: dict, total_steps: int) -> str:
    """One fixed-field line per step, as build-nanogpt prints it; the step counted as done (1 after the first),
    as the evaluation lines count it."""
    mfu = f"{row['mfu']:6.1%}" if "mfu" in row else "     -"
    done = f"{row['step'] + 1}/{total_steps}"
    return (f"step {done:>{2 * len(str(total_steps)) + 1}} | loss {row['loss']:.4f} | lr {row['lr']:.3e} | norm {row['grad_norm']:6.3f} | "
            f"dt {row['dt_ms']:7.1f} ms | tok/s {row['tokens_per_s']:9,.0f} | mfu {mfu}")  # fmt: skip


class MetricsLog:
    """One JSON object per line: a `run` row each time the run starts (arguments, model config, versions,
    hardware), then a row per step. On resume, step rows from beyond the checkpoint (the part of the
    interrupted run being redone) are dropped, so the steps read like an uninterrupted run."""

    def __init__(self, path: Path, resume_step: int, run: dict):
        self.path = path
        rows = path.read_text().splitlines() if path.exists() and resume_step else []
        kept = "".join(row + "\n" for row in rows if self.step_of(row) < resume_step)
        write_text_atomically(path, kept)
        self.write({"run": run})

    @staticmethod
    def step_of(row: str) -> float:
        """A row's step (a run row counts as before any); a line torn by a kill mid-write counts as beyond
        any checkpoint (dropped)."""
        try:
            record = json.loads(row)
            return -math.inf if "run" in record else record["step"]
        except (ValueError, KeyError, TypeError):
            return math.inf

    def write(self, row: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """A metrics log's run rows (one per start) and step rows."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [r["run"] for r in records if "run" in r], [r for r in records if "run" not in r]


def plot_losses(metrics_file: Path, png: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = loss_figure(read_metrics(metrics_file)[1], title)
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
