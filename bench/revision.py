"""The model as it was at an earlier commit, importable beside today's, so that a benchmark measures before
and after in one run: the model files at that revision (`git show`) become a package in a temporary folder,
importing each other relatively as they do on the Hub."""

import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL_FILES = ("configuration_minigpt.py", "modeling_minigpt.py", "loss_minigpt.py", "masking_minigpt.py", "conversion_minigpt.py")


def model_at(revision: str):
    """`modeling_minigpt` as it was at `revision` (a commit, tag or `HEAD~3`); a file that did not exist
    yet is left out."""
    package = f"minigpt_{revision.replace('~', '_').replace('^', '_').replace('/', '_')}"
    folder = Path(tempfile.mkdtemp()) / package
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    for name in MODEL_FILES:
        shown = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:{name}"], capture_output=True)
        if shown.returncode == 0:
            (folder / name).write_bytes(shown.stdout)
        elif name == "modeling_minigpt.py":
            raise SystemExit(f"git show {revision}:{name} failed: {shown.stderr.decode().strip()}")
    sys.path.insert(0, str(folder.parent))
    return importlib.import_module(f"{package}.modeling_minigpt")
