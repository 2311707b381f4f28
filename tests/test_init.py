"""GPT-2's initialisation for every way a model is made, measured against transformers' own
GPT2LMHeadModel built from the same hyperparameters: a wrong scale for any group of tensors fails."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import train_accelerate
from configuration_minigpt import PRESETS, MiniGPTConfig
from modeling_minigpt import MiniGPTForCausalLM
from token_shards import TokenData
from training_settings import TrainingSettings

VOCAB = 1000
SHAPE = dict(n_embd=128, n_head=4, n_positions=128, vocab_size=VOCAB, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
RESIDUAL_PROJECTIONS = ("attn.c_proj.weight", "mlp.c_proj.weight")


def assert_init_like_gpt2(model, hyperparameters):
    """Per tensor: constants (LayerNorm 1/0, zero biases) equal GPT-2's exactly; random tensors have
    GPT-2's std within 5% and a mean indistinguishable from 0. (A 64 x 64 tensor estimates its std
    within ~1%, so 5% separates 0.02 from 0.02/sqrt(2 * n_layer) at any depth.)"""
    torch.manual_seed(1)
    reference = dict(GPT2LMHeadModel(GPT2Config(**hyperparameters)).named_parameters())
    ours = dict(model.named_parameters())
    assert ours.keys() == reference.keys()
    for name, param in ours.items():
        mine, theirs = param.detach().float(), reference[name].detach().float()
        if theirs.std() == 0:
            assert torch.equal(mine.unique(), theirs.unique()), name
            continue
        assert mine.std() / theirs.std() == pytest.approx(1.0, abs=0.05), f"{name}: std {mine.std():.5f}, GPT-2 {theirs.std():.5f}"
        assert mine.mean().abs() < 5 * theirs.std() / mine.numel() ** 0.5, name


@pytest.mark.parametrize("n_layer", [2, 12])
def test_constructor_and_from_config_initialise_like_gpt2(n_layer):
    hyperparameters = dict(SHAPE, n_layer=n_layer)
    config = MiniGPTConfig(**hyperparameters)
    assert_init_like_gpt2(MiniGPTForCausalLM(config), hyperparameters)
    assert_init_like_gpt2(AutoModelForCausalLM.from_config(config), hyperparameters)
    residual = MiniGPTForCausalLM(config).transformer.h[0].mlp.c_proj.weight
    assert residual.std().item() == pytest.approx(0.02 / (2 * n_layer) ** 0.5, rel=0.05)


def test_train_accelerate_presets_initialise_like_gpt2():
    """`train_accelerate.py --model tiny` builds the model it trains through build_model."""
    settings = TrainingSettings(model="tiny", pad_vocab_size_multiple=1)
    model = train_accelerate.build_model(settings, TokenData(Path("unused"), {"vocab_size": VOCAB, "eot_token_id": VOCAB - 1}))
    assert_init_like_gpt2(model, dict(PRESETS["tiny"], vocab_size=VOCAB, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1))


def test_loading_a_full_checkpoint_leaves_every_tensor_untouched(tmp_path):
    model = MiniGPTForCausalLM(MiniGPTConfig(**SHAPE, n_layer=2))
    with torch.no_grad():
        for param in model.parameters():  # values no init would produce: any re-initialisation shows
            param.add_(1.0)
    model.save_pretrained(tmp_path)
    loaded = MiniGPTForCausalLM.from_pretrained(tmp_path)
    for name, param in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], param), name


def test_from_pretrained_initialises_only_the_missing_weights(tmp_path):
    model = MiniGPTForCausalLM(MiniGPTConfig(**SHAPE, n_layer=12))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    missing = [f"transformer.h.3.{RESIDUAL_PROJECTIONS[0]}", f"transformer.h.7.{RESIDUAL_PROJECTIONS[1]}",
               "transformer.h.5.mlp.c_fc.weight", "transformer.h.2.ln_2.weight", "transformer.h.0.attn.c_attn.bias"]  # fmt: skip
    save_file({k: v for k, v in weights.items() if k not in missing}, tmp_path / "model.safetensors", {"format": "pt"})

    loaded = MiniGPTForCausalLM.from_pretrained(tmp_path).state_dict()
    for name, saved in weights.items():
        if name not in missing:
            assert torch.equal(loaded[name], saved), name
    residual_std = 0.02 / (2 * 12) ** 0.5
    assert loaded[missing[0]].std().item() == pytest.approx(residual_std, rel=0.05)
    assert loaded[missing[1]].std().item() == pytest.approx(residual_std, rel=0.05)
    assert loaded[missing[2]].std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(loaded[missing[3]], torch.ones(128)) and torch.equal(loaded[missing[4]], torch.zeros(3 * 128))
