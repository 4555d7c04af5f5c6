"""Repository shape: packaging lists every subpackage, and the import boundaries hold."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP = {"lorafleet": "lorafleet", "models": "lorafleet.models", "evaluation": "lorafleet.evaluation",
       "tasks": "lorafleet.tasks", "flows": "lorafleet.flows", "serving": "lorafleet.serving"}


def imported_roots(path: Path) -> set[str]:
    """Top-level names a module imports, with `lorafleet.x` kept as `lorafleet.x`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            names.add(".".join(parts[:2]) if parts[0] == "lorafleet" else parts[0])
    return names


def python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_every_subpackage_is_packaged():
    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder, package in TOP.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *relative)))
    assert found == packages


@pytest.mark.parametrize("folder", ["models", "serving/engine"])
def test_pure_layers_do_not_import_orchestration(folder):
    offenders = {str(p.relative_to(ROOT)): sorted(imported_roots(p) & {"prefect", "mlflow", "bentoml"})
                 for p in python_files(folder)}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_only_flows_and_tasks_import_prefect_and_only_the_service_imports_bentoml():
    for folder in ("models", "evaluation", "serving", "lorafleet"):
        for path in python_files(folder):
            assert "prefect" not in imported_roots(path), path
    for path in (p for folder in TOP for p in python_files(folder)):
        if "bentoml" in imported_roots(path):
            assert path.relative_to(ROOT) == Path("serving/service.py"), path


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module if node.level == 0 else "." * node.level + node.module)
    return modules


def test_nothing_imports_flows_or_the_service_module():
    """The service runs in its own process (`bentoml serve`); nothing imports it or the flows."""
    for folder in ("models", "evaluation", "tasks", "serving", "lorafleet"):
        for path in python_files(folder):
            modules = imported_modules(path)
            assert not any(m.startswith("lorafleet.flows") for m in modules), path
            assert not {"lorafleet.serving.service", ".service"} & modules, path


def test_models_and_evaluation_do_not_import_tasks():
    for folder in ("models", "evaluation"):
        for path in python_files(folder):
            assert "lorafleet.tasks" not in imported_roots(path), path


def test_ruff_is_clean():
    """Lint runs with the tests so CI (which runs `make test`) keeps the tree clean."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    assert ruff, "ruff is a dev dependency: run `make install`"
    result = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout
