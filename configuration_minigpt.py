"""MiniGPT configuration: GPT-2's hyperparameters under GPT-2's field names.

This file is Hub "remote code": `save_pretrained` copies it next to the weights, so it imports only
installed packages.
"""

import transformers
from packaging.version import Version

# The oldest transformers the suite passes on (CI tests it, and the newest release). Checked here, the
# first file `from_pretrained(..., trust_remote_code=True)` imports, so an older one is refused in one line
# at load instead of failing inside `generate`.
OLDEST_TRANSFORMERS = "5.17"
if Version(transformers.__version__) < Version(OLDEST_TRANSFORMERS):
    raise ImportError(f"MiniGPT needs transformers >= {OLDEST_TRANSFORMERS}, found {transformers.__version__}: "
                      f"pip install 'transformers>={OLDEST_TRANSFORMERS}'")  # fmt: skip

from transformers import PretrainedConfig  # noqa: E402  (after the check: older releases may lack names we import)

# The GPT-2 family by size (OpenAI's gpt2, gpt2-medium, -large, -xl), plus sizes for a laptop CPU.
PRESETS = {
    "124M": dict(n_layer=12, n_head=12, n_embd=768),
    "350M": dict(n_layer=24, n_head=16, n_embd=1024),
    "774M": dict(n_layer=36, n_head=20, n_embd=1280),
    "1558M": dict(n_layer=48, n_head=25, n_embd=1600),
    # CPU quick start: GPT-2's vocabulary and tokenizer, a few million non-embedding parameters.
    "small": dict(n_layer=6, n_head=6, n_embd=384, n_positions=256),
    # Unit tests: seconds on one core.
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, n_positions=128),
}

# Where the Auto classes find our code when the model is loaded with trust_remote_code. Declared here
# because `register_for_auto_class` records one Auto class per model class, and we serve two.
AUTO_MAP = {
    "AutoConfig": "configuration_minigpt.MiniGPTConfig",
    "AutoModel": "modeling_minigpt.MiniGPTModel",
    "AutoModelForCausalLM": "modeling_minigpt.MiniGPTForCausalLM",
}


class MiniGPTConfig(PretrainedConfig):
    """GPT-2 configuration; the defaults are GPT-2 small (124M).

    Args:
        vocab_size: tokens the tokenizer can produce (50257 for GPT-2's BPE).
        n_positions: context length, the number of learned position embeddings.
        n_embd: width of the residual stream; must be divisible by `n_head`.
        n_layer: number of transformer blocks.
        n_head: attention heads per block.
        layer_norm_epsilon: LayerNorm epsilon (GPT-2 uses 1e-5).
        initializer_range: std of the normal init (0.02); residual projections get 0.02/sqrt(2*n_layer).
        embd_pdrop, resid_pdrop, attn_pdrop: dropout on embeddings, residual branches and attention
            probabilities. 0.0 by default: single-epoch pretraining does not need it.
        pad_vocab_size_multiple: the training loss pads the head's matmuls to a multiple of this many rows (64
            turns 50257 into 50304: tensor-core friendly shapes). Only there: the tables hold `vocab_size` rows.
    """

    model_type = "minigpt"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # Trainer drops the KV cache by name: 5.24's, and older
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    def __init__(
        self,
        vocab_size=50257,
        n_positions=1024,
        n_embd=768,
        n_layer=12,
        n_head=12,
        layer_norm_epsilon=1e-5,
        initializer_range=0.02,
        embd_pdrop=0.0,
        resid_pdrop=0.0,
        attn_pdrop=0.0,
        pad_vocab_size_multiple=1,
        use_cache=True,
        bos_token_id=50256,
        eos_token_id=50256,
        tie_word_embeddings=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.embd_pdrop = embd_pdrop
        self.resid_pdrop = resid_pdrop
        self.attn_pdrop = attn_pdrop
        self.pad_vocab_size_multiple = pad_vocab_size_multiple
        self.use_cache = use_cache
        # transformers 5 no longer declares these on the base config: a model config must.
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.tie_word_embeddings = tie_word_embeddings
        self._validate()
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(**kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MiniGPTConfig":
        """A config from a preset name (`124M`, `350M`, `774M`, `1558M`, `small`, `tiny`)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the training loss's head matmuls: `vocab_size` rounded up to `pad_vocab_size_multiple`."""
        multiple = self.pad_vocab_size_multiple
        return -(-self.vocab_size // multiple) * multiple

    def _validate(self):
        """Report every bad value at once, naming the field and the value."""
        problems = []
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems and self.n_embd % self.n_head != 0:
            problems.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name in ("embd_pdrop", "resid_pdrop", "attn_pdrop"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                problems.append(f"{name} must be in [0, 1), got {value!r}")
        if not isinstance(self.pad_vocab_size_multiple, int) or self.pad_vocab_size_multiple < 1:
            problems.append(f"pad_vocab_size_multiple must be an integer >= 1, got {self.pad_vocab_size_multiple!r}")
        if not self.layer_norm_epsilon > 0:
            problems.append(f"layer_norm_epsilon must be positive, got {self.layer_norm_epsilon!r}")
        if not self.initializer_range > 0:
            problems.append(f"initializer_range must be positive, got {self.initializer_range!r}")
        if problems:
            raise ValueError("invalid MiniGPTConfig: " + "; ".join(problems))
