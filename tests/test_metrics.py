"""What a run measures and records (metrics.py): FLOPs per token by hand, the MFU peaks, the log line, and
the metrics log across a resume."""

import json

import pytest

from configuration_minigpt import MiniGPTConfig
from metrics import MetricsLog, log_line, model_flops_per_token, peak_bf16_flops, read_metrics


def test_flops_per_token_equal_a_hand_count():
    """2 layers, n_embd 64, vocabulary 1000 padded to 1024, 32-token windows. Matmul weights: a layer has
    qkv 64 x 192, output 64 x 64, MLP 64 x 256 and 256 x 64 = 49,152; two layers 98,304; the head 1024 x 64
    = 65,536; 163,840 in all, 6 FLOPs each (2 forward, 4 backward) = 983,040. Attention per token and
    layer: q.k over 32 positions and the weighted sum of 32 values, 2 x 2 x 32 x 64 = 8,192 forward, x 3
    with backward = 24,576; two layers 49,152. Total 1,032,192."""
    config = MiniGPTConfig(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=1000, pad_vocab_size_multiple=64,
                           bos_token_id=999, eos_token_id=999)  # fmt: skip
    assert config.padded_vocab_size == 1024
    assert model_flops_per_token(config, seq_len=32) == 1_032_192


def test_gpt2_124m_is_about_six_times_its_parameters():
    """The usual estimate (nanoGPT, llm.c): ~6 x 124M per token plus attention, ~0.87 GFLOP at T = 1024."""
    config = MiniGPTConfig.from_preset("124M", vocab_size=50257, pad_vocab_size_multiple=64)
    assert model_flops_per_token(config, 1024) == pytest.approx(6 * 124.3e6 + 12 * 12 * 768 * 1024, rel=0.01)


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
                                        ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA A100-PCIE-40GB", 312e12),
                                        ("Tesla T4", None)])  # fmt: skip
def test_mfu_peak_by_device_name(name, peak):
    """NVIDIA's datasheets, dense bf16: the PCIe and NVL boards run below the SXM parts' 989 TFLOP/s."""
    assert peak_bf16_flops(name) == peak


def test_the_log_line_has_fixed_fields():
    row = {"step": 8, "loss": 3.25, "lr": 6e-4, "grad_norm": 0.5, "dt_ms": 123.4, "tokens_per_s": 524288, "mfu": 0.4512}
    assert log_line(row, 150) == ("step   9/150 | loss 3.2500 | lr 6.000e-04 | norm  0.500 | dt   123.4 ms | "
                                  "tok/s   524,288 | mfu  45.1%")  # fmt: skip
    del row["mfu"]  # no known peak (CPU)
    assert log_line(row, 150).endswith("| mfu      -")


def test_the_metrics_log_keeps_every_start_and_drops_the_redone_steps(tmp_path):
    """A resumed run keeps the first start's row and the steps before its checkpoint; the redone steps and a
    line torn by the kill go; its own start is recorded."""
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, 0, {"start_step": 0})
    for step in range(6):
        log.write({"step": step, "loss": 10.0 - step})
    with open(path, "a") as file:
        file.write('{"step": 6, "lo')  # killed mid-write
    resumed = MetricsLog(path, 4, {"start_step": 4})
    resumed.write({"step": 4, "loss": 5.5})
    runs, rows = read_metrics(path)
    assert runs == [{"start_step": 0}, {"start_step": 4}]
    assert [(r["step"], r["loss"]) for r in rows] == [(0, 10.0), (1, 9.0), (2, 8.0), (3, 7.0), (4, 5.5)]
    assert json.loads(path.read_text().splitlines()[0]) == {"run": {"start_step": 0}}
    MetricsLog(path, 0, {"start_step": 0})  # a new run in the same directory starts a new log
    assert read_metrics(path) == ([{"start_step": 0}], [])
