"""bench/gpu_check.sh, the prepared device check, dry-run on CPU with a tiny model: every step it will run
on a GPU runs here first, so the script cannot rot before a GPU comes."""

import json
import os
import subprocess
import sys
import tarfile
import time

from conftest import REPO, script_env
from metrics import read_metrics


def test_the_device_check_runs_every_step_on_cpu(data_dir, handmade_hellaswag, tmp_path):
    results = tmp_path / "results"
    sizes = dict(MODEL="tiny", SEQ_LEN="32", BATCH="4", TOTAL_WINDOWS="8", STEPS="4", CONFIG="accelerate_configs/cpu.yaml",
                 BUDGET="100000", PYTHON=sys.executable, ARCHIVE=str(tmp_path / "check.tgz"))  # fmt: skip
    env = {**script_env(**sizes), "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(results), str(data_dir), str(handmade_hellaswag)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = {row["step"]: row["exit"] for row in map(json.loads, (results / "steps.jsonl").read_text().splitlines())}
    assert list(steps) == ["versions", "kernels", "speed", "train", "resume", "attention", "losses", "train-eager", "hellaswag"]
    assert set(steps.values()) == {0}, steps
    kernels = json.loads((results / "kernels.json").read_text())["steps"]["kernels"]
    assert kernels["ok"] and kernels["head"]["tflops"] > 0 and kernels["elementwise_gb_per_s"] > 0
    speed = json.loads((results / "speed.json").read_text())["steps"]["speed"]
    assert speed["ok"] and speed["ours"]["tokens_per_s"] > 0 and speed["transformers"]["tokens_per_s"] > 0
    losses = json.loads((results / "losses.json").read_text())["steps"]["losses"]
    assert losses["ok"] and {"compiled_plain", "chunked", "plain"} <= set(losses)
    assert json.loads((results / "attention.json").read_text())["steps"]["attention"]["ok"]
    train_log = next(results.glob("*-train.log")).read_text()
    assert "Recompiling" not in train_log and "steady state:" in train_log
    assert "speed:" in done.stdout and "steady state:" in done.stdout  # key numbers echoed as they come
    rows = {run: read_metrics(results / f"metrics-{run}.jsonl")[1] for run in ("compiled", "resumed")}
    assert [r["step"] for r in rows["resumed"]] == [0, 1, 2, 3]
    assert [r["loss"] for r in rows["resumed"][2:]] == [r["loss"] for r in rows["compiled"][2:]]  # resumed exactly
    assert json.loads((results / "hellaswag.json").read_text())["hellaswag"]["examples"] == 2
    for _ in range(60):  # the estimates ran beside the other steps
        if (results / "estimates.json").exists():
            break
        time.sleep(1)
    assert json.loads((results / "estimates.json").read_text())["steps"]["estimates"]["ok"]
    with tarfile.open(tmp_path / "check.tgz") as archive:  # what comes back from the device: all but weights
        names = archive.getnames()
    assert "./steps.jsonl" in names and "./speed.json" in names and not [n for n in names if n.endswith(".safetensors")]


def test_a_model_that_fails_to_compile_is_recorded_beside_the_other_models_numbers(monkeypatch, tmp_path):
    """One failure costs no other number: ours raising in `speed` leaves transformers' GPT-2 timed, and a loss
    kind raising leaves the other kinds measured."""
    import argparse

    import torch

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu_check

    def broken(args, device):
        raise RuntimeError("tuned_addmm() takes 3 positional arguments but 4 were given")

    args = argparse.Namespace(model="tiny", seq_len=16, batch=2, steps=1, rounds=2)
    monkeypatch.setattr(gpu_check, "ours", broken)
    speed = gpu_check.speed(args, torch.device("cpu"))
    assert "tuned_addmm" in speed["ours"]["error"] and "traceback" in speed["ours"]
    assert speed["transformers"]["tokens_per_s"] > 0 and "ratio_ours_to_transformers" not in speed
    monkeypatch.undo()
    monkeypatch.setattr(gpu_check, "plain_loss", lambda model, batch: broken(None, None))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the chunked kind's memory estimate is cached there
    losses = gpu_check.losses(args, torch.device("cpu"))
    assert "tuned_addmm" in losses["plain"]["error"] and "tuned_addmm" in losses["compiled_plain"]["error"]
    assert losses["chunked"]["ms_per_step"] > 0
