"""The causal language-modelling loss: next-token cross-entropy, from logits or, in training, chunked
straight from the hidden states and the head's weight so that the (tokens, vocabulary) logits never
exist at once (at GPT-2's vocabulary they are half a training step's memory).

Hub remote code with modeling_minigpt.py, which imports it relatively: `save_pretrained` copies it.
"""

import torch
import torch.nn.functional as F


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


class ChunkedLMHeadLoss(torch.autograd.Function):
    """Cross-entropy of `hidden @ weight.T` without keeping vocabulary-sized tensors for backward.

    The usual path keeps the (N, V) logits and their log-softmax, then builds a zero (N, V) gradient and
    a (N, V) softmax gradient: at GPT-2's vocabulary that is most of the step's memory traffic. Here each
    chunk of rows computes its logits, its loss and, at once, its gradients with respect to `hidden` and
    `weight` (the softmax, made in place into `(softmax - onehot) / divisor`). Backward only scales them.
    `weight` rows past `vocab_size` (padding) take no part: their gradient stays zero."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size: int, divisor, chunk_rows: int):
        # The matmuls run in autocast's dtype (bf16) when it is on. The head is cast once, not in every chunk;
        # the weight-gradient update is a product then a sum, because autocast leaves in-place ops
        # (`addmm_`) in fp32, which on a GPU is TF32 at half bf16's speed.
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        head = weight[:vocab_size].to(dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)  # summed over the chunks in fp32
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            h, t = hidden[start : start + chunk_rows].to(dtype), targets[start : start + chunk_rows]
            scored = (t != -100).unsqueeze(1).float()
            t = t.clamp(min=0).unsqueeze(1)
            logits = (h @ head.t()).float()
            target_logits = logits.gather(1, t)
            row_max = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(row_max).exp_()  # in place: no second (rows, V) tensor
            row_sum = probs.sum(dim=1, keepdim=True)
            total += ((row_max + row_sum.log() - target_logits) * scored).sum()
            grad_logits = probs.mul_(scored / (row_sum * divisor))  # softmax / divisor, unscored rows zero
            grad_logits = grad_logits.scatter_add_(1, t, -scored / divisor).to(dtype)
            grad_hidden[start : start + chunk_rows] = grad_logits @ head
            if dtype == torch.float32:
                grad_weight[:vocab_size].addmm_(grad_logits.t(), h)
            else:
                grad_weight[:vocab_size] += grad_logits.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None, None


@torch.compiler.disable  # compiled, the chunk loop would unroll; the compiler gets the trunk, this stays eager
def chunked_lm_head_loss(
    hidden, weight, vocab_size, labels=None, shift_labels=None, num_items_in_batch=None, chunk_logits=None
):
    """The loss `causal_lm_loss` computes from `hidden @ weight.T`, without materializing the logits.

    Chunks of about `chunk_logits` logits bound the extra memory. By default a chunk holds as many logits
    as `hidden` has elements (Liger-Kernel's rule: the loss then needs no more memory than its input), and
    at least 2^24 (64 MiB in fp32). Large batches thus get chunks of hundreds of rows or more, and each
    chunk's (vocab, n_embd) weight-gradient update is spread over enough rows to stay compute-bound."""
    targets = next_token_targets(labels, shift_labels).to(hidden.device).flatten()
    hidden = hidden.flatten(0, 1)
    divisor = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
    if chunk_logits is None:
        chunk_logits = max(2**24, hidden.numel())
    chunk_rows = max(1, chunk_logits // weight.shape[0])
    return ChunkedLMHeadLoss.apply(hidden, weight, targets, vocab_size, divisor, chunk_rows)
