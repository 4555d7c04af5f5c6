"""Admin endpoints, hot reload and local adapters, in-process (FastAPI TestClient) over a real engine
backend (`build_backend`) and a real SQLite MLflow registry, on the tiny random Llama (~30 s).

Registry: alpha v1 (champion) + v2 (challenger), beta v1, gamma v1 (champion) + v2 (for reload), delta
v1 (champion) + v2 (for the poller). The engine has 3 adapter slots, so of the 4 champions only 3 are
read at start-up. Every answer is compared with plain PEFT greedy decoding of that adapter alone.
The failure-path tests (slow reads, failed warms, stopping the poller mid-reload) each get a backend
of their own that served nothing yet (`fresh`), so what other tests loaded neither hides nor causes them.
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lorafleet.models.adapter_dir import read_manifest
from lorafleet.registry_read import FetchedAdapter, RegistryReader
from lorafleet.serving.api.openai_api import create_app
from lorafleet.serving.backend import build_backend
from lorafleet.serving.catalogue.adapters import AdapterCatalogue, AdapterLoadFailed, ServedModel
from lorafleet.serving.catalogue.local_adapters import (
    InvalidLocalAdapter,
    PathNotAllowed,
    check_local_name,
    folder_fingerprint,
    inside_roots,
    read_local_manifest,
)
from lorafleet.serving.catalogue.model_names import ModelNotFound
from lorafleet.serving.catalogue.registry_poller import ChampionReloader, RegistryPoller
from lorafleet.serving.settings import ServiceSettings
from lorafleet.settings import Settings

from serving_helpers import BASE, IN_PROCESS, make_adapter, reference_greedy, register_adapter

PROMPT = [1, 17, 42, 99, 7, 250]
MAX_TOKENS = 8


@dataclasses.dataclass
class Fleet:
    settings: Settings
    client: object  # MlflowClient
    dirs: dict[str, Path]
    roots: Path
    expected: dict[str, list[int]]  # dirs key -> reference greedy tokens

    def move_champion(self, name: str, version: int) -> None:
        from lorafleet.tasks.registry import set_champion

        set_champion(self.client, name, version, reason="admin test")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, model_cache: Path, migrated_db: Path) -> Fleet:
    from mlflow import MlflowClient

    home = tmp_path_factory.mktemp("admin")
    settings = Settings.for_home(home / "home", model_cache_dir=model_cache).ensure()
    shutil.copyfile(migrated_db, settings.home / "mlflow.db")
    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    src, roots = home / "src", home / "roots"
    seeds = {"alpha": 1, "alpha@2": 2, "beta": 3, "gamma": 4, "gamma@2": 5, "delta": 6, "delta@2": 7}
    dirs = {key: make_adapter(model_cache, src / key.replace("@", "-v"), name=key.split("@")[0], seed=seed)
            for key, seed in seeds.items()}
    dirs["local"] = make_adapter(model_cache, roots / "team" / "local", name="local", seed=8)
    dirs["local2"] = make_adapter(model_cache, roots / "team" / "local2", name="local", seed=9)
    for key in seeds:  # `NAME@2` keys register version 2 without moving the champion
        register_adapter(client, dirs[key], name=key.split("@")[0], artifact_root=settings.mlflow_artifacts_dir,
                         champion="@" not in key)
    expected = {key: reference_greedy(model_cache, path, PROMPT, MAX_TOKENS) for key, path in dirs.items()}
    assert expected["gamma"] != expected["gamma@2"] and expected["local"] != expected["local2"]
    return Fleet(settings, client, dirs, roots, expected)


def service_settings(fleet: Fleet, **overrides) -> ServiceSettings:
    fields = {"registry_poll_s": 0, "engine": {"adapter_slots": 3, "max_lora_rank": 8, "kv_cache_mb": 16},
              "default_max_tokens": MAX_TOKENS, "adapter_roots": (fleet.roots,), **IN_PROCESS, **overrides}
    return ServiceSettings.from_settings(fleet.settings, **fields)


@pytest.fixture(scope="module")
def backend(fleet: Fleet):
    backend = build_backend(service_settings(fleet))
    yield backend
    backend.close()


@pytest.fixture
def fresh(fleet: Fleet):
    backend = build_backend(service_settings(fleet, load_champions=False, base_model=BASE))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def http(backend):
    with TestClient(create_app(backend)) as client:
        yield client


def answer(http, model: str) -> list[int]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def listing(http) -> dict:
    response = http.get("/admin/adapters")
    assert response.status_code == 200, response.text
    return response.json()


def resident(http) -> dict[str, dict]:
    return {row["adapter"]: row for row in listing(http)["resident"]}


def admin_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    return error


def test_start_up_reads_only_as_many_champions_as_the_cache_holds(backend, http, fleet):
    # Sorted champions: alpha, beta, delta are handed to the engine; gamma waits for its first request.
    assert backend.generator.adapters == {"alpha-v1", "beta-v1", "delta-v1"}
    served = {card["id"]: card for card in listing(http)["served"]}
    assert {"alpha", "beta", "gamma", "delta"} <= set(served)
    assert not served["gamma"]["attached"] and served["alpha"]["attached"]
    assert answer(http, "gamma") == fleet.expected["gamma"]
    assert "gamma-v1" in backend.generator.adapters


def test_listing_shows_served_resident_and_registered(http, fleet):
    assert answer(http, "alpha") == fleet.expected["alpha"]
    body = listing(http)
    assert body["base_model"] == BASE and body["backend"] == "engine" and body["adapter_slots"] == 3
    alpha = resident(http)["alpha-v1"]
    assert alpha | {"slot": None} == {"adapter": "alpha-v1", "slot": None, "id": "alpha@1", "name": "alpha",
                                      "version": 1, "turbo_heads": False, "running": 0, "pinned": False}
    assert 1 <= alpha["slot"] <= 3
    registered = {model["name"]: model for model in body["registered"]}
    assert registered["alpha"]["aliases"] == {"champion": 1, "challenger": 2}
    assert registered["alpha"]["versions"] == [1, 2] and body["registry_error"] is None
    card = next(card for card in body["served"] if card["id"] == "alpha")
    assert card | {"attached": True} == {"id": "alpha", "name": "alpha", "version": 1, "adapter": "alpha-v1",
                                         "source": "models:/alpha/1", "champion": True, "attached": True}


def test_load_by_alias_makes_the_version_resident_and_every_spelling_answers(http, fleet):
    response = http.post("/admin/adapters/load", json={"model": "models:/alpha@challenger"})
    assert response.status_code == 200, response.text
    loaded = response.json()
    assert (loaded["id"], loaded["version"], loaded["resident"]) == ("alpha@2", 2, True)
    assert resident(http)[loaded["adapter"]]["slot"] == loaded["slot"]
    for model in ("alpha@2", "alpha@challenger", "models:/alpha/2", "models:/alpha@challenger"):
        assert answer(http, model) == fleet.expected["alpha@2"], model
    assert answer(http, "models:/alpha@champion") == answer(http, "models:/alpha/1") == fleet.expected["alpha"]


def test_unload_evicts_and_the_next_request_reads_it_again(backend, http, fleet):
    assert answer(http, "beta") == fleet.expected["beta"]
    loads = backend.generator.cache.stats.loads
    response = http.post("/admin/adapters/unload", json={"model": "beta"})
    assert response.status_code == 200 and response.json()["unloaded"] is True, response.text
    assert "beta-v1" not in resident(http)
    again = http.post("/admin/adapters/unload", json={"model": "beta@1"})
    assert again.status_code == 200 and again.json()["unloaded"] is False, "not resident: nothing to do"
    assert answer(http, "beta") == fleet.expected["beta"]
    assert "beta-v1" in resident(http) and backend.generator.cache.stats.loads == loads + 1


def test_unload_refuses_an_adapter_that_requests_are_running_on(backend, http):
    answer(http, "alpha")
    cache = backend.generator.cache
    cache.pin("alpha-v1")  # what the engine does for every running sequence
    try:
        error = admin_error(http.post("/admin/adapters/unload", json={"model": "alpha"}), 409, "adapter_in_use")
        assert "alpha@1" in error["message"]
    finally:
        cache.unpin("alpha-v1")
    assert "alpha-v1" in resident(http)


def test_reload_moves_name_to_the_new_champion_and_keeps_the_old_version(http, fleet):
    assert answer(http, "gamma") == fleet.expected["gamma"]
    fleet.move_champion("gamma", 2)
    assert answer(http, "gamma") == fleet.expected["gamma"], "no reload yet: the served version stays"
    response = http.post("/admin/adapters/reload", json={"model": "gamma"})
    assert response.status_code == 200, response.text
    assert response.json()["data"] == [{"name": "gamma", "old_version": 1, "new_version": 2, "changed": True,
                                        "error": None}]
    assert "gamma-v2" in resident(http), "the new version was loaded before `gamma` moved to it"
    assert answer(http, "gamma") == fleet.expected["gamma@2"]
    assert answer(http, "gamma@1") == fleet.expected["gamma"], "what resolved before still runs v1"
    everything = http.post("/admin/adapters/reload").json()["data"]
    assert {change["name"]: change["changed"] for change in everything}["gamma"] is False
    assert all(change["error"] is None for change in everything)


def test_local_folder_under_a_root_loads_serves_and_reloads_when_rewritten(http, fleet):
    path = str(fleet.dirs["local"])
    response = http.post("/admin/adapters/load", json={"name": "mine", "path": path})
    assert response.status_code == 200, response.text
    assert (response.json()["id"], response.json()["source"], response.json()["resident"]) == ("mine", path, True)
    assert answer(http, "mine") == fleet.expected["local"]
    same = http.post("/admin/adapters/load", json={"name": "mine", "path": path}).json()
    assert same["adapter"] == response.json()["adapter"], "an unchanged folder is not read again"
    moved = http.post("/admin/adapters/load", json={"name": "mine", "path": str(fleet.dirs["local2"])}).json()
    assert moved["adapter"] != response.json()["adapter"]
    assert answer(http, "mine") == fleet.expected["local2"]
    admin_error(http.post("/admin/adapters/reload", json={"model": "mine"}), 400, None)


def test_refused_and_bad_requests_change_nothing(http, fleet, tmp_path):
    answer(http, "alpha")
    before = listing(http)
    outside = str(fleet.dirs["alpha"])  # a real adapter, outside the roots
    link = fleet.roots / "sneaky"
    link.symlink_to(fleet.dirs["beta"], target_is_directory=True)
    cases = [
        ({"name": "evil", "path": outside}, 403, "path_not_allowed"),
        ({"name": "evil", "path": str(link)}, 403, "path_not_allowed"),  # a link out of the root
        ({"name": "evil", "path": str(fleet.roots / "missing")}, 400, "invalid_adapter"),
        ({"name": "evil", "path": "team/local"}, 400, "invalid_adapter"),  # relative
        ({"name": "alpha", "path": str(fleet.dirs["local"])}, 400, "invalid_adapter"),  # a registry name
        ({"name": "a b", "path": str(fleet.dirs["local"])}, 400, "invalid_value"),  # the body's name rule
        ({"model": "alpha@99"}, 404, "model_not_found"),
        ({"model": "nope"}, 404, "model_not_found"),
        ({"model": "models:/alpha/Production"}, 404, "model_not_found"),
        ({"model": "alpha", "path": outside}, 400, "invalid_value"),
        ({}, 400, "invalid_value"),
        ({"model": "alpha", "extra": 1}, 400, "invalid_value"),
    ]
    for body, status, code in cases:
        admin_error(http.post("/admin/adapters/load", json=body), status, code)
    assert str(fleet.roots) in admin_error(http.post("/admin/adapters/load", json=cases[0][0]), 403,
                                           "path_not_allowed")["message"]
    admin_error(http.post("/admin/adapters/unload", json={"model": "nope"}), 404, "model_not_found")
    admin_error(http.post("/admin/adapters/unload", json={"model": "alpha@99"}), 404, "model_not_found")
    admin_error(http.post("/admin/adapters/unload", json={"model": BASE}), 400, None)
    admin_error(http.post("/admin/adapters/reload", json={"model": "nope"}), 404, "model_not_found")
    admin_error(http.post("/admin/adapters/reload", json={"model": "alpha@2"}), 400, "invalid_value")  # a NAME
    admin_error(http.post("/admin/adapters/reload", content=b"{", headers={"content-type": "application/json"}),
                400, "invalid_json")
    assert listing(http) == before
    assert answer(http, "alpha") == fleet.expected["alpha"]


def test_local_paths_are_refused_without_roots_and_admin_can_be_turned_off(backend, fleet):
    catalogue = AdapterCatalogue(base_model_id=BASE, base_revision="r", loader=backend.generator, registry=None)
    with pytest.raises(PathNotAllowed, match="adapter_roots"):
        catalogue.load_local("mine", fleet.dirs["local"])
    off = dataclasses.replace(backend, settings=backend.settings.model_copy(update={"admin_enabled": False}))
    with TestClient(create_app(off)) as client:
        error = admin_error(client.get("/admin/adapters"), 403, "admin_disabled")
        assert "LORAFLEET_SERVE_ADMIN_ENABLED" in error["message"]
        assert client.get("/v1/models").status_code == 200


def test_settings_read_roots_and_polling_from_the_environment(fleet, tmp_path):
    env = {"LORAFLEET_SERVE_ADAPTER_ROOTS": f"{tmp_path}/a:{tmp_path}/b", "LORAFLEET_SERVE_REGISTRY_POLL_S": "5",
           "LORAFLEET_SERVE_ADMIN_ENABLED": "false"}
    settings = ServiceSettings.from_env(fleet.settings, env)
    assert settings.adapter_roots == (tmp_path / "a", tmp_path / "b")
    assert (settings.registry_poll_s, settings.admin_enabled) == (5.0, False)
    with pytest.raises(ValueError, match="LORAFLEET_SERVE_ADAPTER_ROOTS"):
        ServiceSettings.from_env(fleet.settings, {"LORAFLEET_SERVE_ADAPTER_ROOTS": "relative/dir"})


def test_the_service_poller_follows_a_moved_alias_without_an_admin_call(fleet):
    polled = build_backend(service_settings(fleet, registry_poll_s=0.05))
    try:
        poller = polled.poller
        assert poller is not None and poller.alive
        with TestClient(create_app(polled)) as http:
            assert answer(http, "delta") == fleet.expected["delta"]
            fleet.move_champion("delta", 2)
            # Two polls that *started* after the move: the first may have begun before it.
            assert poller.wait_polls(poller.polls + 2, timeout=60), "the poller stopped polling"
            assert polled.catalogue.champions()["delta"] == 2 and poller.last_error is None
            assert answer(http, "delta") == fleet.expected["delta@2"]
    finally:
        polled.close()
    assert not polled.poller.alive, "close() stops the poller"


def test_a_broken_registry_is_logged_and_what_is_served_keeps_serving(backend, fleet, tmp_path):
    broken = tmp_path / "broken.db"
    shutil.copyfile(fleet.settings.home / "mlflow.db", broken)
    registry = RegistryReader(f"sqlite:///{broken}", tmp_path / "downloads")
    catalogue = AdapterCatalogue(base_model_id=BASE, base_revision="r", loader=backend.generator,
                                 registry=registry)
    # The main catalogue's download of beta v1: the shared engine already knows `beta-v1` lives there.
    downloaded = fleet.settings.adapter_download_dir / "beta" / "v1"
    catalogue.install_champions([FetchedAdapter("beta", 1, downloaded, read_manifest(downloaded))])
    broken.write_bytes(b"not a database" * 100)
    reloader = ChampionReloader(catalogue)
    poller = RegistryPoller(reloader, 0.01).start()
    try:
        assert poller.wait_polls(3, timeout=60)
        assert poller.alive and "not a database" in (poller.last_error or "")
    finally:
        poller.stop()
    assert catalogue.champions() == {"beta": 1}
    sick = dataclasses.replace(backend, catalogue=catalogue, reloader=reloader)
    with TestClient(create_app(sick)) as http:
        admin_error(http.post("/admin/adapters/reload", json={}), 503, "registry_unavailable")
        body = listing(http)
        assert "not a database" in body["registry_error"] and body["served"][0]["id"] == "beta"
        assert answer(http, "beta") == fleet.expected["beta"]


def test_the_peft_backend_lists_and_loads_but_cannot_unload(fleet):
    peft = build_backend(service_settings(fleet, backend="peft"))
    try:
        with TestClient(create_app(peft)) as http:
            body = listing(http)
            assert (body["backend"], body["adapter_slots"]) == ("peft", None)
            assert len(body["resident"]) == 3 and {row["slot"] for row in body["resident"]} == {None}
            loaded = http.post("/admin/adapters/load", json={"model": "alpha@2"})
            assert loaded.status_code == 200 and loaded.json()["resident"] is True, loaded.text
            assert answer(http, "alpha@2") == fleet.expected["alpha@2"]
            admin_error(http.post("/admin/adapters/unload", json={"model": "alpha@2"}), 501, "not_supported")
    finally:
        peft.close()


# -- failure paths of admin loads, warms and reloads ------------------------------------------------


def timed_out(seen: list[ServedModel]):
    """A warm-up that gives up (what `EngineGenerator.warm` does after its timeout); the read it started goes on."""
    def warm(entry: ServedModel) -> None:
        seen.append(entry)
        raise TimeoutError(f"adapter {entry.adapter!r} was not read in time (slow disk)")
    return warm


def test_warming_an_adapter_does_not_wait_for_an_unrelated_slow_read(fresh, fleet, tmp_path):
    # A read that blocks until the test lets it go (a slow disk); adapter files are never FIFOs any more:
    # the confinement rules refuse them at once (tests/test_serving_confinement.py).
    stuck, release = tmp_path / "stuck", threading.Event()
    generator = fresh.generator
    real_reader = generator.cache._reader

    def reader(path: Path, shape):
        if Path(path) == stuck:
            assert release.wait(60), "the test never released the slow read"
        return real_reader(path, shape)

    generator.cache._reader = reader
    try:
        generator.load("quick", fleet.dirs["local"])  # its read starts first (one reader thread)
        generator.load("stuck", stuck)  # queued behind it; never finishes on its own
        slot = generator.warm("quick", timeout=30)
        assert slot is not None and generator.cache.slot_of("quick") == slot
    finally:
        release.set()
    assert generator.cache.wait_loading(30)  # the reader thread is free again before the backend closes


def test_a_failed_warm_of_a_version_already_served_keeps_it_served(fresh, fleet):
    catalogue = fresh.catalogue
    served = catalogue.load("alpha@2", warm=fresh.warm)
    with pytest.raises(AdapterLoadFailed, match="slow disk"):
        catalogue.load("alpha@2", warm=timed_out([]))  # reported ...
    assert catalogue.resolve("alpha@2", load=False) == served  # ... but clients keep what they use
    assert catalogue.is_attached(served.adapter) and served.adapter in fresh.generator.cache.resident()
    assert catalogue.resolve("alpha@2").adapter == served.adapter, "not fetched again under a new name"
    with TestClient(create_app(fresh)) as http:
        assert answer(http, "alpha@2") == fleet.expected["alpha@2"]


def test_a_failed_admin_load_leaves_no_orphan_in_the_engine(fresh, fleet):
    catalogue, cache = fresh.catalogue, fresh.generator.cache
    seen: list[ServedModel] = []
    with pytest.raises(AdapterLoadFailed, match="slow disk"):
        catalogue.load("gamma@1", warm=timed_out(seen))
    (dropped,) = seen
    with pytest.raises(ModelNotFound):  # this call created the entry: it is forgotten again
        catalogue.resolve("gamma@1", load=False)
    assert cache.wait_loading(30)  # the read the failed load started has ended ...
    cache.install_ready()  # ... and is not installed (what the idle stepping thread does; no forward runs)
    assert dropped.adapter not in cache.resident()
    # A request that resolved the entry just before it was forgotten gets a clear error, not a KeyError.
    with pytest.raises(ModelNotFound, match="gamma@1"):
        catalogue._attach(dropped)
    again = catalogue.load("gamma@1", warm=fresh.warm)
    assert again.adapter != dropped.adapter and again.adapter in cache.resident()
    with TestClient(create_app(fresh)) as http:
        assert answer(http, "gamma@1") == fleet.expected["gamma"]


def test_stopping_the_poller_does_not_wait_for_the_rest_of_a_reload(fresh, fleet):
    catalogue = fresh.catalogue
    registry = catalogue.registry
    # Serve the version that is *not* the champion of two names: one reload would move both.
    stale = {name: 3 - registry.version_for_alias(name, "champion") for name in ("alpha", "gamma")}
    catalogue.install_champions([registry.fetch(name, version) for name, version in stale.items()])
    entered, release, warmed = threading.Event(), threading.Event(), []

    def gated_warm(entry: ServedModel) -> object:
        warmed.append(entry.id)
        entered.set()
        assert release.wait(60)
        return fresh.warm(entry)

    reloader = ChampionReloader(catalogue, warm=gated_warm, add_new=False)
    poller = RegistryPoller(reloader, 0.01).start()
    try:
        assert entered.wait(60), "the poller never reached the first name"
        poller.stop(timeout=0)  # asked to stop while `alpha` (sorted first) is being loaded
    finally:
        release.set()
        poller.stop(timeout=30)
    assert not poller.alive
    assert warmed == [f"alpha@{3 - stale['alpha']}"], "the names after the one in progress are left alone"
    assert catalogue.champions() == {"alpha": 3 - stale["alpha"], "gamma": stale["gamma"]}

    # An admin reload in progress: a poller waiting for it stops at once, without waiting for it.
    entered.clear()
    release.clear()
    admin = threading.Thread(target=reloader.reload, args=(["gamma"],))
    admin.start()
    try:
        assert entered.wait(60), "the admin reload never reached `gamma`"
        waiting = RegistryPoller(reloader, 0.01).start()
        assert not waiting.wait_polls(1, timeout=0.3), "no poll completes while the admin reload runs"
        waiting.stop(timeout=30)
        assert not waiting.alive
    finally:
        release.set()
        admin.join(60)
    assert catalogue.champions()["gamma"] == 3 - stale["gamma"]


def test_local_folder_rules_live_in_their_own_module(fleet, tmp_path):
    roots = (fleet.roots.resolve(),)
    folder = fleet.dirs["local"]
    assert inside_roots(folder, roots) == folder.resolve()
    with pytest.raises(PathNotAllowed, match="not under an adapter root"):
        inside_roots(fleet.dirs["alpha"], roots)
    with pytest.raises(PathNotAllowed, match="adapter_roots"):
        inside_roots(folder, ())
    with pytest.raises(InvalidLocalAdapter, match="usable"):
        check_local_name(BASE, BASE)
    check_local_name("team.mine-2", BASE)
    assert read_local_manifest(folder).task.name == "local"
    with pytest.raises(InvalidLocalAdapter, match="not a directory"):
        read_local_manifest(tmp_path / "missing")
    copy = shutil.copytree(folder, tmp_path / "copy")
    before = folder_fingerprint(copy)
    assert folder_fingerprint(copy) == before
    (copy / "adapter_config.json").write_text((copy / "adapter_config.json").read_text() + " ")
    assert folder_fingerprint(copy) != before
