"""The shard format and the reader (token_shards.py) on hand-made shards of counting tokens, where a
window's first token names it: layout, rank split, seeded shuffling, exact resume, damage named."""

import json
import shutil

import numpy as np
import pytest

from token_shards import HEADER_BYTES, ShardedTokens, ShardError, open_shard, read_meta, token_dtype, verify_shards, write_shard


@pytest.fixture(scope="module")
def counting(tmp_path_factory):
    """Three train shards of distinct counting tokens (of unequal length): a window's first token names it."""
    out = tmp_path_factory.mktemp("counting")
    shards, start = [], 0
    for i, length in enumerate([3300, 2100, 4000]):
        tokens = np.arange(start, start + length, dtype=np.uint16)
        sha = write_shard(out / f"train_{i:06d}.bin", tokens)
        shards.append({"file": f"train_{i:06d}.bin", "split": "train", "tokens": length, "sha256": sha})
        start += length
    meta = {"vocab_size": 65536, "eot_token_id": 0, "tokenizer_sha256": "-", "shards": shards}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def windows_seen(reader, batches):
    return [int(row[0]) for _ in range(batches) for row in next(reader)]


def test_ranks_are_disjoint_and_together_cover_every_window_once(counting):
    single = ShardedTokens(counting, "train", batch_size=4, seq_len=32)
    per_epoch = sum(single.windows_per_shard)
    assert per_epoch == 3299 // 32 + 2099 // 32 + 3999 // 32
    ranks = [ShardedTokens(counting, "train", batch_size=2, seq_len=32, rank=r, world_size=2) for r in range(2)]
    steps = per_epoch // 4
    seen = [windows_seen(reader, steps) for reader in ranks]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(windows_seen(single, steps))
    every_window = {start + 32 * w for start, n in [(0, 3300), (3300, 2100), (5400, 4000)] for w in range((n - 1) // 32)}
    first_epoch = ShardedTokens(counting, "train", batch_size=1, seq_len=32)
    assert sorted(windows_seen(first_epoch, per_epoch)) == sorted(every_window)


def test_windows_are_t_plus_one_tokens_of_the_shards(counting):
    reader = ShardedTokens(counting, "train", batch_size=3, seq_len=16, shuffle=False)
    first_shard = open_shard(counting / "train_000000.bin")
    batch = next(reader)
    assert batch.shape == (3, 17)
    assert batch[1].tolist() == first_shard[16:33].tolist()  # windows overlap by the one target token


def test_shuffling_is_seeded_and_differs_between_epochs(counting):
    a, b, c = (ShardedTokens(counting, "train", batch_size=1, seq_len=64, seed=s) for s in (1, 1, 2))
    per_epoch = sum(a.windows_per_shard)
    first = windows_seen(a, per_epoch)
    assert first == windows_seen(b, per_epoch) and first != windows_seen(c, per_epoch)
    assert first != sorted(first)  # shuffled within shards, not just across them
    second = windows_seen(a, per_epoch)
    assert second != first and sorted(second) == sorted(first)  # epoch 2: another order of the same windows


def test_reader_state_resumes_the_exact_stream_across_epochs(counting):
    reader = ShardedTokens(counting, "train", batch_size=8, seq_len=32)
    windows_seen(reader, 30)
    state = reader.state_dict()
    expected = windows_seen(reader, 20)  # crosses into the second epoch (287 windows per epoch)
    resumed = ShardedTokens(counting, "train", batch_size=8, seq_len=32)
    resumed.load_state_dict(state)
    assert windows_seen(resumed, 20) == expected
    with pytest.raises(ShardError, match="seed"):
        ShardedTokens(counting, "train", batch_size=2, seq_len=32, seed=9).load_state_dict(state)


def test_damaged_shards_are_named(counting, tmp_path):
    out = tmp_path / "damaged"
    shutil.copytree(counting, out)
    meta = read_meta(out)
    shard = out / "train_000000.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(ShardError, match="train_000000.bin is truncated or corrupt"):
        ShardedTokens(out, "train", batch_size=1, seq_len=8)
    reordered = np.frombuffer(data[HEADER_BYTES:], dtype=np.uint16)[::-1]  # every id still valid
    shard.write_bytes(data[:HEADER_BYTES] + reordered.tobytes())
    with pytest.raises(ShardError, match="does not match the sha256"):
        verify_shards(out, meta, checksums=True)
    shard.write_bytes(data)
    meta["shards"][1]["tokens"] += 1
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ShardError, match="holds 2100 tokens but meta.json says 2101"):
        ShardedTokens(out, "train", batch_size=1, seq_len=8)
    (out / "meta.json").write_text("{not json")
    with pytest.raises(ShardError, match="not valid JSON"):
        read_meta(out)
    with pytest.raises(ShardError, match="does not exist"):
        read_meta(tmp_path / "nowhere")


def test_vocabulary_too_large_for_the_dtype():
    assert token_dtype(50257) == np.uint16 and token_dtype(70000) == np.uint32
    with pytest.raises(ShardError, match="does not fit"):
        token_dtype(2**33)
