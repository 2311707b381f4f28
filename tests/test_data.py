"""prepare_data.py on real text (the built-in corpus) and real files: tokenization, shards, resume, bad input."""

import copy
import json
import shutil
import sys
from itertools import islice

import numpy as np
import pytest

import prepare_data
from token_shards import ShardError, open_shard, read_meta, verify_shards
from tokenizing import document_encoder, tiktoken_encoding


@pytest.fixture(scope="module")
def documents():
    return list(islice(prepare_data.builtin_documents(), 120))


@pytest.fixture(scope="module")
def tokenizer_dir(gpt2_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    gpt2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpus_file(documents, tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(documents)))
    return path


def prepare(corpus_file, tokenizer_dir, out, *extra):
    return prepare_data.main(
        ["--files", str(corpus_file), "--tokenizer", str(tokenizer_dir), "--output_dir", str(out),
         "--shard_size", "20000", "--val_tokens", "5000", "--num_proc", "1", *extra]
    )  # fmt: skip


@pytest.fixture(scope="module")
def prepared(corpus_file, tokenizer_dir, tmp_path_factory):
    return prepare(corpus_file, tokenizer_dir, tmp_path_factory.mktemp("out") / "shards")


def all_tokens(out):
    meta = read_meta(out)
    return np.concatenate([open_shard(out / s["file"], s["tokens"]) for s in meta["shards"]])


def test_round_trip_tokens_are_the_tokenizer_output_with_eot_between_documents(prepared, documents, gpt2_tokenizer):
    eot = gpt2_tokenizer.eos_token_id
    tokens = [[eot] + gpt2_tokenizer(d, add_special_tokens=False)["input_ids"] for d in documents]
    meta = read_meta(prepared)
    val = meta["val_split"]["documents"]  # whole documents, drawn at random: val first, then the rest in order
    expected = [tokens[i] for i in val] + [t for i, t in enumerate(tokens) if i not in set(val)]
    assert all_tokens(prepared).tolist() == np.concatenate(expected).tolist()
    assert [s["split"] for s in meta["shards"]] == ["val"] + ["train"] * (len(meta["shards"]) - 1)
    assert meta["shards"][0]["tokens"] == sum(len(tokens[i]) for i in val) >= 5000 and meta["shards"][1]["tokens"] == 20000
    assert meta["vocab_size"] == len(gpt2_tokenizer) and meta["eot_token_id"] == eot and meta["dtype"] == "uint16"
    verify_shards(prepared, meta, checksums=True)
    assert (prepared / "tokenizer" / "tokenizer.json").exists()


def test_two_processes_write_identical_shards(prepared, corpus_file, tokenizer_dir, tmp_path):
    two = prepare(corpus_file, tokenizer_dir, tmp_path / "two", "--num_proc", "2")
    assert [s["sha256"] for s in read_meta(two)["shards"]] == [s["sha256"] for s in read_meta(prepared)["shards"]]


def test_an_interrupted_run_resumes_to_the_same_output(prepared, corpus_file, tokenizer_dir, tmp_path):
    # What a crash after two finished shards leaves: their files, progress.json naming them, a
    # half-written temporary file, and no meta.json.
    out = tmp_path / "resumed"
    shutil.copytree(prepared, out)
    progress = json.loads((out / "progress.json").read_text())
    for shard in progress["shards"][2:]:
        (out / shard["file"]).unlink()
    next_file = progress["shards"][2]["file"]
    progress["shards"] = progress["shards"][:2]
    (out / "progress.json").write_text(json.dumps(progress))
    (out / "meta.json").unlink()
    (out / (next_file + ".tmp")).write_bytes(b"partial")
    with pytest.raises(ShardError, match="meta.json is missing"):
        read_meta(out)  # an unfinished directory is never mistaken for a finished one
    prepare(corpus_file, tokenizer_dir, out)
    assert read_meta(out)["shards"] == read_meta(prepared)["shards"]


def test_rerunning_a_finished_directory_does_nothing(prepared, corpus_file, tokenizer_dir, capsys):
    prepare(corpus_file, tokenizer_dir, prepared)
    assert "is complete" in capsys.readouterr().out


def test_val_bytes_are_the_utf8_bytes_of_the_val_documents_text(prepared, documents):
    """meta.json counts the val split's text in bytes (what bits per byte divides by): exactly the UTF-8 bytes of
    the documents drawn for val, end-of-text excluded."""
    meta = read_meta(prepared)
    expected = sum(len(documents[i].encode()) for i in meta["val_split"]["documents"])
    assert meta["val_bytes"] == expected > meta["tokens"]["val"]


def test_rerunning_a_directory_prepared_before_the_byte_count_adds_it(prepared, corpus_file, tokenizer_dir, tmp_path, capsys):
    from validation import bits_per_byte, bits_per_byte_note

    old = tmp_path / "old"
    shutil.copytree(prepared, old)
    meta = read_meta(old)
    counted = meta.pop("val_bytes")
    (old / "meta.json").write_text(json.dumps(meta))
    assert bits_per_byte(2.0, old) is None and "run prepare_data.py again" in bits_per_byte_note(old)
    prepare(corpus_file, tokenizer_dir, old)
    assert "added the val split's size in bytes" in capsys.readouterr().out
    assert read_meta(old)["val_bytes"] == counted and bits_per_byte_note(old) is None
    assert bits_per_byte(2.0, old) == pytest.approx(2.0 / np.log(2) * meta["tokens"]["val"] / counted)


def test_resuming_with_other_settings_is_refused(prepared, corpus_file, tokenizer_dir):
    with pytest.raises(ValueError, match="other settings \\(shard_size\\)"):
        prepare(corpus_file, tokenizer_dir, prepared, "--shard_size", "30000")


def test_trained_bpe_and_max_tokens(corpus_file, tmp_path):
    out = prepare_data.main(["--files", str(corpus_file), "--vocab_size", "300", "--max_tokens", "12000",
                             "--output_dir", str(tmp_path / "bpe"), "--num_proc", "1"])  # fmt: skip
    meta = read_meta(out)
    assert meta["vocab_size"] == 300 and meta["tokens"]["train"] + meta["tokens"]["val"] == 12000
    assert meta["tokens"]["val"] >= 1200 and meta["val_split"]["documents"]  # 10% of a known size, in whole documents
    assert all_tokens(out).max() < 300


# --- the encoder: tiktoken where it gives the tokenizer's ids ------------------------------------


@pytest.fixture(scope="module")
def hard_documents(documents):
    """Text that stresses a BPE: the built-in documents, Tiny Shakespeare when present, a page quoting the
    end-of-text token, non-Latin scripts, emoji, runs of whitespace, digits and contractions."""
    from conftest import SHARED_DATA

    extra = ["A page that quotes <|endoftext|> in its text, twice: <|endoftext|>",
             "naïve café — 日本語のテキスト, русский текст 🤖🧪\n\n\n   \t  trailing   ",
             "1234567890 3.14159 '''quoted''' they'll we've you're it's don't I'm I'd I'M"]  # fmt: skip
    shakespeare = SHARED_DATA / "tinyshakespeare" / "input.txt"
    return documents + extra + ([shakespeare.read_text()[:300_000]] if shakespeare.exists() else [])


@pytest.mark.parametrize("bpe", ["gpt2", "trained"])
def test_tiktoken_writes_the_shards_the_tokenizer_writes(bpe, hard_documents, tokenizer_dir, tmp_path):
    corpus = tmp_path / "hard.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in hard_documents))
    if bpe == "trained":  # a BPE that `tokenizers` trains here, loaded back from the directory it was saved to
        trained = prepare(corpus, "unused", tmp_path / "trained", "--vocab_size", "2000", "--encoder", "tokenizers")
        tokenizer_dir = trained / "tokenizer"
    outputs = {e: prepare(corpus, tokenizer_dir, tmp_path / e, "--encoder", e) for e in ("tiktoken", "tokenizers")}
    assert read_meta(outputs["tiktoken"])["shards"] == read_meta(outputs["tokenizers"])["shards"]  # sha256 included
    if bpe == "trained":  # and so did the run that trained it, encoding with the BPE in memory
        assert read_meta(trained)["shards"] == read_meta(outputs["tiktoken"])["shards"]
    eot = read_meta(outputs["tiktoken"])["eot_token_id"]
    assert (all_tokens(outputs["tiktoken"]) == eot).sum() == len(hard_documents)  # a quoted eot stays text


def test_a_bpe_tiktoken_cannot_reproduce_is_encoded_by_the_tokenizer(gpt2_tokenizer, documents, corpus_file, tmp_path):
    from tokenizers import pre_tokenizers

    tokenizer = copy.deepcopy(gpt2_tokenizer)  # "hello" and " hello" become the same tokens: not GPT-2's rule
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.save_pretrained(tmp_path / "prefix_space")
    assert tiktoken_encoding(tokenizer) is None
    with pytest.raises(ValueError, match="tiktoken cannot reproduce tokenizer .*; use --encoder tokenizers"):
        prepare(corpus_file, tmp_path / "prefix_space", tmp_path / "refused", "--encoder", "tiktoken")
    assert not (tmp_path / "refused").exists()
    out = prepare(corpus_file, tmp_path / "prefix_space", tmp_path / "auto")
    meta = read_meta(out)
    val, eot = meta["val_split"]["documents"], meta["eot_token_id"]
    order = val + [i for i in range(len(documents)) if i not in set(val)]
    expected = [[eot] + tokenizer(documents[i], add_special_tokens=False)["input_ids"] for i in order]
    assert all_tokens(out).tolist() == np.concatenate(expected).tolist()


def test_builtin_corpus_is_megabytes_of_real_english():
    docs = list(prepare_data.builtin_documents())
    assert sum(map(len, docs)) > 1_500_000
    assert any('The "if" statement is used for conditional execution' in d for d in docs)


# --- bad input -------------------------------------------------------------------------------------


def test_missing_input_file(tokenizer_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        prepare(tmp_path / "nope.txt", tokenizer_dir, tmp_path / "out")


def test_empty_corpus(tokenizer_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "   "}) + "\n")
    with pytest.raises(ValueError, match="empty"):
        prepare(empty, tokenizer_dir, tmp_path / "out")


def test_missing_text_column(corpus_file, tokenizer_dir, tmp_path):
    with pytest.raises(ValueError, match="text column 'body' not in the corpus"):
        prepare(corpus_file, tokenizer_dir, tmp_path / "out", "--text_column", "body")


def test_streamed_corpus_tokenizes_like_an_in_memory_one(corpus_file, gpt2_tokenizer):
    # The Hub and FineWeb-Edu paths stream; a local file loaded with streaming=True takes the same code.
    import datasets

    args = prepare_data.parse_args(["--chunk_docs", "7", "--num_proc", "2"])
    encode = document_encoder(gpt2_tokenizer)
    in_memory = datasets.load_dataset("json", data_files=str(corpus_file), split="train").select_columns(["text"])
    in_memory = in_memory.map(**prepare_data.encode_options(encode))
    streamed = datasets.load_dataset("json", data_files=str(corpus_file), split="train", streaming=True)
    for skip in (0, 10):  # a record without a stream position (an older progress.json) skips documents
        expected = [ids.tolist() for ids, _ in prepare_data.tokenized_documents(in_memory, encode, args, {"end_doc": skip})]
        got = [ids.tolist() for ids, _ in prepare_data.tokenized_documents(streamed, encode, args, {"end_doc": skip})]
        assert got == expected and len(got) == 120 - skip


@pytest.mark.parametrize(
    "case, message",
    [
        ("other_vocab", "holds a run with other settings (bpe_vocab_size)"),
        ("shard_size_0", "--shard_size must be positive, got 0"),
        ("vocab_5", "--vocab_size must be at least 257"),
        ("val_too_big", "--val_tokens 1,000,000,000 leaves nothing to train on: the corpus gives"),
        ("binary_txt", "as text: UnicodeDecodeError"),
        ("malformed_jsonl", "as json:"),
        ("numbers_as_text", "column 'text' holds Value('int64'), not text"),
        ("directory_as_file", "is a directory: pass its files"),
        ("output_is_a_file", "is a file, not a directory"),
    ],
)
def test_nonsense_input_ends_in_one_line_with_nothing_written(case, message, corpus_file, tokenizer_dir, tmp_path):
    from conftest import REPO, run_script

    out = tmp_path / "out"
    args = ["--files", str(corpus_file), "--tokenizer", str(tokenizer_dir), "--num_proc", "1"]
    if case == "other_vocab":
        prepare_data.main(["--vocab_size", "300", "--max_tokens", "5000", "--output_dir", str(out), "--num_proc", "1"])
        args = ["--vocab_size", "400", "--max_tokens", "5000"]
    elif case == "shard_size_0":
        args += ["--shard_size", "0"]
    elif case == "vocab_5":
        args = ["--vocab_size", "5"]
    elif case == "val_too_big":
        args += ["--val_tokens", "1e9"]
    elif case in ("binary_txt", "malformed_jsonl", "numbers_as_text"):
        bad = tmp_path / ("bad.txt" if case == "binary_txt" else "bad.jsonl")
        content = {"binary_txt": bytes(range(256)) * 4, "malformed_jsonl": b'{"text": "fine"}\n{"text": broken\n',
                   "numbers_as_text": b'{"text": 5}\n{"text": 6}\n'}[case]  # fmt: skip
        bad.write_bytes(content)
        args[1] = str(bad)
    elif case == "directory_as_file":
        args[1] = str(corpus_file.parent)
    elif case == "output_is_a_file":
        out.write_text("keep me")
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    result = run_script([sys.executable, str(REPO / "prepare_data.py"), *args, "--output_dir", str(out)], tmp_path)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    if case == "output_is_a_file":
        assert out.read_text() == "keep me"
    else:
        assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else None) == before  # nothing written


def test_a_stream_that_fits_in_val_is_refused_with_the_tokens_it_held(documents, gpt2_tokenizer, tokenizer_dir, tmp_path):
    """A streamed corpus's size is known only once it is read: if the val shard takes all of it, no train
    shard follows, and the run says how many tokens there were (and writes no meta.json)."""
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    (corpus_dir / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents[:5]))
    tokens = sum(len(ids) for ids in document_encoder(gpt2_tokenizer)(documents[:5]))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"the corpus yielded only {tokens:,} tokens: none left for training"):
        prepare_data.main(["--dataset", str(corpus_dir), "--tokenizer", str(tokenizer_dir), "--val_tokens", "1e6",
                           "--num_proc", "1", "--output_dir", str(out)])  # fmt: skip
    assert not (out / "meta.json").exists()


class Crash(Exception):
    pass


def test_a_streamed_corpus_resumes_from_its_recorded_position_reading_nothing_twice(documents, tokenizer_dir, tmp_path, monkeypatch):
    """Local parquet files streamed (many files, many shards), as the Hub's FineWeb-Edu is: a run that dies
    after a late shard resumes from the stream position recorded with it, reading only the rows after it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    rows = [f"{document}\n(copy {copy})" for copy in range(3) for document in documents]  # 360 documents
    for part in range(8):
        pq.write_table(pa.table({"text": rows[part::8]}), corpus_dir / f"part-{part:02d}.parquet")
    argv = ["--dataset", str(corpus_dir), "--tokenizer", str(tokenizer_dir), "--shard_size", "8000",
            "--val_tokens", "8000", "--num_proc", "1", "--chunk_docs", "16"]  # fmt: skip
    reference = prepare_data.main([*argv, "--output_dir", str(tmp_path / "reference")])
    shards = len(read_meta(reference)["shards"])
    assert shards >= 8

    write_shard, written = prepare_data.write_shard, []

    def dies_after_a_late_shard(path, tokens):
        if len(written) == shards - 3:
            raise Crash  # everything finished so far is on disk, as after a kill between two shards
        written.append(path)
        return write_shard(path, tokens)

    monkeypatch.setattr(prepare_data, "write_shard", dies_after_a_late_shard)
    with pytest.raises(Crash):
        prepare_data.main([*argv, "--output_dir", str(tmp_path / "resumed")])
    monkeypatch.setattr(prepare_data, "write_shard", write_shard)
    last = json.loads((tmp_path / "resumed" / "progress.json").read_text())["shards"][-1]
    assert "stream_state" in last

    from datasets.packaged_modules.parquet.parquet import Parquet

    read_from_files, generate_tables = [], Parquet._generate_tables

    def counting(self, *args, **kwargs):  # rows as they come off disk, before any skipping
        for key, table in generate_tables(self, *args, **kwargs):
            read_from_files.append(table.num_rows)
            yield key, table

    monkeypatch.setattr(Parquet, "_generate_tables", counting)
    resumed = prepare_data.main([*argv, "--output_dir", str(tmp_path / "resumed")])
    # datasets restarts a stream at a file boundary (the one before the position's file, 45 documents a
    # file here) and skips to the position: at most two files are read again, where skip() reread them all.
    remaining = len(rows) - last["end_doc"]
    assert remaining <= sum(read_from_files) <= remaining + 2 * 45 < len(rows) // 2
    assert [s["sha256"] for s in read_meta(resumed)["shards"]] == [s["sha256"] for s in read_meta(reference)["shards"]]


def test_val_is_a_seeded_sample_of_documents_from_the_whole_corpus(tmp_path):
    """The built-in corpus begins with the pydoc topics and goes on with stdlib docstrings: a val split
    taken from its start measured another distribution than training. Whole documents drawn with a seed
    come from both parts, the same for any process count, and another seed draws others."""
    documents = list(prepare_data.builtin_documents())
    topics = sum(1 for _ in __import__("pydoc_data.topics").topics.topics)
    runs = {}
    for name, extra in [("one", ["--num_proc", "1"]), ("two", ["--num_proc", "2"]), ("seed", ["--num_proc", "1", "--val_seed", "7"])]:
        runs[name] = read_meta(prepare_data.main(["--vocab_size", "300", "--max_tokens", "200000", "--val_tokens", "50000",
                                                  "--output_dir", str(tmp_path / name), *extra]))  # fmt: skip
    val = runs["one"]["val_split"]["documents"]
    assert runs["two"]["val_split"] == runs["one"]["val_split"] and runs["two"]["shards"] == runs["one"]["shards"]
    assert runs["seed"]["val_split"]["documents"] != val and runs["seed"]["val_split"]["seed"] == 7
    assert any(i < topics for i in val) and any(i >= topics for i in val) and max(val) < len(documents)
