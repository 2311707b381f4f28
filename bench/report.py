"""What every benchmark writes beside its numbers (the machine, the versions, the date), and where:
bench/results/<name>-<date>.json, or --output."""

import datetime
import json
import platform
from pathlib import Path

import torch
import transformers

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def write_report(name: str, results: dict, output: str | None = None) -> Path:
    report = {"machine": machine(), **results}
    path = Path(output or RESULTS / f"{name}-{report['machine']['date'][:19].replace(':', '-')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return path
