"""The house's layout: imports between the repository's modules run one way (no cycles), the remote code
imports only itself and installed packages, the library and the benchmarks import no training script, and
no two tests share a port (CI runs them in parallel)."""

import ast
import graphlib

from conftest import REPO

MODULES = {path.stem for path in REPO.glob("*.py")}
REMOTE_CODE = {"configuration_minigpt", "modeling_minigpt", "loss_minigpt", "masking_minigpt", "conversion_minigpt"}  # what save_pretrained copies
SCRIPTS = {"train_accelerate", "prepare_data", "eval_hellaswag", "export_gpt2"}


def imported(path) -> set[str]:
    """The repository modules a file imports, absolutely or relatively, anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & MODULES


def test_module_imports_form_no_cycle():
    graph = {name: imported(REPO / f"{name}.py") - {name} for name in MODULES}
    order = list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a cycle
    assert order.index("configuration_minigpt") < order.index("modeling_minigpt") < order.index("train_accelerate")


def test_remote_code_imports_only_itself_and_installed_packages():
    for name in REMOTE_CODE:
        assert imported(REPO / f"{name}.py") <= REMOTE_CODE, name
    # relatively, as Hub remote code must (the absolute import is the fallback for the repository's scripts)
    modeling = (REPO / "modeling_minigpt.py").read_text()
    assert all(f"from .{name} import" in modeling for name in REMOTE_CODE - {"modeling_minigpt"})


def test_the_library_imports_no_script_and_nothing_imports_the_training_script():
    """The benchmarks take FLOPs, peaks and the metrics log from metrics.py, not from the loop's script."""
    for path in [*REPO.glob("*.py"), *(REPO / "bench").glob("*.py")]:
        scripts = imported(path) & SCRIPTS - {path.stem}
        assert "train_accelerate" not in scripts, path.name
        if path.parent == REPO and path.stem not in SCRIPTS:
            assert not scripts, (path.name, scripts)


def test_every_multi_process_test_has_its_own_port():
    """CI runs the suite in two workers: two tests on one rendezvous port would join each other's runs."""
    import re

    ports = [port for path in (REPO / "tests").glob("*.py") for port in re.findall(r"\b29[5-9]\d\d\b", path.read_text())]
    assert ports and len(ports) == len(set(ports)), sorted(p for p in ports if ports.count(p) > 1)
