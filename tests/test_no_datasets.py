"""The GPU images ship transformers, accelerate and tokenizers but no `datasets`: the scripts that read only
shards and local files (training with export, evaluation on a local jsonl, the speed benchmark) run there,
and the two places that load a dataset say in one line what they need. `datasets` is blocked in a fresh
process: `sys.modules["datasets"] = None` makes every import of it fail, as if it were not installed."""

import json
import sys

import pytest

from conftest import REPO, TINY_RUN, TRAIN, failure, run_script, step_rows

# `python script.py ...` with datasets blocked: the script's folder first on the path, as Python puts it.
BLOCKED = ("import os, runpy, sys; sys.modules['datasets'] = None; sys.argv = {argv!r}; "
           "sys.path.insert(0, os.path.dirname(sys.argv[0])); runpy.run_path(sys.argv[0], run_name='__main__')")  # fmt: skip


def without_datasets(argv: list[str], cwd):
    return run_script([sys.executable, "-c", BLOCKED.format(argv=argv)], cwd=cwd)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("no_datasets") / "run"
    result = without_datasets([TRAIN[1], *TINY_RUN, "--data_dir", str(data_dir), "--output_dir", str(out),
                               "--max_train_steps", "3", "--checkpointing_steps", "3", "--export_gpt2"], cwd=out.parent)  # fmt: skip
    assert result.returncode == 0, failure(result)
    return out


def test_training_and_export_need_no_datasets(trained):
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    assert [row["step"] for row in step_rows(trained)] == [0, 1, 2]
    assert (trained / "checkpoints" / "step_3").is_dir()
    assert AutoModelForCausalLM.from_pretrained(trained / "final", trust_remote_code=True).config.model_type == "minigpt"
    assert isinstance(AutoModelForCausalLM.from_pretrained(trained / "final-gpt2"), GPT2LMHeadModel)


def test_evaluation_on_a_local_jsonl_needs_no_datasets(trained, data_dir, handmade_hellaswag, tmp_path):
    report = tmp_path / "hellaswag.json"
    result = without_datasets([str(REPO / "eval_hellaswag.py"), "--model", str(trained / "final"), "--hellaswag",
                               str(handmade_hellaswag), "--data_dir", str(data_dir), "--val_batches", "2",
                               "--seq_len", "32", "--output", str(report)], cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, failure(result)
    scores = json.loads(report.read_text())
    assert scores["hellaswag"]["examples"] == 2 and scores["results"][0]["val_loss"] > 0


def test_the_speed_benchmark_imports_without_datasets(tmp_path):
    result = without_datasets([str(REPO / "bench" / "bench_speed.py"), "--help"], cwd=tmp_path)
    assert result.returncode == 0, failure(result)
    assert "--only" in result.stdout


@pytest.mark.parametrize("command", [["prepare_data.py", "--output_dir", "data"],
                                     ["eval_hellaswag.py", "--model", "gpt2", "--hellaswag", "Rowan/hellaswag"]])  # fmt: skip
def test_loading_a_dataset_without_datasets_is_one_line(command, tmp_path):
    result = without_datasets([str(REPO / command[0]), *command[1:]], cwd=tmp_path)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and "needs the `datasets` package" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written
