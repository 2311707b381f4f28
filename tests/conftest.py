"""Shared fixtures. The repo root is importable (scripts and model files live there, flat, like a Hub repo)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

# A model small enough for one CPU core, with its own small vocabulary (eot = its last id).
VOCAB = 1000
TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=VOCAB, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)


# train_accelerate.py on the tiny preset, as the script tests run it.
TRAIN = [sys.executable, str(REPO / "train_accelerate.py")]
TINY_RUN = ["--model", "tiny", "--seq_len", "32", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
            "--num_warmup_steps", "3", "--eval_steps", "0", "--eval_iters", "2", "--sample_prompt", "def"]  # fmt: skip


def step_rows(output_dir) -> list[dict]:
    """A run's metrics rows, one per step (without the rows that describe each start)."""
    from metrics import read_metrics

    return read_metrics(output_dir / "metrics.jsonl")[1]


def losses(output_dir):
    rows = step_rows(output_dir)
    return [row["loss"] for row in rows], [row["step"] for row in rows]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The built-in corpus, 120k tokens in a 512-token BPE: 3 train shards and a val shard."""
    import prepare_data

    out = tmp_path_factory.mktemp("data") / "builtin"
    prepare_data.main(["--vocab_size", "512", "--max_tokens", "120000", "--shard_size", "40000",
                       "--output_dir", str(out), "--num_proc", "1"])  # fmt: skip
    return out


@pytest.fixture(scope="session")
def uninterrupted(data_dir, tmp_path_factory):
    """Reference run: 12 steps, checkpoints every 4."""
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    result = run_script([*TRAIN, *TINY_RUN, "--data_dir", str(data_dir), "--output_dir", str(out), "--max_train_steps", "12",
                  "--checkpointing_steps", "4"], cwd=out.parent)  # fmt: skip
    assert result.returncode == 0, failure(result)
    return out


def script_env(**extra) -> dict:
    """Environment for the repo's scripts in a subprocess: offline, one thread per process (two-process
    runs share the cores), nothing from the caller's ACCELERATE_* or PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "PYTHONPATH"))}
    offline = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return {**env, **offline, **extra}


def failure(result: subprocess.CompletedProcess) -> str:
    """A failed run's output, for an assertion message: first the lines that name an error, from every
    process (the cause of a multi-process failure is printed far above the tail, which the launcher's and
    the other processes' tracebacks fill), then the tail."""
    errors = [line for line in result.stderr.splitlines() if re.search(r"\w(Error|Exception): |error: ", line)]
    return "\n".join(dict.fromkeys(errors)) + "\n[...]\n" + result.stderr[-2500:]


def run_script(command, cwd=None, **extra_env) -> subprocess.CompletedProcess:
    """Run a script to completion; a hang (a collective some process never joins) fails after 10 minutes."""
    return subprocess.run(command, cwd=cwd, env=script_env(**extra_env), capture_output=True, text=True, timeout=600)


def two_cpu_processes(script: str, port: int, mixed_precision: str = "no") -> list[str]:
    """`accelerate launch` of real 2-process DDP (gloo on CPU); run it with ACCELERATE_USE_CPU=true."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no",
            "--main_process_port", str(port), str(REPO / script)]  # fmt: skip


def shared_file(relative: str) -> Path:
    """A file from ../shared/data, or skip: that data cannot ship with the project."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data holds development data that is not shipped)")
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer(tmp_path_factory):
    """GPT-2's real BPE from ../shared when present, else a byte-level BPE trained here by `tokenizers`
    (same eot token, same special-token handling), so tokenizer-dependent tests always run."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    shared = SHARED_DATA / "gpt2-tokenizer"
    if shared.exists():
        return AutoTokenizer.from_pretrained(shared)
    from tokenizers import ByteLevelBPETokenizer

    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "Hello world, this is a tiny corpus for a tiny tokenizer.",
    ] * 50
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=400, special_tokens=["<|endoftext|>"])
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    bpe.save(str(path))
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path), bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


# Two HellaSwag examples in rowanz/hellaswag's format, with the WikiHow artifacts lm-eval cleans up
# (" [title]", "[header]", "[step]") and endings of very different lengths.
HANDMADE_HELLASWAG = [
    {"ind": 1, "activity_label": "Making tea", "ctx_a": "A man fills a kettle [header] with water.", "ctx_b": "then he",
     "ctx": "A man fills a kettle with water. then he", "split": "val", "split_type": "indomain", "label": 1,
     "endings": ["boils it.", "pours the hot water over a tea bag in a big blue cup and waits  for it to steep.",
                 "[title] sings.", "runs away"], "source_id": "handmade~1"},
    {"ind": 2, "activity_label": "Baking", "ctx_a": "She mixes flour and eggs.", "ctx_b": "the dough",
     "ctx": "She mixes flour and eggs. the dough", "split": "val", "split_type": "zeroshot", "label": 0,
     "endings": ["rises.", "is put into the oven [step] for an hour.",
                 "falls on the floor and the dog eats all of it happily.", "x"], "source_id": "handmade~2"},
]  # fmt: skip


@pytest.fixture
def handmade_hellaswag(tmp_path):
    import json

    path = tmp_path / "hellaswag_handmade.jsonl"
    path.write_text("".join(json.dumps(example) + "\n" for example in HANDMADE_HELLASWAG))
    return path
