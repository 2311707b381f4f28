"""The compiled training step against eager, on every torch CI runs, the floor's (2.11, the GPU image's) included:
the same loss and every parameter's gradient. On torch 2.11 the compiled step once returned the right loss and
every gradient exactly 0 (an in-place update of the loss Function's output), so this compares gradients, not
only losses."""

import pytest
import torch

from configuration_minigpt import MiniGPTConfig
from conftest import TINY, VOCAB
from loss_minigpt import chunked_lm_head_loss
from modeling_minigpt import MiniGPTForCausalLM

NO_DROPOUT = dict(embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
# Eager and compiled bf16 round at different places (inductor keeps fused intermediates in fp32): the gradients
# then differ by about a bf16 rounding (2^-8) of the largest, fp32 ones by float noise.
TOLERANCE = {None: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def step(run, model, x, labels, autocast):
    """One training step's loss and gradients, gradients flattened per parameter."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
        loss = run(x, labels=labels).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_compiled_step_has_eagers_loss_and_every_gradient(backend, autocast):
    """The model as training builds it (its loss pads the 1000-row head to 1024), ignored labels included."""
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(MiniGPTConfig(**TINY, **NO_DROPOUT, pad_vocab_size_multiple=64)).train()
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    labels = x.clone()
    labels[0, :5] = -100
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    eager_loss, eager_grads = step(model, model, x, labels, autocast)
    compiled_loss, compiled_grads = step(compiled, model, x, labels, autocast)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled_loss, eager_loss, **TOLERANCE[autocast])
    for (name, _), eager, fused in zip(model.named_parameters(), eager_grads, compiled_grads):
        assert fused.abs().max() > 0 or eager.abs().max() == 0, f"{name}: every compiled gradient is 0"
        torch.testing.assert_close(fused, eager, **TOLERANCE[autocast], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_compiled_loss_over_several_chunks_has_eagers_gradients(autocast):
    """The loss alone at 16 rows a chunk (5 chunks, the last short), compiled by inductor: each chunk's sum into the
    loss and into the weight's gradient must reach backward."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 36, 64, requires_grad=True)
    weight = (0.02 * torch.randn(VOCAB, 64)).requires_grad_()
    labels = torch.randint(0, VOCAB, (2, 36))
    labels[1, 3:9] = -100

    def loss_and_grads(loss_fn):
        with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = loss_fn(hidden, weight, labels=labels, padded_rows=1024, chunk_logits=16 * 1024)
        return (loss, *torch.autograd.grad(loss, (hidden, weight)))

    torch._dynamo.reset()
    eager = loss_and_grads(chunked_lm_head_loss)
    fused = loss_and_grads(torch.compile(chunked_lm_head_loss, backend="inductor", fullgraph=True))
    torch._dynamo.reset()
    for mine, reference in zip(fused, eager):
        assert mine.abs().max() > 0
        torch.testing.assert_close(mine, reference, **TOLERANCE[autocast])
