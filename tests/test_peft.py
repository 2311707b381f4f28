"""PEFT on our model: LoRA adapters, including one on the tied lm_head, must take part in the loss, the
gradients and the logits (the chunked training loss reads the head's weight directly, which would skip an
adapter, so a wrapped head takes the plain loss), and an adapter saved with PEFT must load back onto a
fresh base model."""

import peft
import torch

from configuration_minigpt import MiniGPTConfig
from conftest import TINY, VOCAB
from modeling_minigpt import MiniGPTForCausalLM, causal_lm_loss


def base_model():
    torch.manual_seed(0)
    no_dropout = dict(embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    return MiniGPTForCausalLM(MiniGPTConfig(**TINY, **no_dropout, pad_vocab_size_multiple=64))


def with_lora(model, target_modules):
    # init_lora_weights=False: both LoRA matrices random, so every adapter changes the output from step 0.
    # ensure_weight_tying: an adapter on the tied lm_head is tied to one on the token embedding, as PEFT
    # recommends (it finds the tying through the model's _tied_weights_keys).
    tied = "lm_head" in target_modules
    config = peft.LoraConfig(r=4, target_modules=target_modules, init_lora_weights=False, ensure_weight_tying=tied)
    return peft.get_peft_model(model, config)


def reference_logits(model, x):
    """Logits through plain module calls, the way any wrapped lm_head expects to be used."""
    hidden = model.base_model.model.transformer(x).last_hidden_state
    return model.base_model.model.lm_head(hidden)[..., :VOCAB]


def test_lora_on_attention_and_the_tied_head_trains_through_every_adapter():
    model = with_lora(base_model(), ["c_attn", "lm_head"])
    assert isinstance(model.base_model.model.transformer.wte, peft.tuners.lora.Embedding)  # tied adapter
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    trainable = [p for p in model.parameters() if p.requires_grad]

    model.train()
    loss = model(input_ids=x, labels=x).loss
    grads = torch.autograd.grad(loss, trainable)
    reference = causal_lm_loss(reference_logits(model, x), x)
    reference_grads = torch.autograd.grad(reference, trainable)
    torch.testing.assert_close(loss, reference)
    for grad, expected in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-4)

    model.eval()
    with torch.no_grad(), model.disable_adapter():
        without_adapters = model(input_ids=x).logits
    with torch.no_grad():
        logits = model(input_ids=x).logits  # 48 rows: the CPU path for few rows
        torch.testing.assert_close(logits, reference_logits(model, x))
    assert (logits - without_adapters).abs().max() > 0.1  # the adapters do change the output


def test_adapter_saved_with_peft_loads_onto_a_fresh_base_model(tmp_path):
    model = with_lora(base_model(), ["c_attn", "c_fc"]).eval()
    x = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(base_model(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, model(input_ids=x).logits, atol=0, rtol=0)
    greedy = dict(max_new_tokens=40, do_sample=False, pad_token_id=VOCAB - 1)
    assert torch.equal(reloaded.generate(input_ids=x, **greedy), model.generate(input_ids=x, **greedy))
