"""Where each token sits and what it sees: the positions of a forward pass's tokens, the check that none is past
the model's context, and the attention masks (our own, which are None for plain causal attention so that SDPA
runs its causal kernel, and the library's, for every other implementation).

Hub remote code with modeling_minigpt.py, which imports it relatively: `save_pretrained` copies it.
"""

import torch
from transformers import Cache
from transformers.masking_utils import create_causal_mask


def check_context(cache, past_length, T, n_positions, position_ids=None):
    """No position past the context, on every path: training, scoring, and each step of generation. A static
    cache is checked by its slots, at the prompt, since it counts its tokens in a tensor (under compile). Positions
    given with nothing cached are checked themselves: a row of packed documents (TRL's packing, padding-free
    batches) restarts them at each document and may be longer than the context (not under compile: the check
    reads a value)."""
    if cache is not None and cache.is_compileable:
        slots = cache.get_mask_sizes(T, 0)[0]
        if slots > n_positions:
            raise ValueError(f"a static KV cache of {slots} positions is longer than the model's context of "
                             f"n_positions={n_positions}: ask for at most {n_positions} tokens, prompt included")  # fmt: skip
    elif position_ids is not None and past_length == 0:
        if not torch.compiler.is_compiling() and position_ids.numel() and (last := int(position_ids.max())) >= n_positions:
            raise ValueError(f"position {last} of a sequence of {T} tokens is past the model's context of "
                             f"n_positions={n_positions}")  # fmt: skip
    elif past_length + T > n_positions:
        raise ValueError(f"sequence of {past_length + T} tokens ({past_length} cached + {T} new) is longer than the "
                         f"model's context of n_positions={n_positions}")  # fmt: skip


def new_positions(attention_mask, past_length, T, device):
    """Positions of the T new tokens. With padding they count only real tokens, so a left-padded prompt
    gets the same positions as the prompt alone."""
    new_tokens = torch.arange(T, device=device) + past_length  # (T,): past_length may be a tensor
    if attention_mask is None:
        return new_tokens.unsqueeze(0)  # (1, T)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, new_tokens]  # (B, T)


def own_mask(config, attention_mask, cache, past_length, inputs_embeds, position_ids):
    """The mask our own implementations take: None for plain causal attention (a full sequence, or one new token
    that sees the whole dynamic cache), so that SDPA runs its causal kernel; else boolean, True attends."""
    T = inputs_embeds.shape[1]
    if attention_mask is not None and attention_mask.dim() == 4:  # prepared (generate with a static cache): as is
        return attention_mask
    if attention_mask is not None or (cache is not None and cache.is_compileable) or (T > 1 and past_length > 0):
        key_length = cache.get_mask_sizes(T, 0)[0] if cache is not None else T
        return causal_mask(attention_mask, past_length, T, key_length, inputs_embeds.device)
    if position_ids is not None and past_length == 0:
        # Documents packed into a row (DataCollatorWithFlattening) restart their positions, and each attends
        # only within itself: the library's mask utilities find the restarts (None where there are none).
        return create_causal_mask(config, inputs_embeds, None, None, position_ids)
    return None


def library_mask(config, attention_mask, cache, past_length, inputs_embeds, position_ids):
    """The mask in the form the library's implementation in use takes (a BlockMask for flex attention, none
    for flash attention, ...), from the library's mask utilities."""
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype == torch.bool:
        attention_mask = additive(attention_mask, inputs_embeds.dtype)  # the library's functions add 4-D masks
    if isinstance(cache, Cache) and not cache.is_compileable and past_length == 0:
        cache = None  # an empty dynamic cache changes no mask; left out, it lets the library find packed documents
    return create_causal_mask(config, inputs_embeds, attention_mask, cache, position_ids)


def additive(allowed, dtype):
    """A boolean mask (True attends) as the additive one the library's attention functions take."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def causal_mask(attention_mask, past_length, T, key_length, device):
    """Boolean (B or 1, 1, T, key_length) mask: query i (position past + i) sees keys up to its own
    position, and with `attention_mask` only real ones. Slots of a preallocated cache beyond the newest
    token lie in every query's future, so causality hides them too.

    A left-padding query has no real key before it. Letting it see itself guarantees a finite softmax on
    every SDPA backend (not all of them special-case all-masked rows); real tokens never attend to
    padding, so their outputs do not change.
    """
    query_positions = (torch.arange(T, device=device) + past_length)[:, None]
    key_positions = torch.arange(key_length, device=device)[None, :]
    mask = key_positions <= query_positions  # (T, key_length)
    if attention_mask is None:
        return mask[None, None]
    if attention_mask.shape[-1] != key_length:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens; the keys are {key_length}")
    is_real_key = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, key_length)
    return (mask & is_real_key) | (key_positions == query_positions)
