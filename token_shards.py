"""Token shards on disk: the file format, the manifest, and the reader that feeds training.

A shard is a 1 KiB header of 256 little-endian int32 (magic, format version, token count, bytes per
token) followed by the tokens (uint16, or uint32 for vocabularies over 65,536). `meta.json` beside the
shards names the source, the tokenizer, the vocabulary and every shard with its token count and sha256.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from atomic_writes import write_atomically

MAGIC = 20261121
FORMAT_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"  # the data's tokenizer, saved beside its shards


class ShardError(ValueError):
    """A shard directory that cannot be used as it is: the message says which file and why."""


def token_dtype(vocab_size: int) -> np.dtype:
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32:
        return np.dtype(np.uint32)
    raise ShardError(f"vocabulary of {vocab_size} tokens does not fit in uint32 shards")


def tokenizer_sha256(tokenizer) -> str:
    """Fingerprint of the vocabulary and merges, recorded in the manifest to catch shards made with another
    tokenizer than the model's."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def write_shard(path: Path, tokens: np.ndarray) -> str:
    """Write one shard atomically; return its sha256."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:4] = [MAGIC, FORMAT_VERSION, len(tokens), tokens.dtype.itemsize]
    payload = header.tobytes() + tokens.astype(tokens.dtype.newbyteorder("<"), copy=False).tobytes()
    write_atomically(path, lambda file: file.write(payload))
    return hashlib.sha256(payload).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def open_shard(path: Path, expected_tokens: int | None = None) -> np.memmap:
    """Memory-map a shard's tokens after checking its header against its size (and the manifest)."""
    if not path.exists():
        raise ShardError(f"shard {path} is missing")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"shard {path} is truncated: {size} bytes, shorter than its {HEADER_BYTES}-byte header")
    magic, version, count, itemsize = np.fromfile(path, dtype="<i4", count=4)
    if magic != MAGIC:
        raise ShardError(f"shard {path} is not a token shard (magic {magic}, expected {MAGIC})")
    if version != FORMAT_VERSION:
        raise ShardError(f"shard {path} has format version {version}; this code reads version {FORMAT_VERSION}")
    if itemsize not in (2, 4):
        raise ShardError(f"shard {path} header says {itemsize} bytes per token; expected 2 or 4")
    if size != HEADER_BYTES + count * itemsize:
        raise ShardError(
            f"shard {path} is truncated or corrupt: header says {count} tokens of {itemsize} bytes, "
            f"file holds {(size - HEADER_BYTES) / itemsize:g}"
        )
    if expected_tokens is not None and count != expected_tokens:
        raise ShardError(f"shard {path} holds {count} tokens but {META_FILE} says {expected_tokens}")
    dtype = np.dtype("<u2" if itemsize == 2 else "<u4")
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def tokenizer_dir(data_dir) -> Path:
    return Path(data_dir) / TOKENIZER_DIR


@dataclass(frozen=True)
class TokenData:
    """A prepared data directory with its manifest read once: what training, evaluation and export know of the
    data (vocabulary, tokenizer, token and byte counts)."""

    dir: Path
    meta: dict

    @classmethod
    def of(cls, data) -> "TokenData":
        """`data` itself, or the directory it names, its manifest read and checked."""
        return data if isinstance(data, TokenData) else cls(Path(data), read_meta(data))

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def eot_token_id(self) -> int:
        return self.meta["eot_token_id"]

    @property
    def tokenizer_dir(self) -> Path:
        return tokenizer_dir(self.dir)


def read_meta(data_dir: Path) -> dict:
    data_dir = Path(data_dir)
    path = data_dir / META_FILE
    if not data_dir.is_dir():
        raise ShardError(f"data directory {data_dir} does not exist; create it with prepare_data.py")
    if not path.exists():
        raise ShardError(f"{path} is missing: {data_dir} is not a finished prepare_data.py output")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ShardError(f"{path} is not valid JSON: {error}") from None
    for key in ("vocab_size", "eot_token_id", "shards", "tokenizer_sha256"):
        if key not in meta:
            raise ShardError(f"{path} lacks the field {key!r}")
    return meta


def verify_shards(data_dir: Path, meta: dict, checksums: bool = False) -> None:
    """Every shard in the manifest exists with the promised count and token ids below the vocabulary
    (and, optionally, its checksum). One read of each file serves both checks."""
    for shard in meta["shards"]:
        path = Path(data_dir) / shard["file"]
        tokens = open_shard(path, shard["tokens"])
        digest, largest = hashlib.sha256(), -1
        with open(path, "rb") as file:
            header = file.read(HEADER_BYTES)
            digest.update(header)
            for block in iter(lambda: file.read(1 << 24), b""):  # 16 MiB: a whole number of tokens
                largest = max(largest, int(np.frombuffer(block, dtype=tokens.dtype).max()))
                if checksums:
                    digest.update(block)
        if largest >= meta["vocab_size"]:
            raise ShardError(f"shard {path} holds token id {largest} >= vocab_size {meta['vocab_size']}")
        if checksums and digest.hexdigest() != shard["sha256"]:
            raise ShardError(f"shard {path} does not match the sha256 in {META_FILE}: it was changed or corrupted")


@dataclass
class ShardedTokens:
    """Batches of (B, T + 1) token windows from one split, for one rank of a data-parallel run.

    All ranks walk the same seeded sequence of windows: per epoch, a shuffled order of shards and,
    within each shard, a shuffled order of its non-overlapping windows (a fixed order makes periodic
    patterns in the loss). Global batch i is windows [i*B*world, (i+1)*B*world); rank r takes its r-th
    slice, so ranks are disjoint and together cover every window. The position is the count of
    windows consumed, so a checkpoint resumes exactly, even on a different number of ranks.
    """

    data: TokenData | Path  # a directory is read into its TokenData
    split: str  # "train" or "val"
    batch_size: int  # per rank
    seq_len: int
    rank: int = 0
    world_size: int = 1
    seed: int = 1337
    shuffle: bool = True

    def __post_init__(self):
        self.data = TokenData.of(self.data)
        self.data_dir, meta = self.data.dir, self.data.meta
        self.vocab_size, self.eot_token_id = meta["vocab_size"], meta["eot_token_id"]
        shards = [s for s in meta["shards"] if s["split"] == self.split]
        if not shards:
            raise ShardError(f"{self.data_dir} has no {self.split} shard")
        self.shards = [open_shard(self.data_dir / s["file"], s["tokens"]) for s in shards]
        self.windows_per_shard = [(len(tokens) - 1) // self.seq_len for tokens in self.shards]
        if sum(self.windows_per_shard) < self.batch_size * self.world_size:
            raise ShardError(
                f"the {self.split} split of {self.data_dir} has {sum(self.windows_per_shard)} windows of "
                f"{self.seq_len + 1} tokens, fewer than one global batch of {self.batch_size * self.world_size}"
            )
        self.windows_consumed = 0
        self._layout_epoch = None  # the epoch that _shard_order and _window_ends describe
        self._window_orders = {}  # shard -> its shuffled window order in _layout_epoch

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        start = self.windows_consumed + self.rank * self.batch_size
        rows = [self._window(start + i) for i in range(self.batch_size)]
        self.windows_consumed += self.batch_size * self.world_size
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def _window(self, index: int) -> np.ndarray:
        windows_per_epoch = sum(self.windows_per_shard)
        epoch, index = divmod(index, windows_per_epoch)
        order, ends = self._layout(epoch)
        slot = int(np.searchsorted(ends, index, side="right"))
        shard = order[slot]
        local = index - (ends[slot - 1] if slot else 0)
        if self.shuffle:
            local = self._window_order(epoch, shard)[local]
        begin = local * self.seq_len
        return self.shards[shard][begin : begin + self.seq_len + 1]

    def _layout(self, epoch):
        """This epoch's shard order and the cumulative window count after each shard in it."""
        if self._layout_epoch != epoch:
            order = np.arange(len(self.shards))
            if self.shuffle:
                order = np.random.default_rng((self.seed, epoch)).permutation(order)
            self._layout_epoch, self._shard_order = epoch, order
            self._window_ends = np.cumsum([self.windows_per_shard[s] for s in order])
            self._window_orders = {}
        return self._shard_order, self._window_ends

    def _window_order(self, epoch, shard):
        if shard not in self._window_orders:
            self._window_orders.clear()  # one shard's permutation at a time: shards are read in order
            rng = np.random.default_rng((self.seed, epoch, shard))
            self._window_orders[shard] = rng.permutation(self.windows_per_shard[shard])
        return self._window_orders[shard]

    def state_dict(self) -> dict:
        return {"windows_consumed": self.windows_consumed, "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if (state["seed"], state["seq_len"]) != (self.seed, self.seq_len):
            raise ShardError(
                f"checkpointed data order (seed {state['seed']}, seq_len {state['seq_len']}) differs from this "
                f"run's (seed {self.seed}, seq_len {self.seq_len}): resuming would not continue the same stream"
            )
        self.windows_consumed = state["windows_consumed"]
