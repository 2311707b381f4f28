"""The held-out split: its loss, and the checks that make that number mean something (a window the model
can read, enough val windows, the model's own tokenizer). Shared by training and evaluation. `data` is the
prepared data: a TokenData (its manifest read once, as training holds it) or its directory."""

import math

import torch

from loss_minigpt import causal_lm_loss
from token_shards import ShardedTokens, ShardError, TokenData, tokenizer_sha256

# Logits one evaluation forward may return: 2^28 are 1 GiB in fp32, the dtype accelerate's mixed precision
# converts a model's outputs to (a whole 64 x 1024 batch at GPT-2's vocabulary would be 12.3 GiB, twice
# training's peak). 5 rows of 1,024 tokens at GPT-2's vocabulary.
EVAL_LOGITS = 2**28


def device_of(model) -> torch.device:
    return next(model.parameters()).device  # also for DDP-wrapped and compiled models, which lack `.device`


def padded_share(items: list, rank: int, world: int) -> list[tuple]:
    """This process's round-robin share of `items` as (item, counted) pairs, padded to the same length on
    every process by repeating the last item uncounted. With sharded parameters (FSDP) every forward is a
    collective that all processes must join, so they must all run the same number of forwards."""
    mine = [(item, True) for item in items[rank::world]]
    return mine + [(items[-1], False)] * (-(-len(items) // world) - len(mine))


def check_seq_len(seq_len: int, context: int, model_name: str) -> None:
    if seq_len > context:
        raise ValueError(f"--seq_len {seq_len} exceeds {model_name}'s context of {context} tokens")


def check_val_windows(data, batch_size: int, seq_len: int, batches: int, asked: str) -> None:
    """The val split must hold `batches` batches of `batch_size` windows (`asked` names the arguments)."""
    data = TokenData.of(data)
    windows = sum(ShardedTokens(data, "val", batch_size, seq_len, shuffle=False).windows_per_shard)
    if batches * batch_size > windows:
        raise ShardError(f"{asked} needs {batches * batch_size} val windows of {seq_len + 1} tokens; {data.dir} has "
                         f"{windows}: ask for fewer or prepare more (prepare_data.py --val_tokens)")  # fmt: skip


def check_same_tokenizer(data, tokenizer, model_name: str) -> None:
    data = TokenData.of(data)
    if tokenizer_sha256(tokenizer) != data.meta["tokenizer_sha256"]:
        raise ShardError(f"{data.dir} was tokenized with another tokenizer than {model_name}'s: "
                         "its loss would mean nothing")  # fmt: skip


@torch.no_grad()
def val_loss(model, data, batch_size, seq_len, batches, accelerator=None) -> float:
    """Mean next-token loss over the first `batches` val batches of prepare_data.py shards: the same
    windows every time and whatever the process count (batch i is computed by process i % N). A batch goes
    through the model a few rows at a time, so that no forward returns more than EVAL_LOGITS logits."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    reader = ShardedTokens(data, "val", batch_size, seq_len, 0, 1, shuffle=False)
    rows_per_forward = max(1, EVAL_LOGITS // (seq_len * model.config.vocab_size))
    device = device_of(model)
    was_training = model.training
    model.eval()
    losses = torch.zeros(batches, device=device)
    position = 0
    for i, counted in padded_share([*range(batches)], rank, world):  # uncounted: the last batch, to join in
        while position <= i:  # read on to batch i (a memmap: cheap), so every process walks the same windows
            window, position = next(reader), position + 1
        total = torch.zeros((), device=device)
        for rows in window.to(device).split(rows_per_forward):
            logits = model(input_ids=rows[:, :-1], use_cache=False).logits  # a cache would be ~2.4 GiB at 64 x 1024
            total += causal_lm_loss(logits, shift_labels=rows[:, 1:], num_items_in_batch=1)  # the sum (divided by 1)
        if counted:
            losses[i] = total / window[:, 1:].numel()
    model.train(was_training)
    if world > 1:
        losses = accelerator.reduce(losses, reduction="sum")  # each batch is nonzero on one process only
    return losses.mean().item()


def bits_per_byte(loss: float, data) -> float | None:
    """Val loss (nats per token) as bits per byte of the text, which compares across tokenizers: an 8,192-token
    BPE and GPT-2's give different losses for the same text, and the same bits per byte. The split's tokens per
    byte were counted at preparation; None for data prepared before that (see `bits_per_byte_note`)."""
    meta = TokenData.of(data).meta
    if not meta.get("val_bytes"):
        return None
    return loss / math.log(2) * meta["tokens"]["val"] / meta["val_bytes"]


def bits_per_byte_note(data) -> str | None:
    """The one line for data prepared before the byte count, which prepare_data.py adds when run again."""
    data = TokenData.of(data)
    if "val_bytes" in data.meta:
        return None
    return (f"note: {data.dir}/meta.json has no byte count of the val split (prepared by an older prepare_data.py), "
            f"so val bits per byte is not reported; run prepare_data.py again with the same arguments to add it")
