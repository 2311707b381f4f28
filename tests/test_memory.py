"""memory_estimate.py against memory measured here, the recipe's targets, and the training script's
`--per_device_train_batch_size auto` and its refusal of a micro-batch that cannot fit."""

import json
import sys

import pytest

from configuration_minigpt import MiniGPTConfig
from conftest import REPO, TINY_RUN, TRAIN, failure, run_script
from memory_estimate import GiB, estimate_peak_bytes, usable_bytes

sys.path.insert(0, str(REPO / "bench"))


def test_the_estimate_is_close_to_a_peak_measured_on_this_cpu():
    """A real fp32 step in a fresh process (the rise of its RSS high-water mark, which also counts the C
    allocator's overhead) against the estimate of the same step on fake tensors: 0.83-0.89x at three sizes."""
    import bench_memory

    row = bench_memory.measured_and_estimated(*bench_memory.CHECKS[0])
    assert 0.75 < row["ratio"] < 1.05, row


def test_gpt2_124m_at_the_recipe_batch_fits_a_40gb_card_eager_and_compiled():
    """The targets: 64 x 1024, bf16, DDP, <= 26 GiB eager and compiled. Before, compiled training returned
    (B, T, V) logits that accelerate copied to fp32: ~42 GiB."""
    from memory_estimate import per_process, step_memory

    config = MiniGPTConfig.from_preset("124M", vocab_size=50257, pad_vocab_size_multiple=64)
    memory = step_memory(config, 64, 1024, compiled=True)
    eager, compiled = (per_process(memory, compiled, "ddp", 8) / GiB for compiled in (False, True))
    assert 20 < eager <= 26 and 20 < compiled <= 26, (eager, compiled)
    assert per_process(memory, False, "fsdp", 8) / GiB < eager  # sharding saves parameters, gradients, optimizer state


def test_auto_settles_the_124m_recipe_on_an_80gb_device_in_three_estimates_and_a_resume_in_none(monkeypatch, tmp_path):
    """524,288 tokens a step on one device are 512 windows of 1,024: the divisors 512 and 256 do not fit, the
    line through their estimates names 128, which does. A second start finds all three in the cache."""
    from memory_estimate import Estimates, largest_divisor_that_fits

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = MiniGPTConfig.from_preset("124M", vocab_size=50257, pad_vocab_size_multiple=64)
    for made in (3, 0):
        estimate = Estimates(config, 1024, compiled=False, strategy="single", world_size=1)
        assert largest_divisor_that_fits(estimate, usable_bytes(80e9), 512) == 128
        assert estimate.made == made


def tiny_budget_gib(data_dir, batch):
    """A device memory in which `batch` windows of the tiny run fit, with the margin, and `batch + 1` do not."""
    meta = json.loads((data_dir / "meta.json").read_text())
    eot = meta["eot_token_id"]
    config = MiniGPTConfig.from_preset("tiny", vocab_size=meta["vocab_size"], bos_token_id=eot, eos_token_id=eot,
                                       pad_vocab_size_multiple=64)  # fmt: skip
    fits, too_big = (estimate_peak_bytes(config, b, 32, autocast=None) for b in (batch, batch + 1))
    assert fits < too_big
    return (fits + too_big) / 2 / usable_bytes(1) / GiB


def test_auto_micro_batch_is_the_largest_that_fits_and_divides_the_step(data_dir, tmp_path):
    memory = tiny_budget_gib(data_dir, 6)
    command = [*TRAIN, *TINY_RUN, "--data_dir", str(data_dir), "--max_train_steps", "2", "--checkpointing_steps", "0",
               "--per_device_train_batch_size", "auto", "--device_memory_gib", f"{memory:.9f}"]  # fmt: skip
    alone = run_script([*command, "--output_dir", str(tmp_path / "alone")], tmp_path)
    assert alone.returncode == 0, failure(alone)
    assert "micro-batch auto: 6 windows" in alone.stdout and "= 6 x 32 x 1 processes x 1 accumulation" in alone.stdout
    # 8 windows a step: the largest divisor of 8 that fits is 4, accumulated twice.
    stepped = run_script([*command, "--total_batch_size", str(8 * 32), "--output_dir", str(tmp_path / "stepped")], tmp_path)
    assert stepped.returncode == 0, failure(stepped)
    assert "micro-batch auto: 4 windows" in stepped.stdout and "= 4 x 32 x 1 processes x 2 accumulation" in stepped.stdout


@pytest.mark.parametrize("batch", ["64", "auto"])
def test_a_micro_batch_that_cannot_fit_is_refused_in_one_line_before_anything_is_written(batch, data_dir, tmp_path):
    memory = tiny_budget_gib(data_dir, 6) if batch == "64" else 1e-6
    out = tmp_path / "run"
    result = run_script([*TRAIN, *TINY_RUN, "--data_dir", str(data_dir), "--output_dir", str(out),
                         "--per_device_train_batch_size", batch, "--device_memory_gib", f"{memory:.9f}"], tmp_path)  # fmt: skip
    assert result.returncode != 0 and not out.exists()
    (line,) = result.stderr.strip().splitlines()
    expected = "the largest that fits is 6" if batch == "64" else "not even one window of 32 tokens fits"
    assert line.startswith("train_accelerate.py: error: ") and expected in line, line
