"""Fine-tuning a trained folder with TRL's `SFTTrainer`, as the README shows it: plain (padded) batches, packed
rows and padding-free batches longer than the model's context, then save, reload and generate. The control is
transformers' own GPT-2 with the same weights (our native export), fine-tuned the same way."""

import shutil

import pytest
import torch

pytest.importorskip("trl")

WORDS = "the model reads every token once and learns to predict the next one from those before it".split()
# 48 documents of 5 to 40 words: every one fits the 128-token context; a packed or flattened batch does not.
DOCUMENTS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(5 + (i * 13) % 36)) for i in range(48)]
VOCAB = 520  # not a multiple of 64: the training loss pads the head to 576 columns, the tables stay 520 rows


@pytest.fixture(scope="module")
def folders(uninterrupted, tmp_path_factory):
    """The tiny run's final folder (a 512-token BPE), grown to 520 tokens, and its native GPT-2 export."""
    from export import export_gpt2
    from modeling_minigpt import MiniGPTForCausalLM

    final = tmp_path_factory.mktemp("trl") / "final"
    shutil.copytree(uninterrupted / "final", final)
    model = MiniGPTForCausalLM.from_pretrained(final)
    torch.manual_seed(0)
    model.resize_token_embeddings(VOCAB)
    assert model.config.pad_vocab_size_multiple == 64 and model.lm_head.weight.shape[0] == VOCAB
    model.save_pretrained(final)
    return final, export_gpt2(final, final.with_name("final-gpt2"))


def fine_tune(model_path, output_dir, **options):
    """Three steps of `SFTTrainer` from the folder's path (a user's call); returns the trainer and its logged
    losses. The GPT-2 control is loaded here: transformers' Trainer counts a batch's tokens over the shifted labels
    only for a model whose `loss_type` is "ForCausalLM", which GPT2LMHeadModel's name does not give it (None,
    trainer.py's `_loss_shifts_labels`), so its loss would be divided by one token too many a row (3% here)."""
    from datasets import Dataset
    from transformers import GPT2LMHeadModel
    from trl import SFTConfig, SFTTrainer

    model = str(model_path)
    if (model_path / "config.json").read_text().count('"model_type": "gpt2"'):
        model = GPT2LMHeadModel.from_pretrained(model_path)
        model.loss_type = "ForCausalLM"
    config = SFTConfig(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=8, learning_rate=1e-3,
                       logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
                       trust_remote_code=True, **options)  # fmt: skip
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"text": DOCUMENTS}))
    trainer.train()
    return trainer, [row["loss"] for row in trainer.state.log_history if "loss" in row]


@pytest.mark.parametrize(
    "options",
    [dict(max_length=128), dict(packing=True, max_length=512), dict(padding_free=True, max_length=None)],
    ids=["plain", "packed", "padding-free"],
)
def test_sft_trains_as_gpt2_on_the_same_weights(folders, options, tmp_path):
    final, native = folders
    ours, our_losses = fine_tune(final, tmp_path / "ours", **options)
    gpt2, gpt2_losses = fine_tune(native, tmp_path / "gpt2", **options)
    assert type(ours.model).__name__ == "MiniGPTForCausalLM" and type(gpt2.model).__name__ == "GPT2LMHeadModel"
    if options.get("packing") or options.get("padding_free"):  # rows of several documents, longer than the context
        batch = next(iter(ours.get_train_dataloader()))
        assert batch["input_ids"].shape == (1, batch["input_ids"].shape[1]) and batch["input_ids"].shape[1] > 128
        assert (batch["position_ids"] == 0).sum() > 1
    assert len(our_losses) == 3
    torch.testing.assert_close(our_losses, gpt2_losses, rtol=1e-4, atol=0)


def test_a_fine_tuned_folder_reloads_and_generates_gpt2s_tokens(folders, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final, native = folders
    for name, path in (("ours", final), ("gpt2", native)):
        trainer, _ = fine_tune(path, tmp_path / name, max_length=128)
        trainer.save_model(tmp_path / name / "saved")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours" / "saved", trust_remote_code=True)
    gpt2 = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2" / "saved")
    assert type(ours).__name__ == "MiniGPTForCausalLM" and ours.get_output_embeddings().weight.shape[0] == VOCAB
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ours" / "saved")
    prompt = tokenizer(["the model reads"], return_tensors="pt")
    options = dict(max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert torch.equal(ours.generate(**prompt, **options), gpt2.generate(**prompt, **options))
