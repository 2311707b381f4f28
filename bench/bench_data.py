"""Tokenization throughput: prepare_data.py against build-nanogpt's fineweb.py loop, same documents, same
process count, in one run. Needs ../shared/data/gpt2-tokenizer.

    python bench/bench_data.py                   # ~6 min on 2 cores; JSON in bench/results/data-<date>.json

The corpus (~200 MB of English in 8 parquet files) is documents resampled, with a seed, from the built-in
corpus (Python's documentation) and Tiny Shakespeare cut into scenes: real English that is available
offline. Each command's wall time is measured whole (start-up, reading, tokenizing, writing shards):
- prepare_data.py, in-memory path (`--files *.parquet`: datasets.map with num_proc) and streaming path
  (`--dataset DIR`: the same files streamed, tokenized in chunks by one pool of processes), GPT-2's
  tokenizer encoded by tiktoken (the default); and the in-memory path with `--encoder tokenizers`;
- fineweb.py's loop: load the dataset, `multiprocessing.Pool(N).imap(tokenize, rows, chunksize=16)` with
  `tiktoken.get_encoding("gpt2")`'s `encode_ordinary` per document, uint16 shards of 1e8 tokens.
All must produce the same tokens: compared as the corpus-order token stream (prepare_data's in-memory
path writes its sampled val documents first; they are put back in place for the comparison).
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

from report import write_report  # noqa: E402
from token_shards import open_shard, read_meta  # noqa: E402

FINEWEB_LOOP = r'''
import multiprocessing as mp, sys, time
import numpy as np, tiktoken, datasets
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

# tiktoken.get_encoding("gpt2") as fineweb.py calls it, built from a local copy of its ranks (offline).
enc = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=load_tiktoken_bpe(sys.argv[1]),
                        special_tokens={"<|endoftext|>": 50256})
eot = enc._special_tokens["<|endoftext|>"]

def tokenize(doc):  # fineweb.py's function
    tokens = np.array([eot] + enc.encode_ordinary(doc["text"]))
    return tokens.astype(np.uint16)

if __name__ == "__main__":
    files, out, nprocs, shard_size = sys.argv[2].split(","), sys.argv[3], int(sys.argv[4]), int(1e8)
    fw = datasets.load_dataset("parquet", data_files=files, split="train")
    with mp.Pool(nprocs) as pool:  # fineweb.py's loop
        shard_index, all_tokens_np, token_count = 0, np.empty((shard_size,), dtype=np.uint16), 0
        for tokens in pool.imap(tokenize, fw, chunksize=16):
            if token_count + len(tokens) < shard_size:
                all_tokens_np[token_count:token_count + len(tokens)] = tokens
                token_count += len(tokens)
            else:
                remainder = shard_size - token_count
                all_tokens_np[token_count:token_count + remainder] = tokens[:remainder]
                np.save(f"{out}/shard_{shard_index:06d}.npy", all_tokens_np)
                shard_index += 1
                all_tokens_np[0:len(tokens) - remainder] = tokens[remainder:]
                token_count = len(tokens) - remainder
        if token_count != 0:
            np.save(f"{out}/shard_{shard_index:06d}.npy", all_tokens_np[:token_count])
'''


def build_corpus(directory: Path, megabytes: int, seed: int = 0) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    import prepare_data

    shakespeare = (SHARED / "tinyshakespeare" / "input.txt").read_text()
    scenes = [shakespeare[i : i + 4000] for i in range(0, len(shakespeare), 4000)]  # ~4 KB documents
    pool = list(prepare_data.builtin_documents()) + scenes
    rng, documents, size = np.random.default_rng(seed), [], 0
    while size < megabytes * 1e6:
        document = pool[rng.integers(len(pool))]
        documents.append(document)
        size += len(document.encode())
    files = [directory / f"part-{part}.parquet" for part in range(8)]
    for part, path in enumerate(files):
        pq.write_table(pa.table({"text": documents[part::8]}), path)
    return files


def stream_of_prepare_data(out: Path) -> np.ndarray:
    """The tokens in corpus order: the in-memory path's val documents go back to their places."""
    meta = read_meta(out)
    tokens = np.concatenate([open_shard(out / s["file"], s["tokens"]) for s in meta["shards"]])
    val = meta["val_split"].get("documents")
    if not val:
        return tokens
    starts = np.flatnonzero(tokens == meta["eot_token_id"])
    documents = np.split(tokens, starts[1:])
    val_set, train = set(val), iter(documents[len(val) :])
    placed = dict(zip(val, documents[: len(val)]))
    return np.concatenate([placed[i] if i in val_set else next(train) for i in range(len(documents))])


def timed(command, cache: Path) -> float:
    """Wall time of the whole command, with an empty datasets cache of its own: datasets caches the parquet
    conversion and map results, and a second run would otherwise read the first one's tokens."""
    cache.mkdir()
    # One thread per process on both sides: the comparison is at equal process counts.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(cache)}  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    seconds = time.perf_counter() - started
    shutil.rmtree(cache)
    return seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megabytes", type=int, default=200)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--val_tokens", default="1e7", help="prepare_data.py's val split (the same on both of its paths)")
    p.add_argument("--output", default=None, help="default: bench/results/data-<date>.json")
    args = p.parse_args(argv)
    tokenizer = SHARED / "gpt2-tokenizer"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "corpus").mkdir()
        files = build_corpus(tmp / "corpus", args.megabytes)
        corpus_bytes = sum(f.stat().st_size for f in files)
        rows, hashes = [], {}
        for n in args.processes:
            for path in ("in-memory", "streaming", "in-memory, tokenizers", "fineweb.py loop"):
                out = tmp / f"{path.replace(' ', '_').replace(',', '')}-{n}"
                out.mkdir()
                if path == "fineweb.py loop":
                    seconds = timed([sys.executable, "-c", FINEWEB_LOOP, str(tokenizer / "gpt2.tiktoken"),
                                     ",".join(map(str, files)), str(out), str(n)], tmp / "cache")  # fmt: skip
                    stream = np.concatenate([np.load(f) for f in sorted(out.glob("shard_*.npy"))])
                else:
                    source = ["--dataset", str(tmp / "corpus")] if path == "streaming" else ["--files", *map(str, files)]
                    encoder = ["--encoder", "tokenizers"] if path.endswith("tokenizers") else []
                    seconds = timed([sys.executable, str(REPO / "prepare_data.py"), *source, *encoder, "--tokenizer", str(tokenizer),
                                     "--num_proc", str(n), "--val_tokens", args.val_tokens, "--output_dir", str(out)], tmp / "cache")  # fmt: skip
                    stream = stream_of_prepare_data(out)
                hashes[(path, n)] = hashlib.sha256(stream.tobytes()).hexdigest()
                rows.append({"path": path, "processes": n, "seconds": seconds, "tokens": int(stream.size),
                             "tokens_per_s": stream.size / seconds})  # fmt: skip
                print(f"{path:>21} x{n}: {seconds:7.1f} s  {stream.size / seconds:>12,.0f} tokens/s", flush=True)
                for old in out.iterdir():  # keep the disk small
                    if old.is_file():
                        old.unlink()
    for n in args.processes:
        peer = next(r["tokens_per_s"] for r in rows if r["path"] == "fineweb.py loop" and r["processes"] == n)
        for r in rows:
            if r["processes"] == n:
                r["ratio_to_fineweb_loop"] = r["tokens_per_s"] / peer
    identical = len(set(hashes.values())) == 1
    report = {"corpus_bytes": corpus_bytes, "identical_tokens": identical, "results": rows}
    print(json.dumps(report, indent=1))
    write_report("data", report, args.output)


if __name__ == "__main__":
    main()
