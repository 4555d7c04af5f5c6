"""The OpenAI-compatible HTTP API (FastAPI): chat and text completions, model listing, errors.

Every error is OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`, with a real status:
unknown model 404, invalid parameters, unsupported fields or malformed JSON 400, a body over
`max_request_bytes` 413, a full queue 429, a failed generation 500. Nothing a client sends can stop
the server, and an unexpected error answers a generic message with a request id (the details go to
the log), never exception text that could echo the request.

Tokenisation and chat templating are CPU work proportional to the prompt: they run on a small thread
pool, never on the event loop, so a long prompt delays only its own request.

Chat prompts: when a request for an adapter carries no system message, the adapter's own system
prompt (from its manifest's `TaskInfo`) is prepended, so the adapter sees prompts shaped like its
training data. Send a system message to override it. The prompt template and few-shot examples of
the task are NOT applied: the client sends the user turn as it wants the model to see it.

The app is created without a backend; the service sets `app.state.backend` once the model is loaded
(until then requests get 503).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lorafleet.models.grammar import CompiledGrammar, InvalidGrammar
from lorafleet.models.prompting import encode_prompt
from lorafleet.serving.api.auth import caller_of, install_access_control
from lorafleet.serving.api.body_limit import BodyLimit
from lorafleet.serving.api.completions import (
    Job,
    Outcome,
    cancel_on_disconnect,
    complete,
    start,
    stream_events,
)
from lorafleet.serving.api.openai_schema import (
    UNSUPPORTED_ERROR,
    ChatCompletionRequest,
    CompletionRequest,
    Feedback,
    MergedAdapters,
)
from lorafleet.serving.backend import ServingBackend
from lorafleet.serving.catalogue.adapters import AdapterIncompatible, ServedModel, VersionNotAllowed
from lorafleet.serving.catalogue.model_names import ModelNotFound
from lorafleet.serving.experiments import Assignment, ExperimentError
from lorafleet.serving.generation.interface import (
    GenerationFailed,
    GeneratorBusy,
    RequestRejected,
    SamplingParams,
)
from lorafleet.serving.settings import ServiceSettings, env_name

log = logging.getLogger(__name__)

# Threads that tokenise prompts. Fast tokenizers release the GIL, so a few threads keep one huge prompt
# from delaying the others; more would only contend for the cores the engine steps on.
PREPARE_WORKERS = 4


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")


def error_body(
    message: str, *, type: str = "server_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(
        error_body(error.message, type=error.type, param=error.param, code=error.code),
        status_code=error.status,
    )


def create_app(backend: ServingBackend | None = None) -> FastAPI:
    app = FastAPI(title="lorafleet", summary="OpenAI-compatible API over a base model and its LoRA adapters")
    app.state.backend = backend
    app.state.prepare_pool = ThreadPoolExecutor(PREPARE_WORKERS, thread_name_prefix="lorafleet-prepare")
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=functools.partial(max_request_bytes, app))
    install_access_control(app)  # added last, so it runs first: Host, admin switch and keys before anything
    from lorafleet.serving.api.admin_api import router as admin_router  # here: admin_api imports this module

    app.include_router(admin_router)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        models = require_backend(request).catalogue.models()
        return {"object": "list", "data": [_model_card(model) for model in models]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _run(request, "chat", body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _run(request, "text", body)

    @app.post("/v1/feedback")
    async def feedback(body: Feedback, request: Request) -> dict[str, Any]:
        """An online score for a response served in an A/B experiment (its `id`), counted in its arm."""
        backend = require_backend(request)
        try:
            assignment = backend.experiments.feedback(body.id, body.score)
        except ExperimentError as error:
            raise ApiError(error.status, str(error), param="id" if error.status != 400 else "score",
                           code="feedback_rejected") from None
        if backend.metrics is not None:
            backend.metrics.observe_feedback(experiment=assignment.experiment, arm=assignment.arm, score=body.score)
        return {"object": "feedback", "id": body.id, "experiment": assignment.experiment, "arm": assignment.arm}

    return app


def max_request_bytes(app: FastAPI) -> int:
    """The body limit: the service's setting once it runs, its default while it starts."""
    backend = app.state.backend
    if backend is None:
        return ServiceSettings.model_fields["max_request_bytes"].default
    return backend.settings.max_request_bytes


def require_backend(request: Request) -> ServingBackend:
    """The request's backend, or the 503 every endpoint answers while the service starts."""
    backend = request.app.state.backend
    if backend is None:
        raise ApiError(503, "the service is still starting", code="not_ready")
    return backend


def _model_card(model: ServedModel) -> dict[str, Any]:
    return {
        "id": model.id,
        "object": "model",
        "created": model.created,
        "owned_by": "lorafleet",
        "root": model.parent or model.id,
        "parent": model.parent,
    }


async def _run(request: Request, kind: str, body: ChatCompletionRequest | CompletionRequest):
    backend = require_backend(request)
    started = time.monotonic()
    outcome = Outcome()
    label = "unknown"
    endpoint = "chat.completions" if kind == "chat" else "completions"
    try:
        admin = caller_of(request.scope).admin
        served = await _resolve(backend, body.model, any_version=admin)
        assignment = None
        if body.merged_adapters is not None:
            served = await _resolve_merge(backend, body.merged_adapters, served, any_version=admin)
        elif served.name is not None and body.model == served.name:  # the bare NAME: an experiment may route it
            served, assignment = await _experiment_arm(backend, served, body.user)
        label = served.name or served.id
        pool = request.app.state.prepare_pool
        job = await asyncio.get_running_loop().run_in_executor(
            pool, functools.partial(_prepare, backend, kind, body, served)
        )
        job.assignment = assignment
        try:
            stream = start(backend, job)
        except GeneratorBusy as error:
            raise ApiError(  # OpenAI's rate-limit shape: clients back off and retry
                429, f"the server is busy, retry later: {error}", code="server_busy", type="server_overloaded"
            ) from None
        except RequestRejected as error:
            raise _rejected(error, body) from None
        if body.stream:
            return StreamingResponse(
                _observed_stream(request, backend, job, stream, outcome, started),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", **job.headers()},
            )
        watcher = asyncio.create_task(cancel_on_disconnect(request, stream, outcome))
        try:
            result = await complete(backend, job, stream, outcome)
        except GenerationFailed as error:
            _observe_arm(backend, job, 500, outcome.completion_tokens, started)
            raise ApiError(500, str(error), code="generation_failed") from None
        finally:
            watcher.cancel()
        _observe(backend, label, endpoint, outcome.status, outcome.completion_tokens, started)
        _observe_arm(backend, job, outcome.status, outcome.completion_tokens, started)
        return JSONResponse(result, headers=job.headers())
    except ApiError as error:
        _observe(backend, label, endpoint, error.status, outcome.completion_tokens, started)
        raise


async def _observed_stream(
    request: Request, backend: ServingBackend, job: Job, stream, outcome: Outcome, started: float
):
    watcher = asyncio.create_task(cancel_on_disconnect(request, stream, outcome))
    try:
        async for event in stream_events(
            backend, job, stream, outcome, lambda message: error_body(message, code="generation_failed")
        ):
            yield event
    finally:
        watcher.cancel()
        _observe(backend, job.metrics_model, job.endpoint, outcome.status, outcome.completion_tokens, started)
        _observe_arm(backend, job, outcome.status, outcome.completion_tokens, started)


def _observe(
    backend: ServingBackend, model: str, endpoint: str, status: int, tokens: int, started: float
) -> None:
    if backend.metrics is not None:
        backend.metrics.observe(
            model=model, endpoint=endpoint, status=status, tokens=tokens, seconds=time.monotonic() - started
        )


async def _resolve(backend: ServingBackend, model: str, *, any_version: bool, param: str = "model") -> ServedModel:
    try:
        # Blocking: may download from the registry and wait for the generator to load the adapter.
        return await asyncio.to_thread(backend.catalogue.resolve, model, any_version=any_version)
    except VersionNotAllowed as error:
        raise ApiError(403, f"{error}: send an admin key (`Authorization: Bearer <key>`, "
                       f"{env_name('admin_api_keys')})", param=param, code="admin_key_required") from None
    except ModelNotFound as error:
        raise ApiError(404, str(error), param=param, code="model_not_found") from None
    except AdapterIncompatible as error:
        raise ApiError(400, str(error), param=param, code="model_incompatible") from None


def _observe_arm(backend: ServingBackend, job: Job, status: int, tokens: int, started: float) -> None:
    """Count a request of an A/B experiment in its arm (statistics for the gate, Prometheus per arm)."""
    if job.assignment is None:
        return
    seconds = time.monotonic() - started
    backend.experiments.record(job.assignment, response_id=job.id, version=job.served.version, status=status,
                               tokens=tokens, seconds=seconds)
    if backend.metrics is not None:
        backend.metrics.observe_arm(experiment=job.assignment.experiment, arm=job.assignment.arm,
                                    version=job.served.version, status=status, tokens=tokens, seconds=seconds,
                                    adapter=job.served.adapter)


async def _experiment_arm(backend: ServingBackend, champion: ServedModel,
                          user: str | None) -> tuple[ServedModel, Assignment | None]:
    """The arm of a running experiment for this request, resolved to its version; no experiment: unchanged.

    A challenger that cannot be served any more (its alias removed since the experiment started) sends the
    request to the champion, counted there: the experiment must not fail requests."""
    assignment = backend.experiments.assign(champion.name or "", user)
    if assignment is None or assignment.arm == "champion":
        return champion, assignment
    try:
        return await _resolve(backend, f"{champion.name}@challenger", any_version=False), assignment
    except ApiError as error:
        log.warning("experiment %s: the challenger cannot be served (%s); answering with the champion",
                    champion.name, error.message)
        return champion, replace(assignment, arm="champion")


MERGED_LABEL = "merged"  # metrics label of every per-request merge: recipes are client-chosen, labels bounded


async def _resolve_merge(backend: ServingBackend, merge: MergedAdapters, base: ServedModel, *,
                         any_version: bool) -> ServedModel:
    """A per-request merge as the model a request runs on; each id is resolved like a `model` string."""
    if base.adapter is not None:
        raise ApiError(400, "with merged_adapters, `model` must name the base model (the merge brings the "
                       "adapters)", param="model")
    parents = []
    for index, model in enumerate(merge.ids):
        param = f"merged_adapters.ids.{index}"
        served = await _resolve(backend, model, any_version=any_version, param=param)
        if served.adapter is None:
            raise ApiError(400, f"{param} names the base model: there is nothing of it to merge", param=param)
        parents.append(served)
    try:
        adapter = await asyncio.to_thread(backend.generator.load_merge, [p.adapter for p in parents],
                                          merge.recipe())
    except RequestRejected as error:
        raise ApiError(400, f"merged_adapters: {error}", param="merged_adapters", code="invalid_value") from None
    return replace(base, adapter=adapter, name=MERGED_LABEL, system_prompt=parents[0].system_prompt)


def _rejected(error: RequestRejected, body: ChatCompletionRequest | CompletionRequest) -> ApiError:
    """The generator refused what the API let through (400), named as this request named it."""
    param = error.param
    if isinstance(body, ChatCompletionRequest):
        if param == "prompt":
            param = "messages"
        elif param == "max_tokens" and body.max_completion_tokens is not None:
            param = "max_completion_tokens"
    return ApiError(400, str(error), param=param, code="invalid_value")


def _prepare(
    backend: ServingBackend, kind: str, body: ChatCompletionRequest | CompletionRequest, served: ServedModel
) -> Job:
    """The request as token ids and sampling parameters. CPU-bound (chat template, tokenizer): runs on
    the prepare pool, never on the event loop."""
    if isinstance(body, ChatCompletionRequest):
        prompt_ids, prompt_param = _chat_prompt(backend, body, served), "messages"
    else:
        prompt_ids, prompt_param = _text_prompt(backend, body), "prompt"
    return Job(
        kind=kind,
        model=body.model,
        served=served,
        prompt_ids=prompt_ids,
        params=_sampling(backend, body, len(prompt_ids), prompt_param),
        stop=body.stop_strings(),
        include_usage=body.include_usage_chunk(),
        return_token_ids=body.return_token_ids,
        grammar=_grammar(backend, body),
    )


def _grammar(backend: ServingBackend, body: ChatCompletionRequest | CompletionRequest) -> CompiledGrammar | None:
    """The request's response_format compiled (cached per schema); a 400 naming the field when it cannot be."""
    response_format = body.constrained_format()
    if response_format is None:
        return None
    try:
        return backend.grammar_compiler().compile(response_format)
    except InvalidGrammar as error:
        raise ApiError(400, str(error), param="response_format", code="invalid_response_format") from None


def _chat_prompt(backend: ServingBackend, body: ChatCompletionRequest, served: ServedModel) -> list[int]:
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages
    ]
    if served.system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": served.system_prompt})
    try:
        return encode_prompt(backend.tokenizer, messages)
    except Exception as error:  # noqa: BLE001 - chat templates raise jinja errors for shapes they reject
        raise ApiError(
            400, f"messages could not be formatted with the model's chat template: {error}", param="messages"
        ) from None


def _text_prompt(backend: ServingBackend, body: CompletionRequest) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        vocab = len(backend.tokenizer)
        bad = [token for token in prompt if not 0 <= token < vocab]
        if bad:
            raise ApiError(400, f"prompt token ids must be in [0, {vocab}), got {bad[:5]}", param="prompt")
        return list(prompt)
    text = prompt[0] if isinstance(prompt, list) else prompt
    return [int(token) for token in backend.tokenizer(text)["input_ids"]]


def _sampling(
    backend: ServingBackend,
    body: ChatCompletionRequest | CompletionRequest,
    prompt_tokens: int,
    prompt_param: str,
) -> SamplingParams:
    settings, context = backend.settings, backend.context_length
    room = context - prompt_tokens
    if room < 1:
        raise ApiError(
            400,
            f"this model's maximum context length is {context} tokens, but the prompt "
            f"({prompt_param}) is {prompt_tokens} tokens long: no room is left for the completion",
            param=prompt_param,
            code="context_length_exceeded",
        )
    requested = body.requested_max_tokens()
    param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
    if requested is None:
        max_tokens = min(settings.default_max_tokens, room)
    elif requested > settings.max_tokens_limit:
        raise ApiError(
            400,
            f"{param} is {requested}, but this server allows at most {settings.max_tokens_limit}",
            param=param,
        )
    elif requested > room:
        raise ApiError(
            400,
            f"this model's maximum context length is {context} tokens, but {prompt_tokens} "
            f"prompt tokens + {param}={requested} exceed it",
            param=param,
            code="context_length_exceeded",
        )
    else:
        max_tokens = requested
    try:  # the schema already holds every field to the shared bounds: this is a backstop
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop_token_ids=backend.eos_token_ids,
        )
    except RequestRejected as error:
        raise _rejected(error, body) from None


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return _error_response(_describe_validation(error))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, error: HTTPException) -> JSONResponse:
        return _error_response(
            ApiError(
                error.status_code, str(error.detail), code="not_found" if error.status_code == 404 else None
            )
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        # The exception's text may quote the request (or a file it named): it goes to the log only.
        request_id = f"err-{uuid.uuid4().hex[:16]}"
        log.error("unhandled error %s in %s %s", request_id, request.method, request.url.path, exc_info=error)
        response = _error_response(
            ApiError(500, f"internal error (request id {request_id}); the details are in the server log",
                     code="internal_error")
        )
        response.headers["x-request-id"] = request_id
        return response


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none"})
_TYPE_TAG_PREFIXES = ("list[", "dict[", "function-", "literal[")


def _describe_validation(error: RequestValidationError) -> ApiError:
    """The first problem, with `param` as OpenAI names it (`temperature`, `messages.0.role`)."""
    problems = error.errors()
    if not problems:
        return ApiError(400, "invalid request")
    first = problems[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        where = [part for part in first.get("loc", ()) if isinstance(part, int)]
        at = f" at character {where[0]}" if where else ""
        return ApiError(
            400, f"the request body is not valid JSON{at}: {detail}".rstrip(": "), code="invalid_json"
        )
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # Union types add the member type to the location (`prompt.str`, `content.list[TextPart]`): drop those.
    loc = [part for part in loc if part not in _TYPE_TAGS and not part.startswith(_TYPE_TAG_PREFIXES)]
    unsupported = first.get("type") == UNSUPPORTED_ERROR
    if unsupported:  # raised for the whole body (or message): the field is in the error's context
        loc.append(str((first.get("ctx") or {}).get("field", "")))
    param = ".".join(part for part in loc if part) or None
    # `msg` only, never `input`: pydantic's input value would echo the request back.
    message = str(first.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    extra = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    code = UNSUPPORTED_ERROR if unsupported else "invalid_value"
    return ApiError(400, f"{param or 'request body'}: {message}{extra}", param=param, code=code)
