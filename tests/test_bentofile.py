"""`bentoml build` of the repository's bentofile.yaml, offline, into a private BENTOML_HOME (~20 s).

The build runs as a user would run it (the `bentoml` CLI in the repository root) with every package index
made unreachable (pip/uv offline, proxies pointing at a closed port), so a build that locks packages fails
here. The Bento must carry the service module, the settings doc (its README, naming every variable the
service reads) and sources from which `uv pip install ./src` (the image's install step) builds a complete
lorafleet wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from lorafleet.serving.launcher import SERVICE
from lorafleet.serving.settings import BASE_MODEL_ENV, ServiceSettings, env_name

REPO = Path(__file__).resolve().parents[1]
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, every connection is refused


def bentoml(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "True",
        "UV_OFFLINE": "1",
        "PIP_NO_INDEX": "1",
        **{name: UNREACHABLE for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
    }
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    return subprocess.run([sys.executable, "-m", "bentoml", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def bento(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("bentoml-home")
    built = bentoml("build", "--do-not-track", "--output", "tag", home=home)
    assert built.returncode == 0, f"bentoml build failed:\n{built.stdout[-3000:]}\n{built.stderr[-3000:]}"
    listed = bentoml("list", "--output", "json", home=home)
    assert listed.returncode == 0, listed.stderr
    tags = [entry["tag"] for entry in json.loads(listed.stdout)]
    assert len(tags) == 1 and tags[0].startswith("lorafleet:"), tags
    assert f"__tag__:{tags[0]}" in built.stdout
    path = bentoml("get", tags[0], "--output", "path", home=home)
    assert path.returncode == 0, path.stderr
    return Path(path.stdout.strip())


def test_the_bento_runs_the_service_with_no_locked_packages(bento: Path):
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert info["service"] == SERVICE, "the Bento runs what `lorafleet serve` runs"
    assert info["name"] == "lorafleet"
    assert info["python"]["lock_packages"] is False
    assert not (bento / "env" / "python" / "requirements.lock.txt").exists()
    assert (bento / "src" / "serving" / "service.py").read_bytes() == (REPO / "serving" / "service.py").read_bytes()
    assert (bento / "src" / "serving" / "settings.py").exists()
    # Only the package: no tests, configs, local state or virtual environment.
    assert sorted(p.name for p in (bento / "src").iterdir()) == [
        "README.md", "bentofile.yaml", "evaluation", "flows", "lorafleet", "models", "pyproject.toml", "serving",
        "tasks"]
    assert not list((bento / "src").rglob("__pycache__"))


def test_the_settings_doc_names_every_variable_the_service_reads(bento: Path):
    readme = (bento / "README.md").read_text()
    assert readme == (REPO / "deploy" / "bento" / "README.md").read_text()
    variables = ["MLFLOW_TRACKING_URI", "LORAFLEET_HOME", "LORAFLEET_MODEL_CACHE", BASE_MODEL_ENV]
    variables += [env_name(field) for field in ServiceSettings.tunable_fields()]
    missing = [name for name in variables if f"`{name}`" not in readme]
    assert not missing, f"deploy/bento/README.md does not document {missing}"


def test_the_image_installs_lorafleet_from_the_bento_sources(bento: Path, tmp_path: Path):
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    copied = dockerfile.index("COPY --chown=bentoml:bentoml . ./")
    assert copied < dockerfile.index("uv pip install ${LORAFLEET_PIP_ARGS} ./src"), "installed after src/ is there"
    assert dockerfile.index("rm -rf ./src/lorafleet") < dockerfile.index("ENTRYPOINT")
    # What `uv pip install ./src` builds: a copy of src/ (the build writes into it) made into a wheel, offline.
    src = shutil.copytree(bento / "src", tmp_path / "src")
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600,
                           check=False)
    assert wheel.returncode == 0, wheel.stdout[-3000:] + wheel.stderr[-3000:]
    [built] = (tmp_path / "dist").glob("lorafleet-*.whl")
    names = set(zipfile.ZipFile(built).namelist())
    module = SERVICE.partition(":")[0].replace(".", "/") + ".py"
    assert {module, "lorafleet/serving/settings.py", "lorafleet/models/base.py", "lorafleet/flows/cli.py"} <= names
