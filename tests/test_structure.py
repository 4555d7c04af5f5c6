"""Repository shape: packaging lists every subpackage, and the import boundaries of STYLE.md hold.

STYLE.md ("Import direction"):

    flows ──► tasks ──► evaluation ──► serving.engine ──► models
                 └──► models, mlflow, prefect            serving.service ──► serving.engine, models, mlflow, bentoml

plus `lorafleet/` as the neutral base every layer may import (settings, config, names, registry reads), which
imports no layer above models/. Every check reads the source (ast), relative imports resolved, and
`from package import module` counted as importing `package.module`.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP = {"lorafleet": "lorafleet", "models": "lorafleet.models", "evaluation": "lorafleet.evaluation",
       "tasks": "lorafleet.tasks", "flows": "lorafleet.flows", "serving": "lorafleet.serving"}
ORCHESTRATION = {"prefect", "mlflow", "bentoml"}

# serving/ grouped by role (docs/architecture.md): these modules, and only these, live in each subpackage.
HTTP_MODULES = {"openai_api", "openai_schema", "admin_api", "auth", "body_limit", "completions", "text_stream"}
CATALOGUE_MODULES = {"adapters", "model_names", "local_adapters", "registry_poller"}
GENERATION_MODULES = {"interface", "engine_generator", "runner"}
GENERATOR_INTERFACE = "lorafleet.serving.generation.interface"
# What the HTTP layer and the catalogue may import from lorafleet: never the engine or a concrete generator.
FRONT_ALLOWED = ("lorafleet.serving.api", "lorafleet.serving.catalogue", GENERATOR_INTERFACE,
                 "lorafleet.serving.backend", "lorafleet.serving.settings", "lorafleet.models", "lorafleet.names",
                 "lorafleet.registry_read",
                 "lorafleet.serving.experiments")  # A/B bookkeeping of the front: no generator in it


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


def module_name(path: Path) -> str:
    """`serving/api/auth.py` -> `lorafleet.serving.api.auth` (a package's `__init__.py` -> the package)."""
    relative = path.relative_to(ROOT)
    parts = [TOP[relative.parts[0]], *relative.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (lazy imports too), as absolute dotted names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return found


def within(module: str, prefixes: tuple[str, ...] | set[str]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def offenders(folder: str, forbidden: tuple[str, ...], *, except_under: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """file -> the modules it imports from `forbidden` (unless also under `except_under`)."""
    found = {}
    for path in python_files(folder):
        bad = sorted(m for m in imports_of(path) if within(m, forbidden) and not within(m, except_under))
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    return found


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
    offenders = {str(p.relative_to(ROOT)): sorted(imported_roots(p) & ORCHESTRATION)
                 for p in python_files(folder)}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_models_import_no_other_layer():
    """models/ is the bottom: usable from a notebook, it imports nothing of lorafleet but itself."""
    assert offenders("models", ("lorafleet",), except_under=("lorafleet.models",)) == {}


def test_the_engine_imports_only_itself_and_models():
    """serving/engine/ is pure PyTorch: no service code (generators, HTTP, catalogue), no pipeline."""
    assert offenders("serving/engine", ("lorafleet",),
                     except_under=("lorafleet.serving.engine", "lorafleet.models")) == {}


def test_the_neutral_base_imports_no_layer_above_models():
    """`lorafleet/` (settings, config and its sections, names, registry reads) is imported by every layer, so it
    imports none of them: `lorafleet/config.py` used to pull in tasks/ and evaluation/ for its sections."""
    layers = ("lorafleet.tasks", "lorafleet.evaluation", "lorafleet.serving", "lorafleet.flows")
    assert offenders("lorafleet", layers) == {}


def test_the_finetune_config_depends_only_on_models_and_the_base():
    config = ROOT / "lorafleet" / "config.py"
    lorafleet_imports = {m for m in imports_of(config) if within(m, ("lorafleet",))}
    assert lorafleet_imports and all(
        within(m, ("lorafleet.models", "lorafleet.names", "lorafleet.sections", "lorafleet.metric_catalog"))
        for m in lorafleet_imports), sorted(lorafleet_imports)


def test_evaluation_imports_only_the_engine_of_serving_and_no_pipeline():
    assert offenders("evaluation", ("lorafleet.serving",), except_under=("lorafleet.serving.engine",)) == {}
    assert offenders("evaluation", ("lorafleet.tasks", "lorafleet.flows")) == {}


def test_tasks_import_no_serving():
    """The pipeline reaches the registry through `lorafleet/registry_read.py`, never through the server."""
    assert offenders("tasks", ("lorafleet.serving", "lorafleet.flows")) == {}


def test_serving_imports_no_pipeline():
    """serving may import models/, the neutral base and mlflow (registry reads): not tasks/, flows/, evaluation/."""
    assert offenders("serving", ("lorafleet.tasks", "lorafleet.flows", "lorafleet.evaluation")) == {}


def test_only_flows_and_tasks_import_prefect_and_only_the_service_imports_bentoml():
    for folder in ("models", "evaluation", "serving", "lorafleet"):
        for path in python_files(folder):
            assert "prefect" not in imported_roots(path), path
    for path in (p for folder in TOP for p in python_files(folder)):
        if "bentoml" in imported_roots(path):
            assert path.relative_to(ROOT) == Path("serving/service.py"), path


def test_nothing_imports_flows_or_the_service_module():
    """The service runs in its own process (`bentoml serve`); nothing imports it or the flows."""
    for folder in ("models", "evaluation", "tasks", "serving", "lorafleet"):
        assert offenders(folder, ("lorafleet.flows", "lorafleet.serving.service")) == {}, folder


def test_models_and_evaluation_do_not_import_tasks():
    for folder in ("models", "evaluation"):
        for path in python_files(folder):
            assert "lorafleet.tasks" not in imported_roots(path), path


def test_serving_is_grouped_by_role():
    """HTTP in serving/api/, the adapter catalogue in serving/catalogue/, the engine front in serving/generation/."""
    for folder, modules in (("api", HTTP_MODULES), ("catalogue", CATALOGUE_MODULES),
                            ("generation", GENERATION_MODULES)):
        found = {p.stem for p in (ROOT / "serving" / folder).glob("*.py")} - {"__init__"}
        assert found == modules, folder
    assert (ROOT / "serving" / "service.py").is_file(), "`bentoml serve lorafleet.serving.service:...` finds it"


@pytest.mark.parametrize("role", ["http", "catalogue"])
def test_http_and_catalogue_reach_generators_only_through_the_interface(role):
    """The HTTP layer and the catalogue never import the engine or a concrete generator: whatever they need of a
    generator is in the interface, which both generators implement (found by module name, wherever it lives)."""
    names = HTTP_MODULES if role == "http" else CATALOGUE_MODULES
    files = [p for p in python_files("serving") if p.stem in names and "engine" not in p.parts]
    assert len(files) == len(names)
    found = {}
    for path in files:
        bad = sorted(m for m in imports_of(path) if within(m, ("lorafleet",)) and not within(m, FRONT_ALLOWED))
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    assert found == {}


def test_the_generator_interface_depends_on_no_generator():
    """Both generators implement the interface; it knows neither (only the shared rules of models/)."""
    interface = ROOT / "serving" / "generation" / "interface.py"
    assert sorted(m for m in imports_of(interface) if within(m, ("lorafleet",))
                  and not within(m, ("lorafleet.models",))) == []


def attribute_reads(path: Path, attribute: str) -> list[int]:
    return [node.lineno for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Attribute) and node.attr == attribute]


def test_end_of_sequence_ids_have_one_answer():
    """Which ids end a sequence is answered by `sampling_rules.eos_token_ids` alone (the tokenizer's EOS and the
    generation config's); only the training target reads the tokenizer's EOS on its own (`prompting`).
    Four modules used to answer it, differently."""
    allowed = {Path("models/sampling_rules.py"), Path("models/prompting.py")}
    readers = {str(p.relative_to(ROOT)): attribute_reads(p, "eos_token_id")
               for folder in TOP for p in python_files(folder) if p.relative_to(ROOT) not in allowed}
    assert {path: lines for path, lines in readers.items() if lines} == {}


def test_ruff_is_clean():
    """Lint runs with the tests so CI (which runs `make test`) keeps the tree clean."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    assert ruff, "ruff is a dev dependency: run `make install`"
    result = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout
