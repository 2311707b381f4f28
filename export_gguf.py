"""Export a trained model as one GGUF file, for llama.cpp and what runs on it (Ollama, LM Studio,
llama-cpp-python):

    python export_gguf.py runs/quickstart/final                    # -> runs/quickstart/final-f16.gguf
    python export_gguf.py runs/quickstart/final --outtype q8_0     # f32 | f16 | bf16 | q8_0
    python export_gguf.py runs/x/checkpoints/step_500 --outfile x.gguf

The source is a saved MiniGPT folder, a training checkpoint (its tokenizer is the data directory's) or a
native GPT-2 folder. The file is written through `gguf`, llama.cpp's own Python library, as llama.cpp's
GPT-2 architecture: the same tensors its converter writes for the same weights, GPT-2's byte-level BPE with
pre-tokenizer "gpt-2" (our own BPEs from `prepare_data.py --vocab_size` too, which llama.cpp's converter
refuses), the context length, end-of-text as bos/eos, and the model's name. Norms, biases and position
embeddings stay f32, as the converter keeps them; a matrix whose rows do not split into q8_0's 32-value
blocks falls back to f16. For k-quants, run llama.cpp's `llama-quantize` on an f16 or f32 file.
`train_accelerate.py --export_gguf TYPE` does this for its export.
"""

import argparse
import json
import sys
from pathlib import Path

import gguf
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from atomic_writes import replace_atomically
from modeling_minigpt import MiniGPTForCausalLM
from tokenizing import is_gpt2_bpe
from training_settings import find_tokenizer

OUTTYPES = {  # the file's type, and what its matrices are stored as
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
KEPT_IN_F32 = ("position_embd.weight",)  # besides every 1-D tensor: llama.cpp's converter keeps these f32


class ExportError(ValueError):
    """An input that cannot be exported; the command line prints it as one line."""


def load_source(source: Path):
    """The model (MiniGPT, float32) and tokenizer of `source`, checked before anything is written."""
    if not (source / "config.json").is_file():
        raise ExportError(f"{source} is not a saved model, checkpoint or GPT-2 folder (no config.json)")
    # Read from the file, not through AutoConfig: for a type it does not know, transformers answers in three
    # lines that advise upgrading it.
    model_type = json.loads((source / "config.json").read_text()).get("model_type")
    if model_type not in ("minigpt", "gpt2"):
        raise ExportError(f"{source} is a {model_type!r} model: GGUF export writes GPT-2 models (minigpt or gpt2)")
    tokenizer_path = Path(find_tokenizer(str(source), None))
    if not (tokenizer_path / "tokenizer.json").is_file():
        raise ExportError(f"no tokenizer for {source}: {tokenizer_path} has no tokenizer.json")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=True)  # a MiniGPT folder names our code
    check_tokenizer(tokenizer, tokenizer_path)
    if model_type == "gpt2":
        model = MiniGPTForCausalLM.from_gpt2(GPT2LMHeadModel.from_pretrained(source, dtype=torch.float32))
    else:
        model = MiniGPTForCausalLM.from_pretrained(source, dtype=torch.float32)
    if len(tokenizer) > model.config.vocab_size:
        raise ExportError(f"{source}: its tokenizer has {len(tokenizer)} tokens, the model only {model.config.vocab_size}")
    return model, tokenizer


def check_tokenizer(tokenizer, where) -> None:
    if not is_gpt2_bpe(tokenizer):
        raise ExportError(f"the tokenizer at {where} is not a byte-level BPE with GPT-2's pre-tokenization, the only "
                          f"kind llama.cpp's gpt2 architecture reads")  # fmt: skip


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens by id (ids the tokenizer lacks as unused placeholders, as llama.cpp's converter writes them),
    their types (special added tokens are control tokens, other added ones user-defined) and the merges."""
    by_id = {id: token for token, id in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for id in range(vocab_size):
        if id not in by_id:
            tokens.append(f"[PAD{id}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[id])
            kind = gguf.TokenType.NORMAL if id not in added else None
            types.append(kind or (gguf.TokenType.CONTROL if added[id].special else gguf.TokenType.USER_DEFINED))
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    return tokens, types, [merge if isinstance(merge, str) else " ".join(merge) for merge in merges]


def gguf_tensors(model: MiniGPTForCausalLM, outtype: str):
    """(GGUF name, data, stored type) for every tensor, in llama.cpp's GPT-2 layout. Our Linear weights are
    (out, in), as llama.cpp's are; a tied head is left out (llama.cpp then uses the token embedding)."""
    c = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, c.n_layer)
    state = model.state_dict()
    if c.tie_word_embeddings:
        state.pop("lm_head.weight")
    for key, tensor in state.items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"{key}: no GGUF name for it in llama.cpp's gpt2 architecture")
        data = tensor.detach().to(torch.float32).numpy()
        stored = OUTTYPES[outtype][1]
        if data.ndim == 1 or name in KEPT_IN_F32:
            stored = gguf.GGMLQuantizationType.F32
        try:
            yield name, gguf.quants.quantize(data, stored), stored
        except gguf.QuantError:  # rows not a multiple of the block size
            yield name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def write_gguf(model: MiniGPTForCausalLM, tokenizer, path: Path, outtype: str = "f16", name: str = "minigpt") -> Path:
    """The GGUF file at `path`, written under a temporary name and renamed when complete."""
    c, eot = model.config, tokenizer.eos_token_id
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(c.n_positions)
    writer.add_embedding_length(c.n_embd)
    writer.add_feed_forward_length(4 * c.n_embd)
    writer.add_block_count(c.n_layer)
    writer.add_head_count(c.n_head)
    writer.add_layer_norm_eps(c.layer_norm_epsilon)
    writer.add_file_type(OUTTYPES[outtype][0])
    tokens, types, merges = vocabulary(tokenizer, c.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eot)  # documents are led by end-of-text in training
    writer.add_eos_token_id(eot)
    writer.add_add_bos_token(False)  # text is tokenized as our tokenizer does: nothing added
    writer.add_add_eos_token(False)
    if tokenizer.unk_token_id is not None:  # GPT-2's BPE has none: every byte is a token
        writer.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    for tensor_name, data, stored in gguf_tensors(model, outtype):
        writer.add_tensor(tensor_name, data, raw_dtype=stored)

    def write_to(temporary):
        writer.write_header_to_file(temporary)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    replace_atomically(path, write_to)
    return path


def export_gguf(source: Path, destination: Path | None = None, outtype: str = "f16", name: str | None = None) -> Path:
    """Write `source` (a MiniGPT folder, training checkpoint or native GPT-2 folder) as a GGUF file."""
    source = Path(source)
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype {outtype}: choose one of {', '.join(OUTTYPES)}")
    destination = Path(destination or source.with_name(f"{source.name}-{outtype}.gguf"))
    if not destination.parent.is_dir():
        raise ExportError(f"--outfile {destination}: its folder {destination.parent} does not exist")
    if destination.is_dir():
        raise ExportError(f"--outfile {destination} is a folder: name the .gguf file to write")
    model, tokenizer = load_source(source)
    return write_gguf(model, tokenizer, destination, outtype, name or run_name(source))


def run_name(source: Path) -> str:
    """The training run's folder name for its export or checkpoints (`runs/NAME/final`,
    `runs/NAME/checkpoints/step_N`); any other folder's own name."""
    source = source.resolve()
    if source.name == "final":
        return source.parent.name
    return source.parent.parent.name if source.parent.name == "checkpoints" else source.name


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="a saved MiniGPT folder, a training checkpoint or a native GPT-2 folder")
    p.add_argument("--outfile", type=Path, default=None, help="default: SOURCE-OUTTYPE.gguf beside the source")
    p.add_argument("--outtype", default="f16", choices=list(OUTTYPES))
    p.add_argument("--name", default=None, help="the model's name in the file (default: the run's folder name)")
    args = p.parse_args(argv)
    print(f"wrote {export_gguf(args.source, args.outfile, args.outtype, args.name)}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as error:
        sys.exit(f"export_gguf.py: error: {error}")
