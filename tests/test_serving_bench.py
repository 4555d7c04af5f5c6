"""`bench serving`: the load generator against real `bentoml serve` processes on a tiny registry (~60 s).

The registry holds one adapter made by the serving test helpers plus the random `bench-*` adapters the
bench's own setup adds, so the setup is tested on the same store the servers then serve. One server
runs with default settings; a second one, with a queue of one waiting request and one running
sequence, must answer some requests with 429, which the clients retry and never count as errors.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorafleet.evaluation.serving_bench import (
    LoadOptions,
    LoadSpec,
    ZipfSampler,
    measure_serving,
    parse_metrics,
    percentile_ms,
    zipf_weights,
)
from lorafleet.flows.cli import app
from lorafleet.flows.serving_bench import (
    champions_for_base,
    ensure_bench_adapters,
    parse_env_pairs,
    served_adapters,
)
from lorafleet.serving.launcher import start_server
from lorafleet.settings import Settings

from serving_helpers import BASE, make_adapter, register_adapter

PROMPTS = (
    "Portal 2 is a first person puzzle game from Valve, released in 2011 for PC and Mac.",
    "Have you ever played a multiplayer game on Steam that you really liked?",
    "I think Little Big Adventure is a pretty average game.",
)


@dataclass
class Fleet:
    settings: Settings
    created: list[str]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, model_cache: Path) -> Fleet:
    from mlflow import MlflowClient

    settings = Settings.for_home(tmp_path_factory.mktemp("sbench") / "home", model_cache_dir=model_cache).ensure()
    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    alpha = make_adapter(model_cache, settings.home / "src" / "alpha", name="alpha", seed=1)
    register_adapter(client, alpha, name="alpha", artifact_root=settings.mlflow_artifacts_dir)
    created = ensure_bench_adapters(settings, base_model=BASE, count=3)
    return Fleet(settings, created)


@pytest.fixture(scope="module")
def server(fleet: Fleet):
    with start_server(fleet.settings, env={"HF_HUB_OFFLINE": "1"}) as handle:
        yield handle


def test_setup_registers_exactly_the_missing_champions(fleet):
    assert fleet.created == ["bench-000", "bench-001"], "one champion existed, three were wanted"
    assert champions_for_base(fleet.settings, BASE) == ["alpha", "bench-000", "bench-001"]
    assert ensure_bench_adapters(fleet.settings, base_model=BASE, count=3) == []
    assert champions_for_base(fleet.settings, "some-other-base") == []


def test_closed_loop_against_a_real_server(server, fleet):
    models = tuple(served_adapters(server.url, 3))
    assert models == ("alpha", "bench-000", "bench-001")
    spec = LoadSpec(url=server.url, models=models, prompts=PROMPTS,
                    options=LoadOptions(concurrency=4, duration_s=5, max_tokens=16, seed=3, check=2))
    report = measure_serving(spec, server_pid=server.process.pid, device="cpu")

    assert report.completed > 0 and report.errors == 0, report.error_samples
    assert report.rejected_429 == 0 and report.abandoned == 0
    assert sum(report.per_adapter_requests.values()) == report.completed
    assert set(report.per_adapter_requests) <= set(models)
    assert report.tokens_from == "usage"
    assert 0 < report.tokens_total <= report.completed * 16
    assert report.tokens_per_s == pytest.approx(report.tokens_total / report.duration_s)
    assert report.duration_s >= 5
    for low, high in ((report.ttft_p50_ms, report.ttft_p99_ms), (report.itl_p50_ms, report.itl_p99_ms)):
        assert low is not None and 0 < low <= high
    assert report.rss_mb_before > 50 and report.rss_mb_after > 50
    # The server counted the same requests (summed over adapters). It records a stream just after
    # sending `[DONE]`, so the last few may not be counted yet when the client reads /metrics.
    answered = report.server_metrics_delta['lorafleet_requests_total{endpoint="chat.completions",status="200"}']
    assert report.completed - 4 <= answered <= report.completed
    assert report.check["checked"] == 2 and report.check["identical"] == 2, report.check
    data = report.to_dict()
    for key in ("tokens_per_s", "requests_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
                "errors", "rejected_429", "concurrency", "n_adapters", "duration_s", "rss_mb_before",
                "rss_mb_after"):
        assert key in data
    assert data["concurrency"] == 4 and data["n_adapters"] == 3


def test_a_full_queue_answers_429_which_is_retried_not_an_error(fleet, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "LORAFLEET_SERVE_MAX_QUEUE": "1", "LORAFLEET_SERVE_MAX_NUM_SEQS": "1"}
    with start_server(fleet.settings, env=env, log_file=tmp_path / "queue.log") as handle:
        spec = LoadSpec(url=handle.url, models=("alpha", "bench-000"), prompts=PROMPTS,
                        options=LoadOptions(concurrency=6, duration_s=3, max_tokens=24, backoff_s=0.02))
        report = measure_serving(spec)
    assert report.rejected_429 > 0
    assert report.errors == 0, report.error_samples
    assert report.completed > 0
    assert report.rss_mb_before is None, "no pid given: no RSS"


def test_cli_against_a_running_server(server, fleet, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_HOME", str(fleet.settings.home))  # prompts are prepared there
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out.json"
    result = CliRunner().invoke(app, ["bench", "serving", "--url", server.url, "--adapters", "2", "--concurrency",
                                      "2", "--duration", "1", "--max-tokens", "4", "--json", str(out),
                                      "--server-pid", str(server.process.pid)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["errors"] == 0 and report["completed"] > 0 and report["n_adapters"] == 2
    assert report["rss_mb_after"] > 0
    assert "tokens/s" in result.output
    # --models names exactly what is requested (any spelling the server accepts), whatever --adapters says.
    result = CliRunner().invoke(app, ["bench", "serving", "--url", server.url, "--models", "alpha@1, alpha",
                                      "--concurrency", "2", "--duration", "1", "--max-tokens", "4", "--json",
                                      str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["n_adapters"] == 2 and set(report["per_adapter_requests"]) <= {"alpha@1", "alpha"}
    assert sum(report["per_adapter_requests"].values()) == report["completed"] > 0 and report["errors"] == 0


def test_cli_refuses_bad_options_before_any_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    for args, problem in ((["--concurrency", "0"], "concurrency"), (["--serve-env", "NOEQUALS"], "NOEQUALS"),
                          (["--zipf", "-1"], "zipf")):
        result = CliRunner().invoke(app, ["bench", "serving", "--json", str(tmp_path / "x.json"), *args])
        assert result.exit_code == 2 and problem in result.output, result.output
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "home").exists()


def test_env_pairs():
    assert parse_env_pairs(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(ValueError, match="=oops"):
        parse_env_pairs(["=oops"])


def test_zipf_sampling_follows_the_weights_and_is_seeded():
    weights = zipf_weights(4, 1.0)
    assert weights == pytest.approx([12 / 25, 6 / 25, 4 / 25, 3 / 25])
    assert zipf_weights(3, 0.0) == pytest.approx([1 / 3] * 3)
    sampler = ZipfSampler(4, 1.0, random.Random(7))
    counts = Counter(sampler.sample() for _ in range(20000))
    assert set(counts) == {0, 1, 2, 3}
    for rank, weight in enumerate(weights):
        assert counts[rank] / 20000 == pytest.approx(weight, abs=0.015)
    assert counts[0] > counts[1] > counts[2] > counts[3]
    def draws(seed: int) -> list[int]:
        seeded = ZipfSampler(4, 1.0, random.Random(seed))
        return [seeded.sample() for _ in range(50)]

    assert draws(7) == draws(7) != draws(8)
    with pytest.raises(ValueError, match="zipf"):
        zipf_weights(3, -0.5)


def test_percentiles_and_metrics_parsing():
    assert percentile_ms([0.001, 0.002, 0.003, 0.004], 50) == pytest.approx(2.5)
    assert percentile_ms([0.010], 99) == pytest.approx(10.0)
    assert percentile_ms([], 50) is None
    page = """\
# HELP lorafleet_requests_total requests
# TYPE lorafleet_requests_total counter
lorafleet_requests_total{endpoint="chat.completions",model="a",status="200"} 3.0
lorafleet_requests_total{endpoint="chat.completions",model="b",status="200"} 4.0
# TYPE lorafleet_prompt_tokens_total counter
lorafleet_prompt_tokens_total{adapter="a-v1"} 10.0
lorafleet_prompt_tokens_total{adapter="b-v1"} 5.0
# TYPE lorafleet_adapter_cache_evictions_total counter
lorafleet_adapter_cache_evictions_total 5.0
# TYPE lorafleet_batch_size histogram
lorafleet_batch_size_bucket{le="1.0"} 2.0
lorafleet_batch_size_count 2.0
# TYPE bentoml_other counter
bentoml_other_total 9.0
"""
    assert parse_metrics(page) == {
        'lorafleet_requests_total{endpoint="chat.completions",status="200"}': 7.0,
        "lorafleet_prompt_tokens_total": 15.0,
        "lorafleet_adapter_cache_evictions_total": 5.0,
        "lorafleet_batch_size_count": 2.0,
    }
    assert parse_metrics("this is { not prometheus") == {}


def test_options_and_spec_are_validated():
    with pytest.raises(ValueError, match="duration_s"):
        LoadOptions(duration_s=0)
    with pytest.raises(ValueError, match="models"):
        LoadSpec(url="http://x", models=(), prompts=PROMPTS)
    with pytest.raises(ValueError, match="url"):
        LoadSpec(url="localhost:3000", models=("a",), prompts=PROMPTS)
