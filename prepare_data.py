"""Tokenize a corpus into uint16 token shards for training.

    python prepare_data.py                                   # built-in corpus, GPT-2's tokenizer
    python prepare_data.py --vocab_size 8192                 # built-in corpus, a BPE trained on it (offline)
    python prepare_data.py --fineweb_edu --max_tokens 1e9    # the real recipe's data, streamed
    python prepare_data.py --dataset user/corpus --text_column text
    python prepare_data.py --files 'books/*.txt'             # also .jsonl / .json / .parquet

Each document is preceded by the end-of-text token. The val shard holds `--val_tokens` tokens: for a
corpus of known size, whole documents drawn at random (seeded by `--val_seed`, listed in meta.json), so
val measures the training distribution; for a streamed corpus, its first tokens (the convention of
build-nanogpt and llm.c on FineWeb-Edu). The rest make train shards of `--shard_size` tokens. Shards
are written under a temporary name and renamed, and `progress.json` records where each finished shard
ends, so an interrupted run resumes where it stopped. `meta.json` (see token_shards.py) is written last: its presence means the directory is complete.
"""

import argparse
import ast
import json
import multiprocessing
import os
import sys
import sysconfig
from itertools import chain, islice
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerFast

try:  # corpora load through it; the scripts that only read shards (training, evaluation) do without it
    import datasets
except ImportError:
    sys.exit("prepare_data.py: error: it needs the `datasets` package (pip install datasets)")

from atomic_writes import write_text_atomically
from token_shards import (META_FILE, ShardError, open_shard, token_dtype, tokenizer_dir, tokenizer_sha256, verify_shards,
                          write_shard)
from tokenizing import EOT, MIN_BPE_VOCAB, document_encoder, load_tokenizer, train_bpe

PROGRESS_FILE = "progress.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--fineweb_edu", action="store_true", help="HuggingFaceFW/fineweb-edu, streamed")
    source.add_argument("--dataset", help="a Hub dataset id, streamed")
    source.add_argument("--files", nargs="+", help="local .txt/.jsonl/.json/.parquet files or globs")
    parser.add_argument("--dataset_config", default=None, help="Hub dataset config (fineweb-edu: sample-10BT)")
    parser.add_argument("--split", default="train", help="Hub dataset split")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--output_dir", default=None, help="default: data/<source name>")
    parser.add_argument("--tokenizer", default="openai-community/gpt2", help="Hub id or local tokenizer directory")
    parser.add_argument("--vocab_size", type=int, default=None, help="train a byte-level BPE of this size instead")
    parser.add_argument("--shard_size", type=float, default=None, help="tokens per shard (default 1e8; 1e6 built-in)")
    parser.add_argument("--val_tokens", type=float, default=None, help="default: 10%% of a known-size corpus, else a shard")
    parser.add_argument("--max_tokens", type=float, default=None, help="stop after this many tokens in all")
    parser.add_argument("--val_seed", type=int, default=0, help="which documents of a known-size corpus are val")
    parser.add_argument("--num_proc", type=int, default=os.cpu_count(), help="tokenizer processes")
    parser.add_argument("--chunk_docs", type=int, default=10_000, help="documents tokenized per batch when streaming")
    parser.add_argument("--encoder", choices=["auto", "tiktoken", "tokenizers"], default="auto",
                        help="what encodes the documents (the same ids either way): tiktoken where it can "
                             "reproduce the tokenizer (a byte-level BPE like GPT-2's; ~6x faster), else tokenizers")
    args = parser.parse_args(argv)
    if args.fineweb_edu:
        args.dataset, args.dataset_config = "HuggingFaceFW/fineweb-edu", args.dataset_config or "sample-10BT"
    name = "builtin" if not (args.dataset or args.files) else "files" if args.files else args.dataset.split("/")[-1]
    args.output_dir = Path(args.output_dir or Path("data") / name)
    builtin = not (args.dataset or args.files)
    for flag in ("shard_size", "val_tokens", "max_tokens", "vocab_size", "num_proc", "chunk_docs"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            parser.error(f"--{flag} must be positive, got {value:g}")
    if args.vocab_size is not None and args.vocab_size < MIN_BPE_VOCAB:
        parser.error(f"--vocab_size must be at least {MIN_BPE_VOCAB} (a byte-level BPE starts from 256 bytes plus "
                     f"{EOT}), got {args.vocab_size}")  # fmt: skip
    if args.output_dir.exists() and not args.output_dir.is_dir():
        parser.error(f"--output_dir {args.output_dir} is a file, not a directory")
    args.shard_size = int(args.shard_size if args.shard_size is not None else 1e6 if builtin else 1e8)
    args.max_tokens = None if args.max_tokens is None else int(args.max_tokens)
    args.val_tokens = None if args.val_tokens is None else int(args.val_tokens)
    return args


# --- the corpus ------------------------------------------------------------------------------------


def builtin_documents():
    """Real English that every Python install carries: the language reference topics that `help()`
    shows, then the docstrings of each standard-library module (parsed, never imported)."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).parts
        if parts[0] in ("site-packages", "dist-packages", "idlelib", "lib2to3") or {"test", "tests"} & set(parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately not valid source
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        docstrings = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds)]
        text = "\n\n".join(d for d in docstrings if d)
        if text:
            yield text


def load_corpus(args):
    """A `datasets.Dataset` (known size) or `IterableDataset` (streamed) with a `text` column."""
    if args.dataset:
        corpus = datasets.load_dataset(args.dataset, name=args.dataset_config, split=args.split, streaming=True)
    elif args.files:
        corpus = load_local_files(args.files)
    else:
        return without_empty_documents(datasets.Dataset.from_dict({"text": list(builtin_documents())}))
    columns = corpus.column_names  # None for some streamed datasets: then the first row tells
    if columns is not None and args.text_column not in columns:
        raise ValueError(f"text column {args.text_column!r} not in the corpus (columns: {', '.join(columns)})")
    corpus = corpus.select_columns([args.text_column])
    text_type = getattr(corpus.features[args.text_column], "dtype", None) if corpus.features else "string"
    if text_type not in ("string", "large_string"):
        raise ValueError(f"column {args.text_column!r} holds {corpus.features[args.text_column]}, not text")
    corpus = corpus if args.text_column == "text" else corpus.rename_column(args.text_column, "text")
    return without_empty_documents(corpus) if isinstance(corpus, datasets.Dataset) else corpus


def without_empty_documents(corpus):
    corpus = corpus.filter(lambda batch: [bool(text and text.strip()) for text in batch["text"]], batched=True)
    if len(corpus) == 0:
        raise ValueError("the corpus is empty after dropping empty documents")
    return corpus


def load_local_files(patterns):
    from glob import glob

    files = sorted({f for pattern in patterns for f in (glob(pattern, recursive=True) or [pattern])})
    folders = [f for f in files if Path(f).is_dir()]
    if folders:
        raise ValueError(f"--files takes files, and {', '.join(folders)} is a directory: pass its files, e.g. '{folders[0]}/*.txt'")
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"input file(s) not found: {', '.join(missing)}")
    builders = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    kinds = {builders.get(Path(f).suffix) for f in files}
    if None in kinds or len(kinds) > 1:
        raise ValueError(f"--files must all be one kind of .txt, .jsonl/.json or .parquet; got {files}")
    builder = kinds.pop()
    options = {"sample_by": "document"} if builder == "text" else {}  # a .txt file is one document
    try:
        return datasets.load_dataset(builder, data_files=files, split="train", **options)
    except Exception as error:  # datasets wraps the reader's error (UnicodeDecodeError, JSON, Arrow) in its own
        cause = error.__cause__ or error
        raise ValueError(f"cannot read {', '.join(files)} as {builder}: {type(cause).__name__}: "
                         f"{(str(cause).splitlines() or [''])[0][:200]}") from None  # fmt: skip


# --- the tokenizer ---------------------------------------------------------------------------------


def corpus_tokenizer(args, corpus, tokenizer_dir: Path) -> PreTrainedTokenizerFast:
    """--tokenizer, or with --vocab_size a BPE trained on the corpus (its first 100k documents when
    streamed); resuming, the one trained before, as BPE training is not bitwise stable."""
    if args.vocab_size is None:
        return load_tokenizer(args.tokenizer)
    if (tokenizer_dir / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = corpus["text"] if isinstance(corpus, datasets.Dataset) else (row["text"] for row in corpus.take(100_000))
    return train_bpe(texts, args.vocab_size)


# --- tokenizing and writing ------------------------------------------------------------------------


def encode_options(encode) -> dict:
    return dict(function=encode_batch, batched=True, remove_columns=["text"], fn_kwargs=dict(encode=encode))


def encode_batch(batch, encode):
    ids = encode(batch["text"])
    return {"ids": ids, "length": [len(doc) for doc in ids]}


def start_worker(encode):
    global encode_in_worker  # set once per worker process: a task then carries only its texts
    encode_in_worker = encode


def encode_piece(texts):
    return encode_in_worker(texts)


def encoded_rows(chunks, encode, processes: int):
    """(token array, stream state) of each (text, stream state) row of `chunks` (lists of rows), encoded by
    `processes` worker processes started once for the whole run. One chunk is encoded while this process
    reads the next and writes out the one before."""
    with multiprocessing.Pool(processes, initializer=start_worker, initargs=(encode,)) as pool:
        pending = None
        for chunk in chain(chunks, [None]):
            job = None
            if chunk is not None:
                texts = [text for text, _ in chunk]
                step = -(-len(texts) // (4 * processes))  # a few pieces per process: none waits on one slow piece
                pieces = pool.map_async(encode_piece, [texts[i : i + step] for i in range(0, len(texts), step)])
                job = pieces, [state for _, state in chunk]
            if pending is not None:
                pieces, states = pending
                yield from zip((ids for piece in pieces.get() for ids in piece), states)
            pending = job


def tokenized_documents(corpus, encode, args, start: dict):
    """(token array, stream position after it) per document, in corpus order whatever `num_proc` is,
    from the document where `start` (a finished shard's record) ends. `corpus` is either an already
    tokenized `Dataset` (an `ids` column; no stream position) or a streamed `IterableDataset` of text,
    which resumes from the recorded `stream_state` without reading what came before (a record without one
    skips, reading and dropping, `end_doc` documents)."""
    if isinstance(corpus, datasets.Dataset):
        for batch in corpus.select(range(start["end_doc"], len(corpus))).with_format("arrow").iter(batch_size=1000):
            documents = batch["ids"].combine_chunks()  # split here: datasets formats numpy row by row, slowly
            ends = np.cumsum(pc.list_value_length(documents).to_numpy())
            yield from ((ids, None) for ids in np.split(documents.flatten().to_numpy(), ends[:-1]))
        return
    # The same layers every time (skip 0 when a position was recorded), so a recorded position fits them.
    corpus = corpus.skip(0 if "stream_state" in start else start["end_doc"])
    if "stream_state" in start:
        corpus.load_state_dict(start["stream_state"])
    # The position after each document (~20 us: 2% of tokenizing a typical web page) lets a shard that
    # ends anywhere record exactly where its successor starts.
    rows = ((row["text"], corpus.state_dict()) for row in corpus)
    yield from encoded_rows(iter(lambda: list(islice(rows, args.chunk_docs)), []), encode, args.num_proc)


def plan_val_tokens(args, lengths) -> int:
    """The val split's size, checked up front against what the corpus can give where that is known."""
    known = None if lengths is None else int(lengths.sum())
    total = min(t for t in (known, args.max_tokens) if t is not None) if known or args.max_tokens else None
    val_tokens = args.val_tokens
    if val_tokens is None:
        val_tokens = args.shard_size if total is None else min(args.shard_size, total // 10)
    if total is not None and val_tokens >= total:
        raise ValueError(f"--val_tokens {val_tokens:,} leaves nothing to train on: the corpus gives {total:,} tokens")
    return val_tokens


def val_documents(lengths, val_tokens: int, seed: int) -> np.ndarray | None:
    """Whole documents, drawn at random (seeded) until they hold `val_tokens`, in corpus order; None where
    that would leave nothing to train on (a corpus of one or a few huge documents): then val is the first
    `val_tokens` tokens."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    count = int(np.searchsorted(np.cumsum(lengths[order]), val_tokens)) + 1  # the document reaching val_tokens
    return None if count >= len(lengths) else np.sort(order[:count])


def settings_of(args, tokenizer, val_tokens) -> dict:
    """What must not change between an interrupted run and its resumption."""
    return {
        "source": args.dataset or ("files:" + ",".join(args.files) if args.files else "builtin"),
        "dataset_config": args.dataset_config,
        "split": args.split,
        "text_column": args.text_column,
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "bpe_vocab_size": args.vocab_size,  # the size asked for: a trained BPE may come out smaller
        "shard_size": args.shard_size,
        "val_tokens": val_tokens,
        "max_tokens": args.max_tokens,
        "val_seed": args.val_seed,
    }


class ShardWriter:
    """Fills the shards in order (the val shard, then train shards of `shard_size`), each under a temporary
    name then renamed, and records each finished one in `progress.json` with where its successor starts."""

    def __init__(self, out: Path, progress: dict, dtype, val_tokens: int, shard_size: int):
        self.out, self.progress, self.dtype = out, progress, dtype
        self.val_tokens, self.shard_size = val_tokens, shard_size
        self.start_shard()

    def start_shard(self):
        index, val_shards = len(self.progress["shards"]), 1 if self.val_tokens > 0 else 0
        if index < val_shards:
            self.split, self.name, capacity = "val", "val_000000.bin", self.val_tokens
        else:
            self.split, self.name, capacity = "train", f"train_{index - val_shards:06d}.bin", self.shard_size
        self.buffer, self.filled = np.empty(capacity, dtype=self.dtype), 0

    def add(self, ids, doc_index: int, position: int, state_before, state_after) -> int:
        """Writes `ids[position:]`, document `doc_index`, finishing every shard it fills; returns the count.
        A shard that ends inside the document records the stream state before it, one that ends with it after."""
        start = position
        while position < len(ids):
            take = min(len(ids) - position, len(self.buffer) - self.filled)
            self.buffer[self.filled : self.filled + take] = ids[position : position + take]
            self.filled, position = self.filled + take, position + take
            if self.filled == len(self.buffer):  # the next shard starts inside this document, or after it
                inside = position < len(ids)
                self.finish(*((doc_index, position, state_before) if inside else (doc_index + 1, 0, state_after)))
        return position - start

    def finish(self, end_doc: int, end_offset: int, stream_state):
        """Where the next shard starts: document `end_doc`, token `end_offset`; a stream resumes at `stream_state`."""
        sha = write_shard(self.out / self.name, self.buffer[: self.filled])
        record = {"file": self.name, "split": self.split, "tokens": int(self.filled), "sha256": sha, "end_doc": end_doc}
        record |= {"end_offset": int(end_offset)} | ({"stream_state": stream_state} if stream_state else {})
        self.progress["shards"].append(record)
        write_text_atomically(self.out / PROGRESS_FILE, json.dumps(self.progress, indent=1))
        self.start_shard()


def write_corpus(writer: ShardWriter, corpus, encode, args, bar):
    """Every document from where the last finished shard ends, up to --max_tokens in all."""
    shards = writer.progress["shards"]
    budget = None if args.max_tokens is None else args.max_tokens - sum(s["tokens"] for s in shards)
    last = shards[-1] if shards else {"end_doc": 0, "end_offset": 0}
    doc_index, skip, state_before = last["end_doc"], last["end_offset"], last.get("stream_state")
    for doc_index, (ids, state_after) in enumerate(tokenized_documents(corpus, encode, args, last), doc_index):
        position, skip = skip, 0  # only the first document after a resume was partly written
        taken = writer.add(ids if budget is None else ids[: position + budget], doc_index, position, state_before, state_after)
        bar.update(taken)
        state_before = state_after
        if budget is not None and (budget := budget - taken) == 0:
            break
    if writer.filled:
        writer.finish(doc_index + 1, 0, None)


def split_corpus(args, corpus, encode):
    """(corpus, val_tokens, val_docs): a corpus of known size is tokenized here, once and in parallel, and
    reordered to be written val documents first; a streamed one is tokenized as it is written."""
    if not isinstance(corpus, datasets.Dataset):
        return corpus, plan_val_tokens(args, None), None
    corpus = corpus.map(**encode_options(encode), num_proc=min(args.num_proc, len(corpus)))
    lengths = np.asarray(corpus["length"])
    val_tokens = plan_val_tokens(args, lengths)
    if not val_tokens or (val_docs := val_documents(lengths, val_tokens, args.val_seed)) is None:
        return corpus, val_tokens, None
    val_tokens = int(lengths[val_docs].sum())  # whole documents: the val shard ends where its last one does
    if args.max_tokens is not None and val_tokens >= args.max_tokens:
        raise ValueError(f"the val documents hold {val_tokens:,} tokens, --max_tokens {args.max_tokens:,} leaves none to train on")
    train_docs = np.setdiff1d(np.arange(len(lengths)), val_docs)
    return corpus.select(np.concatenate([val_docs, train_docs])), val_tokens, val_docs


def val_text_bytes(out: Path, shards: list[dict], tokenizer, documents_per_batch: int = 4096) -> int:
    """UTF-8 bytes of the val split's text, from its tokens decoded document by document (end-of-text
    dropped): what turns val loss in nats per token into bits per byte, which compares across tokenizers."""
    val = [shard for shard in shards if shard["split"] == "val"]
    if not val:
        return 0
    ids = open_shard(out / val[0]["file"], val[0]["tokens"])
    starts = np.flatnonzero(ids == tokenizer.eos_token_id)
    documents = np.split(np.asarray(ids), starts[1:] if len(starts) and starts[0] == 0 else starts)
    total = 0
    for i in range(0, len(documents), documents_per_batch):
        texts = tokenizer.batch_decode([d.tolist() for d in documents[i : i + documents_per_batch]], skip_special_tokens=True)
        total += sum(len(text.encode()) for text in texts)
    return total


def resumable_progress(out: Path, settings: dict, vocab_size: int) -> dict | None:
    """What an earlier run in `out` finished (its intact shards), a fresh record, or None if it is complete."""
    progress_path = out / PROGRESS_FILE
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else None
    # Compared on what the directory recorded (an older version recorded fewer settings).
    changed = [k for k in settings if progress is not None and k in progress["settings"] and progress["settings"][k] != settings[k]]
    if changed:
        raise ValueError(f"{out} holds a run with other settings ({', '.join(changed)}); use another --output_dir")
    if (out / META_FILE).exists():
        verify_shards(out, json.loads((out / META_FILE).read_text()), checksums=True)
        return None
    progress = progress or {"settings": settings, "shards": []}
    for shard in progress["shards"]:  # finished shards are kept only if intact
        verify_shards(out, {"shards": [shard], "vocab_size": vocab_size}, checksums=True)
    return progress


def main(argv=None):
    args = parse_args(argv)
    out = args.output_dir
    corpus = load_corpus(args)
    tokenizer = corpus_tokenizer(args, corpus, tokenizer_dir(out))
    encode = document_encoder(tokenizer, args.encoder)
    corpus, val_tokens, val_docs = split_corpus(args, corpus, encode)
    settings = settings_of(args, tokenizer, val_tokens)
    progress = resumable_progress(out, settings, len(tokenizer))
    if progress is None:
        meta = json.loads((out / META_FILE).read_text())
        if "val_bytes" in meta:
            print(f"{out} is complete; nothing to do")
        else:  # prepared before the count existed
            meta["val_bytes"] = val_text_bytes(out, meta["shards"], tokenizer)
            write_text_atomically(out / META_FILE, json.dumps(meta, indent=1))
            print(f"{out} is complete; added the val split's size in bytes ({meta['val_bytes']:,}) for bits per byte")
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(tokenizer_dir(out))

    dtype = token_dtype(len(tokenizer))
    written = sum(s["tokens"] for s in progress["shards"])
    with tqdm(total=args.max_tokens, initial=written, unit="tok", unit_scale=True, desc=f"tokenizing -> {out}") as bar:
        write_corpus(ShardWriter(out, progress, dtype, val_tokens, args.shard_size), corpus, encode, args, bar)
    tokens = {split: sum(s["tokens"] for s in progress["shards"] if s["split"] == split) for split in ("train", "val")}
    if not tokens["train"]:
        raise ValueError(f"the corpus yielded only {tokens['val']:,} tokens: none left for training after --val_tokens")
    meta = {
        "format_version": 1,
        **settings,
        "tokenizer": args.tokenizer if args.vocab_size is None else f"byte-level BPE trained here ({len(tokenizer)})",
        "vocab_size": len(tokenizer),
        "eot_token_id": tokenizer.eos_token_id,
        "dtype": dtype.name,
        "tokens": tokens,
        "val_bytes": val_text_bytes(out, progress["shards"], tokenizer),
        "shards": [{k: v for k, v in shard.items() if k != "stream_state"} for shard in progress["shards"]],
        "val_split": {"documents": val_docs.tolist(), "seed": args.val_seed} if val_docs is not None else {"first_tokens": val_tokens},
        "python": sys.version.split()[0],
    }
    write_text_atomically(out / META_FILE, json.dumps(meta, indent=1))
    print(f"wrote {tokens['train']:,} train and {tokens['val']:,} val tokens to {out}")
    return out


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ShardError) as error:
        sys.exit(f"prepare_data.py: error: {error}")
