"""What converts other formats into MiniGPT's: OpenAI's GPT-2 checkpoints (`MiniGPTForCausalLM.from_gpt2`; the
inverse, `export.to_gpt2`, shares the names below), and folders and checkpoints saved while the tables were padded.

Hub remote code with modeling_minigpt.py, which imports it relatively: `save_pretrained` copies it.
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

try:  # as Hub remote code (a package) ...
    from .configuration_minigpt import MiniGPTConfig
except ImportError:  # ... or as a top-level module of this repository's scripts
    from configuration_minigpt import MiniGPTConfig

# The hyperparameters MiniGPTConfig and transformers' GPT2Config share, under the same names.
GPT2_CONFIG_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "layer_norm_epsilon",
                      "initializer_range", "embd_pdrop", "resid_pdrop", "attn_pdrop", "bos_token_id", "eos_token_id")  # fmt: skip
# OpenAI stored these as Conv1D, (in, out); nn.Linear holds (out, in).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def from_gpt2(cls, source, **config_overrides):
    """A `cls` (MiniGPTForCausalLM) with the weights of `source`: a `transformers.GPT2LMHeadModel`, a local
    directory or a Hub id."""
    from transformers import GPT2LMHeadModel

    gpt2 = source if isinstance(source, GPT2LMHeadModel) else GPT2LMHeadModel.from_pretrained(source)
    g = gpt2.config
    unsupported = {
        "activation_function": (g.activation_function, "gelu_new"),
        "n_inner": (g.n_inner, None),
        "scale_attn_weights": (g.scale_attn_weights, True),
        "scale_attn_by_inverse_layer_idx": (g.scale_attn_by_inverse_layer_idx, False),
        "reorder_and_upcast_attn": (g.reorder_and_upcast_attn, False),
    }
    differing = [f"{name}={got!r} (need {want!r})" for name, (got, want) in unsupported.items() if got != want]
    if differing:
        raise ValueError(f"GPT-2 checkpoint uses options MiniGPT does not implement: {', '.join(differing)}")
    tied = bool(getattr(g, "tie_word_embeddings", True))  # an untied GPT-2 keeps its own head
    config = MiniGPTConfig(**{**{name: getattr(g, name) for name in GPT2_CONFIG_FIELDS}, "tie_word_embeddings": tied,
                              **config_overrides})  # fmt: skip
    model = cls(config).to(gpt2.dtype)

    copied = "transformer." if config.tie_word_embeddings else ("transformer.", "lm_head.")
    theirs = {k: v for k, v in gpt2.state_dict().items() if k.startswith(copied)}
    ours = {k: v for k, v in model.state_dict().items() if k.startswith(copied)}
    if theirs.keys() != ours.keys():
        raise ValueError(f"GPT-2 checkpoint keys differ: {sorted(theirs.keys() ^ ours.keys())}")
    with torch.no_grad():
        for key, target in ours.items():
            weight = theirs[key].t() if key.endswith(CONV1D_WEIGHTS) else theirs[key]
            if weight.shape != target.shape:
                raise ValueError(f"{key}: GPT-2 has shape {tuple(weight.shape)}, MiniGPT {tuple(target.shape)}")
            target.copy_(weight)
    return model


# Folders and checkpoints written before 2026-12-05 held the two tables padded to `pad_vocab_size_multiple` rows
# (50,304 for GPT-2); the padding rows were never read. Now only the loss pads, where it casts the head: their
# padding is cut on load.
TABLES = ("wte.weight", "lm_head.weight")


def without_table_padding(state: dict, vocab_size: int) -> dict:
    for key in [key for key in state if key.endswith(TABLES)]:
        state[key] = state[key][:vocab_size]
    return state


def cut_table_padding_on_load(module, state: dict, *_) -> None:
    """A `load_state_dict` pre-hook of the model (torch's loading, as accelerate's checkpoints use)."""
    without_table_padding(state, module.config.vocab_size)


def state_without_table_padding(folder: Path, files: list) -> dict | None:
    """The weights of a local folder saved with padded tables, cut to its vocabulary; None for any other folder."""
    try:
        vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError):  # no readable config: the library's loading says what is wrong
        return None
    for file in files:
        with safe_open(file, "pt") as weights:
            tables = [key for key in weights.keys() if key.endswith(TABLES)]
            if any(weights.get_slice(key).get_shape()[0] > vocab_size for key in tables):
                state = {key: tensor for each in files for key, tensor in load_file(each).items()}
                return without_table_padding(state, vocab_size)
    return None


def unreadable_weights(files: list, source, error: SafetensorError) -> OSError:
    """The error for weights that do not load, naming the file (safetensors says only "header too small")."""
    named = ", ".join(str(f) for f in files if not _readable(f)) or f"a weights file of {source}"
    return OSError(f"{named} is truncated or corrupt ({error}): save or download it again")


def _readable(path) -> bool:
    """Opening checks the header and that its tensors cover the file: what a truncated file fails."""
    try:
        with safe_open(path, "pt"):
            return True
    except SafetensorError:
        return False
