"""What a request can make the server touch on disk: names are checked before any I/O, a registry
version is confirmed before anything is created for it, every adapter file read stays inside its
folder after resolving links, and error bodies never echo what a file holds (issue 13, A5, A6, A9).

In-process (FastAPI TestClient) over a real engine backend and a real SQLite MLflow registry, on the
tiny random Llama. The registry holds `alpha` v1 (champion); the admin may load folders under `roots/`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.models.adapter_dir import (
    MANIFEST_FILE,
    PEFT_CONFIG_FILE,
    InvalidAdapterDir,
    UnsafeAdapterFile,
    adapter_file,
    read_adapter_text,
    read_manifest,
)
from lorafleet.registry_read import RegistryReader, VersionNotFound
from lorafleet.serving.api.openai_api import create_app
from lorafleet.serving.backend import build_backend
from lorafleet.serving.catalogue.local_adapters import InvalidLocalAdapter, read_local_manifest
from lorafleet.serving.catalogue.model_names import ModelNotFound, split_model
from lorafleet.serving.engine.config import EngineConfig
from lorafleet.serving.settings import ServiceSettings
from lorafleet.settings import Settings as LorafleetSettings

from serving_helpers import BASE, make_adapter, register_adapter

PROMPT = [1, 17, 42, 99, 7, 250]
SECRET = "sk-TOP-SECRET-7f3a9c"  # what a linked file holds; must never come back in an answer


@dataclasses.dataclass
class World:
    top: Path  # everything the tests create lives under here: nothing may appear outside what they made
    settings: LorafleetSettings
    roots: Path
    alpha: Path  # the registered adapter's source folder (outside the roots)
    secret: Path  # a JSON file outside the roots holding SECRET


@pytest.fixture(scope="module")
def world(tmp_path_factory, model_cache: Path, migrated_db: Path) -> World:
    from mlflow import MlflowClient

    top = tmp_path_factory.mktemp("confinement")
    settings = LorafleetSettings.for_home(top / "home", model_cache_dir=model_cache).ensure()
    shutil.copyfile(migrated_db, settings.home / "mlflow.db")
    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    alpha = make_adapter(model_cache, top / "src" / "alpha", name="alpha", seed=1)
    register_adapter(client, alpha, name="alpha", artifact_root=settings.mlflow_artifacts_dir)
    roots = top / "roots"
    roots.mkdir()
    secret = top / "private" / "secret.json"
    secret.parent.mkdir()
    # Valid JSON whose values a validator would quote back (pydantic's `input_value=...`).
    secret.write_text(json.dumps({"api_key": SECRET, "method": SECRET, "r": SECRET}))
    return World(top, settings, roots, alpha, secret)


@pytest.fixture(scope="module")
def backend(world: World):
    settings = ServiceSettings.from_settings(
        world.settings, registry_poll_s=0, engine=EngineConfig(adapter_slots=2, max_lora_rank=8, kv_cache_mb=16),
        default_max_tokens=4, adapter_roots=(world.roots,), load_champions=False, base_model=BASE,
        bind_host="127.0.0.1", allowed_hosts=("testserver",))  # loopback: admin on without a key (serving/api/auth.py)
    backend = build_backend(settings)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def http(backend):
    with TestClient(create_app(backend)) as client:
        yield client


def complete(http, model: str):
    return http.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 2,
                                              "temperature": 0})


def tree(top: Path) -> set[tuple[str, bool]]:
    """Every path under `top` (files and folders), so a test can prove nothing was created."""
    return {(str(path.relative_to(top)), path.is_dir()) for path in top.rglob("*")}


def assert_refused(response, statuses: tuple[int, ...] = (400, 404)) -> dict:
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    error = response.json()["error"]
    if response.status_code == 404:
        assert error["code"] == "model_not_found" and error["param"] == "model", error
    return error


def local_copy(world: World, name: str) -> Path:
    """A fresh copy of a real adapter folder under the roots, for a test to tamper with."""
    return Path(shutil.copytree(world.alpha, world.roots / name))


# -- A5: names are checked before any I/O; nothing is created for a model that does not exist ------


HOSTILE_MODELS = [
    "..@1", "../x@1", "...@1", ".@1", "models:/..@1", "models:/../1", "models:/x/../1", "alpha/../..@1",
    "a" * 5000, "a" * 5000 + "@1", "alpha@" + "a" * 5000, "alpha@" + "9" * 5000, "alpha@99999999999999999999",
    "al\x00pha", "al\x00pha@1", "\x00@1", "alpha@1\x00", "alpha@champion\x00",
    "ålpha@1", "名前@1", "alpha\u202e@1", "alpha\n@1", " alpha@1", "-alpha@1", "ALPHA@1", "alpha@0",
    "alpha@99", "nope@1", "nope", "nope@champion", "alpha@no-such-alias", "alpha@v1", "alpha@@1", "@1",
]


def test_hostile_model_names_write_nothing_and_answer_404_or_400(http, world):
    assert complete(http, "alpha").status_code == 200  # downloads alpha v1: the one legitimate write
    before = tree(world.top)
    rng = random.Random(13)
    junk = [f"junk{rng.randrange(10**6)}@{rng.randrange(1, 50)}" for _ in range(50)]
    for model in HOSTILE_MODELS + junk:
        assert_refused(complete(http, model))
        assert_refused(http.post("/admin/adapters/load", json={"model": model}))
        assert_refused(http.post("/admin/adapters/unload", json={"model": model}))
        assert_refused(http.post("/admin/adapters/reload", json={"model": model}))
    assert tree(world.top) == before, "a refused model name created files or folders"
    assert not (world.settings.home / ".v1.lock").exists()
    assert complete(http, "alpha").status_code == 200, "the server keeps serving"


def test_long_names_are_answered_without_echoing_all_of_them(http):
    error = assert_refused(complete(http, "b" * 5000 + "@1"), (404,))
    assert len(error["message"]) < 500, "the error names the model without copying 5,000 characters back"


def test_model_spellings_are_checked_by_the_name_rule_before_anything_else():
    assert split_model("alpha") == ("alpha", None)
    assert split_model("Team.Mine-2") == ("Team.Mine-2", None)  # a local adapter name (served by name only)
    assert split_model("models:/alpha/3") == ("alpha", "3")
    assert split_model("alpha@champion") == ("alpha", "champion")
    for model in ("..", "..@1", "a" * 65, "al\x00pha", "ålpha", "Alpha@1", "alpha@" + "1" * 19, "alpha@a b",
                  "models:/Alpha/1", "alpha@" + "x" * 256):
        with pytest.raises(ModelNotFound):
            split_model(model)


# Text that looks like model names: the name alphabet plus what breaks paths and parsers.
PIECES = [*"abz09._-@/:", "..", "\x00", "\n", "A", "é", "名", "\u202e", "models:/", "champion", "1" * 19]
NAMEISH = st.lists(st.sampled_from(PIECES), max_size=40).map("".join) | st.text(max_size=300)


@given(model=NAMEISH)
@settings(max_examples=300, deadline=None)
def test_whatever_split_model_accepts_is_one_safe_path_component(model):
    try:
        name, selector = split_model(model)
    except ModelNotFound:
        return
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name) and name not in (".", "..")
    assert selector is None or re.fullmatch(r"[A-Za-z0-9_-]{1,255}", selector)


@given(name=NAMEISH, version=st.integers(min_value=-(2**70), max_value=2**70))
@settings(max_examples=150, deadline=None)
def test_the_registry_reader_writes_nothing_for_any_name_it_does_not_hold(world, name, version):
    downloads = world.top / "reader-property"
    reader = RegistryReader(world.settings.tracking_uri, downloads)
    if (name, version) == ("alpha", 1):
        return
    with pytest.raises(VersionNotFound):
        reader.fetch(name, version)
    assert not downloads.exists()


def test_the_registry_reader_refuses_bad_names_and_missing_versions_before_any_io(world, tmp_path):
    downloads = tmp_path / "downloads"
    reader = RegistryReader(world.settings.tracking_uri, downloads)
    for name, version in [("..", 1), ("../x", 1), ("", 1), ("a" * 5000, 1), ("al\x00pha", 1), ("ålpha", 1),
                          ("alpha", 0), ("alpha", 2**63), ("alpha", 99), ("nope", 1)]:
        with pytest.raises(VersionNotFound):
            reader.fetch(name, version)
    for name, alias in [("..", "champion"), ("a" * 5000, "champion"), ("alpha", "x" * 300), ("alpha", "a\x00")]:
        with pytest.raises(VersionNotFound):
            reader.version_for_alias(name, alias)
    assert not downloads.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    fetched = reader.fetch("alpha", 1)  # and what exists still downloads
    assert fetched.path == downloads / "alpha" / "v1" and fetched.manifest.name == "alpha"


# -- A6: every adapter file read is confined to its folder; errors never echo file contents ----------


def test_adapter_file_refuses_links_out_of_the_folder_and_special_files(world, tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "inside.json").write_text("{}")
    (folder / "link-out.json").symlink_to(world.secret)
    (folder / "link-in.json").symlink_to(folder / "inside.json")
    (folder / "sub").mkdir()
    os.mkfifo(folder / "pipe.json")
    assert adapter_file(folder, "inside.json") == (folder / "inside.json").resolve()
    assert adapter_file(folder, "link-in.json") == (folder / "inside.json").resolve()
    for name in ("link-out.json", "pipe.json", "sub", "../private/secret.json", "sub/../inside.json"):
        with pytest.raises(UnsafeAdapterFile) as caught:
            adapter_file(folder, name)
        assert SECRET not in str(caught.value)
    with pytest.raises(FileNotFoundError):
        adapter_file(folder, "missing.json")
    assert read_adapter_text(folder, "inside.json") == "{}"
    with pytest.raises(UnsafeAdapterFile):
        read_adapter_text(folder, "pipe.json")  # refused, not blocked on: nobody writes the pipe
    (folder / "big.json").write_text(" " * 100)
    with pytest.raises(UnsafeAdapterFile, match="big.json"):
        read_adapter_text(folder, "big.json", max_bytes=10)


def test_a_manifest_linked_to_a_secret_outside_the_roots_is_refused_and_never_echoed(http, world):
    folder = local_copy(world, "linked-manifest")
    (folder / MANIFEST_FILE).unlink()
    (folder / MANIFEST_FILE).symlink_to(world.secret)
    with pytest.raises(InvalidAdapterDir) as caught:
        read_manifest(folder)
    assert SECRET not in str(caught.value) and MANIFEST_FILE in str(caught.value)
    response = http.post("/admin/adapters/load", json={"name": "linked", "path": str(folder)})
    assert response.status_code in (400, 403), response.text
    assert SECRET not in response.text and MANIFEST_FILE in response.json()["error"]["message"]
    assert complete(http, "linked").status_code == 404, "nothing was served under that name"


def test_a_peft_config_linked_out_of_the_folder_is_refused_at_load(http, world):
    for name, with_manifest in (("linked-peft", True), ("linked-plain-peft", False)):
        folder = local_copy(world, name)
        if not with_manifest:
            (folder / MANIFEST_FILE).unlink()  # a plain PEFT folder: no manifest, its config is read by the engine
        (folder / PEFT_CONFIG_FILE).unlink()
        (folder / PEFT_CONFIG_FILE).symlink_to(world.secret)
        with pytest.raises(InvalidLocalAdapter) as caught:
            read_local_manifest(folder)
        assert SECRET not in str(caught.value) and PEFT_CONFIG_FILE in str(caught.value)
        response = http.post("/admin/adapters/load", json={"name": name, "path": str(folder)})
        error = assert_refused(response, (400, 403))
        assert error["code"] == "invalid_adapter" and PEFT_CONFIG_FILE in error["message"], error
        assert SECRET not in response.text


def test_any_entry_of_a_local_folder_that_leaves_it_or_is_not_a_file_is_refused(http, world):
    linked = local_copy(world, "linked-extra")
    (linked / "notes.txt").symlink_to(world.secret)  # never read by the engine, but a read is one open away
    piped = local_copy(world, "piped")
    (piped / MANIFEST_FILE).unlink()
    os.mkfifo(piped / MANIFEST_FILE)  # a reader would block forever on it
    for folder, entry in ((linked, "notes.txt"), (piped, MANIFEST_FILE)):
        response = http.post("/admin/adapters/load", json={"name": folder.name, "path": str(folder)})
        error = assert_refused(response, (400,))
        assert error["code"] == "invalid_adapter" and entry in error["message"], error
        assert SECRET not in response.text


def test_a_bad_manifest_value_is_named_but_not_echoed(http, world):
    folder = local_copy(world, "bad-value")
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["method"] = SECRET
    manifest["task"]["output_format"] = SECRET
    manifest["surprise"] = SECRET
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(InvalidAdapterDir) as caught:
        read_manifest(folder)
    message = str(caught.value)
    assert SECRET not in message and "input_value" not in message
    assert f"{MANIFEST_FILE}: method: " in message and f"{MANIFEST_FILE}: task.output_format: " in message
    assert f"{MANIFEST_FILE}: surprise: " in message
    response = http.post("/admin/adapters/load", json={"name": "badvalue", "path": str(folder)})
    error = assert_refused(response, (400,))
    assert "method" in error["message"] and SECRET not in response.text


# -- A9: admin bodies are bounded at the boundary: 400 with the parameter named, never 500 ----------


def test_admin_bodies_refuse_nul_bytes_and_over_long_values_naming_the_parameter(http, world):
    folder = local_copy(world, "fine")
    long_path = str(world.roots / ("d" * 250)) * 20  # under a root, but far past any path limit
    cases = [
        ("/admin/adapters/load", {"name": "x", "path": str(folder) + "\x00"}, "path"),
        ("/admin/adapters/load", {"name": "x", "path": str(world.roots) + "/\x00/../../private"}, "path"),
        ("/admin/adapters/load", {"name": "x", "path": long_path}, "path"),
        ("/admin/adapters/load", {"name": "x\x00", "path": str(folder)}, "name"),
        ("/admin/adapters/load", {"name": "x" * 5000, "path": str(folder)}, "name"),
        ("/admin/adapters/load", {"name": "a b", "path": str(folder)}, "name"),
        ("/admin/adapters/load", {"model": "alpha\x00@1"}, "model"),
        ("/admin/adapters/load", {"model": "m" * 5000}, "model"),
        ("/admin/adapters/unload", {"model": "alpha\x00"}, "model"),
        ("/admin/adapters/unload", {"model": "m" * 5000}, "model"),
        ("/admin/adapters/reload", {"model": "alpha\x00"}, "model"),
        ("/admin/adapters/reload", {"model": "m" * 5000}, "model"),
        ("/admin/adapters/reload", {"model": "alpha@2"}, "model"),
    ]
    before = tree(world.top)
    for url, body, param in cases:
        response = http.post(url, json=body)
        assert response.status_code == 400, (url, body, response.status_code, response.text[:300])
        assert response.json()["error"]["param"] == param, (body, response.json())
    assert tree(world.top) == before
    loaded = http.post("/admin/adapters/load", json={"name": "fine", "path": str(folder)})
    assert loaded.status_code == 200, loaded.text
    assert complete(http, "fine").status_code == 200
