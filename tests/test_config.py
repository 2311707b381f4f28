"""Config validation and presets."""

import pytest

from configuration_minigpt import PRESETS, MiniGPTConfig


def test_defaults_are_gpt2_small():
    config = MiniGPTConfig()
    assert (config.vocab_size, config.n_positions, config.n_embd, config.n_layer, config.n_head) == (50257, 1024, 768, 12, 12)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.max_position_embeddings) == (768, 12, 12, 1024)
    assert config.tie_word_embeddings and config.use_cache
    assert config.bos_token_id == config.eos_token_id == 50256
    assert config.padded_vocab_size == 50257


def test_vocab_padding_multiple():
    assert MiniGPTConfig(pad_vocab_size_multiple=64).padded_vocab_size == 50304
    assert MiniGPTConfig(vocab_size=128, pad_vocab_size_multiple=64).padded_vocab_size == 128


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("n_embd", 100, "n_embd (100) must be divisible by n_head (12)"),
        ("n_layer", 0, "n_layer must be a positive integer, got 0"),
        ("vocab_size", -5, "vocab_size must be a positive integer, got -5"),
        ("n_head", 2.5, "n_head must be a positive integer, got 2.5"),
        ("attn_pdrop", 1.0, "attn_pdrop must be in [0, 1), got 1.0"),
        ("resid_pdrop", -0.1, "resid_pdrop must be in [0, 1), got -0.1"),
        ("pad_vocab_size_multiple", 0, "pad_vocab_size_multiple must be an integer >= 1, got 0"),
        ("layer_norm_epsilon", 0.0, "layer_norm_epsilon must be positive, got 0.0"),
    ],
)
def test_bad_values_name_the_field_and_value(field, value, message):
    with pytest.raises(ValueError) as error:
        MiniGPTConfig(**{field: value})
    assert message in str(error.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError, match="n_layer.*embd_pdrop"):
        MiniGPTConfig(n_layer=-1, embd_pdrop=2.0)


def test_presets_by_name_with_overrides():
    assert set(PRESETS) >= {"124M", "350M", "774M", "1558M", "small", "tiny"}
    config = MiniGPTConfig.from_preset("350M", n_positions=512)
    assert (config.n_layer, config.n_head, config.n_embd, config.n_positions) == (24, 16, 1024, 512)
    with pytest.raises(ValueError, match="unknown preset 'gpt2-medium'"):
        MiniGPTConfig.from_preset("gpt2-medium")
