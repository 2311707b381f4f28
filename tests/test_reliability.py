"""Data, weights and checkpoints that are wrong must not train silently; one run per output directory;
arguments that would make nonsense end in one line, with nothing written."""

import json
import shutil
import subprocess
import time

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from conftest import TINY_RUN, TRAIN, failure, losses, run_script, script_env, two_cpu_processes
from token_shards import HEADER_BYTES, file_sha256

TWELVE_STEPS = [*TINY_RUN, "--max_train_steps", "12", "--checkpointing_steps", "4"]


def one_line_failure(result, message):
    assert result.returncode != 0, result.stdout[-2000:]
    assert message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def refused_before_the_first_step(data, tmp_path, message):
    out = tmp_path / "run"
    result = run_script([*TRAIN, *TINY_RUN, "--data_dir", str(data), "--output_dir", str(out)], tmp_path)
    one_line_failure(result, message)
    assert not (out / "metrics.jsonl").exists()


@pytest.fixture
def own_data(data_dir, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    return copy


def test_changed_shard_bytes_are_refused_before_the_first_step(own_data, tmp_path):
    shard = own_data / "train_000001.bin"
    raw = bytearray(shard.read_bytes())
    raw[HEADER_BYTES + 100] ^= 1  # one flipped bit in a token
    shard.write_bytes(bytes(raw))
    refused_before_the_first_step(own_data, tmp_path, "train_000001.bin does not match the sha256")


def test_a_token_id_beyond_the_vocabulary_is_refused_before_the_first_step(own_data, tmp_path):
    """Even with a manifest that agrees with the bytes (the shard was written by something else)."""
    shard = own_data / "train_000002.bin"
    tokens = np.memmap(shard, dtype=np.uint16, mode="r+", offset=HEADER_BYTES)
    tokens[7] = 600  # vocab_size is 512
    tokens.flush()
    del tokens
    meta = json.loads((own_data / "meta.json").read_text())
    for entry in meta["shards"]:
        if entry["file"] == shard.name:
            entry["sha256"] = file_sha256(shard)
    (own_data / "meta.json").write_text(json.dumps(meta))
    refused_before_the_first_step(own_data, tmp_path, "holds token id 600 >= vocab_size 512")


def copy_run(uninterrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out, ignore=shutil.ignore_patterns("final", "loss.png"))
    return out


def test_nan_weights_stop_at_the_first_step_without_a_checkpoint(uninterrupted, data_dir, tmp_path):
    out = copy_run(uninterrupted, tmp_path)
    weights_file = out / "checkpoints" / "step_8" / "model.safetensors"
    weights = load_file(weights_file)
    weights["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")  # a bit-flipped checkpoint
    save_file(weights, weights_file, {"format": "pt"})
    (out / "checkpoints" / "latest").write_text("step_8")
    result = run_script([*TRAIN, *TWELVE_STEPS, "--data_dir", str(data_dir), "--output_dir", str(out),
                         "--resume_from_checkpoint", "latest"], tmp_path)  # fmt: skip
    one_line_failure(result, "step 8: loss nan")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["kept.json", "latest", "step_12", "step_8"]
    assert (out / "checkpoints" / "latest").read_text() == "step_8"  # nothing new was saved
    assert losses(out)[1] == list(range(8))  # the log holds only the good steps


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.bin", "training_state.json", "random_states_0.pkl"])
def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous_one(damaged, uninterrupted, data_dir, tmp_path):
    out = copy_run(uninterrupted, tmp_path)
    target = out / "checkpoints" / "step_12" / damaged
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])  # truncated, as by a full disk
    command = [*TRAIN, *TWELVE_STEPS, "--data_dir", str(data_dir), "--output_dir", str(out)]
    named = run_script([*command, "--resume_from_checkpoint", str(out / "checkpoints" / "step_12")], tmp_path)
    one_line_failure(named, f"checkpoint {out / 'checkpoints' / 'step_12'} is unreadable")

    with open(out / "metrics.jsonl", "a") as log:  # a kill mid-write tears the last line
        log.write('{"step": 12, "loss": 3.1')
    resumed = run_script([*command, "--resume_from_checkpoint", "latest"], tmp_path)
    assert resumed.returncode == 0, failure(resumed)
    assert "step_12 is unreadable" in resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "step_8 at step 8" in resumed.stdout
    assert losses(out) == losses(uninterrupted)  # steps 8-11 redone exactly


def test_latest_naming_a_missing_checkpoint_falls_back(uninterrupted, data_dir, tmp_path):
    out = copy_run(uninterrupted, tmp_path)
    shutil.rmtree(out / "checkpoints" / "step_12")
    resumed = run_script([*TRAIN, *TWELVE_STEPS, "--data_dir", str(data_dir), "--output_dir", str(out),
                          "--resume_from_checkpoint", "latest"], tmp_path)  # fmt: skip
    assert resumed.returncode == 0, failure(resumed)
    assert "step_8 at step 8" in resumed.stdout
    assert losses(out) == losses(uninterrupted)


def test_a_second_run_on_the_same_output_dir_is_refused_and_a_killed_run_leaves_no_stale_lock(data_dir, tmp_path):
    out = tmp_path / "run"
    command = [*TRAIN, *TINY_RUN, "--data_dir", str(data_dir), "--output_dir", str(out), "--checkpointing_steps", "2"]
    long_run = [*command, "--max_train_steps", "100000"]
    first = subprocess.Popen(long_run, cwd=tmp_path, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "latest").exists():
            assert first.poll() is None and time.time() < deadline, "the first run ended early"
            time.sleep(0.05)
        second = run_script(long_run, tmp_path)
        one_line_failure(second, f"{out} is in use by another training run (pid {first.pid})")
        assert first.poll() is None  # the first run goes on, its files untouched
    finally:
        first.kill()
        first.wait()
    reached = int((out / "checkpoints" / "latest").read_text().removeprefix("step_"))
    resumed = run_script([*command, "--max_train_steps", str(reached + 2), "--resume_from_checkpoint", "latest"], tmp_path)
    assert resumed.returncode == 0, failure(resumed)


def test_a_late_second_process_leaves_every_checkpoint_and_the_export_whole(data_dir, tmp_path):
    """Rank 1 two seconds late inside each checkpoint's save and inside the export: every folder the run
    wrote is whole (both processes' random states, the exported weights equal the last checkpoint's) and
    nothing half-written stays behind. Before the fix, the late process re-created the export's staging
    folder after the rename (or, a moment earlier, crashed listing it)."""
    out = tmp_path / "run"
    late = [*two_cpu_processes("tests/scripts/late_rank.py", 29544), *TINY_RUN, "--data_dir", str(data_dir),
            "--output_dir", str(out), "--max_train_steps", "4", "--checkpointing_steps", "2"]  # fmt: skip
    result = run_script(late, tmp_path, ACCELERATE_USE_CPU="true")
    assert result.returncode == 0, failure(result)
    assert sorted(path.name for path in out.iterdir()) == [".lock", "checkpoints", "final", "loss.png", "metrics.jsonl"]
    assert not [path for path in out.rglob("*.tmp")]
    checkpoints = out / "checkpoints"
    for step in (2, 4):
        assert {"random_states_0.pkl", "random_states_1.pkl"} <= {path.name for path in (checkpoints / f"step_{step}").iterdir()}
    exported, last = load_file(out / "final" / "model.safetensors"), load_file(checkpoints / "step_4" / "model.safetensors")
    assert exported.keys() == last.keys() and all(exported[name].equal(last[name]) for name in last)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max_grad_norm", "-1"], "--max_grad_norm must be positive, got -1.0"),
        (["--max_grad_norm", "0"], "--max_grad_norm must be positive, got 0.0"),
        (["--checkpoints_total_limit", "-1"], "--checkpoints_total_limit must be positive"),
        (["--seq_len", "0"], "--seq_len must be positive, got 0"),
        (["--seq_len", "-5"], "--seq_len must be positive, got -5"),
        (["--min_lr_ratio", "5"], "--min_lr_ratio is a fraction of the peak in [0, 1], got 5.0"),
        (["--learning_rate", "-1e-3"], "--learning_rate must be positive, got -0.001"),
        (["--learning_rate=-1e-3"], "--learning_rate must be positive, got -0.001"),
        (["--optimizer", "muon", "--muon_momentum", "1"], "--muon_momentum must be in [0, 1), got 1.0"),
        (["--optimizer", "muon", "--muon_learning_rate", "0"], "--muon_learning_rate must be positive, got 0.0"),
        (["--optimizer", "lion"], "argument --optimizer: invalid choice: 'lion'"),
        (["--eval_iters", "100000"], "--eval_iters 100000 x batch 4 needs 400000 val windows"),
        (["--model", "EMPTY_DIR"], "is a directory without config.json"),
        (["--output_dir", "A_FILE"], "is a file, not a directory"),
    ],
)
def test_nonsense_arguments_end_in_one_line_with_nothing_written(extra, message, data_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("not a directory")
    extra = [e.replace("EMPTY_DIR", str(tmp_path / "empty")).replace("A_FILE", str(tmp_path / "a_file")) for e in extra]
    out = tmp_path / "run"
    result = run_script([*TRAIN, *TINY_RUN, "--data_dir", str(data_dir), "--output_dir", str(out), *extra], tmp_path)
    one_line_failure(result, message)
    assert not out.exists() and (tmp_path / "a_file").read_text() == "not a directory"
