"""The causal language-modelling loss: next-token cross-entropy, from logits or, in training, straight from
the hidden states and the head's weight, a chunk of rows at a time, so that the (tokens, vocabulary) logits
never exist at once (at GPT-2's vocabulary they would be half a training step's memory).

The chunked loss is written to be traced: `torch.compile(model, fullgraph=True)` takes it into the same
graph as the trunk, where the compiler fuses each chunk's softmax into a few passes over its logits.

Hub remote code with modeling_minigpt.py, which imports it relatively: `save_pretrained` copies it.
"""

import torch
import torch.nn.functional as F

# Logits a chunk holds: 2^28 is 5,336 rows at GPT-2's padded vocabulary, 50,304 (1 GiB of bf16 logits and their
# gradient). Fewer, larger chunks read and write the fp32 weight-gradient sum (vocab x n_embd) fewer times and
# make fewer kernels: 2^27 -> 2^28 is 1.3% of GPT-2 124M's step on an H100 on paper, for 1.5 GiB more a process
# at 64 x 1024 (the memory estimate: 21.6 -> 23.1 GiB; docs/benchmarks.md). The chunk's memory bounds them.
CHUNK_LOGITS = 2**28


def next_token_targets(labels=None, shift_labels=None):
    """`labels` are aligned with the inputs and shifted here; `shift_labels` are already the next tokens
    (training on (T + 1)-token windows predicts all T positions). Shifting the labels instead of the
    logits avoids copying the (B, T, V) logits."""
    return shift_labels if shift_labels is not None else F.pad(labels[:, 1:], (0, 1), value=-100)


def causal_lm_loss(logits, labels=None, shift_labels=None, num_items_in_batch=None):
    """Next-token cross-entropy from logits, positions labelled -100 ignored. `num_items_in_batch` (the
    label count over all accumulated micro-batches) averages over tokens rather than micro-batches, as
    transformers' Trainer expects."""
    targets = next_token_targets(labels, shift_labels).to(logits.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


class LMHeadCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `hidden @ weight.T`, with its gradients made in the forward pass, a chunk of rows at a
    time, so that nothing vocabulary-sized is kept for backward.

    The head is padded with zero rows to `padded_rows` where it is cast for the matmuls, so the three
    matmuls get a tensor-core friendly width (50,257 -> 50,304) while the model's own table holds exactly
    the vocabulary, as every tool that reads it expects; the padding columns are set to -inf before the
    softmax, so they add nothing to the loss, and their gradient rows are dropped.

    The softmax, scaled by 1 / divisor, is made in place in the chunk's logits; the one-hot part of
    `softmax - onehot` is subtracted from the two gradients directly (a row of the head for each target, and
    the hidden row added into the target's row of the weight gradient), so no pass over the logits is spent
    on it. Backward only scales the gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, padded_rows: int, divisor, chunk_rows: int):
        # The matmuls run in autocast's dtype (bf16) when it is on, the softmax in fp32. The head is cast and
        # padded once.
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        vocab_size = weight.shape[0]
        head = weight.to(dtype)
        if padded_rows > vocab_size:
            head = F.pad(head, (0, 0, 0, padded_rows - vocab_size))
        grad_hidden = torch.empty_like(hidden)
        grad_weight = head.new_zeros(head.shape, dtype=torch.float32)  # summed over the chunks in fp32
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # Counting the chunks (not stepping through the rows) makes a compiled graph depend on the count alone:
        # under dynamic shapes, every length with the same number of chunks runs the same graph.
        for chunk in range(-(-hidden.shape[0] // chunk_rows)):
            rows = slice(chunk * chunk_rows, (chunk + 1) * chunk_rows)
            h, t = hidden[rows].to(dtype), targets[rows]
            scale = ((t != -100) / divisor).unsqueeze(1)  # (rows, 1): 0 for ignored positions
            t = t.clamp(min=0)
            logits = (h @ head.t()).float()
            if head.shape[0] > vocab_size:
                logits[:, vocab_size:] = float("-inf")
            target_logits = logits.gather(1, t.unsqueeze(1))
            row_max = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(row_max).exp_()  # in place: no second (rows, V) tensor
            row_sum = probs.sum(dim=1, keepdim=True)
            # Not `total +=`: torch 2.11's compiled backward drops the incoming gradient of a Function output
            # updated in place, and every gradient comes out 0.
            total = total + ((row_max + row_sum.log() - target_logits) * scale).sum()
            probs = probs.mul_(scale / row_sum).to(dtype)  # softmax / divisor; ignored rows zero
            grad_hidden[rows] = probs @ head - head[t] * scale.to(dtype)
            # Each chunk's product in the matmul dtype (bf16 under autocast), summed over the chunks in fp32, the
            # same on every device: cuBLAS's fp32-output addmm has no CPU kernel and does not compile on torch
            # 2.11-2.13 (docs/benchmarks.md, "The loss's one code path").
            if probs.dtype == grad_weight.dtype:
                grad_weight.addmm_(probs.t(), h)  # fp32: the sum in the product's own kernel
            else:
                grad_weight += probs.t() @ h
            grad_weight.index_add_(0, t, h.float() * -scale)
        ctx.save_for_backward(grad_hidden, grad_weight[:vocab_size].to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None, None


def chunked_lm_head_loss(hidden, weight, labels=None, shift_labels=None, num_items_in_batch=None, padded_rows=None,
                         chunk_logits=CHUNK_LOGITS):  # fmt: skip
    """The loss `causal_lm_loss` computes from `hidden @ weight.T`, without materializing the logits: chunks
    of `chunk_logits // padded_rows` rows, the head padded to `padded_rows` rows (default: its own)."""
    targets = next_token_targets(labels, shift_labels).to(hidden.device).flatten()
    hidden = hidden.flatten(0, 1)
    divisor = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
    padded_rows = padded_rows or weight.shape[0]
    chunk_rows = max(1, chunk_logits // padded_rows)
    return LMHeadCrossEntropy.apply(hidden, weight, targets, padded_rows, divisor, chunk_rows)
