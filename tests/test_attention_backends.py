"""The attention kernels training prefers by GPU (attention_backends.py), and the training loop in force of them."""

import contextlib

import torch
from torch.nn.attention import SDPBackend

import attention_backends
from conftest import TINY_RUN, step_rows


def test_hopper_prefers_cudnn_and_every_other_device_keeps_sdpas_order(monkeypatch):
    for capability, expected in (((9, 0), attention_backends.HOPPER), ((8, 0), None), ((10, 0), None), ((12, 0), None)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert attention_backends.preferred_backends(torch.device("cuda")) == expected
    assert attention_backends.preferred_backends(torch.device("cpu")) is None
    assert attention_backends.HOPPER[:2] == [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]


def test_the_training_loop_steps_under_the_preference_and_changes_nothing_where_cudnn_is_absent(data_dir, tmp_path, monkeypatch):
    """train_accelerate.main, in this process, told it is on Hopper: every attention call of every training step
    runs inside the preference (on this CPU SDPA has no cuDNN and falls back to its own kernel), and the losses
    are bitwise those of the same run with SDPA's own order."""
    import train_accelerate

    entered, inside, calls = [], [], []
    sdpa_kernel, sdpa = attention_backends.sdpa_kernel, torch.nn.functional.scaled_dot_product_attention

    @contextlib.contextmanager
    def recording(backends, set_priority=False):
        entered.append((backends, set_priority))
        inside.append(True)
        with sdpa_kernel(backends, set_priority=set_priority):
            yield
        inside.pop()

    monkeypatch.setattr(attention_backends, "sdpa_kernel", recording)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(bool(inside)) or sdpa(*a, **k))
    run = [*TINY_RUN, "--data_dir", str(data_dir), "--max_train_steps", "3", "--checkpointing_steps", "0"]
    train_accelerate.main([*run, "--output_dir", str(tmp_path / "own_order")])
    assert not entered and not any(calls)
    calls.clear()
    monkeypatch.setattr(train_accelerate, "preferred_backends", lambda device: attention_backends.HOPPER)
    train_accelerate.main([*run, "--output_dir", str(tmp_path / "hopper")])
    assert entered == [(attention_backends.HOPPER, True)] * 3  # once a step
    assert calls.count(True) == 3 * 2  # the tiny preset's two layers, every step; evaluation's calls are outside
    assert [r["loss"] for r in step_rows(tmp_path / "hopper")] == [r["loss"] for r in step_rows(tmp_path / "own_order")]
