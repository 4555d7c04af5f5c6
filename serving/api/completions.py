"""Run one prepared completion job and shape its output as OpenAI JSON or SSE chunks.

A `Job` is a validated request reduced to tokens and sampling parameters. Both endpoints
(`/v1/chat/completions`, `/v1/completions`) share this code; only the JSON shapes differ.
Streaming sends `data: {chunk}\\n\\n` events and ends with `data: [DONE]`, which the official
`openai` client parses; a failure after the stream started is sent as a `data: {"error": ...}` event.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from lorafleet.models.grammar import CompiledGrammar
from lorafleet.serving.api.text_stream import TextAssembler
from lorafleet.serving.backend import ServingBackend
from lorafleet.serving.catalogue.adapters import ServedModel
from lorafleet.serving.experiments import Assignment
from lorafleet.serving.generation.interface import (
    GenerationFailed,
    GenerationRequest,
    SamplingParams,
    TokenStream,
)

Kind = Literal["chat", "text"]
SERVED_BY_HEADER = "x-lorafleet-served-by"
ARM_HEADER = "x-lorafleet-experiment-arm"
CLIENT_GONE = 499  # nginx's status for "the client closed the connection", used in metrics only


@dataclass
class Job:
    kind: Kind
    model: str  # echoed back as the request named it
    served: ServedModel
    prompt_ids: list[int]
    params: SamplingParams
    stop: list[str] = field(default_factory=list)
    include_usage: bool = False
    return_token_ids: bool = False
    assignment: Assignment | None = None  # the A/B arm this request went to (serving/experiments.py)
    grammar: CompiledGrammar | None = None  # response_format to enforce (models/grammar.py)
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
        self.id = self.id or f"{prefix}-{uuid.uuid4().hex}"
        self.created = self.created or int(time.time())

    @property
    def endpoint(self) -> str:
        return "chat.completions" if self.kind == "chat" else "completions"

    @property
    def metrics_model(self) -> str:
        return self.served.name or self.served.id

    @property
    def served_by(self) -> str:
        """Which weights answered: `NAME@VERSION` for a registry version, else the served id (base model,
        local folder) or `merged`."""
        served = self.served
        return f"{served.name}@{served.version}" if served.name and served.version is not None \
            else served.name or served.id

    @property
    def system_fingerprint(self) -> str:
        """OpenAI's field for "which backend configuration answered": here, which adapter version."""
        return f"lorafleet:{self.served_by}"

    def headers(self) -> dict[str, str]:
        """Response headers naming the version (and the A/B arm) that served this request."""
        headers = {SERVED_BY_HEADER: self.served_by}
        if self.assignment is not None:
            headers[ARM_HEADER] = self.assignment.arm
        return headers


@dataclass
class Outcome:
    """What happened, for usage and metrics (filled in as the job runs)."""

    completion_tokens: int = 0
    finish_reason: str | None = None
    status: int = 200


def start(backend: ServingBackend, job: Job) -> TokenStream:
    request = GenerationRequest(
        prompt_ids=tuple(job.prompt_ids), params=job.params, adapter=job.served.adapter, grammar=job.grammar
    )
    return backend.generator.submit(request)


async def _text_deltas(stream: TokenStream, assembler: TextAssembler, outcome: Outcome) -> AsyncIterator[str]:
    async for token in stream:
        delta = assembler.push(token)
        outcome.completion_tokens = len(assembler.token_ids)
        if delta:
            yield delta
        if assembler.stopped:  # a stop string matched: the rest is not wanted
            stream.cancel()
            break
    tail = assembler.finish()
    if tail:
        yield tail
    outcome.finish_reason = "stop" if assembler.stopped or stream.finish_reason == "stop" else "length"


def _usage(job: Job, outcome: Outcome) -> dict[str, int]:
    prompt = len(job.prompt_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": prompt + outcome.completion_tokens,
    }


async def complete(
    backend: ServingBackend, job: Job, stream: TokenStream, outcome: Outcome
) -> dict[str, Any]:
    """Collect the whole answer (non-streaming response body)."""
    assembler = TextAssembler(backend.tokenizer, job.stop)
    try:
        text = "".join([delta async for delta in _text_deltas(stream, assembler, outcome)])
    finally:
        stream.cancel()  # no-op when finished; frees the row if this task was cancelled
    if job.kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": outcome.finish_reason,
        }
        body: dict[str, Any] = {
            "id": job.id,
            "object": "chat.completion",
            "created": job.created,
            "model": job.model,
            "system_fingerprint": job.system_fingerprint,
            "choices": [choice],
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": outcome.finish_reason}
        body = {
            "id": job.id,
            "object": "text_completion",
            "created": job.created,
            "model": job.model,
            "system_fingerprint": job.system_fingerprint,
            "choices": [choice],
        }
    if job.return_token_ids:
        body["prompt_token_ids"] = list(job.prompt_ids)
        choice["token_ids"] = list(assembler.token_ids)
    body["usage"] = _usage(job, outcome)
    return body


def _chunk(job: Job, delta: str | None, finish_reason: str | None, *, first: bool = False) -> dict[str, Any]:
    if job.kind == "chat":
        content: dict[str, Any] = {}
        if first:
            content["role"] = "assistant"
        if delta is not None:
            content["content"] = delta
        choice: dict[str, Any] = {
            "index": 0,
            "delta": content,
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": job.id, "object": obj, "created": job.created, "model": job.model,
            "system_fingerprint": job.system_fingerprint, "choices": [choice]}


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def stream_events(
    backend: ServingBackend, job: Job, stream: TokenStream, outcome: Outcome, error_body
) -> AsyncIterator[str]:
    """SSE events for a streaming response; `error_body(message)` shapes a mid-stream failure."""
    assembler = TextAssembler(backend.tokenizer, job.stop)
    try:
        if job.kind == "chat":
            yield sse(_chunk(job, "", None, first=True))
        try:
            async for delta in _text_deltas(stream, assembler, outcome):
                yield sse(_chunk(job, delta, None))
        except GenerationFailed as error:
            outcome.status = 500
            yield sse(error_body(str(error)))
            yield sse("[DONE]")
            return
        if stream.cancelled and not assembler.stopped:  # the client disconnected: nobody to tell
            outcome.status = CLIENT_GONE
            return
        yield sse(_chunk(job, None if job.kind == "chat" else "", outcome.finish_reason))
        if job.include_usage:
            yield sse(
                {
                    "id": job.id,
                    "object": _chunk(job, None, None)["object"],
                    "created": job.created,
                    "model": job.model,
                    "system_fingerprint": job.system_fingerprint,
                    "choices": [],
                    "usage": _usage(job, outcome),
                }
            )
        yield sse("[DONE]")
    except (asyncio.CancelledError, GeneratorExit):
        outcome.status = CLIENT_GONE
        raise
    finally:
        stream.cancel()


async def cancel_on_disconnect(
    request: Any, stream: TokenStream, outcome: Outcome, poll_s: float = 0.25
) -> None:
    """Drop a request's row as soon as its client disconnects (run as a side task).

    Starlette notices a gone client of a streaming response only when the next write fails, which
    can be long after the fact; this polls instead, for streaming and non-streaming requests alike.
    """
    while stream.finish_reason is None and not stream.cancelled:
        if await request.is_disconnected():
            outcome.status = CLIENT_GONE
            stream.cancel()
            return
        await asyncio.sleep(poll_s)
