"""Everything a request handler needs, assembled once at start-up: tokenizer, catalogue, generator.

Start-up order matters: champions are downloaded first because, unless configured, the base model is
the one they were trained on; then the base is loaded, the generator started and the champions loaded
into it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from lorafleet.models.base import load_base_model
from lorafleet.serving.adapters import AdapterCatalogue, choose_base_model, fetch_champions
from lorafleet.serving.generation import TokenGenerator
from lorafleet.serving.metrics import ServingMetrics
from lorafleet.serving.registry_reader import RegistryReader
from lorafleet.serving.runner import GenerationRunner
from lorafleet.serving.settings import ServiceSettings

log = logging.getLogger(__name__)


@dataclass
class ServingBackend:
    settings: ServiceSettings
    tokenizer: Any
    catalogue: AdapterCatalogue
    generator: TokenGenerator
    context_length: int  # prompt + completion tokens the model accepts
    eos_token_ids: tuple[int, ...]
    metrics: ServingMetrics | None = None

    def close(self) -> None:
        self.generator.close()


def build_backend(settings: ServiceSettings, *, metrics: ServingMetrics | None = None) -> ServingBackend:
    registry = RegistryReader(settings.tracking_uri, settings.adapter_download_dir)
    champions = fetch_champions(registry) if settings.load_champions else []
    base_id = choose_base_model(settings.base_model, champions)
    log.info("serving base model %s with %d champion adapter(s) found", base_id, len(champions))
    loaded = load_base_model(base_id, settings.model_cache_dir, dtype=settings.dtype, device=settings.device)
    tokenizer = loaded.tokenizer
    runner = GenerationRunner(
        loaded.model,
        pad_token_id=tokenizer.pad_token_id,
        max_batch_size=settings.max_batch_size,
        batch_wait_s=settings.batch_wait_ms / 1000,
        max_queue=settings.max_queue,
        on_batch=metrics.observe_batch if metrics is not None else None,
        on_speculative=metrics.observe_speculative if metrics is not None else None,
    )
    catalogue = AdapterCatalogue(
        base_model_id=loaded.resolved.model_id,
        base_revision=loaded.resolved.revision,
        loader=runner,
        registry=registry,
    )
    catalogue.install_champions(champions)
    return ServingBackend(
        settings=settings,
        tokenizer=tokenizer,
        catalogue=catalogue,
        generator=runner,
        context_length=_context_length(loaded.model, tokenizer),
        eos_token_ids=_eos_ids(tokenizer),
        metrics=metrics,
    )


def _context_length(model: Any, tokenizer: Any) -> int:
    limits = [
        getattr(model.config, "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),
    ]
    # Tokenizers without a limit report a huge sentinel (int(1e30)); ignore it.
    usable = [int(limit) for limit in limits if isinstance(limit, int) and 0 < limit < 10**9]
    return min(usable) if usable else 2048


def _eos_ids(tokenizer: Any) -> tuple[int, ...]:
    return () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)
