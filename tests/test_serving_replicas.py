"""Two `lorafleet serve` replicas sharing one registry, behind a real nginx running deploy/nginx/lorafleet.conf
(~1-2 min, most of it two server starts).

The replicas are what a user runs on two machines: separate LORAFLEET_HOMEs (downloads, logs), one MLflow
registry (the SQLite store the other serving tests use), a short registry poll interval. Client threads send
chat requests through nginx without pause while `lorafleet promote` moves `alpha`'s champion from version 1
to 2. Every replica must report version 2 as `alpha` (each polled directly; a generous bound, not a timing
check), the clients must see no error, and every answer is version 1's or version 2's exact greedy output,
version 2's for every request sent after both replicas switched. A streamed request through nginx arrives
intact, event by event.

Measured here with nginx 1.22: even with `proxy_buffering on` nginx passes each event on at once to a client
that reads it (and passes a client's hang-up on to the replica, even with `proxy_ignore_client_abort on`), so
no request tells the settings apart; `proxy_buffering off` (nginx then never reads a long stream ahead of a
slow client, into memory and temp files) is checked in the shipped file instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lorafleet.processes import stop_process_group
from lorafleet.serving.launcher import free_port
from lorafleet.serving.settings import ServiceSettings
from lorafleet.settings import Settings

from proxy_helpers import EXAMPLE, nginx_binary, site_config, start_nginx
from serving_helpers import make_adapter, register_adapter

pytestmark = pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed (Debian package `nginx`; "
                                "CI's .ci/run installs it)")

LORAFLEET = str(Path(sys.executable).with_name("lorafleet"))  # the CLI of this environment
POLL_S = 1  # LORAFLEET_SERVE_REGISTRY_POLL_S of the replicas
READY_S = 300.0  # generous bounds on waits (a loaded 2-core machine), never timing assertions
SWITCH_S = 120.0
CLIENTS = 3
AFTER = 3  # requests each client completes after both replicas switched, before the clients stop
PROMPT = [{"role": "user", "content": "Tell me a story."}]


@dataclass
class Replica:
    process: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:]) if self.log.exists() else ""


def _stop(process: subprocess.Popen) -> None:
    """`lorafleet serve` leads its own process group (the CLI, `bentoml serve`); BentoML's workers live in
    sessions of their own, so whatever of the process tree survives the group's signals is killed last."""
    stop_process_group(process)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Settings:
    """The shared registry: `alpha` version 1 is champion, version 2 is registered (challenger)."""
    from mlflow import MlflowClient

    settings = Settings.for_home(tmp_path_factory.mktemp("registry") / "home", model_cache_dir=model_cache).ensure()
    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    for seed, champion in ((1, True), (2, False)):
        adapter = make_adapter(model_cache, settings.home / "src" / f"alpha{seed}", name="alpha", seed=seed)
        register_adapter(client, adapter, name="alpha", artifact_root=settings.mlflow_artifacts_dir,
                         champion=champion)
    return settings


def user_env(registry: Settings, home: Path) -> dict[str, str]:
    """What a user sets on a replica's machine: its own home, the shared registry and model cache."""
    return {**os.environ, "LORAFLEET_HOME": str(home), "MLFLOW_TRACKING_URI": registry.tracking_uri,
            "LORAFLEET_MODEL_CACHE": str(registry.model_cache_dir), "HF_HUB_OFFLINE": "1",
            "BENTOML_DO_NOT_TRACK": "True", "LORAFLEET_SERVE_REGISTRY_POLL_S": str(POLL_S),
            "LORAFLEET_SERVE_KV_CACHE_MB": "16"}


@pytest.fixture(scope="module")
def replicas(registry: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Replica]]:
    started: list[Replica] = []
    try:
        for index in range(2):
            home = tmp_path_factory.mktemp(f"replica{index}")
            port, log = free_port(), home / "serve.log"
            with open(log, "wb") as out:
                process = subprocess.Popen([LORAFLEET, "serve", "--port", str(port)], env=user_env(registry, home),
                                           cwd=home, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True)
            started.append(Replica(process, port, log))
        deadline = time.monotonic() + READY_S
        for replica in started:  # both start together; wait for each
            while not _ready(replica):
                assert replica.process.poll() is None, f"replica exited:\n{replica.log_tail()}"
                assert time.monotonic() < deadline, f"replica not ready in {READY_S} s:\n{replica.log_tail()}"
                time.sleep(0.25)
        yield started
    finally:
        for replica in started:
            _stop(replica.process)


def _ready(replica: Replica) -> bool:
    try:
        return httpx.get(f"{replica.url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def proxy(replicas: list[Replica], tmp_path_factory: pytest.TempPathFactory):
    upstreams = [f"127.0.0.1:{replica.port}" for replica in replicas]
    with start_nginx(tmp_path_factory.mktemp("nginx"), upstreams, free_port()) as nginx:
        yield nginx


def chat(url: str, model: str, **fields) -> dict:
    body = {"model": model, "messages": PROMPT, "max_tokens": 6, "temperature": 0, "return_token_ids": True,
            **fields}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def tokens(answer: dict) -> tuple[int, ...]:
    return tuple(answer["choices"][0]["token_ids"])


def champion_version(replica: Replica, name: str) -> int | None:
    """What the replica says `name` means now (its admin listing; admin is on for a loopback server)."""
    listing = httpx.get(f"{replica.url}/admin/adapters", timeout=60)
    assert listing.status_code == 200, listing.text
    return next((card["version"] for card in listing.json()["served"] if card["id"] == name and card["champion"]),
                None)


class Client(threading.Thread):
    """Chats with `alpha` through the proxy until told to stop; records (started, tokens) or the error."""

    def __init__(self, url: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.stop = url, stop
        self.answers: list[tuple[float, tuple[int, ...]]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        with httpx.Client(timeout=120) as http:
            while not self.stop.is_set():
                started = time.monotonic()
                body = {"model": "alpha", "messages": PROMPT, "max_tokens": 6, "temperature": 0,
                        "return_token_ids": True}
                try:
                    response = http.post(f"{self.url}/v1/chat/completions", json=body)
                except httpx.HTTPError as error:
                    self.errors.append(f"{type(error).__name__}: {error}")
                    continue
                if response.status_code != 200:
                    self.errors.append(f"HTTP {response.status_code}: {response.text[:300]}")
                else:
                    self.answers.append((started, tokens(response.json())))

    def done_after(self, moment: float) -> int:
        return sum(started >= moment for started, _ in self.answers)


def statuses(replica: Replica) -> dict[str, float]:
    """HTTP statuses of the chat requests a replica answered, from its own /metrics."""
    text = httpx.get(f"{replica.url}/metrics", timeout=60).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "lorafleet_requests_total" and sample.labels.get("endpoint") == "chat.completions":
                found[sample.labels["status"]] = found.get(sample.labels["status"], 0.0) + sample.value
    return found


def test_a_promotion_reaches_every_replica_with_no_error_under_load(registry, replicas, proxy, tmp_path):
    v1, v2 = tokens(chat(replicas[0].url, "alpha@1")), tokens(chat(replicas[0].url, "alpha@2"))
    assert v1 != v2, "the two versions must answer differently for the switch to be visible"
    assert [champion_version(replica, "alpha") for replica in replicas] == [1, 1]

    stop = threading.Event()
    clients = [Client(proxy.url, stop) for _ in range(CLIENTS)]
    for client in clients:
        client.start()
    try:
        deadline = time.monotonic() + READY_S
        while min(len(client.answers) for client in clients) < 3 and not any(c.errors for c in clients):
            assert time.monotonic() < deadline, "the clients got no answers through nginx"
            time.sleep(0.05)
        promoting = time.monotonic()
        promoted = subprocess.run([LORAFLEET, "promote", "alpha", "2"], env=user_env(registry, registry.home),
                                  capture_output=True, text=True, timeout=300, check=False)
        assert promoted.returncode == 0, promoted.stdout + promoted.stderr
        deadline = time.monotonic() + SWITCH_S
        for replica in replicas:
            while (version := champion_version(replica, "alpha")) != 2:
                assert time.monotonic() < deadline, (
                    f"replica {replica.port} still serves version {version} as alpha {SWITCH_S:.0f} s after the "
                    f"promotion (poll interval {POLL_S} s):\n{replica.log_tail()}")
                time.sleep(0.1)
        switched = time.monotonic()
        deadline = time.monotonic() + READY_S
        while min(client.done_after(switched) for client in clients) < AFTER:
            assert all(client.is_alive() for client in clients)
            assert time.monotonic() < deadline, "the clients stopped getting answers after the switch"
            time.sleep(0.05)
    finally:
        stop.set()
        for client in clients:
            client.join(120)

    errors = [error for client in clients for error in client.errors]
    assert errors == [], f"{len(errors)} client errors during the promotion, e.g. {errors[:3]}"
    answers = [answer for client in clients for answer in client.answers]
    assert {answer for _, answer in answers} <= {v1, v2}, "every answer is exactly one version's"
    assert all(answer == v1 for started, answer in answers if started < promoting)
    assert all(answer == v2 for started, answer in answers if started >= switched), "after the switch: v2 only"
    served = {replica.port: statuses(replica) for replica in replicas}
    assert all(set(codes) == {"200"} for codes in served.values()), served
    used = proxy.upstreams_used()
    assert all(used.get(f"127.0.0.1:{replica.port}", 0) > 0 for replica in replicas), used
    print(f"\nrequests through nginx: {len(answers)} ({sum(s < promoting for s, _ in answers)} before the "
          f"promotion), per replica {used}; errors 0; both replicas on v2 {switched - promoting:.1f} s after "
          f"`lorafleet promote` started")


def test_a_streamed_request_through_nginx(replicas, proxy):
    """Server-sent events through the proxy: the content type, every event, the end marker, the same text as
    the plain answer."""
    whole = chat(proxy.url, "alpha", max_tokens=16)
    body = {"model": "alpha", "messages": PROMPT, "max_tokens": 16, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read().decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "content-length" not in response.headers, "a stream has no length known in advance"
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert len(chunks) > 2, "the role, the tokens and the finish reason arrive as separate events"
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_the_shipped_config_matches_the_service(tmp_path):
    """The example's body limit is the service's own default, and streaming is not buffered."""
    text = EXAMPLE.read_text()
    limit = ServiceSettings.model_fields["max_request_bytes"].default
    assert f"client_max_body_size {limit // 2**20}m;" in text, f"the service refuses bodies over {limit} bytes"
    for directive in ("proxy_buffering off;", "proxy_http_version 1.1;", "proxy_read_timeout 3600s;"):
        assert directive in text
    rendered = site_config(["10.0.0.1:3000"], "127.0.0.1:1")
    assert "server 10.0.0.1:3000;" in rendered and "127.0.0.1:3001" not in rendered
