"""MiniGPT: GPT-2 written from scratch as a Hugging Face model.

Readable blocks in the spirit of nanoGPT (attention, MLP, block, model) inside the contract transformers
expects (config class, weight init, tied embeddings, KV cache, generation). Module names are those of
the OpenAI checkpoint (`wte`, `wpe`, `h`, `c_attn`, `c_proj`, `ln_f`), so its weights map one to one.

This file is Hub "remote code": `save_pretrained` copies it next to the weights, with the modules it imports
relatively (`configuration_minigpt`, `loss_minigpt`, `masking_minigpt`, `conversion_minigpt`); otherwise it imports only installed
packages.
"""

import dataclasses
import functools
import inspect
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    Cache,
    DynamicCache,
    GenerationConfig,
    GenerationMixin,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

try:  # as Hub remote code (a package) ...
    from .configuration_minigpt import MiniGPTConfig
    from .conversion_minigpt import cut_table_padding_on_load, from_gpt2, state_without_table_padding, unreadable_weights
    from .loss_minigpt import causal_lm_loss, chunked_lm_head_loss
    from .masking_minigpt import check_context, library_mask, new_positions, own_mask
except ImportError:  # ... or as top-level modules of this repository's scripts
    from configuration_minigpt import MiniGPTConfig
    from conversion_minigpt import cut_table_padding_on_load, from_gpt2, state_without_table_padding, unreadable_weights
    from loss_minigpt import causal_lm_loss, chunked_lm_head_loss
    from masking_minigpt import check_context, library_mask, new_positions, own_mask


class CausalSelfAttention(nn.Module):
    def __init__(self, config: MiniGPTConfig, layer_idx: int):
        super().__init__()
        self.config = config  # read at every call: `set_attn_implementation` changes the implementation in it
        self.n_head = config.n_head
        self.layer_idx = layer_idx  # which slot of the KV cache is ours
        self.is_causal = True  # read by the library's attention functions
        self.scaling = (config.n_embd // config.n_head) ** -0.5
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.is_residual_projection = True  # its init is scaled by depth: see _init_weights
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x, attend, attn_mask=None, cache=None, **kwargs):
        """`attend` and `attn_mask` are what the model chose for the implementation in use (`attention`); for ours,
        a None mask means plain causal attention. `kwargs` carry what the library's implementations read
        (positions, continuous batching's indices). Returns the output and the attention weights (None from an
        implementation that makes none)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if isinstance(cache, Cache):
            k, v = cache.update(k, v, self.layer_idx)  # (B, nh, past + T, hs)
        elif cache is not None:
            k, v = update_paged_cache(cache, k, v, self.layer_idx, kwargs)
        dropout = self.attn_pdrop if self.training else 0.0
        y, weights = attend(self, q, k, v, attn_mask, dropout=dropout, scaling=self.scaling, **kwargs)
        y = y.reshape(B, T, C)  # (B, T, nh, hs) -> all head outputs side by side
        return self.resid_dropout(self.c_proj(y)), weights


def sdpa_attention(module, q, k, v, attn_mask, dropout=0.0, scaling=None, **kwargs):
    """MiniGPT's default, "sdpa": one fused kernel, SDPA's mask (boolean, True attends, or additive). Without a
    mask it is causal: over a full sequence, or one new token seeing every cached one. Signature and (B, T, nh, hs)
    output as the library's attention functions."""
    # A full sequence without a mask takes SDPA's is_causal kernel. Under torch.compile with dynamic shapes
    # `T > 1` is a symbolic bool, which SDPA refuses: branching on it makes it a guard instead.
    is_causal = True if attn_mask is None and q.shape[2] > 1 else False
    y = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling)
    return y.transpose(1, 2), None


def eager_attention(module, q, k, v, attn_mask, dropout=0.0, scaling=None, **kwargs):
    """"eager": what SDPA computes, written out so the (B, nh, T, S) attention weights can be returned. It holds
    that tensor in memory and runs unfused, so "sdpa" uses it only when `output_attentions` asks for weights."""
    T, S = q.shape[2], k.shape[2]
    if attn_mask is None:  # causal, with the queries being the last T of the S positions
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = (q @ k.transpose(-2, -1)) * scaling  # (B, nh, T, S)
    if attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    else:
        scores = scores + attn_mask
    weights = scores.softmax(dim=-1)
    return (F.dropout(weights, dropout) @ v).transpose(1, 2), weights


# Our own implementations, under the library's names. They take the model's own masks (None for plain causal
# attention); every other implementation gets the library's masks.
OWN_ATTENTION = {"sdpa": sdpa_attention, "eager": eager_attention}


class MLP(nn.Module):
    def __init__(self, config: MiniGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.is_residual_projection = True  # its init is scaled by depth: see _init_weights
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(GradientCheckpointingLayer):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: MiniGPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, attend, attn_mask=None, cache=None, **kwargs):
        attended, weights = self.attn(self.ln_1(x), attend, attn_mask, cache, **kwargs)
        x = x + attended
        return x + self.mlp(self.ln_2(x)), weights


class MiniGPTPreTrainedModel(PreTrainedModel):
    config_class = MiniGPTConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _skip_keys_device_placement = ["cache", "past_key_values"]  # the cache's name from transformers 5.24, and before
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True  # attention through the library's interface: vLLM's Transformers backend
    _can_compile_fullgraph = True
    # What `output_hidden_states` (all, or chosen layers) and `output_attentions` collect, by hooks (capture_outputs).
    _can_record_outputs = {"hidden_states": Block, "attentions": OutputRecorder(CausalSelfAttention, index=1)}

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        # torch's load_state_dict (accelerate's checkpoints) of weights saved with padded tables; a module-level
        # function, not a lambda, so that the model still pickles
        self.register_load_state_dict_pre_hook(cut_table_padding_on_load)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """The library's, with an unreadable weights file named (safetensors says only "header too small"), and
        a local folder saved with padded tables loaded without the padding rows."""
        folder = Path(str(pretrained_model_name_or_path))
        files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        try:
            state = None if "state_dict" in kwargs else state_without_table_padding(folder, files)
            if state is not None:
                # The library takes a state dict only instead of a folder: the config and generation config by hand
                kwargs["config"] = kwargs.get("config") or cls.config_class.from_pretrained(folder)
                model = super().from_pretrained(None, *args, state_dict=state, **kwargs)
                if (folder / "generation_config.json").is_file():
                    model.generation_config = GenerationConfig.from_pretrained(folder)
                return model
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:
            raise unreadable_weights(files, pretrained_model_name_or_path, error) from None

    @torch.no_grad()
    def _init_weights(self, module):
        """GPT-2's init: normal(0, 0.02) weights, zero biases, LayerNorm 1 and 0. transformers calls this
        once per module, skipping (for custom code) modules with no parameters of their own, such as
        attention and MLP; so the residual scaling is decided on the Linear itself, never on its parent.
        The `init` helpers leave tensors that were loaded from a checkpoint untouched."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_projection", False):
                # GPT-2 paper: "scale the weights of residual layers at initialization by a factor of
                # 1/sqrt(N) where N is the number of residual layers" (two per block: attention and MLP).
                std = std / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class MiniGPTModel(MiniGPTPreTrainedModel):
    """The GPT-2 trunk: embeddings, blocks, final LayerNorm. Returns hidden states."""

    def __init__(self, config: MiniGPTConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([Block(config, layer_idx=i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    @capture_outputs
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, past_key_values=None, **kwargs) -> BaseModelOutputWithPast:  # fmt: skip
        """As transformers' GPT2Model. The library's hooks (`_can_record_outputs`) collect `output_hidden_states`
        (True, or the indices of those to keep: the embeddings' output, then every block's, the last after `ln_f`)
        and `output_attentions` (with "sdpa", from the unfused "eager" path: they cost time and memory)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        output_attentions = _flag(kwargs.pop("output_attentions", None), self.config.output_attentions)
        kwargs.pop("output_hidden_states", None)
        if inputs_embeds is None:
            if not self.training and not torch.compiler.is_compiling():
                _check_token_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.wte(input_ids)
        T = inputs_embeds.shape[1]
        if use_cache is None:  # a cache only pays off when generating; in training it just holds memory
            use_cache = self.config.use_cache and not self.training
        cache = one_cache(cache, past_key_values)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        # Continuous batching's paged cache is not a `Cache`: its batches bring their positions and masks.
        # A static cache (what compiled generation uses) counts its tokens in a tensor and hands attention
        # all of its preallocated slots; a dynamic one counts in Python and hands over exactly past + T keys.
        past_length = cache.get_seq_length() if isinstance(cache, Cache) else 0
        if cache is None or isinstance(cache, Cache):
            check_context(cache, past_length, T, self.config.n_positions, position_ids)
        given_positions = position_ids  # restarting, they mark packed documents
        if position_ids is None:
            padding = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
            position_ids = new_positions(padding, past_length, T, inputs_embeds.device)
        masks = (attention_mask, cache, past_length, inputs_embeds, position_ids, given_positions)
        attend, attn_mask = self.attention(output_attentions, *masks)

        x = self.drop(inputs_embeds + self.wpe(position_ids))
        if torch.is_autocast_enabled(x.device.type):
            # The residual stream in autocast's dtype, as llm.c keeps it (the weights stay fp32 for the optimizer):
            # half the bytes of every add, norm and cast along it.
            x = x.to(torch.get_autocast_dtype(x.device.type))
        for block in self.h:
            x, _ = block(x, attend, attn_mask, cache, position_ids=position_ids, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(x), **{CACHE_FIELD: cache if use_cache else None})

    def attention(self, output_attentions, attention_mask, cache, past_length, inputs_embeds, position_ids,
                  given_positions):  # fmt: skip
        """The attention function and its mask, chosen together once a forward pass. "sdpa" (the default) and "eager"
        are ours, with our masks; any other name comes from the library's registry (flash attention, flex attention,
        paged attention, kernels from the Hub, a function a user registered), with the library's masks."""
        implementation = self.config._attn_implementation or "sdpa"  # unset on a model built outside from_pretrained
        if output_attentions and implementation == "sdpa":
            implementation = "eager"  # a fused kernel has no weights to return
        if implementation in OWN_ATTENTION:
            return OWN_ATTENTION[implementation], own_mask(self.config, attention_mask, cache, past_length, inputs_embeds,
                                                               given_positions)  # fmt: skip
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention)
        return attend, library_mask(self.config, attention_mask, cache, past_length, inputs_embeds, position_ids)

# --- What differs between transformers releases (5.17 to the newest) ---------------------------------------

# transformers 5.24 renamed the KV cache from `past_key_values` to `cache`: the argument `generate` passes to
# `forward`, and the output field it reads the cache back from. `forward` takes either name; outputs use the
# installed release's field, read off its public output class (the old name warns on 5.24, and earlier
# releases have no new one).
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"


def one_cache(cache, past_key_values):
    """The KV cache passed under either name."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the KV cache once: as `cache` (or as `past_key_values`, its name before transformers 5.24)")
    return cache if cache is not None else past_key_values


def update_paged_cache(cache, k, v, layer_idx, kwargs):
    """Continuous batching's paged cache (not a `Cache`). In newer transformers (5.24) the model writes to it,
    reading the batch's indices from `kwargs` (which it narrows to this layer); in 5.17 the paged attention
    function did, given the cache among its keyword arguments."""
    if model_writes_paged_cache(type(cache)):
        return cache.update(k, v, layer_idx, kwargs=kwargs)
    kwargs["cache"] = cache
    return k, v


@functools.cache
def model_writes_paged_cache(cache_class) -> bool:
    """Read once per class, not at every layer of every decoding step."""
    return "kwargs" in inspect.signature(cache_class.update).parameters


# --- Helpers of the forward pass ----------------------------------------------------------------------------


def _check_token_ids(input_ids, vocab_size):
    """An id outside the vocabulary would fail in the embedding with an IndexError that names neither the id nor
    the vocabulary. Checked at inference only: training's data is checked when it is prepared and read, and a
    GPU training step must not wait for a value to be read."""
    outside = (input_ids < 0) | (input_ids >= vocab_size)
    if outside.any():
        raise ValueError(f"input id {input_ids[outside][0].item()} is outside the model's vocabulary of {vocab_size} "
                         f"tokens (ids 0-{vocab_size - 1}): the tokenizer does not match the model")  # fmt: skip


def _flag(value, default) -> bool:
    """A per-call output option, else the config's (transformers' convention)."""
    return default if value is None else value


class MiniGPTForCausalLM(MiniGPTPreTrainedModel, GenerationMixin):
    """GPT-2 with its language-modelling head (tied to the token embedding)."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: MiniGPTConfig):
        super().__init__(config)
        self.transformer = MiniGPTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None, labels=None,
                use_cache=None, logits_to_keep=0, num_items_in_batch=None, return_dict=None, past_key_values=None,
                **kwargs) -> CausalLMOutputWithPast:  # fmt: skip
        """`labels` are the inputs themselves (shifted inside), or `shift_labels=` (a keyword, as transformers'
        loss functions take it) the next tokens. Only `labels` is named in the signature: the Trainer treats
        every argument with "label" in its name as a label column. Without labels, `logits_to_keep` keeps the
        last that many positions (an int; 0 keeps all, generate asks for 1) or selects them (a tensor). The
        KV cache comes as `cache` (transformers >= 5.24) or `past_key_values`. Other keywords go to the trunk:
        output options, and what the library's attention implementations read."""
        shift_labels = kwargs.pop("shift_labels", None)
        outputs = self.transformer(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache,
                                   past_key_values, return_dict=True, **kwargs)  # fmt: skip
        hidden_states = outputs.last_hidden_state
        training = self.training and torch.is_grad_enabled()
        loss = logits = None
        if labels is None and shift_labels is None:  # inference rarely needs every position
            positions = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, positions])
        elif training and type(self.lm_head) is nn.Linear:  # a wrapped head (PEFT, quantized) must be called
            loss = chunked_lm_head_loss(hidden_states, self.lm_head.weight, labels, shift_labels, num_items_in_batch,
                                        self.config.padded_vocab_size)  # fmt: skip
        else:
            logits = self.lm_head(hidden_states)
            loss = causal_lm_loss(logits, labels, shift_labels, num_items_in_batch)
            # Training needs only the loss: returned, the (B, T, V) logits would stay alive, and accelerate's
            # mixed precision would copy them to fp32 (12.3 GiB at GPT-2 124M, 64 x 1024).
            logits = None if training else logits
        output = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
                                        hidden_states=outputs.hidden_states, attentions=outputs.attentions)  # fmt: skip
        return output if _flag(return_dict, self.config.return_dict) else output.to_tuple()

    @classmethod
    def from_gpt2(cls, source="openai-community/gpt2", **config_overrides) -> "MiniGPTForCausalLM":
        """Convert OpenAI's GPT-2 weights: `source` is a `transformers.GPT2LMHeadModel`, a local directory
        or a Hub id (`openai-community/gpt2` ... `gpt2-xl`). The logits equal the library's GPT-2."""
        return from_gpt2(cls, source, **config_overrides)


# Hub integration: `save_pretrained` copies this file and configuration_minigpt.py next to the weights
# and writes `auto_map` into config.json, so `from_pretrained(..., trust_remote_code=True)` works anywhere.
MiniGPTConfig.register_for_auto_class()
MiniGPTModel.register_for_auto_class("AutoModel")
MiniGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
# In this process the Auto classes and `pipeline` know the model directly, without remote code.
AutoConfig.register(MiniGPTConfig.model_type, MiniGPTConfig, exist_ok=True)
AutoModel.register(MiniGPTConfig, MiniGPTModel, exist_ok=True)
AutoModelForCausalLM.register(MiniGPTConfig, MiniGPTForCausalLM, exist_ok=True)
