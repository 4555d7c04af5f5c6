"""Everything a request handler needs, assembled once at start-up: tokenizer, catalogue, generator.

Start-up order matters: champions are downloaded first because, unless configured, the base model is
the one they were trained on; then the base is loaded, the generator started and the champions handed
to it (at most `adapter_slots` of them read now, the rest on first use). Last, the registry poller
starts (`registry_poll_s` > 0); `close()` stops it before the generator.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from lorafleet.models.base import load_base_model
from lorafleet.serving.adapters import AdapterCatalogue, ServedModel, Warm, choose_base_model, fetch_champions
from lorafleet.serving.engine.engine import EngineConfig
from lorafleet.serving.engine.openmp_pool import release_thread_pool
from lorafleet.serving.engine_generator import EngineGenerator
from lorafleet.serving.generation import TokenGenerator
from lorafleet.serving.metrics import ServingMetrics
from lorafleet.serving.registry_poller import ChampionReloader, RegistryPoller
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
    reloader: ChampionReloader | None = None  # None: no registry to follow
    poller: RegistryPoller | None = None  # None: polling is off
    warm: Warm | None = None  # makes an attached adapter resident now (engine); None: loading is synchronous

    def close(self) -> None:
        if self.poller is not None:
            self.poller.stop()
        self.generator.close()


def build_backend(settings: ServiceSettings, *, metrics: ServingMetrics | None = None) -> ServingBackend:
    registry = RegistryReader(settings.tracking_uri, settings.adapter_download_dir)
    champions = fetch_champions(registry) if settings.load_champions else []
    base_id = choose_base_model(settings.base_model, champions)
    log.info("serving base model %s with %d champion adapter(s) found", base_id, len(champions))
    loaded = load_base_model(base_id, settings.model_cache_dir, dtype=settings.dtype, device=settings.device)
    tokenizer = loaded.tokenizer
    runner = _generator(settings, loaded, metrics)
    catalogue = AdapterCatalogue(
        base_model_id=loaded.resolved.model_id,
        base_revision=loaded.resolved.revision,
        loader=runner,
        registry=registry,
        adapter_roots=settings.adapter_roots,
        warm_limit=settings.adapter_slots,
    )
    catalogue.install_champions(champions)
    warm = _warm(runner)
    reloader = ChampionReloader(catalogue, warm=warm, add_new=settings.load_champions)
    poller = RegistryPoller(reloader, settings.registry_poll_s).start() if settings.registry_poll_s > 0 else None
    return ServingBackend(
        settings=settings,
        tokenizer=tokenizer,
        catalogue=catalogue,
        generator=runner,
        context_length=_context_length(loaded.model, tokenizer, runner),
        eos_token_ids=_eos_ids(tokenizer),
        metrics=metrics,
        reloader=reloader,
        poller=poller,
        warm=warm,
    )


def _warm(generator: TokenGenerator) -> Warm | None:
    """The engine reads adapters in the background: admin loads and reloads wait for the read here."""
    if not isinstance(generator, EngineGenerator):
        return None

    def warm(entry: ServedModel) -> int | None:
        return generator.warm_adapter(entry.adapter) if entry.adapter is not None else None

    return warm


def _generator(settings: ServiceSettings, loaded: Any, metrics: ServingMetrics | None) -> TokenGenerator:
    """The engine when it supports the base model (Llama family, full precision), else PEFT batches."""
    if settings.backend == "engine":
        try:
            return EngineGenerator(loaded.model, _engine_config(settings), eos_token_ids=frozenset(
                _eos_ids(loaded.tokenizer)), on_step=metrics.observe_engine if metrics is not None else None)
        except ValueError as error:  # e.g. an architecture the compact model does not implement
            log.warning("engine unavailable for %s (%s): serving with PEFT + generate", loaded.resolved.model_id,
                        error)
    release_thread_pool()  # the model was loaded on this thread; only the runner's thread computes now
    return GenerationRunner(
        loaded.model,
        pad_token_id=loaded.tokenizer.pad_token_id,
        max_batch_size=settings.max_batch_size,
        batch_wait_s=settings.batch_wait_ms / 1000,
        max_queue=settings.max_queue,
        on_batch=metrics.observe_batch if metrics is not None else None,
        on_speculative=metrics.observe_speculative if metrics is not None else None,
    )


def _engine_config(settings: ServiceSettings) -> EngineConfig:
    return EngineConfig(kv_cache_mb=settings.kv_cache_mb, max_num_seqs=settings.max_num_seqs,
                        max_tokens_per_step=max(settings.max_tokens_per_step, settings.max_num_seqs),
                        max_waiting=settings.max_queue, speculative_max_batch=settings.speculative_max_batch,
                        adapter_slots=settings.adapter_slots, max_lora_rank=settings.max_lora_rank,
                        prefix_caching=settings.prefix_caching)


def _context_length(model: Any, tokenizer: Any, generator: TokenGenerator | None = None) -> int:
    limits = [
        getattr(model.config, "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),
    ]
    # Tokenizers without a limit report a huge sentinel (int(1e30)); ignore it.
    usable = [int(limit) for limit in limits if isinstance(limit, int) and 0 < limit < 10**9]
    context = min(usable) if usable else 2048
    if isinstance(generator, EngineGenerator):  # one sequence can never outgrow the whole KV pool
        context = min(context, generator.engine.scheduler.capacity_tokens)
    return context


def _eos_ids(tokenizer: Any) -> tuple[int, ...]:
    return () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)
