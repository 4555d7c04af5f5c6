"""prefect.yaml, its work-pool templates and the image they run, checked without a Docker daemon or cluster.

- every deployment's entrypoint loads, its parameters fit the flow, configs exist;
- the process pool keeps finetune / retrain (cron) / promote / rollback; a retrain's fan-out target is
  a finetune deployment of the same file and pool;
- the Docker and Kubernetes pool templates (pools/*.json) extend the default base job templates this
  Prefect version ships for those workers, every job variable a deployment sets is one the pool's template
  accepts (and validates the way the Prefect server validates it), and rendering them with Prefect's own
  templating gives the GPU requests, node selector and tolerations;
- the Dockerfile: instructions parse, every COPY source exists and is not dropped by .dockerignore, the
  package's folders are all copied, the offline wheel path exists, the entrypoint is the lorafleet CLI (the
  entrypoint script is run here), and the image tag the pools use is the Dockerfile's.
The image itself is not built here (no Docker daemon on this machine).
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = yaml.safe_load((ROOT / "prefect.yaml").read_text())
DEPLOYMENTS = DOCUMENT["deployments"]
PROCESS, DOCKER, KUBERNETES = "lorafleet-process", "lorafleet-docker", "lorafleet-kubernetes"
POOL_TEMPLATES = {DOCKER: ROOT / "pools/docker-gpu.json", KUBERNETES: ROOT / "pools/kubernetes-gpu.json"}
WORKER_TYPES = {DOCKER: ("prefect-docker", "docker"), KUBERNETES: ("prefect-kubernetes", "kubernetes")}
CONTAINER_DEPLOYMENTS = [d for d in DEPLOYMENTS if d["work_pool"]["name"] in POOL_TEMPLATES]
# docker-py's DeviceRequest(**kwargs): what a device_requests entry may hold
DEVICE_REQUEST_KEYS = {"driver", "count", "device_ids", "capabilities", "options"}


def _flow_of(entrypoint: str, monkeypatch: pytest.MonkeyPatch):
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)  # Prefect resolves file entrypoints relative to the working directory
    return load_flow_from_entrypoint(entrypoint)


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_deployment_entrypoint_and_parameters(deployment, monkeypatch):
    flow = _flow_of(deployment["entrypoint"], monkeypatch)
    signature = inspect.signature(flow.fn)
    assert set(deployment.get("parameters", {})) <= set(signature.parameters)
    required = {n for n, p in signature.parameters.items() if p.default is inspect.Parameter.empty}
    assert required <= set(deployment.get("parameters", {}))
    config = deployment.get("parameters", {}).get("config")
    if config:
        assert (ROOT / config).exists()
    assert deployment["work_pool"]["name"] in (PROCESS, *POOL_TEMPLATES)
    if deployment["work_pool"]["name"] != PROCESS:  # code comes from the image, not from this checkout
        assert not deployment["entrypoint"].split(":")[0].endswith(".py"), "use a module entrypoint in images"


def test_the_process_pool_keeps_finetune_retrain_promote_and_rollback(monkeypatch):
    on_process = {d["name"]: d for d in DEPLOYMENTS if d["work_pool"]["name"] == PROCESS}
    flows = {name: _flow_of(d["entrypoint"], monkeypatch).name for name, d in on_process.items()}
    assert flows == {"finetune-demo": "finetune", "nightly-retrain": "retrain",
                     "promote-challenger": "promote", "rollback": "rollback", "merge-adapters": "merge",
                     "experiment-gate": "experiment-gate"}
    for pool in POOL_TEMPLATES:  # and each container pool has a finetune and a retrain
        assert {_flow_of(d["entrypoint"], monkeypatch).name for d in DEPLOYMENTS
                if d["work_pool"]["name"] == pool} == {"finetune", "retrain"}


def test_retrains_are_scheduled_and_fan_out_to_a_finetune_of_their_own_pool(monkeypatch):
    from prefect.client.schemas.schedules import CronSchedule

    nightly = next(d for d in DEPLOYMENTS if d["name"] == "nightly-retrain")
    assert nightly["entrypoint"] == "flows/retrain.py:retrain"
    assert nightly["schedules"][0]["active"] is True
    by_name = {d["name"]: d for d in DEPLOYMENTS}
    retrains = [d for d in DEPLOYMENTS if _flow_of(d["entrypoint"], monkeypatch).name == "retrain"]
    assert len(retrains) == 3
    for retrain in retrains:
        schedule = retrain["schedules"][0]
        CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # raises on a bad cron
        flow_name, _, deployment_name = retrain["parameters"]["finetune_deployment"].partition("/")
        target = by_name[deployment_name]
        assert flow_name == _flow_of(target["entrypoint"], monkeypatch).name == "finetune"
        assert target["work_pool"]["name"] == retrain["work_pool"]["name"]


# ----- Docker and Kubernetes pool templates --------------------------------------------------------


def _bundled_default(pool: str) -> dict[str, Any]:
    """The default base job template this Prefect version ships for the pool's worker type (the one
    `prefect work-pool create --type docker|kubernetes` starts from)."""
    import prefect

    views = Path(prefect.__file__).parent / "server/api/collections_data/views"
    metadata = json.loads((views / "aggregate-worker-metadata.json").read_text())
    collection, worker = WORKER_TYPES[pool]
    return metadata[collection][worker]["default_base_job_configuration"]


def _template(pool: str) -> dict[str, Any]:
    return json.loads(POOL_TEMPLATES[pool].read_text())


@pytest.mark.parametrize("pool", list(POOL_TEMPLATES))
def test_pool_templates_extend_the_workers_default_templates(pool):
    from prefect.utilities.schema_tools.validation import is_valid_schema
    from prefect.utilities.templating import find_placeholders

    template, default = _template(pool), _bundled_default(pool)
    is_valid_schema(template["variables"], preprocess=False)
    ours, theirs = template["variables"]["properties"], default["variables"]["properties"]
    assert {k: ours[k] for k in theirs} == theirs, "a default variable was changed or dropped"
    assert set(default["job_configuration"]) <= set(template["job_configuration"])
    placeholders = {p.name for p in find_placeholders(template["job_configuration"])}
    assert placeholders <= set(ours), f"placeholders without a variable: {placeholders - set(ours)}"
    assert set(ours) - set(theirs) <= placeholders, "an added variable is never used"


@pytest.mark.parametrize("deployment", CONTAINER_DEPLOYMENTS, ids=[d["name"] for d in CONTAINER_DEPLOYMENTS])
def test_job_variables_are_ones_the_pool_accepts(deployment):
    from prefect.utilities.schema_tools.validation import validate

    pool = deployment["work_pool"]["name"]
    variables = _template(pool)["variables"]
    job_variables = deployment["work_pool"]["job_variables"]
    unknown = set(job_variables) - set(variables["properties"])
    assert not unknown, f"{deployment['name']}: the {pool} template has no variable {sorted(unknown)}"
    # what the Prefect server does when the deployment is created (server/api/validation.py)
    defaults = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    validate({**defaults, **job_variables}, variables, raise_on_error=True, preprocess=True, ignore_required=True)
    env = job_variables["env"]
    assert env["MLFLOW_TRACKING_URI"].startswith(("http://", "https://")), "containers need the shared MLflow server"
    assert env["LORAFLEET_HOME"] == _dockerfile_env()["LORAFLEET_HOME"]
    assert job_variables["image"] == _dockerfile_image()


def _render(deployment: dict[str, Any]) -> dict[str, Any]:
    """The job configuration a worker of the pool builds for this deployment (Prefect's own templating)."""
    from prefect.utilities.templating import apply_values

    template = _template(deployment["work_pool"]["name"])
    values = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
    values.update(deployment["work_pool"]["job_variables"])
    return apply_values(template["job_configuration"], values)


def test_kubernetes_finetune_jobs_request_a_gpu_on_a_gpu_node():
    finetune = next(d for d in DEPLOYMENTS if d["name"] == "finetune-k8s")
    manifest = _render(finetune)["job_manifest"]
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == _dockerfile_image()
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"] == {"cpu": "4", "memory": "32Gi"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert manifest["metadata"]["namespace"] == "lorafleet"
    retrain = _render(next(d for d in DEPLOYMENTS if d["name"] == "nightly-retrain-k8s"))["job_manifest"]
    assert retrain["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 0


def test_docker_finetune_containers_request_the_hosts_gpus():
    finetune = _render(next(d for d in DEPLOYMENTS if d["name"] == "finetune-docker"))
    requests = finetune["container_create_kwargs"]["device_requests"]
    assert requests and all(set(r) <= DEVICE_REQUEST_KEYS for r in requests)
    assert requests[0]["capabilities"] == [["gpu"]] and requests[0]["count"] == -1
    assert finetune["env"]["LORAFLEET_DEVICE_LOCKS"].startswith(finetune["env"]["LORAFLEET_HOME"])
    assert any(v.endswith(":" + finetune["env"]["LORAFLEET_HOME"]) for v in finetune["volumes"])
    retrain = _render(next(d for d in DEPLOYMENTS if d["name"] == "nightly-retrain-docker"))
    assert not retrain["container_create_kwargs"].get("device_requests")


def test_container_runs_start_in_the_images_working_directory():
    for deployment in CONTAINER_DEPLOYMENTS:
        (step,) = deployment["pull"]
        assert step["prefect.deployments.steps.set_working_directory"]["directory"] == _dockerfile_workdir()
        assert (ROOT / deployment["parameters"]["config"]).is_relative_to(ROOT / "configs")  # copied to the image


# ----- the Dockerfile (parsed; not built: no Docker daemon here) ------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def _copies() -> list[tuple[list[str], str]]:
    copies = []
    for keyword, arguments in _instructions():
        if keyword == "COPY":
            parts = [p for p in shlex.split(arguments) if not p.startswith("--")]
            copies.append((parts[:-1], parts[-1]))
    return copies


def _dockerfile_env() -> dict[str, str]:
    env = {}
    for keyword, arguments in _instructions():
        if keyword == "ENV":
            env.update(part.split("=", 1) for part in shlex.split(arguments))
    return env


def _dockerfile_workdir() -> str:
    return [arguments for keyword, arguments in _instructions() if keyword == "WORKDIR"][-1]


def _dockerfile_image() -> str:
    """`title:version` from the image's OCI labels: the tag the build command and the pools use."""
    labels = {}
    for keyword, arguments in _instructions():
        if keyword == "LABEL":
            labels.update(part.split("=", 1) for part in shlex.split(arguments))
    return f"{labels['org.opencontainers.image.title']}:{labels['org.opencontainers.image.version']}"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent folder excludes it."""
    parts = Path(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate, pattern = pattern.startswith("!"), pattern.lstrip("!").strip("/")
        for candidate in candidates:
            anywhere = pattern.startswith("**/") and fnmatch.fnmatch(Path(candidate).name, pattern[3:])
            if anywhere or fnmatch.fnmatch(candidate, pattern):
                excluded = not negate
    return excluded


def test_dockerfile_parses_and_builds_from_the_repositorys_files():
    instructions = _instructions()
    known = {"FROM", "ARG", "LABEL", "ENV", "WORKDIR", "COPY", "RUN", "USER", "EXPOSE", "ENTRYPOINT", "CMD"}
    assert {keyword for keyword, _ in instructions} <= known
    assert next(keyword for keyword, _ in instructions if keyword != "ARG") == "FROM"
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied = []
    for sources, _ in _copies():
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not _ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
            copied.append(source.strip("/"))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"],
              *pyproject["tool"]["setuptools"]["package-dir"].values()}
    assert needed <= set(copied), f"the package needs {sorted(needed - set(copied))} in the image"
    assert {"configs", "prefect.yaml", "wheels"} <= set(copied)
    assert _dockerfile_image() == f"lorafleet:{pyproject['project']['version']}"
    assert _ignored(".venv/bin/python", patterns) and _ignored("tests/test_cli.py", patterns)
    assert not _ignored("models/base.py", patterns)


def test_dockerfile_installs_offline_from_wheels_when_present():
    (install,) = [arguments for keyword, arguments in _instructions() if keyword == "RUN" and "pip install" in arguments]
    guard, _, rest = install.partition("then")
    with_wheels, _, without = rest.partition("else")
    assert "/tmp/wheels/*.whl" in guard
    offline = with_wheels.split("pip install")[1:]
    assert len(offline) == 2 and all("--no-index --find-links /tmp/wheels" in call for call in offline)
    assert len(without.split("pip install")[1:]) == 2  # the same two installs from the index
    assert ("wheels/", "/tmp/wheels/") in [(s[0], d) for s, d in _copies()]
    assert "pip wheel" in (ROOT / "wheels/README.md").read_text()


def test_the_image_entrypoint_is_the_lorafleet_cli():
    entrypoint = json.loads(next(a for k, a in _instructions() if k == "ENTRYPOINT"))
    (script_path,) = [dest for sources, dest in _copies() if sources == ["docker-entrypoint.sh"]]
    assert entrypoint == [Path(script_path).name] and Path(script_path).parent.as_posix() == "/usr/local/bin"
    assert json.loads(next(a for k, a in _instructions() if k == "CMD")) == ["--help"]
    # Run the script as the image would, with this venv's `lorafleet` and `python` on PATH.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def run(*args: str) -> str:
        done = subprocess.run(["sh", str(ROOT / "docker-entrypoint.sh"), *args], env=env, capture_output=True,
                              text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    assert "finetune" in run("--help") and "retrain" in run("--help")  # the image's default command
    assert "Usage: lorafleet finetune" in " ".join(run("finetune", "--help").split())
    # a worker's own command (Prefect replaces the container command) runs as given
    assert run("python", "-c", "print('worker command')").strip() == "worker command"
