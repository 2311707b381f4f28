"""bench/gpu_check.sh, the prepared device check, dry-run on CPU with a tiny model: every step it will run
on a GPU runs here first, so the script cannot rot before a GPU comes."""

import json
import os
import subprocess
import sys
import tarfile

from conftest import REPO, script_env
from metrics import read_metrics


def test_the_device_check_runs_every_step_on_cpu(data_dir, handmade_hellaswag, tmp_path):
    results = tmp_path / "results"
    sizes = dict(MODEL="tiny", SEQ_LEN="32", BATCH="4", COMPILED_BATCH="4", TOTAL_WINDOWS="8", STEPS="4", LOSS_BATCHES="2",
                 CONFIG="accelerate_configs/cpu.yaml", PYTHON=sys.executable, ARCHIVE=str(tmp_path / "check.tgz"))  # fmt: skip
    env = {**script_env(**sizes), "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(results), str(data_dir), str(handmade_hellaswag)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = {row["step"]: row["exit"] for row in map(json.loads, (results / "steps.jsonl").read_text().splitlines())}
    assert list(steps) == ["versions", "nvidia-smi", "branches-and-losses", "train-eager", "train-compiled", "resume",
                           "hellaswag", "speed"]  # fmt: skip
    assert {name: code for name, code in steps.items() if code != 0} == {"nvidia-smi": 127}  # no GPU here
    check = json.loads((results / "gpu_check.json").read_text())["steps"]
    assert all(step["ok"] for step in check.values()) and {"chunked", "plain", "compiled"} <= set(check["loss_batch_2"])
    compiled_log = next(results.glob("*-train-compiled.log")).read_text()
    assert "chunked_lm_head_loss" in compiled_log and "Recompiling" not in compiled_log  # compiled, once
    rows = {run: read_metrics(results / f"metrics-{run}.jsonl")[1] for run in ("compiled", "resumed")}
    assert [r["step"] for r in rows["resumed"]] == [0, 1, 2, 3]
    assert [r["loss"] for r in rows["resumed"][2:]] == [r["loss"] for r in rows["compiled"][2:]]  # resumed exactly
    assert json.loads((results / "hellaswag.json").read_text())["hellaswag"]["examples"] == 2
    with tarfile.open(tmp_path / "check.tgz") as archive:  # what comes back from the device: all but weights
        names = archive.getnames()
    assert "./steps.jsonl" in names and "./gpu_check.json" in names and not [n for n in names if n.endswith(".safetensors")]
