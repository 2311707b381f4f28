"""What every benchmark writes beside its numbers (the machine, the versions, the date), and where:
bench/results/<name>-<date>.json, or --output."""

import json
from pathlib import Path

from metrics import machine  # the benchmarks put the repository first on sys.path

RESULTS = Path(__file__).resolve().parent / "results"


def write_report(name: str, results: dict, output: str | None = None) -> Path:
    report = {"machine": machine(), **results}
    path = Path(output or RESULTS / f"{name}-{report['machine']['date'][:19].replace(':', '-')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return path
