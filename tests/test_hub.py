"""Hugging Face integration: what a Hub user, `pipeline` and the Auto classes get."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, pipeline

from configuration_minigpt import MiniGPTConfig
from conftest import TINY, VOCAB
from modeling_minigpt import MiniGPTForCausalLM, MiniGPTModel


# What a Hub user runs: no repository on sys.path, the model's code comes from the saved folder.
REMOTE_LOAD = """
import importlib.util, sys, torch
from transformers import AutoModel, AutoModelForCausalLM
assert importlib.util.find_spec("modeling_minigpt") is None, "the repo leaked onto sys.path"
folder, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert model.lm_head.weight is model.transformer.wte.weight
trunk = AutoModel.from_pretrained(folder, trust_remote_code=True)
assert type(trunk).__name__ == "MiniGPTModel", type(trunk)
x = torch.arange(32).view(2, 16) * 7 % 1000
with torch.no_grad():
    logits = model(x).logits
# Training takes the chunked loss, from the loss_minigpt.py that save_pretrained copied beside the model.
assert any(name.startswith("transformers_modules") and name.endswith("loss_minigpt") for name in sys.modules)
loss = model.train()(x, labels=x).loss
loss.backward()
torch.save({"logits": logits, "loss": loss.detach(), "grad": model.transformer.wte.weight.grad}, out)
"""


@pytest.fixture
def saved_model(tmp_path):
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(MiniGPTConfig(**TINY)).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    return model, folder


def test_saved_folder_is_safetensors_with_code_and_both_auto_classes(saved_model):
    model, folder = saved_model
    files = sorted(os.listdir(folder))
    assert "model.safetensors" in files and not [f for f in files if f.endswith((".bin", ".pt"))]
    assert {"configuration_minigpt.py", "modeling_minigpt.py", "loss_minigpt.py", "masking_minigpt.py", "conversion_minigpt.py"} <= set(files)
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_minigpt.MiniGPTConfig",
        "AutoModel": "modeling_minigpt.MiniGPTModel",
        "AutoModelForCausalLM": "modeling_minigpt.MiniGPTForCausalLM",
    }
    # Tied weights are stored once; the head must come back tied, not random.
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")


def test_remote_code_loads_in_a_clean_process_elsewhere_with_identical_logits_and_trains(saved_model, tmp_path):
    model, folder = saved_model
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    out = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", REMOTE_LOAD, str(folder), str(out)], cwd=elsewhere, env=env, check=True)
    x = torch.arange(32).view(2, 16) * 7 % 1000
    remote = torch.load(out)
    with torch.no_grad():
        assert torch.equal(remote["logits"], model(x).logits)
    loss = model.train()(x, labels=x).loss
    loss.backward()
    assert torch.equal(remote["loss"], loss.detach()) and torch.equal(remote["grad"], model.transformer.wte.weight.grad)


def test_reload_in_bfloat16(saved_model):
    model, folder = saved_model
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert isinstance(reloaded, MiniGPTForCausalLM)
    assert all(p.dtype == torch.bfloat16 for p in reloaded.parameters())
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits.float(), model(x).logits, atol=0.05, rtol=0.05)


def test_auto_classes_know_the_config_in_process():
    config = MiniGPTConfig(**TINY)
    assert isinstance(AutoModelForCausalLM.from_config(config), MiniGPTForCausalLM)
    assert isinstance(AutoModel.from_config(config), MiniGPTModel)


def test_text_generation_pipeline_with_a_real_tokenizer(gpt2_tokenizer, caplog):
    torch.manual_seed(0)
    config = MiniGPTConfig.from_preset("tiny", vocab_size=len(gpt2_tokenizer))
    config.bos_token_id = config.eos_token_id = gpt2_tokenizer.eos_token_id
    model = MiniGPTForCausalLM(config)
    with caplog.at_level(logging.WARNING):
        generator = pipeline("text-generation", model=model, tokenizer=gpt2_tokenizer)
        [result] = generator("Hello world", max_new_tokens=8, do_sample=False)
    assert result["generated_text"].startswith("Hello world")
    assert len(gpt2_tokenizer(result["generated_text"])["input_ids"]) > len(gpt2_tokenizer("Hello world")["input_ids"])
    assert not [r for r in caplog.records if "not supported" in r.getMessage()], caplog.text
