"""Request bodies of the OpenAI-compatible API, validated by pydantic with field-named errors.

Three kinds of field:

- **Honoured** fields are modelled below and checked against what the engine can represent: integers
  are strict (no `true`, `1.5` or `"5"`), floats are finite, `seed` fits the 64-bit range a torch
  generator accepts. Limits that depend on the server (`max_tokens` against the context and
  `max_tokens_limit`, token ids against the vocabulary) are checked by the API, which knows them.
- **Refused** fields are features lorafleet does not implement (tools, vLLM's guided_* fields, logprobs,
  penalties, `n > 1`, ...). `UNSUPPORTED` lists them, each with its reason: a request that sets one to
  a value that changes the answer is refused with HTTP 400 naming it (`code: unsupported_parameter`),
  never answered as if it had not been asked. Values that change nothing (`tools: []`, penalties 0,
  `logit_bias: {}`, `response_format: {"type": "text"}`, `n: 1`) are accepted, because SDKs send them.
- Every **other** field is ignored, as OpenAI's own server does for fields a model does not use:
  metadata (`user`, `metadata`, `store`, `service_tier`...) changes nothing about the answer.

Extensions: `return_token_ids: true` adds `prompt_token_ids` and per-choice `token_ids` to a
non-streaming response, so clients (and tests) can compare exact tokens instead of decoded text;
`merged_adapters` (LoRAX's spelling) serves a merge of several adapters, see `MergedAdapters`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator
from pydantic_core import PydanticCustomError

# The shared sampling bounds: what every decoder can represent (a seed outside the engine's range used to
# fail inside the engine), so the API refuses exactly what a generator would.
from lorafleet.models.merging import MAX_MERGED, MergeMethod, MergeRecipe, SignMethod
from lorafleet.models.sampling_rules import SEED_MAX, SEED_MIN, TEMPERATURE_MAX

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_USER_LENGTH = 1024  # `user` is hashed for A/B stickiness; a bounded id, not a document

Temperature = Annotated[float, Field(ge=0.0, le=TEMPERATURE_MAX, strict=True, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, strict=True, allow_inf_nan=False)]
TokenCount = Annotated[StrictInt, Field(ge=1)]  # upper bounds depend on the server: checked by the API
Seed = Annotated[StrictInt, Field(ge=SEED_MIN, le=SEED_MAX)]
UNSUPPORTED_ERROR = "unsupported_parameter"  # pydantic error type, and the OpenAI error code


# -- fields we do not implement -------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _absent_or(*inert: Any) -> Callable[[Any], bool]:
    """`value` is None or equal to one of `inert`, compared with its type (`true` is not `1`)."""

    def changes_nothing(value: Any) -> bool:
        if value is None:
            return True
        for candidate in inert:
            if _is_number(candidate):
                if _is_number(value) and value == candidate:
                    return True
            elif type(value) is type(candidate) and value == candidate:
                return True
        return False

    return changes_nothing


def _zero_biases(value: Any) -> bool:
    return value is None or (isinstance(value, dict) and all(_is_number(b) and b == 0 for b in value.values()))


@dataclass(frozen=True)
class Unsupported:
    """A request field lorafleet does not implement; `changes_nothing(value)` says when it is harmless."""

    reason: str
    changes_nothing: Callable[[Any], bool]
    accepted: str  # the harmless values, as the error tells the client


_TOOLS = "tool and function calling is not implemented"
_FORMAT = "use response_format (json_object or json_schema) for structured output"
_LOGPROBS = "log-probabilities are not returned"
_PENALTY = "repetition penalties are not implemented"

# OpenAI's fields, then the common vLLM sampling extensions (sent through the SDKs' `extra_body`).
UNSUPPORTED: dict[str, Unsupported] = {
    "n": Unsupported("one choice is generated per request", _absent_or(1), "1"),
    "best_of": Unsupported("one choice is generated per request", _absent_or(1), "1"),
    "logprobs": Unsupported(_LOGPROBS, _absent_or(False, 0), "false or 0"),
    "top_logprobs": Unsupported(_LOGPROBS, _absent_or(0), "0"),
    "echo": Unsupported("the prompt is not echoed back", _absent_or(False), "false"),
    "suffix": Unsupported("insertion (text after the completion) is not implemented", _absent_or(""), '""'),
    "logit_bias": Unsupported("logit biases are not applied", _zero_biases, "{} or all-zero biases"),
    "presence_penalty": Unsupported(_PENALTY, _absent_or(0), "0"),
    "frequency_penalty": Unsupported(_PENALTY, _absent_or(0), "0"),
    "tools": Unsupported(_TOOLS, _absent_or([]), "[]"),
    "tool_choice": Unsupported(_TOOLS, _absent_or("none", "auto"), '"none" or "auto"'),
    "parallel_tool_calls": Unsupported(_TOOLS, _absent_or(True), "true"),
    "functions": Unsupported(_TOOLS, _absent_or([]), "[]"),
    "function_call": Unsupported(_TOOLS, _absent_or("none", "auto"), '"none" or "auto"'),
    "modalities": Unsupported("only text output is generated", _absent_or(["text"]), '["text"]'),
    "audio": Unsupported("only text output is generated", _absent_or(), "null"),
    "prediction": Unsupported("predicted outputs are not implemented", _absent_or(), "null"),
    "reasoning_effort": Unsupported("the models served are not reasoning models", _absent_or(), "null"),
    "web_search_options": Unsupported("web search is not implemented", _absent_or(), "null"),
    "top_k": Unsupported("only top_p truncation is implemented", _absent_or(-1, 0), "-1 or 0"),
    "min_p": Unsupported("only top_p truncation is implemented", _absent_or(0), "0"),
    "repetition_penalty": Unsupported(_PENALTY, _absent_or(1), "1"),
    "min_tokens": Unsupported("a minimum length is not enforced", _absent_or(0), "0"),
    "ignore_eos": Unsupported("generation always stops at end-of-sequence", _absent_or(False), "false"),
    "stop_token_ids": Unsupported("stop token ids are not configurable; use `stop`", _absent_or([]), "[]"),
    "use_beam_search": Unsupported("beam search is not implemented", _absent_or(False), "false"),
    "guided_json": Unsupported(_FORMAT, _absent_or(), "null"),
    "guided_regex": Unsupported(_FORMAT, _absent_or(), "null"),
    "guided_choice": Unsupported(_FORMAT, _absent_or(), "null"),
    "guided_grammar": Unsupported(_FORMAT, _absent_or(), "null"),
}

# Per chat message: tool turns are refused by `role` already; these carry tool calls on other turns.
UNSUPPORTED_IN_MESSAGES: dict[str, Unsupported] = {
    "tool_calls": Unsupported(_TOOLS, _absent_or([]), "[]"),
    "function_call": Unsupported(_TOOLS, _absent_or(), "null"),
}


def refuse_unsupported(data: Any, table: dict[str, Unsupported]) -> Any:
    """Raise for the first field of `table` set to a value that would change the answer.

    The error's `ctx["field"]` names the field; the API appends it to the error's location, since a
    model-level validator cannot place its error on a field the model does not declare."""
    if isinstance(data, dict):
        for name, rule in table.items():
            if name in data and not rule.changes_nothing(data[name]):
                raise PydanticCustomError(
                    UNSUPPORTED_ERROR,
                    "not supported by this server ({reason}); omit it or send {accepted}",
                    {"field": name, "reason": rule.reason, "accepted": rule.accepted},
                )
    return data


# -- the request bodies ---------------------------------------------------------------------------


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # `developer` is OpenAI's newer name for `system`.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_tool_calls(cls, data: Any) -> Any:
        return refuse_unsupported(data, UNSUPPORTED_IN_MESSAGES)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool | None = False


class MergedAdapters(BaseModel):
    """LoRAX's per-request merge (`extra_body={"merged_adapters": {...}}`): served adapters combined by PEFT's
    merge arithmetic (`models/merging.py`) into one cached slot; `model` names the base model."""

    model_config = ConfigDict(extra="forbid")

    ids: list[str] = Field(min_length=1, max_length=MAX_MERGED)
    weights: list[Annotated[float, Field(strict=True, allow_inf_nan=False)]] | None = None  # None: equal
    merge_strategy: MergeMethod = "linear"
    density: Annotated[float, Field(gt=0.0, le=1.0, strict=True)] | None = None
    majority_sign_method: SignMethod = "total"
    seed: Annotated[StrictInt, Field(ge=0, le=SEED_MAX)] = 0

    @model_validator(mode="after")
    def _consistent(self) -> MergedAdapters:
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("ids must be distinct (weigh an adapter once)")
        if self.weights is not None and len(self.weights) != len(self.ids):
            raise ValueError(f"weights has {len(self.weights)} entries for {len(self.ids)} ids")
        self.recipe()  # density per strategy, non-zero weights: MergeRecipe's own checks
        return self

    def recipe(self) -> MergeRecipe:
        weights = tuple(self.weights) if self.weights is not None else (1.0 / len(self.ids),) * len(self.ids)
        return MergeRecipe(weights=weights, method=self.merge_strategy, density=self.density,
                           majority_sign_method=self.majority_sign_method, seed=self.seed)


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: TokenCount | None = None
    # `None` (JSON null) means "the default", as in OpenAI's API: 1.0, 1.0 and false.
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    return_token_ids: StrictBool = False
    merged_adapters: MergedAdapters | None = None
    # OpenAI's end-user id: an A/B experiment keeps each user on one arm (serving/experiments.py).
    user: Annotated[str, Field(strict=True, max_length=MAX_USER_LENGTH)] | None = None
    # {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}: the schema itself is checked by
    # the grammar compiler (models/grammar.py), which names the field at fault.
    response_format: dict[str, Any] | None = None

    @field_validator("response_format")
    @classmethod
    def _known_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type") not in ("text", "json_object", "json_schema"):
            raise ValueError("type must be 'text', 'json_object' or 'json_schema'")
        return value

    def constrained_format(self) -> dict[str, Any] | None:
        """The response format to enforce, or None for plain text."""
        if self.response_format is None or self.response_format.get("type") == "text":
            return None
        return self.response_format

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        return refuse_unsupported(data, UNSUPPORTED)

    @field_validator("stop")
    @classmethod
    def _valid_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return value

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage_chunk(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: TokenCount | None = None  # OpenAI's newer name for max_tokens

    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


class CompletionRequest(_Common):
    # Token ids are strict ints here; whether they are in the vocabulary is checked by the API.
    prompt: str | list[str] | list[StrictInt]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str] | list[int]) -> str | list[str] | list[int]:
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be empty")
            if isinstance(value[0], str) and len(value) != 1:
                raise ValueError("only one prompt per request is supported")
        if value == "" or value == [""]:
            raise ValueError("prompt must not be empty")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class Feedback(BaseModel):
    """`POST /v1/feedback`: a score for one response (its `id`) of an A/B experiment (the online metric)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=128)
    score: Annotated[float, Field(strict=True, allow_inf_nan=False)]
