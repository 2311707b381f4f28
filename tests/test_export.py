"""The exported folders as the Hub and other runtimes see them: tokenizer settings, the model card's
metadata, the loss plot, checkpoints that save without warnings, and the native GPT-2 export loaded
with no remote code, by transformers and by onnxruntime."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoTokenizer

import prepare_data
from conftest import REPO, TINY, VOCAB, failure, run_script, script_env, step_rows
from configuration_minigpt import MiniGPTConfig
from export import to_gpt2
from modeling_minigpt import MiniGPTForCausalLM
from token_shards import read_meta

SEQ_LEN = 32


@pytest.fixture(scope="module")
def run(tmp_path_factory, handmade_hellaswag_module):
    """A tiny run with checkpoints, HellaSwag in the loop and the native export."""
    root = tmp_path_factory.mktemp("export")
    data = root / "data"
    prepare_data.main(["--vocab_size", "512", "--max_tokens", "60000", "--shard_size", "30000",
                       "--output_dir", str(data), "--num_proc", "1"])  # fmt: skip
    out = root / "run"
    result = run_script([*training(data, handmade_hellaswag_module), "--output_dir", str(out)], cwd=root)
    assert result.returncode == 0, failure(result)
    return out, result


def training(data, hellaswag) -> list[str]:
    return [sys.executable, str(REPO / "train_accelerate.py"), "--model", "tiny", "--seq_len", str(SEQ_LEN),
            "--data_dir", str(data), "--per_device_train_batch_size", "4", "--max_train_steps", "6",
            "--num_warmup_steps", "2", "--eval_steps", "3", "--eval_iters", "2", "--checkpointing_steps", "3",
            "--hellaswag", str(hellaswag), "--export_gpt2", "--export_gguf", "q8_0"]  # fmt: skip


@pytest.fixture(scope="module")
def handmade_hellaswag_module(tmp_path_factory):
    from conftest import HANDMADE_HELLASWAG

    path = tmp_path_factory.mktemp("hellaswag") / "handmade.jsonl"
    path.write_text("".join(json.dumps(example) + "\n" for example in HANDMADE_HELLASWAG))
    return path


def test_checkpoints_save_without_the_shared_tensor_warning_and_resume(run, handmade_hellaswag_module, tmp_path):
    """The tied head is saved once (no warning) and comes back tied: resumed from step 3 into another
    directory, steps 4-6 repeat the run's losses, evaluations and export bit for bit."""
    out, result = run
    assert "Removed shared tensor" not in result.stderr + result.stdout
    assert (out / "checkpoints" / "step_6" / "model.safetensors").exists()
    resumed = run_script([*training(out.parent / "data", handmade_hellaswag_module), "--output_dir", str(tmp_path / "resumed"),
                          "--resume_from_checkpoint", str(out / "checkpoints" / "step_3")], cwd=tmp_path)  # fmt: skip
    assert resumed.returncode == 0 and "step_3 at step 3" in resumed.stdout, resumed.stderr[-3000:]
    measured = ("loss", "grad_norm", "lr", "val_loss", "hellaswag_acc_norm")
    original, again = step_rows(out)[3:], step_rows(tmp_path / "resumed")
    assert [[row.get(k) for k in measured] for row in again] == [[row.get(k) for k in measured] for row in original]
    exported = (out / "final" / "model.safetensors").read_bytes()
    assert (tmp_path / "resumed" / "final" / "model.safetensors").read_bytes() == exported


def test_exported_tokenizer_truncates_at_the_context_and_pads_left_with_eot(run):
    final = run[0] / "final"
    tokenizer = AutoTokenizer.from_pretrained(final, trust_remote_code=True)
    context = json.loads((final / "config.json").read_text())["n_positions"]  # the model's, not the run's seq_len
    assert tokenizer.model_max_length == context == 128
    assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.padding_side == "left"
    assert len(tokenizer("def " * 500, truncation=True)["input_ids"]) == context
    batch = tokenizer(["def", "def main(): return 1"], padding=True)
    assert batch["attention_mask"][0][0] == 0 and batch["input_ids"][0][0] == tokenizer.eos_token_id


def test_model_card_metadata_parses_back_with_the_logged_numbers(run):
    out = run[0]
    last = step_rows(out)[-1]
    card = ModelCard.load(out / "final" / "README.md")
    assert card.data.license == "mit" and card.data.pipeline_tag == "text-generation"
    assert card.data.library_name == "transformers" and card.data.base_model is None
    results = {(r.dataset_name, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert results[("builtin (held-out split)", "val loss")] == round(last["val_loss"], 4)
    assert results[("HellaSwag", "acc_norm, completion style (2 examples)")] == round(last["hellaswag_acc_norm"], 4)
    assert results[("HellaSwag", "acc, lm-evaluation-harness style (2 examples)")] == round(last["hellaswag_lm_eval_acc"], 4)
    assert "| final val loss |" in card.text
    # bits per byte: the logged val loss over the split's bytes per token, in every evaluated row and the card
    meta = read_meta(out.parent / "data")
    for row in [r for r in step_rows(out) if "val_loss" in r]:
        assert row["val_bpb"] == pytest.approx(row["val_loss"] / np.log(2) * meta["tokens"]["val"] / meta["val_bytes"])
    assert results[("builtin (held-out split)", "val bits per byte")] == round(last["val_bpb"], 4)
    assert "| final val bits per byte |" in card.text


def test_loss_plot_draws_evaluations_at_the_logged_step_and_has_a_title(run):
    from metrics import loss_figure

    figure = loss_figure(step_rows(run[0]), "MiniGPT tiny, 768 tokens")
    train_line, val_line = figure.axes[0].lines[:2]
    assert list(val_line.get_xdata()) == [3, 6]  # the log says "step 3:" and "step 6:" after 3 and 6 steps
    assert list(train_line.get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert figure._suptitle.get_text() == "MiniGPT tiny, 768 tokens"


def test_to_gpt2_and_back_is_bitwise_and_the_logits_are_gpt2s():
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(MiniGPTConfig(**TINY)).eval()
    gpt2 = to_gpt2(model)
    assert type(gpt2).__name__ == "GPT2LMHeadModel" and gpt2.lm_head.weight is gpt2.transformer.wte.weight
    back = MiniGPTForCausalLM.from_gpt2(gpt2)
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(gpt2(x).logits, model(x).logits, atol=1e-5, rtol=0)



NATIVE_LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tokenizer(["def main", "import os"], padding=True, return_tensors="pt")
positions = (ids["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # GPT-2's forward leaves left padding to the caller
with torch.no_grad():
    logits = model(**ids, position_ids=positions).logits
tokens = model.generate(**ids, max_new_tokens=8, do_sample=False)
print(json.dumps({"type": type(model).__name__, "model_type": model.config.model_type, "module": type(model).__module__,
                  "logits": logits.tolist(), "tokens": tokens.tolist(), "input_ids": ids["input_ids"].tolist(),
                  "attention_mask": ids["attention_mask"].tolist()}))
"""


def test_native_export_loads_without_remote_code_and_equals_ours(run, tmp_path):
    """From a directory outside the repo, no trust_remote_code, stdin closed: no prompt, no warning."""
    out = run[0]
    native = out / "final-gpt2"
    result = subprocess.run([sys.executable, "-c", NATIVE_LOAD, str(native)], cwd=tmp_path, env=script_env(),
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)  # fmt: skip
    assert result.returncode == 0, failure(result)
    assert "[y/N]" not in result.stdout + result.stderr and "model of type" not in result.stderr, result.stderr
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert (loaded["type"], loaded["model_type"]) == ("GPT2LMHeadModel", "gpt2")
    assert loaded["module"].startswith("transformers.models.gpt2")

    ours = MiniGPTForCausalLM.from_pretrained(out / "final").eval()
    ids, mask = torch.tensor(loaded["input_ids"]), torch.tensor(loaded["attention_mask"])
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask).logits
    real = mask.bool()  # padded positions are not compared: each library fills them its own way
    torch.testing.assert_close(torch.tensor(loaded["logits"])[real], logits[real], atol=1e-5, rtol=0)
    pad = ours.config.eos_token_id
    assert loaded["tokens"] == ours.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=pad).tolist()
    card = ModelCard.load(native / "README.md")
    assert "minigpt-native-gpt2" in card.data.tags and card.data.eval_results


def test_training_exports_a_gguf_file_beside_the_folder(run):
    """--export_gguf: the run's model as llama.cpp reads it (tests/test_gguf.py runs such files in llama.cpp),
    named after the run, with its context and every tensor of a tied 2-layer GPT-2."""
    gguf = pytest.importorskip("gguf")
    out = run[0]
    reader = gguf.GGUFReader(out / "final-q8_0.gguf")
    name, context = reader.get_field("general.name"), reader.get_field("gpt2.context_length")
    assert bytes(name.parts[name.data[0]]).decode() == out.name
    assert context.parts[context.data[0]][0] == MiniGPTConfig.from_pretrained(out / "final").n_positions
    assert len(reader.tensors) == 4 + 12 * 2  # embeddings and ln_f, 12 per block; no output.weight: tied


def test_native_export_runs_in_onnxruntime_with_our_logits_and_greedy_tokens(run, tmp_path):
    import onnxruntime
    from transformers import AutoModelForCausalLM

    out = run[0]
    gpt2 = AutoModelForCausalLM.from_pretrained(out / "final-gpt2").eval()

    class Logits(torch.nn.Module):  # the exported graph: ids in, logits out, no cache
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids, use_cache=False).logits

    example = torch.randint(0, 512, (2, 8))
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence", max=128)}
    torch.onnx.export(Logits(gpt2).eval(), (example,), tmp_path / "model.onnx", input_names=["input_ids"],
                      output_names=["logits"], dynamic_shapes={"input_ids": dims}, dynamo=True)  # fmt: skip
    session = onnxruntime.InferenceSession(tmp_path / "model.onnx", providers=["CPUExecutionProvider"])

    ours = MiniGPTForCausalLM.from_pretrained(out / "final").eval()
    x = torch.randint(0, 512, (3, 13), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"input_ids": x.numpy()})[0], ours(x).logits.numpy(), atol=1e-4, rtol=0)
    prompt = x[:1, :5]
    sequence = prompt.numpy()
    for _ in range(10):  # greedy decoding, the whole sequence each step
        logits = session.run(None, {"input_ids": sequence})[0]
        sequence = np.concatenate([sequence, logits[:, -1:].argmax(-1)], axis=1)
    expected = ours.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=ours.config.eos_token_id)
    assert sequence.tolist() == expected.tolist()


def test_export_gpt2_script_on_an_existing_folder_and_a_bad_path(run, tmp_path):
    command = [sys.executable, str(REPO / "export_gpt2.py")]
    result = run_script([*command, str(run[0] / "final"), str(tmp_path / "native")], tmp_path)
    assert result.returncode == 0, failure(result)
    assert (tmp_path / "native" / "config.json").exists() and not (tmp_path / "native.tmp").exists()
    assert json.loads((tmp_path / "native" / "config.json").read_text())["model_type"] == "gpt2"
    bad = run_script([*command, str(tmp_path / "missing"), str(tmp_path / "x")], tmp_path)
    assert bad.returncode == 1 and "is not a saved MiniGPT folder" in bad.stderr and "Traceback" not in bad.stderr
