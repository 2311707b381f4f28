"""A GPT-2 with its own head (`tie_word_embeddings=False`) keeps it through every path that converts one: the
logits equal the library's GPT-2's, tied and untied. (Before, `from_gpt2` tied every model and dropped `lm_head`:
logits off by up to 20.8 on a random 2-layer model.) The GGUF export of such a folder is tested in test_gguf.py."""


import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import TINY, TINY_RUN, TRAIN, failure, run_script
from export import to_gpt2
from modeling_minigpt import MiniGPTForCausalLM


def gpt2(tied: bool, vocab_size: int = TINY["vocab_size"]) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**{**TINY, "vocab_size": vocab_size}, tie_word_embeddings=tied)).eval()
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    return model


def same_logits(ours, theirs, vocab_size=TINY["vocab_size"]):
    x = torch.randint(0, vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x).logits, theirs(x).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_from_gpt2_keeps_the_tie_setting_and_the_head(tied, tmp_path):
    reference = gpt2(tied)
    reference.save_pretrained(tmp_path / "gpt2")
    for source in (reference, tmp_path / "gpt2"):  # the model object, and a folder
        ours = MiniGPTForCausalLM.from_gpt2(source, pad_vocab_size_multiple=64)
        assert ours.config.tie_word_embeddings == tied
        assert (ours.lm_head.weight is ours.transformer.wte.weight) == tied
        same_logits(ours, reference)
    ours.save_pretrained(tmp_path / "ours")  # saved and reloaded, and back to a native GPT-2 folder
    same_logits(MiniGPTForCausalLM.from_pretrained(tmp_path / "ours"), reference)
    to_gpt2(MiniGPTForCausalLM.from_pretrained(tmp_path / "ours")).save_pretrained(tmp_path / "native")  # --export_gpt2's
    native = GPT2LMHeadModel.from_pretrained(tmp_path / "native").eval()
    assert native.config.tie_word_embeddings == tied
    same_logits(native, reference)


def test_training_from_an_untied_gpt2_folder_starts_from_its_head(data_dir, tmp_path):
    """`train_accelerate.py --from_gpt2 FOLDER` at a learning rate of 1e-12: the exported model is GPT-2's, head included."""
    reference = gpt2(tied=False, vocab_size=512)  # the data's BPE
    reference.save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "run"
    result = run_script([*TRAIN, *TINY_RUN, "--model", str(tmp_path / "gpt2"), "--from_gpt2", "--learning_rate", "1e-12",
                         "--data_dir", str(data_dir), "--output_dir", str(out), "--max_train_steps", "1"], cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, failure(result)
    trained = MiniGPTForCausalLM.from_pretrained(out / "final")
    assert not trained.config.tie_word_embeddings
    same_logits(trained, reference, vocab_size=512)
