"""Text -> token ids for the shards: the tokenizer (a local or Hub one, or a byte-level BPE trained on the
corpus), the same BPE as a tiktoken `Encoding` where tiktoken reproduces it, and documents -> token
arrays, each led by end-of-text. `prepare_data.py` uses it; training and evaluation read shards only."""

import json
from functools import partial

import numpy as np
import tiktoken
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from token_shards import token_dtype

EOT = "<|endoftext|>"
MIN_BPE_VOCAB = 257  # the 256 byte tokens every byte-level BPE has, plus EOT
# GPT-2's pre-tokenization regex as `tokenizers` writes it (ByteLevel's own, or a Split before it), and an
# equivalent spelling that tiktoken runs faster (5.7M against 4.8M tokens/s on one core here; tiktoken's own
# "gpt2" pattern, r50k_pat_str, ran at 5.0M).
TOKENIZERS_GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_PRE_TOKENIZED = "gpt2-bpe"  # the name of a tiktoken encoding that splits text with GPT2_PATTERN


def load_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A Hub id or a local directory; its end-of-text (eos) token separates the documents."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as error:
        raise ValueError(
            f"cannot load tokenizer {name!r} ({error.__class__.__name__}); offline, pass a local "
            f"directory (e.g. ../shared/data/gpt2-tokenizer) or --vocab_size N to train one on the corpus"
        ) from None
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer {name!r} has no end-of-text (eos) token to separate documents")
    return tokenizer


def train_bpe(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's kind) of at most `vocab_size` tokens, EOT among them, trained on `texts`.
    Built from tokenizers' parts, as its `ByteLevelBPETokenizer` builds one, rather than through that
    class: it is a Python wrapper, and transformers turns `split_special_tokens` on in the object it is
    given, so a wrapped BPE read a quoted "<|endoftext|>" as the token until saved and loaded back."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOT, eos_token=EOT, unk_token=EOT)


def tiktoken_encoding(tokenizer) -> tiktoken.Encoding | None:
    """The tokenizer's byte-level BPE as a tiktoken `Encoding`, which encodes ~6x faster per core than
    `tokenizers` (bench/bench_data.py), or None where tiktoken cannot reproduce it: a normalizer, a
    pre-tokenizer other than a regex split into bytes, BPE options, or merges out of vocabulary order
    (tiktoken merges by the merged token's rank, so ids must follow merge priority, as in GPT-2's BPE and
    in every BPE that `tokenizers` trains)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, steps = spec["model"], spec["pre_tokenizer"] or {"type": None}
    steps = steps.get("pretokenizers", [steps])
    kinds = [step["type"] for step in steps]
    options = ("dropout", "byte_fallback", "continuing_subword_prefix", "end_of_word_suffix")
    if spec["normalizer"] or model["type"] != "BPE" or any(model.get(option) for option in options):
        return None
    if kinds == ["ByteLevel"] and steps[0]["use_regex"]:
        pattern = GPT2_PATTERN
    elif kinds == ["Split", "ByteLevel"] and "Regex" in steps[0]["pattern"] and not steps[1]["use_regex"]:
        if steps[0]["behavior"] != "Isolated" or steps[0]["invert"]:
            return None
        pattern = steps[0]["pattern"]["Regex"]
        pattern = GPT2_PATTERN if pattern == TOKENIZERS_GPT2_REGEX else pattern
    else:
        return None
    if steps[-1]["add_prefix_space"]:
        return None
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    special = {token["content"] for token in spec["added_tokens"]}
    vocab = {token: id for token, id in model["vocab"].items() if token not in special}
    if any(char not in byte_of for token in vocab for char in token):
        return None
    merges = [merge.split(" ") if isinstance(merge, str) else merge for merge in model["merges"]]
    merged_ids = [vocab.get(first + second) for first, second in merges]  # a token may have several merges
    bytes_present = sum(len(token) == 1 for token in vocab) == 256
    in_merge_order = None not in merged_ids and all(a <= b for a, b in zip(merged_ids, merged_ids[1:]))
    if not (bytes_present and in_merge_order and len(set(merged_ids)) == len(vocab) - 256):
        return None
    ranks = {bytes(byte_of[char] for char in token): id for token, id in vocab.items()}
    name = GPT2_PRE_TOKENIZED if pattern == GPT2_PATTERN else "bpe"  # named for its pre-tokenization
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})


def is_gpt2_bpe(tokenizer) -> bool:
    """A plain byte-level BPE (whatever its vocabulary) that pre-tokenizes as GPT-2's does: what llama.cpp's
    "gpt-2" pre-tokenizer reproduces, as tiktoken does."""
    encoding = tiktoken_encoding(tokenizer)
    return encoding is not None and encoding.name == GPT2_PRE_TOKENIZED


def document_encoder(tokenizer, encoder: str = "auto"):
    """texts -> their token arrays, each led by end-of-text: through tiktoken where it reproduces the
    tokenizer (`encoder` "auto" or "tiktoken"), else (or with "tokenizers") through the tokenizer."""
    encoding = None if encoder == "tokenizers" else tiktoken_encoding(tokenizer)
    if encoding is None and encoder == "tiktoken":
        raise ValueError(f"tiktoken cannot reproduce tokenizer {tokenizer.name_or_path!r} (not a plain byte-level BPE with "
                         f"merges in vocabulary order); use --encoder tokenizers")  # fmt: skip
    return partial(encode_documents, encoder=encoding or tokenizer, eot_token_id=tokenizer.eos_token_id,
                   dtype=token_dtype(len(tokenizer)))  # fmt: skip


def encode_documents(texts, encoder, eot_token_id, dtype) -> list[np.ndarray]:
    """Each document's ids, led by the end-of-text token. Text that spells a special token (a web page
    quoting "<|endoftext|>") is encoded as the text it is, as tiktoken's `encode_ordinary` does."""
    if isinstance(encoder, tiktoken.Encoding):
        ids = [encoder.encode_ordinary(text) for text in texts]
    else:
        ids = encoder(texts, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
    documents = [np.empty(len(doc) + 1, dtype) for doc in ids]
    for document, doc in zip(documents, ids):
        document[0], document[1:] = eot_token_id, doc
    return documents
