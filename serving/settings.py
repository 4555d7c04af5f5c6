"""Serving knobs: which base model, how requests are bounded, where adapters come from.

`ServiceSettings` is built once, in the service entry point, from the global `Settings` (paths, MLflow
URI) plus `LORAFLEET_BASE_MODEL` / `LORAFLEET_SERVE_*` environment variables; everything below receives
the object. The generators' own budgets are nested, not re-declared: `engine` is the engine's
`EngineConfig` and `peft` the PEFT runner's `RunnerConfig`, each the one owner of its defaults. Their
fields keep the variable names the README documents: `LORAFLEET_SERVE_<FIELD>` for `engine.<field>` and
`peft.<field>` alike (`LORAFLEET_SERVE_KV_CACHE_MB` -> `engine.kv_cache_mb`), except `engine.max_waiting`,
which is `LORAFLEET_SERVE_MAX_QUEUE` (it bounds the queue of either generator). The launcher passes those variables to the `bentoml serve` subprocess, which is the only way
to configure a process that BentoML starts. It also passes `LORAFLEET_SERVE_BIND_HOST`, the address it
binds, so that the service knows whether it is reachable from the network (see `serving/api/auth.py`).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from lorafleet.serving.engine.config import EngineConfig
from lorafleet.serving.generation.runner import RunnerConfig
from lorafleet.settings import Settings

BASE_MODEL_ENV = "LORAFLEET_BASE_MODEL"
ENV_PREFIX = "LORAFLEET_SERVE_"
SECTIONS: dict[str, type[BaseModel]] = {"engine": EngineConfig, "peft": RunnerConfig}  # nested configs
# Nested fields whose documented variable is not their own name.
_ENV_ALIASES = {"engine.max_waiting": "max_queue"}


class ServiceSettings(BaseModel):
    # hide_input_in_errors: a rejected API key must not be quoted back in a ValidationError.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    tracking_uri: str
    model_cache_dir: Path
    adapter_download_dir: Path = Field(
        description="registry versions are downloaded to <dir>/<name>/v<version>/"
    )
    base_model: str | None = Field(
        None,
        description="None: the base model most champion adapters were trained on, else the embedded "
        "smollm2-135m-instruct",
    )
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    backend: Literal["engine", "peft"] = Field(
        "engine", description="'engine': continuous batching (serving/engine); 'peft': HF generate + PEFT batches"
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="the engine's budgets (its queue "
                                 "bound, `max_waiting`, bounds the PEFT runner's queue too)")
    peft: RunnerConfig = Field(default_factory=RunnerConfig, description="the PEFT runner's batching")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none")
    max_tokens_limit: int = Field(2048, ge=1, description="largest max_tokens a request may ask for")
    max_request_bytes: int = Field(
        2 * 2**20, ge=1024, le=2**30, description="largest request body (HTTP 413 beyond), checked before it is "
        "read: 2 MiB holds a 128k-token prompt as JSON text (even \\u-escaped CJK) or as token ids; raise it only "
        "for longer contexts, since every byte admitted is held in memory and tokenised"
    )
    load_champions: bool = Field(
        True, description="serve every `champion` adapter; at most adapter_slots are read at start-up, the "
        "rest on first use"
    )
    registry_poll_s: float = Field(
        30.0, ge=0.0, description="seconds between registry polls for moved `champion` aliases; 0 = no polling"
    )
    admin_enabled: bool = Field(
        True, description="false turns the /admin endpoints off whatever else is set; true allows them only where "
        "they are safe: an admin key is set, or the server binds to loopback only (see serving/api/auth.py)"
    )
    api_keys: tuple[SecretStr, ...] = Field(
        (), description="bearer keys for inference (/v1); several for rotation (env: comma-separated); empty: "
        "inference needs no key"
    )
    admin_api_keys: tuple[SecretStr, ...] = Field(
        (), description="bearer keys for /admin and for registry versions other than champion and challenger; "
        "they grant inference too (env: comma-separated)"
    )
    allowed_hosts: tuple[str, ...] | None = Field(
        None, description="Host header names served, without port (`*.example.com`: its subdomains, `*`: any; "
        "env: comma-separated); None: loopback names when bound to loopback, else any (see serving/api/auth.py)"
    )
    bind_host: str | None = Field(
        None, description="the address the server listens on, passed by the launcher (`lorafleet serve --host`); "
        "None (unknown, e.g. a hand-run `bentoml serve`) counts as reachable from the network"
    )
    adapter_roots: tuple[Path, ...] = Field(
        (), description="absolute folders under which /admin/adapters/load may read local adapter "
        "directories (env: os.pathsep-separated); empty = local paths are refused"
    )

    @field_validator("adapter_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):  # from the environment: "/a:/b" (";" on Windows)
            return tuple(part for part in value.split(os.pathsep) if part.strip())
        return value

    @field_validator("adapter_roots")
    @classmethod
    def _absolute_roots(cls, roots: tuple[Path, ...]) -> tuple[Path, ...]:
        relative = [str(root) for root in roots if not root.is_absolute()]
        if relative:  # relative to what? bentoml serve runs in LORAFLEET_HOME, not where it was typed
            raise ValueError(f"adapter roots must be absolute paths, got {relative}")
        return roots

    @field_validator("api_keys", "admin_api_keys", "allowed_hosts", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):  # from the environment: "a,b" (spaces around entries ignored)
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("api_keys", "admin_api_keys")
    @classmethod
    def _header_safe_keys(cls, keys: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        # Never quote a key back: the message only says which one (by position) is unusable.
        for position, key in enumerate(keys, start=1):
            if not _TOKEN.fullmatch(key.get_secret_value()):
                raise ValueError(f"key #{position} is not usable as a bearer token: keys are 1 to 512 printable "
                                 "ASCII characters without spaces or commas")
        return keys

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, hosts: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if hosts is None:
            return None
        bad = [host for host in hosts if not _valid_host_pattern(host)]
        if bad:
            raise ValueError(f"allowed hosts are names or IP addresses without scheme, port or path "
                             f"(`*.example.com` for subdomains, `*` for any), got {[host[:80] for host in bad]}")
        return tuple(host.lower() for host in hosts)

    @model_validator(mode="after")
    def _default_within_limit(self) -> ServiceSettings:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) must not exceed "
                f"max_tokens_limit ({self.max_tokens_limit})"
            )
        return self

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: object) -> ServiceSettings:
        return cls(
            tracking_uri=settings.tracking_uri,
            model_cache_dir=settings.model_cache_dir,
            adapter_download_dir=settings.adapter_download_dir,
            **overrides,
        )

    @classmethod
    def from_env(cls, settings: Settings, environ: Mapping[str, str]) -> ServiceSettings:
        """Read `LORAFLEET_BASE_MODEL` and `LORAFLEET_SERVE_<FIELD>` (nested fields included, see the module
        docstring); errors name the variable."""
        overrides: dict[str, object] = {}
        given: set[str] = set()
        if environ.get(BASE_MODEL_ENV):
            overrides["base_model"] = environ[BASE_MODEL_ENV]
            given.add("base_model")
        for path in cls.tunable_fields():
            value = environ.get(env_name(path))
            if value in (None, ""):
                continue
            given.add(path)
            section, dot, field = path.partition(".")
            if dot:
                overrides.setdefault(section, {})[field] = value  # type: ignore[index]
            else:
                overrides[path] = value
        try:
            return cls.from_settings(settings, **overrides)
        except ValidationError as error:
            problems = []
            for item in error.errors():
                path = ".".join(str(part) for part in item["loc"][:2] if isinstance(part, str))
                if path.partition(".")[0] not in SECTIONS:
                    path = path.partition(".")[0]
                where = env_name(path) if path in given else path or "<settings>"
                problems.append(f"{where}: {str(item['msg']).removeprefix('Value error, ')}")
            raise ValueError("invalid serving settings: " + "; ".join(problems)) from None

    @classmethod
    def tunable_fields(cls) -> list[str]:
        """Fields settable through `LORAFLEET_SERVE_*` (paths come from `Settings`); nested ones dotted
        (`engine.kv_cache_mb`)."""
        fixed = {"tracking_uri", "model_cache_dir", "adapter_download_dir", "base_model"}
        fields = []
        for name in cls.model_fields:
            if name in SECTIONS:
                fields.extend(f"{name}.{field}" for field in SECTIONS[name].model_fields)
            elif name not in fixed:
                fields.append(name)
        return fields


_TOKEN = re.compile(r"[!-+\--~]{1,512}")  # printable ASCII (0x21-0x7e) except ',' (0x2c): the env list separator
_HOST_NAME = re.compile(r"(\*\.)?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?\.?", re.IGNORECASE)


def _valid_host_pattern(host: str) -> bool:
    """`*`, a host name (optionally `*.`-prefixed), or an IP address (IPv6 with or without brackets)."""
    if host == "*" or _HOST_NAME.fullmatch(host):
        return True
    try:
        ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
    except ValueError:
        return False
    return True


def env_name(field: str) -> str:
    """The variable that sets `field` (`adapter_roots`, or a nested `engine.kv_cache_mb`)."""
    if field == "base_model":
        return BASE_MODEL_ENV
    return ENV_PREFIX + _ENV_ALIASES.get(field, field.rpartition(".")[2]).upper()
