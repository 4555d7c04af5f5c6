"""Hostile traffic for `bench serving --hostile`: what a careless or malicious tenant sends, beside the load.

The promise under test is the tenancy contract (DESIGN.md): nothing one request or one adapter does may
change another request's answer, fail it or stall it. So while the closed-loop clients of
`serving_bench` measure, one more client cycles through attacks that each broke the server once (issue
13): a seed outside 64 bits with sampling, fields the server does not honour, junk and path-like model
names, an oversized body, malformed JSON, out-of-range token ids, and admin loads of a NaN adapter and of
Turbo heads shaped for another model. Each attack has the statuses it may get; a 5xx, a transport error or
any other status is a failure of the server, counted in `server_errors`. The well-behaved clients must
see 0 errors and, with `--check`, identical greedy answers.

Plain asyncio + httpx, like serving_bench: nothing here knows how the server was started.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
OVERSIZED_BODY_BYTES = 8 * 2**20  # well above any sane request-body limit
PAUSE_S = 0.05  # between attacks: the hostile client probes isolation, it is not a capacity test
SAMPLES = 5


@dataclass(frozen=True)
class HostileSpec:
    """Whom to attack and with what. Admin attacks run only when the adapter folders are given (they
    must lie under the server's adapter roots, so only a bench that started the server knows them)."""

    models: tuple[str, ...]  # served models the bad-parameter requests name
    nan_adapter: Path | None = None  # a LoRA folder with non-finite weights
    bad_heads_adapter: Path | None = None  # Turbo heads sized for another base model
    headers: dict[str, str] = field(default_factory=dict)  # e.g. an admin bearer key
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("models: at least one served model to aim bad parameters at")


@dataclass
class HostileOutcome:
    """Statuses per attack; `server_errors` counts answers outside an attack's allowed statuses."""

    sent: int = 0
    by_attack: dict[str, Counter[int]] = field(default_factory=dict)
    server_errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def record(self, attack: str, status: int, allowed: frozenset[int], detail: str) -> None:
        self.sent += 1
        self.by_attack.setdefault(attack, Counter())[status] += 1
        if status not in allowed:
            self.server_errors += 1
            if len(self.error_samples) < SAMPLES:
                self.error_samples.append(f"{attack}: HTTP {status}: {detail[:200]}")

    def to_dict(self) -> dict[str, Any]:
        return {"sent": self.sent, "server_errors": self.server_errors, "error_samples": self.error_samples,
                "by_attack": {name: {str(status): count for status, count in sorted(counts.items())}
                              for name, counts in sorted(self.by_attack.items())}}


Attack = Callable[[httpx.AsyncClient, str, int], Awaitable[httpx.Response]]
TRANSPORT_ERROR = 0  # the status recorded when no HTTP answer came back


def _chat(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, **fields}


def _post(path: str, body: Any) -> Attack:
    async def attack(client: httpx.AsyncClient, model: str, n: int) -> httpx.Response:
        payload = body(model, n) if callable(body) else body
        if isinstance(payload, bytes):
            return await client.post(path, content=payload, headers={"Content-Type": "application/json"})
        return await client.post(path, json=payload)

    return attack


async def _oversized(client: httpx.AsyncClient, model: str, n: int) -> httpx.Response:
    body = json.dumps(_chat(model, messages=[{"role": "user", "content": "x" * OVERSIZED_BODY_BYTES}]))
    return await client.post(CHAT_PATH, content=body.encode(), headers={"Content-Type": "application/json"})


async def _seed_overflow_stream(client: httpx.AsyncClient, model: str, n: int) -> httpx.Response:
    async with client.stream("POST", CHAT_PATH, json=_chat(model, seed=2**64, temperature=1.0,
                                                           stream=True)) as response:
        await response.aread()
        return response


async def _hang_up_mid_stream(client: httpx.AsyncClient, model: str, n: int) -> httpx.Response:
    """A client that goes away after the first chunk: its request must be dropped, nobody else's."""
    async with client.stream("POST", CHAT_PATH, json=_chat(model, max_tokens=32, stream=True)) as response:
        async for _ in response.aiter_lines():
            break
        return response


BAD_REQUEST = frozenset({400, 422})
NOT_FOUND_OR_BAD = frozenset({400, 404})

# name -> (attack, allowed statuses). Unsupported fields may become 200 once implemented (issue 16).
ATTACKS: dict[str, tuple[Attack, frozenset[int]]] = {
    "seed_overflow_sampling": (_post(CHAT_PATH, lambda m, n: _chat(m, seed=2**64 + n, temperature=1.0)),
                               BAD_REQUEST),
    "seed_overflow_stream": (_seed_overflow_stream, BAD_REQUEST),
    "seed_negative_overflow": (_post(CHAT_PATH, lambda m, n: _chat(m, seed=-(2**63) - 1 - n, temperature=1.0)),
                               BAD_REQUEST),
    "max_tokens_huge": (_post(CHAT_PATH, lambda m, n: _chat(m, max_tokens=10**30)), BAD_REQUEST),
    "temperature_nan": (_post(CHAT_PATH, lambda m, n: json.dumps(_chat(m, temperature=float("nan"))).encode()),
                        BAD_REQUEST),
    "tools_required": (_post(CHAT_PATH, lambda m, n: _chat(m, tool_choice="required", tools=[
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])), BAD_REQUEST),
    "logit_bias": (_post(CHAT_PATH, lambda m, n: _chat(m, logit_bias={"1": 100})), BAD_REQUEST),
    "best_of": (_post(COMPLETIONS_PATH, lambda m, n: {"model": m, "prompt": "Hi", "max_tokens": 4, "best_of": 3}),
                BAD_REQUEST),
    "token_id_out_of_range": (_post(COMPLETIONS_PATH, lambda m, n: {"model": m, "prompt": [1, 10**12 + n],
                                                                    "max_tokens": 4}), BAD_REQUEST),
    "junk_model": (_post(CHAT_PATH, lambda m, n: _chat(f"junk{n}@{n % 7 + 1}")), NOT_FOUND_OR_BAD),
    "dot_dot_model": (_post(CHAT_PATH, lambda m, n: _chat("..@1")), NOT_FOUND_OR_BAD),
    "long_model_name": (_post(CHAT_PATH, lambda m, n: _chat("a" * 5000 + "@1")), NOT_FOUND_OR_BAD),
    "nul_in_model": (_post(CHAT_PATH, lambda m, n: _chat(f"{m}\x00@1")), NOT_FOUND_OR_BAD),
    "malformed_json": (_post(CHAT_PATH, b'{"model": "x", "messages": ['), BAD_REQUEST),
    "oversized_body": (_oversized, frozenset({413})),
    "hang_up_mid_stream": (_hang_up_mid_stream, frozenset({200})),
}


def _admin_attacks(spec: HostileSpec) -> dict[str, tuple[Attack, frozenset[int]]]:
    attacks: dict[str, tuple[Attack, frozenset[int]]] = {
        "admin_nul_path": (_post("/admin/adapters/load", {"name": "hostile-nul", "path": "/tmp/\x00x"}),
                           BAD_REQUEST),
    }
    for label, folder in (("nan_adapter", spec.nan_adapter), ("bad_heads_adapter", spec.bad_heads_adapter)):
        if folder is None:
            continue
        name = f"hostile-{label.replace('_', '-')}"
        attacks[f"admin_load_{label}"] = (_post("/admin/adapters/load", {"name": name, "path": str(folder)}),
                                          BAD_REQUEST)
        # Never loaded, so never served: 404. (A 200 would mean the bad adapter became resident.)
        attacks[f"admin_unload_{label}"] = (_post("/admin/adapters/unload", {"model": name}), frozenset({404}))
        attacks[f"request_{label}"] = (_post(CHAT_PATH, lambda m, n, name=name: _chat(name)), frozenset({404}))
    return attacks


async def run_hostile(spec: HostileSpec, client: httpx.AsyncClient, *, deadline: float,
                      outcome: HostileOutcome | None = None) -> HostileOutcome:
    """Cycle through every attack (shuffled per round) until `deadline` (time.perf_counter)."""
    outcome = outcome or HostileOutcome()
    attacks = {**ATTACKS, **_admin_attacks(spec)}
    rng = random.Random(spec.seed)
    names = sorted(attacks)
    for n in itertools.count():
        if n % len(names) == 0:
            rng.shuffle(names)
        if time.perf_counter() >= deadline:
            break
        name = names[n % len(names)]
        attack, allowed = attacks[name]
        model = spec.models[n % len(spec.models)]
        try:
            response = await attack(client, model, n)
            status, detail = response.status_code, _detail(response)
        except httpx.HTTPError as error:
            status, detail = TRANSPORT_ERROR, f"{type(error).__name__}: {error}"
        outcome.record(name, status, allowed, detail)
        await asyncio.sleep(PAUSE_S)
    return outcome


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (json.JSONDecodeError, KeyError, TypeError, httpx.ResponseNotRead, UnicodeDecodeError):
        return ""
