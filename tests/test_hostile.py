"""Issue 13's hostile reproductions against one real `bentoml serve`, tiny model, real SQLite registry.

Every test plays a tenant who sends what broke the server once; after every test (an autouse fixture)
the server is still running, the well-behaved *bystander* requests (two adapters, a Turbo adapter, the
base model, and a seeded sampling request) answer exactly what they answered before any attack, and
no file appeared or changed anywhere under LORAFLEET_HOME or the adapter root, except the logs. The
attacks that can run while bystanders are in flight run concurrently with them. Finer-grained tests of
each boundary live beside the code (test_engine_isolation, test_serving_boundary,
test_serving_confinement, test_serving_auth); this file proves the promise end to end over HTTP.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafleet.serving.launcher import start_server
from lorafleet.settings import Settings

from serving_helpers import add_heads, make_adapter, register_adapter

SECRET = "TOP-SECRET-7f3a9c"  # the content of a file outside the adapter roots; must never come back
KV_CACHE_MB = 0.5  # the tiny model stores 512 bytes of K/V per token: a pool of 1,024 tokens
TINY_WIDTH = 64  # hidden size of the tiny random Llama


@dataclass
class Hostile:
    settings: Settings
    root: Path  # LORAFLEET_SERVE_ADAPTER_ROOTS
    folders: dict[str, Path]


def write_heads_config(folder: Path, **fields: Any) -> None:
    config = json.loads((folder / "turbo_config.json").read_text())
    (folder / "turbo_config.json").write_text(json.dumps({**config, **fields}))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, model_cache: Path) -> Hostile:
    from mlflow import MlflowClient
    from safetensors.torch import load_file, save_file

    home = tmp_path_factory.mktemp("hostile") / "home"
    settings = Settings.for_home(home, model_cache_dir=model_cache).ensure()
    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    src = home.parent / "src"
    alpha = make_adapter(model_cache, src / "alpha", name="alpha", seed=1)
    beta = add_heads(make_adapter(model_cache, src / "beta", name="beta", seed=2), model_cache, seed=3)
    for name, folder in (("alpha", alpha), ("beta", beta)):
        register_adapter(client, folder, name=name, artifact_root=settings.mlflow_artifacts_dir)
    register_adapter(client, make_adapter(model_cache, src / "alpha2", name="alpha", seed=4), name="alpha",
                     artifact_root=settings.mlflow_artifacts_dir, champion=False)

    root = home.parent / "adapters"
    root.mkdir()
    secret = home.parent / "secret.txt"
    secret.write_text(SECRET)
    folders = {"good": Path(shutil.copytree(alpha, root / "good"))}
    folders["nan"] = Path(shutil.copytree(alpha, root / "nan"))
    weights = folders["nan"] / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    first = min(tensors)
    tensors[first] = tensors[first].clone()
    tensors[first].view(-1)[0] = float("nan")
    save_file(tensors, str(weights))
    folders["wide_heads"] = Path(shutil.copytree(beta, root / "wide_heads"))
    write_heads_config(folders["wide_heads"], hidden_size=2 * TINY_WIDTH)
    folders["bomb_heads"] = Path(shutil.copytree(beta, root / "bomb_heads"))  # ~100 bytes asking for GBs
    write_heads_config(folders["bomb_heads"], num_heads=8, hidden_size=10**6, block_size=10**6)
    for name, linked in (("linked_manifest", "lorafleet.json"), ("linked_config", "adapter_config.json")):
        folders[name] = Path(shutil.copytree(alpha, root / name))
        (folders[name] / linked).unlink()
        (folders[name] / linked).symlink_to(secret)
    return Hostile(settings, root, folders)


@pytest.fixture(scope="module")
def server(hostile: Hostile):
    env = {"HF_HUB_OFFLINE": "1", "LORAFLEET_SERVE_ADAPTER_ROOTS": str(hostile.root),
           "LORAFLEET_SERVE_KV_CACHE_MB": str(KV_CACHE_MB), "LORAFLEET_SERVE_REGISTRY_POLL_S": "0"}
    with start_server(hostile.settings, env=env, log_file=hostile.settings.home.parent / "server.log") as handle:
        yield handle


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


# ----- bystanders ---------------------------------------------------------------------------------

BYSTANDERS: dict[str, dict[str, Any]] = {
    "alpha": {"model": "alpha", "temperature": 0},
    "alpha-v2": {"model": "alpha@2", "temperature": 0},
    "beta-turbo": {"model": "beta", "temperature": 0},
    "base": {"model": "tiny-random-llama", "temperature": 0},
    "alpha-sampled": {"model": "alpha", "temperature": 1.0, "seed": 7},
}


def ask(http: httpx.Client, body: dict[str, Any]) -> list[int]:
    full = {"messages": [{"role": "user", "content": "Tell me a story about a cat."}], "max_tokens": 16,
            "return_token_ids": True, **body}
    response = http.post("/v1/chat/completions", json=full)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def ask_all(http: httpx.Client) -> dict[str, list[int]]:
    """Every bystander at once, so they share batches with each other (and with any attack in flight)."""
    with concurrent.futures.ThreadPoolExecutor(len(BYSTANDERS)) as pool:
        futures = {name: pool.submit(ask, http, body) for name, body in BYSTANDERS.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope="module")
def expected(http) -> dict[str, list[int]]:
    """The bystanders' answers before any attack (each alone)."""
    return {name: ask(http, body) for name, body in BYSTANDERS.items()}


def files_of(*roots: Path) -> dict[str, str]:
    """Every file and folder under `roots` (path -> content hash, '' for folders), logs and the SQLite
    store's own bookkeeping left out: requests may log and read, never write anything else."""
    seen = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            name = str(path)
            if path.suffix == ".log" or "/logs/" in name or "mlflow.db" in path.name or "/bentoml/" in name:
                continue
            seen[name] = "" if path.is_dir() or path.is_symlink() else hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


@pytest.fixture(autouse=True)
def nobody_else_is_hurt(server, http, hostile, expected):
    """Around every attack: the server still runs, bystanders answer as before, no file was written."""
    before = files_of(hostile.settings.home, hostile.root)
    yield
    assert server.running(), server.log_tail()
    assert ask_all(http) == expected
    assert files_of(hostile.settings.home, hostile.root) == before


def while_bystanders_run(http: httpx.Client, expected: dict[str, list[int]], attack) -> Any:
    """Run `attack()` while the bystanders are in flight; they must answer exactly as before."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        bystanders = pool.submit(ask_all, http)
        result = pool.submit(attack).result()
        assert bystanders.result() == expected
    return result


def error_of(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json"), response.text
    return response.json()["error"]


# ----- A1: one request must not poison the server -------------------------------------------------

@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    ("/v1/completions", {"prompt": "Hi"}),
])
@pytest.mark.parametrize("stream", [False, True])
def test_a_seed_beyond_64_bits_is_refused_and_poisons_nothing(http, expected, path, body, stream):
    def attack() -> httpx.Response:
        return http.post(path, json={"model": "alpha", "temperature": 1, "seed": 18446744073709551616,
                                     "stream": stream, **body})

    response = while_bystanders_run(http, expected, attack)
    assert response.status_code == 400
    assert error_of(response)["param"] == "seed"


@pytest.mark.parametrize("field,value", [
    ("seed", -(2**63) - 1), ("max_tokens", 10**30), ("max_tokens", 0), ("max_tokens", 2.5),
    ("temperature", 1e308 * 10), ("top_p", -1), ("top_p", "1"), ("n", 10**20), ("logprobs", 10**20),
])
def test_every_numeric_field_is_checked_against_what_the_engine_can_represent(http, field, value):
    body = {"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], field: value}
    response = http.post("/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert field in (error_of(response)["param"] or "")


def test_token_ids_outside_the_vocabulary_are_refused(http):
    response = http.post("/v1/completions", json={"model": "alpha", "prompt": [1, 10**12], "max_tokens": 4})
    assert response.status_code == 400
    assert error_of(response)["param"] == "prompt"


# ----- A2, A3: bad adapters are refused before they become resident ---------------------------------

@pytest.mark.parametrize("folder,problem", [
    ("nan", "non-finite"),
    ("wide_heads", "hidden_size"),
    ("bomb_heads", "hidden_size"),
])
def test_an_adapter_that_would_hurt_others_is_refused_at_load(http, hostile, expected, folder, problem):
    def attack() -> httpx.Response:
        return http.post("/admin/adapters/load", json={"name": f"bad-{folder}".replace("_", "-"),
                                                       "path": str(hostile.folders[folder])})

    response = while_bystanders_run(http, expected, attack)
    assert response.status_code == 400, response.text
    assert problem in error_of(response)["message"]
    name = f"bad-{folder}".replace("_", "-")
    assert http.post("/v1/chat/completions", json={"model": name, "messages": [
        {"role": "user", "content": "Hi"}]}).status_code == 404, "a refused adapter is not served"
    listing = http.get("/admin/adapters").json()
    assert name not in {row["id"] for row in listing["resident"]}


def test_a_good_local_adapter_still_loads_beside_the_refused_ones(http, hostile):
    response = http.post("/admin/adapters/load", json={"name": "good", "path": str(hostile.folders["good"])})
    assert response.status_code == 200, response.text
    assert ask(http, {"model": "good", "temperature": 0}) == ask(http, {"model": "alpha", "temperature": 0})


# ----- A4: size -----------------------------------------------------------------------------------

def test_an_oversized_body_is_413_with_and_without_a_length(http, expected):
    body = json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "x" * (3 * 2**20)}]}).encode()
    sized = while_bystanders_run(http, expected, lambda: http.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}))
    assert sized.status_code == 413
    assert error_of(sized)["code"] == "request_too_large"

    def chunks():
        for start in range(0, len(body), 2**16):
            yield body[start:start + 2**16]

    unsized = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert unsized.status_code == 413


def test_a_prompt_larger_than_the_kv_pool_is_400_not_500(http):
    response = http.post("/v1/chat/completions", json={
        "model": "alpha", "messages": [{"role": "user", "content": "y" * 1500}], "max_tokens": 4})
    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == "context_length_exceeded"


# ----- A5: names ----------------------------------------------------------------------------------

def test_junk_and_path_like_model_names_write_nothing(http, expected):
    names = [f"junk{n}@{n % 7 + 1}" for n in range(50)] + [
        "..@1", "../x@1", ".@1", "a/../../b@1", "models:/../x/1", "x" * 5000 + "@1", "alpha\x00@1",
        "alpha@../../1", "alpha@" + "9" * 40, "ALPHA@1", "émoji🙂@1", "alpha\n@1"]

    def attack() -> list[int]:
        return [http.post("/v1/chat/completions", json={"model": name, "messages": [
            {"role": "user", "content": "Hi"}]}).status_code for name in names]

    statuses = while_bystanders_run(http, expected, attack)
    assert set(statuses) <= {400, 404}, statuses  # the autouse fixture checks that nothing was written


# ----- A6: confinement ----------------------------------------------------------------------------

@pytest.mark.parametrize("folder", ["linked_manifest", "linked_config"])
def test_a_file_linked_out_of_the_adapter_root_is_refused_and_never_echoed(http, hostile, folder):
    response = http.post("/admin/adapters/load", json={"name": folder.replace("_", "-"),
                                                       "path": str(hostile.folders[folder])})
    assert response.status_code in (400, 403), response.text
    assert SECRET not in response.text


def test_a_folder_outside_the_roots_is_403(http, hostile):
    response = http.post("/admin/adapters/load", json={"name": "outside",
                                                       "path": str(hostile.settings.home.parent / "src" / "alpha")})
    assert response.status_code == 403


# ----- A7: who may call what ------------------------------------------------------------------------

def test_a_foreign_host_header_is_refused(http):
    """A DNS-rebinding page reaches 127.0.0.1 under its own host name: refused before any route."""
    for path in ("/v1/models", "/admin/adapters"):
        response = http.get(path, headers={"Host": "attacker.example"})
        assert response.status_code == 400, response.text
        assert error_of(response)["code"] == "invalid_host"


# ----- A8: fields we do not honour ----------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    ("tool_choice", "required"), ("guided_json", {"type": "object"}), ("logit_bias", {"1": 5}),
    ("presence_penalty", 0.5), ("frequency_penalty", 0.5), ("top_logprobs", 3),
])
def test_unsupported_chat_fields_are_refused_naming_them(http, field, value):
    response = http.post("/v1/chat/completions", json={
        "model": "alpha", "messages": [{"role": "user", "content": "Hi"}], field: value})
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == field


@pytest.mark.parametrize("field,value", [("best_of", 3), ("suffix", "!"), ("echo", True)])
def test_unsupported_completion_fields_are_refused_naming_them(http, field, value):
    response = http.post("/v1/completions", json={"model": "alpha", "prompt": "Hi", field: value})
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == field


# ----- A9: the last 500s --------------------------------------------------------------------------

@pytest.mark.parametrize("body,param", [
    ({"name": "nul", "path": "/tmp/a\x00b"}, "path"),
    ({"name": "x" * 5000, "path": "/tmp/a"}, "name"),
    ({"name": "long", "path": "/" + "a" * 10000}, "path"),
    ({"model": "a" * 5000}, "model"),
])
def test_admin_bodies_with_nul_bytes_or_over_long_values_are_400(http, body, param):
    response = http.post("/admin/adapters/load", json=body)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == param


# ----- property-based: anything a client sends ------------------------------------------------------

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=3)), max_leaves=6)
FIELDS = st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.sampled_from(["alpha", "beta", "alpha@2", "tiny-random-llama", "junk@1", "..@1"]),
                       JSON_VALUES),
    "messages": st.one_of(st.just([{"role": "user", "content": "Hi"}]), JSON_VALUES),
    "prompt": st.one_of(st.just("Hi"), st.lists(st.integers(min_value=-5, max_value=2**64), max_size=4),
                        JSON_VALUES),
    "max_tokens": st.one_of(st.integers(min_value=-2, max_value=8), st.integers(), JSON_VALUES),
    "temperature": st.one_of(st.sampled_from([0, 0.5, 1, 2, 2.5, -1]), JSON_VALUES),
    "top_p": st.one_of(st.floats(allow_nan=False, allow_infinity=False), JSON_VALUES),
    "seed": st.one_of(st.integers(), st.sampled_from([2**64, 2**64 - 1, -(2**63), -(2**63) - 1]), JSON_VALUES),
    "stop": st.one_of(st.lists(st.text(max_size=3), max_size=5), JSON_VALUES),
    "stream": st.one_of(st.booleans(), JSON_VALUES),
    "n": JSON_VALUES, "logprobs": JSON_VALUES, "tools": JSON_VALUES, "response_format": JSON_VALUES,
    "logit_bias": JSON_VALUES, "user": JSON_VALUES, "return_token_ids": JSON_VALUES,
})


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=FIELDS, endpoint=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_no_request_body_gets_a_5xx(http, body, endpoint):
    response = http.post(endpoint, json=body)
    assert response.status_code < 500, (body, response.text)
    if response.status_code != 200:
        assert "error" in response.json()
