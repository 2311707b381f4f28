"""The shard reader at the 124M recipe's scale: 100 shards of 1e8 tokens (10B tokens, 20 GB).

    python bench/bench_reader.py                 # ~1 min; JSON in bench/results/reader-<date>.json

The shards are sparse files: a real header and a hole the size of 1e8 uint16 tokens, so the run needs no
20 GB of disk and reads zeros from the page cache, i.e. the reader's own cost without the disk's. It
measures, in a fresh process for each: `ShardedTokens` start-up time and memory, the rate at which one
process produces (64, 1025) windows (the recipe's micro-batch), and `verify_shards` with checksums over
all 10B tokens (sha256 and token ids in one read), which training runs once per node before its first step. One H100 consumes ~550k
tokens/s at the target: the reader must exceed that by a wide margin.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from report import write_report  # noqa: E402
from token_shards import FORMAT_VERSION, HEADER_BYTES, HEADER_INTS, MAGIC, META_FILE, file_sha256  # noqa: E402

SHARDS, TOKENS_PER_SHARD, BATCH, SEQ_LEN = 100, 100_000_000, 64, 1024
H100_TOKENS_PER_S = 550_000

MEASURE = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from token_shards import ShardedTokens, read_meta, verify_shards

def rss_mib(field="RssAnon"):  # anonymous memory: what the process owns (mapped shards count as RssFile)
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) / 1024

data_dir, what = sys.argv[1], sys.argv[2]
before = rss_mib()
started = time.perf_counter()
if what == "reader":
    reader = ShardedTokens(data_dir, "train", {batch}, {seq_len}, rank=0, world_size=8)
    startup = time.perf_counter() - started
    resident = rss_mib() - before
    next(reader)
    started, batches = time.perf_counter(), 0
    while time.perf_counter() - started < 10:
        next(reader)
        batches += 1
    seconds = time.perf_counter() - started
    print(json.dumps({{"startup_s": startup, "anon_rss_after_startup_mib": resident, "anon_rss_after_reading_mib": rss_mib() - before,
                      "mapped_shard_pages_mib": rss_mib("RssFile"),
                      "windows_per_s": batches * {batch} / seconds, "tokens_per_s": batches * {batch} * {seq_len} / seconds}}))
else:
    verify_shards(data_dir, read_meta(data_dir), checksums=True)  # what training runs before its first step
    print(json.dumps({{"verify_sha256_and_token_ids_s": time.perf_counter() - started}}))
"""


def make_sparse_shards(directory: Path) -> None:
    """100 train shards and a val shard, each a real header over a hole of 1e8 uint16 tokens."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:4] = [MAGIC, FORMAT_VERSION, TOKENS_PER_SHARD, 2]
    shards = []
    for index in range(SHARDS + 1):
        split, name = ("val", "val_000000.bin") if index == 0 else ("train", f"train_{index - 1:06d}.bin")
        with open(directory / name, "wb") as file:
            file.write(header.tobytes())
            file.truncate(HEADER_BYTES + 2 * TOKENS_PER_SHARD)  # a hole: no disk blocks, reads as zeros
        shards.append({"file": name, "split": split, "tokens": TOKENS_PER_SHARD})
    sha256 = file_sha256(directory / "val_000000.bin")  # every shard holds the same bytes
    shards = [{**shard, "sha256": sha256} for shard in shards]
    meta = {"format_version": FORMAT_VERSION, "vocab_size": 50257, "eot_token_id": 50256, "dtype": "uint16", "tokenizer_sha256": "-",
            "shards": shards, "tokens": {"train": SHARDS * TOKENS_PER_SHARD, "val": TOKENS_PER_SHARD}}  # fmt: skip
    (directory / META_FILE).write_text(json.dumps(meta))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=None, help="default: bench/results/reader-<date>.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        make_sparse_shards(Path(directory))
        script = MEASURE.format(repo=str(REPO), batch=BATCH, seq_len=SEQ_LEN)
        results = {}
        for what in ("reader", "verify"):
            out = subprocess.run([sys.executable, "-c", script, directory, what], capture_output=True, text=True, check=True)
            results.update(json.loads(out.stdout.splitlines()[-1]))
    results["margin_over_one_h100"] = results["tokens_per_s"] / H100_TOKENS_PER_S
    report = {"shards": SHARDS, "tokens_per_shard": TOKENS_PER_SHARD, "batch": BATCH, "seq_len": SEQ_LEN, **results}
    print(json.dumps(report, indent=1))
    write_report("reader", report, args.output)


if __name__ == "__main__":
    main()
