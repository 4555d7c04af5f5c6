"""Who may call what (issue 13, A7): API keys, the admin switch, the Host-header check, the rule that only
admins load registry versions beyond champion and challenger, and the warning for a public bind.

The middleware is tested on a tiny Starlette app; the version rule on the catalogue over a real SQLite
MLflow registry; then two real `bentoml serve` processes over that registry, driven by the official `openai`
SDK, `curl` and httpx: one on loopback with inference and admin keys, one on 0.0.0.0 with an inference key
only (its admin must be off). The registry holds `alpha` v1 (champion), v2 (no alias but `old`), v3
(challenger).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect
from typer.testing import CliRunner

from lorafleet.registry_read import RegistryReader
from lorafleet.serving.api.auth import (
    AccessMiddleware,
    SettingsPolicy,
    caller_of,
    exposure_warnings,
    is_loopback,
    request_host,
)
from lorafleet.serving.catalogue.adapters import AdapterCatalogue, VersionNotAllowed
from lorafleet.serving.catalogue.model_names import ModelNotFound
from lorafleet.serving.launcher import BIND_HOST_ENV, ServerHandle, server_env, start_server
from lorafleet.serving.settings import ServiceSettings
from lorafleet.settings import Settings

from serving_helpers import BASE, make_adapter, register_adapter

INFERENCE_KEYS = ("inf-key-1", "inf-key-2")
ADMIN_KEY = "adm-key-1"
KEYS = {"api_keys": INFERENCE_KEYS, "admin_api_keys": (ADMIN_KEY,)}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def error_of(response: httpx.Response, status: int, code: str) -> dict:
    """The OpenAI-shaped error body, checked for status, exact keys and code."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    return error


# -- the middleware on a tiny app ------------------------------------------------------------------


async def _echo(request: Request) -> JSONResponse:
    return JSONResponse({"admin": caller_of(request.scope).admin})


async def _socket(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text("hello")
    await websocket.close()


def tiny(tmp_path: Path, *, host: str = "localhost", **fields) -> TestClient:
    """A tiny app behind the middleware, with settings built from `fields` (as the service would)."""
    settings = ServiceSettings.from_settings(Settings.for_home(tmp_path), **fields)
    routes = [Route(path, _echo) for path in ("/v1/models", "/admin/adapters", "/docs", "/openapi.json")]
    app = Starlette(routes=[*routes, WebSocketRoute("/v1/socket", _socket)])
    app.add_middleware(AccessMiddleware, policy=SettingsPolicy(lambda: settings))
    return TestClient(app, base_url=f"http://{host}")


def test_inference_and_admin_keys_are_separate_and_the_admin_key_grants_both(tmp_path):
    with tiny(tmp_path, bind_host="127.0.0.1", **KEYS) as http:
        missing = http.get("/v1/models")
        error = error_of(missing, 401, "invalid_api_key")
        assert error["type"] == "invalid_request_error" and "Authorization: Bearer" in error["message"]
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = http.get("/v1/models", headers=bearer("sk-guessed-key"))
        assert error_of(wrong, 401, "invalid_api_key")["type"] == "authentication_error"
        assert wrong.headers["www-authenticate"].startswith("Bearer") and "sk-guessed" not in wrong.text
        for key in INFERENCE_KEYS:  # two keys at once: rotation
            assert http.get("/v1/models", headers=bearer(key)).json() == {"admin": False}
        assert http.get("/v1/models", headers=bearer(ADMIN_KEY)).json() == {"admin": True}
        assert http.get("/v1/models", headers={"Authorization": f"bEaReR   {ADMIN_KEY} "}).json() == {"admin": True}
        assert error_of(http.get("/v1/models", headers={"Authorization": f"Basic {ADMIN_KEY}"}), 401,
                        "invalid_api_key")
        assert error_of(http.get("/v1/models", headers=[("Authorization", f"Bearer {INFERENCE_KEYS[0]}")] * 2),
                        401, "invalid_api_key"), "two Authorization headers are not a choice"

        refused = error_of(http.get("/admin/adapters", headers=bearer(INFERENCE_KEYS[0])), 403,
                           "insufficient_permissions")
        assert "LORAFLEET_SERVE_ADMIN_API_KEYS" in refused["message"]
        assert error_of(http.get("/admin/adapters"), 401, "invalid_api_key")
        assert http.get("/admin/adapters", headers=bearer(ADMIN_KEY)).json() == {"admin": True}
        for path in ("/docs", "/openapi.json"):  # they describe the API and hold no data
            assert http.get(path).status_code == 200


def test_loopback_without_keys_is_open_as_before_and_a_sent_key_is_ignored(tmp_path):
    with tiny(tmp_path, bind_host="127.0.0.1") as http:
        assert http.get("/admin/adapters").json() == {"admin": True}
        assert http.get("/v1/models", headers=bearer("whatever")).json() == {"admin": True}


def test_loopback_with_inference_keys_only_serves_nothing_keyless(tmp_path):
    with tiny(tmp_path, bind_host="::1", api_keys=INFERENCE_KEYS) as http:
        assert error_of(http.get("/admin/adapters"), 401, "invalid_api_key")
        assert http.get("/admin/adapters", headers=bearer(INFERENCE_KEYS[1])).json() == {"admin": True}


def test_admin_is_off_beyond_loopback_without_an_admin_key_and_when_turned_off(tmp_path):
    with tiny(tmp_path, bind_host="0.0.0.0", api_keys=INFERENCE_KEYS) as http:
        error = error_of(http.get("/admin/adapters", headers=bearer(INFERENCE_KEYS[0])), 403, "admin_disabled")
        assert "LORAFLEET_SERVE_ADMIN_API_KEYS" in error["message"] and "0.0.0.0" in error["message"]
        assert http.get("/v1/models", headers=bearer(INFERENCE_KEYS[0])).json() == {"admin": False}
    with tiny(tmp_path) as http:  # bind address unknown (a hand-run `bentoml serve`): counts as public
        error = error_of(http.get("/admin/adapters"), 403, "admin_disabled")
        assert "LORAFLEET_SERVE_BIND_HOST" in error["message"]
        assert http.get("/v1/models").json() == {"admin": False}, "no admin rights, so no old versions either"
    with tiny(tmp_path, bind_host="0.0.0.0", admin_api_keys=(ADMIN_KEY,)) as http:
        assert http.get("/admin/adapters", headers=bearer(ADMIN_KEY)).json() == {"admin": True}
        assert error_of(http.get("/admin/adapters"), 401, "invalid_api_key")
    with tiny(tmp_path, bind_host="127.0.0.1", admin_enabled=False, admin_api_keys=(ADMIN_KEY,)) as http:
        error = error_of(http.get("/admin/adapters", headers=bearer(ADMIN_KEY)), 403, "admin_disabled")
        assert "LORAFLEET_SERVE_ADMIN_ENABLED" in error["message"], "false always wins, and is named"
        assert http.get("/v1/models", headers=bearer(ADMIN_KEY)).json() == {"admin": False}


def test_loopback_answers_only_loopback_host_names_so_dns_rebinding_fails(tmp_path):
    with tiny(tmp_path, bind_host="127.0.0.1", admin_api_keys=(ADMIN_KEY,)) as http:
        for host in ("localhost:8000", "LOCALHOST", "localhost.", "127.0.0.1", "127.0.0.1:3000", "[::1]:3000"):
            assert http.get("/v1/models", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io"):
            error = error_of(http.get("/v1/models", headers={"Host": host}), 400, "invalid_host")
            assert "LORAFLEET_SERVE_ALLOWED_HOSTS" in error["message"], host
        # Before the key is even looked at, and on the open paths too.
        assert error_of(http.get("/admin/adapters", headers={"Host": "evil.example", **bearer(ADMIN_KEY)}),
                        400, "invalid_host")
        assert error_of(http.get("/docs", headers={"Host": "evil.example"}), 400, "invalid_host")


def test_public_bind_answers_any_host_unless_allowed_hosts_are_set(tmp_path):
    with tiny(tmp_path, bind_host="0.0.0.0") as http:
        assert http.get("/v1/models", headers={"Host": "anything.example"}).status_code == 200
    allowed = {"allowed_hosts": ("api.example.com", "*.corp.example"), "bind_host": "0.0.0.0"}
    with tiny(tmp_path, host="api.example.com", **allowed) as http:
        for host in ("api.example.com", "API.example.com:443", "x.corp.example", "a.b.corp.example:1"):
            assert http.get("/v1/models", headers={"Host": host}).status_code == 200, host
        for host in ("corp.example", "example.com", "localhost", "evilcorp.example"):
            assert error_of(http.get("/v1/models", headers={"Host": host}), 400, "invalid_host"), host
    with tiny(tmp_path, allowed_hosts=("*",), bind_host="127.0.0.1") as http:
        assert http.get("/v1/models", headers={"Host": "evil.example"}).status_code == 200


def test_malformed_host_headers_are_refused():
    assert request_host("LocalHost:80") == "localhost" and request_host("[::1]:3000") == "::1"
    assert request_host("[::1]") == "::1" and request_host("example.com.") == "example.com"
    for header in (None, "", ":80", "::1", "[::1", "[::1]x", "host:", "host:http", "host:8０", "a:1:2"):
        assert request_host(header) is None, header


def test_bind_addresses_that_are_loopback():
    assert all(is_loopback(host) for host in ("127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost", "LOCALHOST"))
    assert not any(is_loopback(host) for host in (None, "", "0.0.0.0", "::", "192.168.1.5", "myhost", "localhost.x"))


def test_not_ready_without_settings_and_websockets_are_checked_too(tmp_path):
    app = Starlette(routes=[Route("/v1/models", _echo)])
    app.add_middleware(AccessMiddleware, policy=lambda: None)
    with TestClient(app) as http:
        assert error_of(http.get("/v1/models"), 503, "not_ready")["type"] == "server_error"
    # Starlette's test client sends `Host: testserver` on WebSockets, whatever its base URL.
    with tiny(tmp_path, bind_host="127.0.0.1", allowed_hosts=("testserver",), **KEYS) as http:
        with http.websocket_connect("/v1/socket", headers=bearer(INFERENCE_KEYS[0])) as socket:
            assert socket.receive_text() == "hello"
        with pytest.raises(WebSocketDisconnect) as closed, http.websocket_connect("/v1/socket"):
            pass
        assert closed.value.code == 1008


# -- settings, warnings, launcher, CLI -------------------------------------------------------------


def test_keys_and_hosts_come_from_the_environment_and_keys_are_never_shown(tmp_path):
    home = Settings.for_home(tmp_path)
    settings = ServiceSettings.from_env(home, {
        "LORAFLEET_SERVE_API_KEYS": " inf-key-1, inf-key-2,, ", "LORAFLEET_SERVE_ADMIN_API_KEYS": ADMIN_KEY,
        "LORAFLEET_SERVE_ALLOWED_HOSTS": "API.example.com, *.corp.example,[::1]", BIND_HOST_ENV: "0.0.0.0"})
    assert tuple(key.get_secret_value() for key in settings.api_keys) == INFERENCE_KEYS
    assert settings.admin_api_keys[0].get_secret_value() == ADMIN_KEY and settings.bind_host == "0.0.0.0"
    assert settings.allowed_hosts == ("api.example.com", "*.corp.example", "[::1]")
    assert "inf-key" not in repr(settings) and ADMIN_KEY not in str(settings)
    assert ADMIN_KEY not in settings.model_dump_json()

    secret = "sécret-key-with-accent"
    with pytest.raises(ValueError, match="LORAFLEET_SERVE_ADMIN_API_KEYS: key #2") as bad:
        ServiceSettings.from_env(home, {"LORAFLEET_SERVE_ADMIN_API_KEYS": f"fine-key,{secret}"})
    assert secret not in str(bad.value)
    with pytest.raises(ValidationError) as bad:
        ServiceSettings.from_settings(home, api_keys=("has space",))
    assert "has space" not in str(bad.value)
    with pytest.raises(ValueError, match="LORAFLEET_SERVE_ALLOWED_HOSTS"):
        ServiceSettings.from_env(home, {"LORAFLEET_SERVE_ALLOWED_HOSTS": "example.com:443"})
    with pytest.raises(ValueError, match="LORAFLEET_SERVE_ALLOWED_HOSTS"):
        ServiceSettings.from_env(home, {"LORAFLEET_SERVE_ALLOWED_HOSTS": "https://example.com"})


def test_public_binds_without_keys_are_warned_about(tmp_path):
    def warnings(**fields) -> list[str]:
        return exposure_warnings(ServiceSettings.from_settings(Settings.for_home(tmp_path), **fields))

    assert warnings(bind_host="127.0.0.1") == [] and warnings(bind_host="localhost") == []
    open_inference, admin_off = warnings(bind_host="0.0.0.0")
    assert "LORAFLEET_SERVE_API_KEYS" in open_inference and "DNS rebinding" in open_inference
    assert "LORAFLEET_SERVE_ADMIN_API_KEYS" in admin_off and "OFF" in admin_off
    assert warnings(bind_host="0.0.0.0", **KEYS) == []
    assert warnings(bind_host="0.0.0.0", api_keys=INFERENCE_KEYS, admin_enabled=False) == []
    (unknown,) = warnings(admin_api_keys=(ADMIN_KEY,))
    assert "LORAFLEET_SERVE_BIND_HOST" in unknown


def test_the_launcher_tells_the_service_where_it_listens(tmp_path):
    settings = Settings.for_home(tmp_path)
    env = server_env(settings, {BIND_HOST_ENV: "127.0.0.1"}, host="0.0.0.0")
    assert env[BIND_HOST_ENV] == "0.0.0.0", "the real bind address wins over a configured one"
    assert ServerHandle(process=None, host="0.0.0.0", port=9, log_file=tmp_path).url == "http://127.0.0.1:9"
    assert ServerHandle(process=None, host="::", port=9, log_file=tmp_path).url == "http://[::1]:9"


def test_serve_warns_on_stderr_for_a_public_bind_and_checks_settings_first(tmp_path, monkeypatch):
    from lorafleet.flows.cli import app
    from lorafleet.serving import launcher

    started: list[str] = []
    monkeypatch.setattr(launcher, "serve_foreground", lambda settings, port, host: started.append(host) or 0)
    env = {"LORAFLEET_HOME": str(tmp_path / "home"), "LORAFLEET_SERVE_API_KEYS": "",
           "LORAFLEET_SERVE_ADMIN_API_KEYS": ""}
    public = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0"], env=env)
    assert public.exit_code == 0 and started == ["0.0.0.0"]
    assert "WARNING" in public.stderr and "LORAFLEET_SERVE_API_KEYS" in public.stderr
    assert "LORAFLEET_SERVE_ADMIN_API_KEYS" in public.stderr
    local = CliRunner().invoke(app, ["serve"], env=env)
    assert local.exit_code == 0 and started[-1] == "127.0.0.1" and "WARNING" not in local.stderr
    bad = CliRunner().invoke(app, ["serve"], env={**env, "LORAFLEET_SERVE_API_KEYS": "a b"})
    assert bad.exit_code == 2 and "LORAFLEET_SERVE_API_KEYS" in bad.stdout and len(started) == 2


# -- the version rule, on the catalogue over a real registry ---------------------------------------


@dataclass
class Registry:
    settings: Settings


@pytest.fixture(scope="module")
def registry(tmp_path_factory, model_cache: Path, migrated_db: Path) -> Registry:
    import shutil

    from mlflow import MlflowClient

    settings = Settings.for_home(tmp_path_factory.mktemp("auth") / "home", model_cache_dir=model_cache).ensure()
    shutil.copyfile(migrated_db, settings.home / "mlflow.db")
    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    adapter = make_adapter(model_cache, settings.home / "src" / "alpha", name="alpha", seed=1)
    for champion in (True, False, False):  # v1 champion, v2 plain, v3 challenger
        register_adapter(client, adapter, name="alpha", artifact_root=settings.mlflow_artifacts_dir,
                         champion=champion)
    client.set_registered_model_alias("alpha", "old", "2")
    return Registry(settings)


class RecordingLoader:
    def __init__(self) -> None:
        self.loaded: list[str] = []

    def load(self, name: str, adapter_dir: Path) -> None:
        self.loaded.append(name)


def test_only_admins_fetch_versions_beyond_champion_and_challenger(registry, tmp_path):
    downloads = tmp_path / "downloads"
    catalogue = AdapterCatalogue(base_model_id=BASE, base_revision="r", loader=RecordingLoader(),
                                 registry=RegistryReader(registry.settings.tracking_uri, downloads))
    assert catalogue.resolve("alpha").version == 1
    assert catalogue.resolve("alpha@challenger").version == catalogue.resolve("alpha@3").version == 3
    for model in ("alpha@2", "models:/alpha/2", "alpha@old", "models:/alpha@old"):
        with pytest.raises(VersionNotAllowed, match="admin"):
            catalogue.resolve(model)
    assert not (downloads / "alpha" / "v2").exists(), "nothing is fetched for a refused version"
    with pytest.raises(ModelNotFound):
        catalogue.resolve("alpha@99")  # a missing version stays a 404
    assert catalogue.resolve("alpha@2", any_version=True).version == 2
    assert catalogue.resolve("alpha@old").version == 2, "served here now: anyone may use it"


# -- real servers ----------------------------------------------------------------------------------


SERVER_ENV = {"HF_HUB_OFFLINE": "1", "LORAFLEET_SERVE_REGISTRY_POLL_S": "0", "LORAFLEET_SERVE_KV_CACHE_MB": "32",
              "LORAFLEET_SERVE_API_KEYS": ",".join(INFERENCE_KEYS)}


@pytest.fixture(scope="module")
def keyed(registry: Registry):
    """Loopback, with inference keys and an admin key."""
    env = {**SERVER_ENV, "LORAFLEET_SERVE_ADMIN_API_KEYS": ADMIN_KEY}
    log = registry.settings.home / "logs" / "keyed.log"
    with start_server(registry.settings, env=env, log_file=log) as handle:
        yield handle


@pytest.fixture(scope="module")
def public(registry: Registry):
    """Bound to every interface, with inference keys only: admin must be off, and the log must say so."""
    log = registry.settings.home / "logs" / "public.log"
    with start_server(registry.settings, env=SERVER_ENV, host="0.0.0.0", log_file=log) as handle:
        yield handle


def ask(client: openai.OpenAI, model: str) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=3, temperature=0)
    return reply.choices[0].finish_reason


def test_the_openai_sdk_works_with_a_key_and_gets_401_without_the_right_one(keyed):
    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=INFERENCE_KEYS[1], max_retries=0)
    assert "alpha" in [model.id for model in client.models.list()]
    assert ask(client, "alpha") in ("stop", "length")
    wrong = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.models.list()
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"


def curl(url: str, key: str | None = None) -> tuple[int, dict]:
    command = ["curl", "-sS", "--max-time", "60", "-w", "\n%{http_code}", url]
    if key is not None:
        command[1:1] = ["-H", f"Authorization: Bearer {key}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=90, check=True)
    body, _, status = done.stdout.rpartition("\n")
    return int(status), json.loads(body)


def test_curl_with_a_bearer_key_reaches_models_and_admin(keyed):
    status, models = curl(f"{keyed.url}/v1/models", INFERENCE_KEYS[0])
    assert status == 200 and "alpha" in [model["id"] for model in models["data"]]
    status, listing = curl(f"{keyed.url}/admin/adapters", ADMIN_KEY)
    assert status == 200 and listing["base_model"] == BASE
    status, refused = curl(f"{keyed.url}/admin/adapters", INFERENCE_KEYS[0])
    assert status == 403 and refused["error"]["code"] == "insufficient_permissions"
    assert curl(f"{keyed.url}/admin/adapters")[0] == 401


def test_health_and_metrics_stay_open_and_foreign_hosts_are_refused(keyed):
    with httpx.Client(base_url=keyed.url, timeout=60) as http:
        for path in ("/livez", "/readyz", "/metrics"):  # probes and Prometheus carry no key
            assert http.get(path).status_code == 200, path
        rebound = http.get("/v1/models", headers={"Host": "evil.example", **bearer(ADMIN_KEY)})
        assert error_of(rebound, 400, "invalid_host")
        assert http.get("/v1/models", headers={"Host": f"localhost:{keyed.port}",
                                               **bearer(ADMIN_KEY)}).status_code == 200
    assert "WARNING" not in keyed.log_tail(400), "a loopback bind is nothing to warn about"


def test_old_versions_need_the_admin_key(keyed, registry):
    user = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=INFERENCE_KEYS[0], max_retries=0)
    admin = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=ADMIN_KEY, max_retries=0)
    assert ask(user, "alpha@challenger") in ("stop", "length")
    for model in ("alpha@2", "models:/alpha/2", "alpha@old"):
        with pytest.raises(openai.PermissionDeniedError) as refused:
            ask(user, model)
        assert refused.value.code == "admin_key_required" and "LORAFLEET_SERVE_ADMIN_API_KEYS" in str(refused.value)
    assert not (registry.settings.adapter_download_dir / "alpha" / "v2").exists()
    assert ask(admin, "alpha@2") in ("stop", "length")


def test_a_public_bind_turns_admin_off_and_says_so(public):
    log = public.log_tail(400)
    assert "WARNING" in log and "LORAFLEET_SERVE_ADMIN_API_KEYS" in log
    with httpx.Client(base_url=public.url, timeout=60) as http:
        assert error_of(http.get("/admin/adapters", headers=bearer(INFERENCE_KEYS[0])), 403, "admin_disabled")
        assert error_of(http.get("/v1/models"), 401, "invalid_api_key")
        # Any Host is answered here (the names clients use are unknown); only key holders get in.
        assert http.get("/v1/models", headers={"Host": "lorafleet.example", **bearer(INFERENCE_KEYS[0])}
                        ).status_code == 200
        old = http.post("/v1/completions", headers=bearer(INFERENCE_KEYS[0]),
                        json={"model": "alpha@old", "prompt": "hi", "max_tokens": 2})
        assert error_of(old, 403, "admin_key_required")
