"""GGUF files run by llama.cpp itself (llama-cpp-python), against transformers running the same weights:
tokenization, the prompt's logits, greedy tokens; for our own BPE (a trained run) and GPT-2's; tied and untied
heads; llama.cpp's own converter on the native GPT-2 export; bad input in one line, nothing half-written."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, failure, run_script, shared_file
from configuration_minigpt import MiniGPTConfig
from export import export_gpt2
from export_gguf import ExportError, export_gguf
from modeling_minigpt import MiniGPTForCausalLM

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (.ci/run builds it)")
gguf = pytest.importorskip("gguf")

TEXTS = ["Hello world", "café naïve — 東京 and 😀", "tabs\tand  spaces\n\nnew lines", "a<|endoftext|>b", "ROMEO:\nWhat"]
# Largest |logit difference| from transformers' float32 logits, as a fraction of the largest |logit|: about
# twice the worst measured (2-core AMD EPYC; the random GPT-2-vocabulary models: 9.6e-4, 1.8e-3, 4.1e-2; the
# trained run: 5.5e-5, 1.6e-4, 4.2e-3).
TOLERANCE = {"f32": 2e-3, "f16": 4e-3, "q8_0": 8e-2}


def transformers_side(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    return model, AutoTokenizer.from_pretrained(folder, trust_remote_code=True)


@pytest.fixture
def llama():
    """Open GGUF files with llama.cpp; closed at the end (llama-cpp-python fails closing them at exit)."""
    opened = []

    def open_file(path):
        opened.append(llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False))
        return opened[-1]

    yield open_file
    for model in opened:
        model.close()


def llama_logits(llm, ids) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def llama_greedy(llm, ids, n=20) -> list[int]:
    llm.reset()
    tokens = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        tokens.append(token)
        if len(tokens) == n:
            return tokens


def check_against_transformers(folder, gguf_files, llama, greedy_types=("f32", "f16")):
    model, tokenizer = transformers_side(folder)
    for outtype, path in gguf_files.items():
        llm = llama(path)
        for text in TEXTS:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text)["input_ids"], (outtype, text)
        ids = tokenizer("ROMEO:\nWhat light through yonder window")["input_ids"]
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].numpy()
        atol = TOLERANCE[outtype] * np.abs(expected).max()
        np.testing.assert_allclose(llama_logits(llm, ids), expected, atol=atol, rtol=0, err_msg=outtype)
        if outtype in greedy_types:
            tokens = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                                    pad_token_id=tokenizer.eos_token_id)[0, len(ids) :].tolist()  # fmt: skip
            assert llama_greedy(llm, ids) == tokens, outtype


def test_our_bpe_run_in_llama_cpp_tokenizes_scores_and_continues_as_transformers(uninterrupted, llama, tmp_path):
    """A trained run with its own 512-token BPE (which llama.cpp's converter refuses): f32, f16 and q8_0
    files; the default command writes final-f16.gguf beside the folder."""
    final = uninterrupted / "final"
    files = {t: export_gguf(final, tmp_path / f"model-{t}.gguf", t) for t in ("f32", "q8_0")}
    result = run_script([sys.executable, str(REPO / "export_gguf.py"), str(final)], cwd=tmp_path)
    assert result.returncode == 0, failure(result)
    files["f16"] = uninterrupted / "final-f16.gguf"
    assert result.stdout.strip() == f"wrote {files['f16']}" and files["f16"].is_file()
    check_against_transformers(final, files, llama)
    reader = gguf.GGUFReader(files["f16"])
    field = reader.get_field("gpt2.context_length")
    assert field.parts[field.data[0]][0] == MiniGPTConfig.from_pretrained(final).n_positions


@pytest.fixture(scope="module")
def gpt2_vocabulary_folders(tmp_path_factory):
    """Tiny models on GPT-2's own tokenizer (50,257 tokens, the loss padded to 50,304), tied and untied."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared_file("gpt2-tokenizer"))
    folders = {}
    for tied in (True, False):
        torch.manual_seed(0)
        config = MiniGPTConfig(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=50257, pad_vocab_size_multiple=64,
                               initializer_range=0.2, tie_word_embeddings=tied)  # fmt: skip
        folder = tmp_path_factory.mktemp("tied" if tied else "untied")
        MiniGPTForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[tied] = folder
    return folders


@pytest.mark.parametrize("tied", [True, False], ids=["tied_head", "untied_head"])
def test_gpt2_vocabulary_in_llama_cpp_as_transformers(gpt2_vocabulary_folders, tied, llama, tmp_path):
    folder = gpt2_vocabulary_folders[tied]
    files = {t: export_gguf(folder, tmp_path / f"model-{t}.gguf", t) for t in TOLERANCE}
    names = {tensor.name for tensor in gguf.GGUFReader(files["f32"]).tensors}
    assert ("output.weight" in names) == (not tied)
    check_against_transformers(folder, files, llama)


def test_an_untied_native_gpt2_folder_keeps_its_head_in_llama_cpp(gpt2_vocabulary_folders, llama, tmp_path):
    """A native GPT-2 folder with its own head (the export of an untied model): its GGUF file has `output.weight`
    and llama.cpp's logits and greedy tokens are GPT-2's. (Before, the head was dropped: tokens differed from the
    first one.)"""
    native = export_gpt2(gpt2_vocabulary_folders[False], tmp_path / "native")
    files = {t: export_gguf(native, tmp_path / f"native-{t}.gguf", t) for t in ("f32", "f16")}
    assert "output.weight" in {tensor.name for tensor in gguf.GGUFReader(files["f32"]).tensors}
    check_against_transformers(native, files, llama)


def test_llama_cpps_converter_accepts_the_native_export_and_writes_our_tensors(gpt2_vocabulary_folders, tmp_path):
    """llama.cpp's own converter (from the llama-cpp-python source CI builds) reads the native GPT-2 export,
    which before had no `n_ctx` (KeyError); its tensors are ours byte for byte, in f32 and q8_0."""
    converter = os.environ.get("LLAMA_CPP_CONVERTER")
    if not converter or not Path(converter).is_file():
        pytest.skip("LLAMA_CPP_CONVERTER names no convert_hf_to_gguf.py (.ci/run extracts it from llama-cpp-python's source)")
    native = export_gpt2(gpt2_vocabulary_folders[True], tmp_path / "native")
    for outtype in ("f32", "q8_0"):
        theirs = tmp_path / f"converter-{outtype}.gguf"
        result = subprocess.run([sys.executable, converter, str(native), "--outfile", str(theirs), "--outtype", outtype],
                                capture_output=True, text=True, cwd=Path(converter).parent)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        ours = export_gguf(gpt2_vocabulary_folders[True], tmp_path / f"ours-{outtype}.gguf", outtype)
        their_tensors = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
        our_tensors = {t.name: t for t in gguf.GGUFReader(ours).tensors}
        assert our_tensors.keys() == their_tensors.keys()
        for name, tensor in our_tensors.items():
            assert tensor.tensor_type == their_tensors[name].tensor_type, name
            assert bytes(tensor.data) == bytes(their_tensors[name].data), name


def test_bad_sources_are_one_line_and_nothing_is_written(tmp_path, uninterrupted, monkeypatch):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    llama_folder = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(llama_folder)  # fmt: skip
    no_tokenizer = tmp_path / "no_tokenizer"
    MiniGPTForCausalLM(MiniGPTConfig.from_preset("tiny")).save_pretrained(no_tokenizer)
    cases = {
        llama_folder: "is a 'llama' model: GGUF export writes GPT-2 models",
        no_tokenizer: "has no tokenizer.json",
        tmp_path / "missing": "no config.json",
    }
    for source, message in cases.items():
        out = tmp_path / "out.gguf"
        result = run_script([sys.executable, str(REPO / "export_gguf.py"), str(source), "--outfile", str(out)], cwd=tmp_path)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[-1]]
        assert message in result.stderr and not out.exists()

    # a tokenizer llama.cpp cannot reproduce (a prefix space before the first word)
    prefixed = tmp_path / "prefixed"
    MiniGPTForCausalLM(MiniGPTConfig.from_preset("tiny", vocab_size=512)).save_pretrained(prefixed)
    tokenizer = AutoTokenizer.from_pretrained(uninterrupted / "final", trust_remote_code=True)
    tokenizer.backend_tokenizer.pre_tokenizer.add_prefix_space = True
    tokenizer.save_pretrained(prefixed)
    with pytest.raises(ExportError, match="not a byte-level BPE with GPT-2's pre-tokenization"):
        export_gguf(prefixed, tmp_path / "out.gguf")

    # a failure partway leaves neither the file nor its temporary
    import export_gguf as module

    every_tensor = module.gguf_tensors

    def failing_tensors(model, outtype):
        yield from list(every_tensor(model, outtype))[:3]
        raise OSError("disk full")

    monkeypatch.setattr(module, "gguf_tensors", failing_tensors)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(uninterrupted / "final", tmp_path / "half.gguf")
    assert list(tmp_path.glob("half.gguf*")) == []


def test_unknown_types_folders_stale_temporaries_names_and_metadata(uninterrupted, tmp_path):
    """An unknown model_type and an --outfile that is a folder are one line each, before any work; a temporary a
    killed export left is replaced; the name is the folder's own unless it is a run's export; the metadata other
    readers (Ollama, LM Studio) look for is there."""
    mystery = tmp_path / "mystery"
    mystery.mkdir()
    (mystery / "config.json").write_text('{"model_type": "mystery"}')
    cases = [(mystery, tmp_path / "out.gguf", f"{mystery} is a 'mystery' model: GGUF export writes GPT-2 models (minigpt or gpt2)"),
             (uninterrupted / "final", tmp_path, f"--outfile {tmp_path} is a folder: name the .gguf file to write")]  # fmt: skip
    for source, outfile, message in cases:
        result = run_script([sys.executable, str(REPO / "export_gguf.py"), str(source), "--outfile", str(outfile)], cwd=tmp_path)
        assert result.returncode == 1 and result.stderr.strip().splitlines() == [f"export_gguf.py: error: {message}"], result.stderr
    assert list(tmp_path.glob("*.gguf*")) == []

    model = tmp_path / "w" / "model"
    shutil.copytree(uninterrupted / "final", model)
    stale = tmp_path / "model.gguf.tmp"
    stale.write_bytes(b"half a file from a killed export")
    fields = gguf.GGUFReader(export_gguf(model, tmp_path / "model.gguf", "f32")).fields
    assert not stale.exists()
    assert fields["general.name"].contents() == "model"  # not "w", its parent's
    assert fields["general.quantization_version"].contents() == gguf.GGML_QUANT_VERSION
    assert fields["tokenizer.ggml.add_eos_token"].contents() is False
    run = gguf.GGUFReader(export_gguf(uninterrupted / "final", tmp_path / "run.gguf", "f32")).fields
    assert run["general.name"].contents() == "uninterrupted"  # runs/NAME/final: the run's name
