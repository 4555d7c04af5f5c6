"""Everything a request handler needs, assembled once at start-up: tokenizer, catalogue, generator.

The composition root of `serving/`: the only module that picks a generator (`generation/`), builds the
catalogue (`catalogue/`) around it and hands both to the HTTP layer (`api/`), which sees the generator
only through its interface (`generation/interface.py`).

Start-up order matters: champions are downloaded first because, unless configured, the base model is
the one they were trained on; then the base is loaded, the generator started and the champions handed
to it (at most `adapter_slots` of them read now, the rest on first use). Last, the registry poller
starts (`registry_poll_s` > 0); `close()` stops it before the generator.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from lorafleet.models.base import load_base_model
from lorafleet.models.grammar import GrammarCompiler
from lorafleet.models.sampling_rules import eos_token_ids
from lorafleet.registry_read import RegistryReader
from lorafleet.serving.catalogue.adapters import (
    AdapterCatalogue,
    ServedModel,
    Warm,
    choose_base_model,
    fetch_champions,
)
from lorafleet.serving.catalogue.registry_poller import ChampionReloader, RegistryPoller
from lorafleet.serving.engine.openmp_pool import release_thread_pool
from lorafleet.serving.experiments import ExperimentBook
from lorafleet.serving.generation.engine_generator import EngineGenerator
from lorafleet.serving.generation.interface import TokenGenerator
from lorafleet.serving.generation.runner import GenerationRunner
from lorafleet.serving.metrics import ServingMetrics
from lorafleet.serving.settings import ServiceSettings

log = logging.getLogger(__name__)


@dataclass
class ServingBackend:
    settings: ServiceSettings
    tokenizer: Any
    catalogue: AdapterCatalogue
    generator: TokenGenerator
    context_length: int  # prompt + completion tokens the model accepts
    eos_token_ids: tuple[int, ...]  # `sampling_rules.eos_token_ids` of the model and tokenizer
    metrics: ServingMetrics | None = None
    reloader: ChampionReloader | None = None  # None: no registry to follow
    poller: RegistryPoller | None = None  # None: polling is off
    warm: Warm | None = None  # makes an attached adapter resident now (`TokenGenerator.warm`); None: never
    experiments: ExperimentBook = field(default_factory=ExperimentBook)  # A/B splits started by the admin
    vocab_size: int | None = None  # the model's logits width (None: the tokenizer's length)
    _grammar: GrammarCompiler | None = field(default=None, init=False, repr=False)
    _grammar_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def grammar_compiler(self) -> GrammarCompiler:
        """The structured-output compiler, built on first use (converting the tokenizer takes ~0.5 s: a
        server that never gets a response_format never pays it)."""
        with self._grammar_lock:
            if self._grammar is None:
                self._grammar = GrammarCompiler(self.tokenizer, self.vocab_size or len(self.tokenizer),
                                                self.eos_token_ids)
            return self._grammar

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
    eos = eos_token_ids(loaded.model, tokenizer)
    generator = _generator(settings, loaded, eos, metrics)
    catalogue = AdapterCatalogue(
        base_model_id=loaded.resolved.model_id,
        base_revision=loaded.resolved.revision,
        loader=generator,
        registry=registry,
        adapter_roots=settings.adapter_roots,
        warm_limit=settings.engine.adapter_slots,
    )
    if metrics is not None:
        metrics.name_adapters(_served_names(catalogue))
    catalogue.install_champions(champions)
    warm = _warm(generator)
    reloader = ChampionReloader(catalogue, warm=warm, add_new=settings.load_champions)
    poller = RegistryPoller(reloader, settings.registry_poll_s).start() if settings.registry_poll_s > 0 else None
    return ServingBackend(
        settings=settings,
        tokenizer=tokenizer,
        catalogue=catalogue,
        generator=generator,
        context_length=_context_length(loaded.model, tokenizer, generator),
        eos_token_ids=eos,
        vocab_size=loaded.model.config.vocab_size,
        metrics=metrics,
        reloader=reloader,
        poller=poller,
        warm=warm,
    )


def _served_names(catalogue: AdapterCatalogue) -> Callable[[Collection[str]], dict[str, str]]:
    """Generator adapter names -> the `model` clients send for them, as /v1/models lists them (`NAME` for the
    champion, `NAME@VERSION` for other versions, `NAME` for local folders): LoRA-affinity routers match a
    request's `model` against the adapters `vllm:lora_requests_info` names (serving/metrics.py)."""

    def served(adapters: Collection[str]) -> dict[str, str]:
        champions = catalogue.champions()
        names = {}
        for adapter in adapters:
            entry = catalogue.by_adapter(adapter)
            if entry is not None:
                champion = entry.version is not None and champions.get(entry.name or "") == entry.version
                names[adapter] = entry.name if champion and entry.name else entry.id
        return names

    return served


def _warm(generator: TokenGenerator) -> Warm:
    """Admin loads and reloads wait here until the adapter is resident (the engine reads in the background)."""

    def warm(entry: ServedModel) -> int | None:
        return generator.warm(entry.adapter) if entry.adapter is not None else None

    return warm


def _generator(settings: ServiceSettings, loaded: Any, eos: tuple[int, ...],
               metrics: ServingMetrics | None) -> TokenGenerator:
    """The engine when it supports the base model (Llama family, full precision), else PEFT batches."""
    if settings.backend == "engine":
        try:
            return EngineGenerator(loaded.model, settings.engine, eos_token_ids=frozenset(eos),
                                   on_step=metrics.observe_engine if metrics is not None else None)
        except ValueError as error:  # e.g. an architecture the compact model does not implement
            if settings.engine.weights != "dense":  # asked for explicitly: only the engine has int8/int4
                raise ValueError(f"engine.weights={settings.engine.weights!r} needs the engine: {error}") from error
            log.warning("engine unavailable for %s (%s): serving with PEFT + generate", loaded.resolved.model_id,
                        error)
    release_thread_pool()  # the model was loaded on this thread; only the runner's thread computes now
    return GenerationRunner(
        loaded.model,
        pad_token_id=loaded.tokenizer.pad_token_id,
        config=settings.peft,
        max_queue=settings.engine.max_waiting,
        eos_token_ids=frozenset(eos),
        on_batch=metrics.observe_batch if metrics is not None else None,
        on_speculative=metrics.observe_speculative if metrics is not None else None,
    )


def _context_length(model: Any, tokenizer: Any, generator: TokenGenerator | None = None) -> int:
    limits = [
        getattr(model.config, "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),
    ]
    # Tokenizers without a limit report a huge sentinel (int(1e30)); ignore it.
    usable = [int(limit) for limit in limits if isinstance(limit, int) and 0 < limit < 10**9]
    context = min(usable) if usable else 2048
    capacity = generator.stats().capacity_tokens if generator is not None else None
    if capacity is not None:  # one sequence can never outgrow the whole KV pool
        context = min(context, capacity)
    return context
