"""The optimizers and the schedule (optimization.py): which parameters go where, the fused AdamW branch
CUDA takes, and the lr at every step of a short schedule against values computed by hand."""

import dataclasses

import pytest
import torch

from configuration_minigpt import MiniGPTConfig
from modeling_minigpt import MiniGPTForCausalLM
from optimization import configure_optimizers, lr_factor, set_lr, short_schedule_warning
from train_accelerate import parse_args
from training_settings import TrainingSettings


def schedule(warmup, total, floor=0.1):
    return parse_args(["--num_warmup_steps", str(warmup), "--max_train_steps", str(total), "--min_lr_ratio", str(floor)])


def test_lr_factor_at_every_step_of_a_short_schedule():
    """4 warmup steps, (s + 1) / 4, reach the peak on the 4th; then 0.1 + 0.45 (1 + cos(pi p)) with
    p = (s - 4) / 6 descends to the 10% floor, reached when the 10 steps are done."""
    args = schedule(warmup=4, total=10)
    expected = [0.25, 0.5, 0.75, 1.0,  # warmup
                1.0, 0.9397114, 0.775, 0.55, 0.325, 0.1602886]  # cos of 0, 30, 60, 90, 120, 150 degrees  # fmt: skip
    assert [lr_factor(step, args) for step in range(10)] == pytest.approx(expected, abs=1e-7)
    assert lr_factor(10, args) == pytest.approx(0.1) and lr_factor(50, args) == pytest.approx(0.1)  # the floor, past the end


def test_lr_factor_without_warmup_and_with_a_zero_floor():
    args = schedule(warmup=0, total=4, floor=0.0)
    assert [lr_factor(step, args) for step in range(5)] == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466, 0.0], abs=1e-7)


def test_set_lr_scales_every_group_by_its_own_peak():
    model = MiniGPTForCausalLM(MiniGPTConfig.from_preset("tiny", vocab_size=1000))
    adamw, muon = configure_optimizers(model, parse_args(["--optimizer", "muon", "--learning_rate", "2e-3",
                                                          "--muon_learning_rate", "5e-3"]), "cpu")  # fmt: skip
    set_lr([adamw, muon], 0.5)
    assert [g["lr"] for g in adamw.param_groups] == [1e-3, 1e-3] and muon.param_groups[0]["lr"] == 2.5e-3


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = MiniGPTForCausalLM(MiniGPTConfig.from_preset("tiny", vocab_size=1000))
    args = parse_args(["--optimizer", "muon", "--learning_rate", "2e-3", "--muon_learning_rate", "5e-3"])
    adamw, muon = configure_optimizers(model, args, "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = sorted(names[id(p)] for g in muon.param_groups for p in g["params"])
    in_adamw = sorted(names[id(p)] for g in adamw.param_groups for p in g["params"])
    assert in_muon == sorted(f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert sorted(in_muon + in_adamw) == sorted(names.values())  # each parameter once (the tied head is wte)
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight"} <= set(in_adamw)
    assert [g["peak_lr"] for g in adamw.param_groups] == [2e-3, 2e-3] and muon.param_groups[0]["peak_lr"] == 5e-3
    assert muon.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw" and muon.param_groups[0]["momentum"] == 0.95
    assert configure_optimizers(model, parse_args([]), "cpu")[0].param_groups[0]["params"][0] is model.transformer.wte.weight


def test_the_cuda_optimizer_branch_fused_adamw_steps_like_the_default():
    """On CUDA the optimizers are built with AdamW(fused=True), which torch also runs on CPU: that branch,
    taken here, must step the weights as the default (foreach) implementation does."""
    args = parse_args(["--weight_decay", "0.1"])
    weights = []
    for device_type in ("cuda", "cpu"):
        torch.manual_seed(0)
        model = MiniGPTForCausalLM(MiniGPTConfig(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=64,
                                                 bos_token_id=63, eos_token_id=63)).train()  # fmt: skip
        (adamw,) = configure_optimizers(model, args, device_type)
        assert adamw.defaults["fused"] == (device_type == "cuda")
        for step in range(5):
            x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(step))
            model(x, labels=x).loss.backward()
            adamw.step()
            adamw.zero_grad()
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    # The kernels round differently where a gradient is near zero (Adam divides by its root mean square):
    # 1.7e-6 measured, against updates of ~1e-3 a step.
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-5)


def test_a_run_that_ends_inside_its_warmup_is_warned_with_what_its_schedule_does():
    args = TrainingSettings(num_warmup_steps=15, max_train_steps=6, learning_rate=6e-4, min_lr_ratio=0.1)
    assert short_schedule_warning(args) == (
        "warning: --num_warmup_steps 15 is not below --max_train_steps 6: the learning rate only warms up, to 40% "
        "of its peak (0.00024 of 0.0006) at the last step, and never decays"
    )
    assert lr_factor(5, args) == 6 / 15  # what the line reports: the last step's factor
    assert short_schedule_warning(dataclasses.replace(args, max_train_steps=16)) is None
