"""Serving knobs: which base model, how requests are batched and bounded, where adapters come from.

`ServiceSettings` is built once, in the service entry point, from the global `Settings` (paths, MLflow
URI) plus `LORAFLEET_BASE_MODEL` / `LORAFLEET_SERVE_*` environment variables; everything below receives
the object. The launcher passes those variables to the `bentoml serve` subprocess, which is the only way
to configure a process that BentoML starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorafleet.settings import Settings

BASE_MODEL_ENV = "LORAFLEET_BASE_MODEL"
ENV_PREFIX = "LORAFLEET_SERVE_"


class ServiceSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

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
    max_batch_size: int = Field(8, ge=1, le=256, description="rows in one generate() call")
    batch_wait_ms: float = Field(
        5.0, ge=0.0, le=1000.0, description="how long a new request waits for others to share its batch"
    )
    max_queue: int = Field(256, ge=1, description="waiting requests beyond this get HTTP 429")
    backend: Literal["engine", "peft"] = Field(
        "engine", description="'engine': continuous batching (serving/engine); 'peft': HF generate + PEFT batches"
    )
    max_num_seqs: int = Field(32, ge=1, le=1024, description="engine: sequences decoding together per step")
    max_tokens_per_step: int = Field(512, ge=1, description="engine: packed tokens per forward (prefill chunks)")
    kv_cache_mb: float = Field(512, gt=0, description="engine: KV-cache memory budget")
    adapter_slots: int = Field(16, ge=1, description="engine: adapters resident at once (LRU beyond)")
    max_lora_rank: int = Field(16, ge=1, description="engine: largest LoRA rank an adapter may have (vLLM's "
                               "default too); every slot is sized for it, so memory and LoRA work grow with it")
    speculative_max_batch: int = Field(4, ge=0, description="engine: live requests above which no row drafts")
    prefix_caching: bool = Field(True, description="engine: reuse the K/V of prompt prefixes seen before, "
                                 "per adapter")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none")
    max_tokens_limit: int = Field(2048, ge=1, description="largest max_tokens a request may ask for")
    load_champions: bool = Field(
        True, description="serve every `champion` adapter; at most adapter_slots are read at start-up, the "
        "rest on first use"
    )
    registry_poll_s: float = Field(
        30.0, ge=0.0, description="seconds between registry polls for moved `champion` aliases; 0 = no polling"
    )
    admin_enabled: bool = Field(
        True, description="serve the unauthenticated /admin endpoints (load/unload/reload adapters): keep the "
        "server on a private network, or turn them off"
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
        """Read `LORAFLEET_BASE_MODEL` and `LORAFLEET_SERVE_<FIELD>`; errors name the variable."""
        overrides: dict[str, object] = {}
        if environ.get(BASE_MODEL_ENV):
            overrides["base_model"] = environ[BASE_MODEL_ENV]
        for name in cls.tunable_fields():
            value = environ.get(env_name(name))
            if value not in (None, ""):
                overrides[name] = value
        try:
            return cls.from_settings(settings, **overrides)
        except ValidationError as error:
            problems = []
            for item in error.errors():
                field = str(item["loc"][0]) if item["loc"] else ""
                where = env_name(field) if field in overrides else field or "<settings>"
                problems.append(f"{where}: {item['msg']}")
            raise ValueError("invalid serving settings: " + "; ".join(problems)) from None

    @classmethod
    def tunable_fields(cls) -> list[str]:
        """Fields settable through `LORAFLEET_SERVE_*` (paths come from `Settings`)."""
        fixed = {"tracking_uri", "model_cache_dir", "adapter_download_dir", "base_model"}
        return [name for name in cls.model_fields if name not in fixed]


def env_name(field: str) -> str:
    return BASE_MODEL_ENV if field == "base_model" else ENV_PREFIX + field.upper()
