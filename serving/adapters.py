"""The served-adapter catalogue: what a request's `model` string means and which adapter it runs.

`model` may be
  * the base model id (e.g. `smollm2-135m-instruct`): the bare base model;
  * `NAME`: the adapter's `champion` version, pinned when the server started (or when `NAME` was first
    asked for, if it had no champion then) so that a moving alias never changes answers mid-flight;
  * `NAME@VERSION` (digits): that registry version;
  * `NAME@ALIAS`: whatever version the alias points at right now (`NAME@champion` = `NAME`).

Champions are loaded at start-up; any other version is downloaded and loaded on first use. Loading is
serialised per version (two requests for the same new version load it once) and the generator applies
it between batches. Adapters trained on a different base model are refused: their deltas would be
applied to weights they were never trained against.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from lorafleet.models.adapter_dir import InvalidAdapterDir
from lorafleet.models.embedded import EMBEDDED_MODEL_ID
from lorafleet.serving.registry_reader import CHAMPION, FetchedAdapter, RegistryReader, VersionNotFound

log = logging.getLogger(__name__)


class ModelNotFound(LookupError):
    """The request's `model` names nothing this server can serve (HTTP 404)."""

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"the model `{model}` does not exist: {reason}")
        self.model = model


class AdapterIncompatible(ValueError):
    """The adapter exists but cannot run on the served base model (HTTP 400)."""


class AdapterLoader(Protocol):
    def load_adapter(self, name: str, adapter_dir: Path) -> None: ...


@dataclass(frozen=True)
class ServedModel:
    id: str  # as listed in /v1/models
    adapter: str | None  # the generator's adapter name; None = bare base model
    created: int
    parent: str | None = None  # the base model id for adapters
    name: str | None = None
    version: int | None = None
    system_prompt: str | None = None  # prepended to chats that bring no system message


def fetch_champions(registry: RegistryReader) -> list[FetchedAdapter]:
    """Download every champion; one broken version is logged and skipped, not fatal to start-up."""
    fetched = []
    for name, version in sorted(registry.champions().items()):
        try:
            fetched.append(registry.fetch(name, version))
        except Exception as error:  # noqa: BLE001 - keep serving the others
            log.warning("skipping champion %s version %s: %s", name, version, error)
    return fetched


def choose_base_model(configured: str | None, champions: Sequence[FetchedAdapter]) -> str:
    """The configured base, else the one most champions were trained on, else the embedded default."""
    if configured:
        return configured
    counts = collections.Counter(adapter.manifest.base_model.id for adapter in champions)
    if not counts:
        return EMBEDDED_MODEL_ID
    best = max(counts.values())
    return min(base for base, count in counts.items() if count == best)


class AdapterCatalogue:
    def __init__(
        self,
        *,
        base_model_id: str,
        base_revision: str,
        loader: AdapterLoader,
        registry: RegistryReader | None,
    ) -> None:
        self.base = ServedModel(id=base_model_id, adapter=None, created=int(time.time()))
        self._base_revision = base_revision
        self._loader = loader
        self._registry = registry
        self._lock = threading.Lock()  # guards the dicts below
        self._loading: dict[tuple[str, int], threading.Lock] = {}
        self._loaded: dict[tuple[str, int], ServedModel] = {}
        self._champions: dict[str, int] = {}
        self._adapter_names: set[str] = set()

    # -- start-up ------------------------------------------------------------------------------

    def install_champions(self, fetched: Iterable[FetchedAdapter]) -> list[ServedModel]:
        served = []
        for adapter in fetched:
            try:
                entry = self._install(adapter)
            except AdapterIncompatible as error:
                log.warning("not serving champion %s version %s: %s", adapter.name, adapter.version, error)
                continue
            with self._lock:
                self._champions[adapter.name] = adapter.version
            served.append(entry)
        return served

    # -- requests ------------------------------------------------------------------------------

    def resolve(self, model: str) -> ServedModel:
        """Map a request's `model` to a loaded adapter, loading it first if needed (blocking)."""
        if model == self.base.id:
            return self.base
        name, has_selector, selector = model.partition("@")
        if not name or "@" in selector or (has_selector and not selector):
            raise ModelNotFound(
                model, f"use NAME, NAME@ALIAS, NAME@VERSION or the base model id `{self.base.id}`"
            )
        if not has_selector or selector == CHAMPION:
            return self._load_version(model, name, self._champion_version(model, name))
        if selector.isdigit():
            return self._load_version(model, name, int(selector))
        registry = self._require_registry(model)
        try:
            version = registry.version_for_alias(name, selector)
        except VersionNotFound as error:
            raise ModelNotFound(model, str(error)) from None
        return self._load_version(model, name, version)

    def models(self) -> list[ServedModel]:
        """The base, each champion as `NAME`, and every other loaded version as `NAME@VERSION`."""
        with self._lock:
            champions = dict(self._champions)
            loaded = dict(self._loaded)
        listed = [self.base]
        for name, version in sorted(champions.items()):
            entry = loaded.get((name, version))
            if entry is not None:
                listed.append(ServedModel(**{**entry.__dict__, "id": name}))
        for (name, version), entry in sorted(loaded.items()):
            if champions.get(name) != version:
                listed.append(entry)
        return listed

    # -- internals -----------------------------------------------------------------------------

    def _champion_version(self, model: str, name: str) -> int:
        with self._lock:
            pinned = self._champions.get(name)
        if pinned is not None:
            return pinned
        registry = self._require_registry(model)
        try:
            version = registry.version_for_alias(name, CHAMPION)
        except VersionNotFound as error:
            raise ModelNotFound(model, str(error)) from None
        with self._lock:
            return self._champions.setdefault(name, version)

    def _load_version(self, model: str, name: str, version: int) -> ServedModel:
        key = (name, version)
        with self._lock:
            if key in self._loaded:
                return self._loaded[key]
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:  # one download + load per version, however many requests ask at once
            with self._lock:
                if key in self._loaded:
                    return self._loaded[key]
            registry = self._require_registry(model)
            try:
                fetched = registry.fetch(name, version)
            except VersionNotFound as error:
                raise ModelNotFound(model, str(error)) from None
            except InvalidAdapterDir as error:
                raise AdapterIncompatible(
                    f"{name} version {version} is not a usable adapter: {error}"
                ) from None
            return self._install(fetched)

    def _install(self, adapter: FetchedAdapter) -> ServedModel:
        self._check_compatible(adapter)
        key = (adapter.name, adapter.version)
        with self._lock:
            if key in self._loaded:
                return self._loaded[key]
            runner_name = self._unique_adapter_name(adapter.name, adapter.version)
        self._loader.load_adapter(runner_name, adapter.path)
        entry = ServedModel(
            id=f"{adapter.name}@{adapter.version}",
            adapter=runner_name,
            created=_epoch(adapter.manifest.created_at),
            parent=self.base.id,
            name=adapter.name,
            version=adapter.version,
            system_prompt=adapter.manifest.task.system_prompt,
        )
        with self._lock:
            self._loaded[key] = entry
        log.info("serving %s version %s (adapter %s)", adapter.name, adapter.version, runner_name)
        return entry

    def _check_compatible(self, adapter: FetchedAdapter) -> None:
        manifest = adapter.manifest
        if manifest.base_model.id != self.base.id:
            raise AdapterIncompatible(
                f"adapter {adapter.name} version {adapter.version} was trained on base model "
                f"`{manifest.base_model.id}`, but this server serves `{self.base.id}`"
            )
        if manifest.base_model.revision != self._base_revision:
            log.warning(
                "adapter %s version %s was trained on revision %s of %s; serving revision %s",
                adapter.name,
                adapter.version,
                manifest.base_model.revision,
                self.base.id,
                self._base_revision,
            )

    def _unique_adapter_name(self, name: str, version: int) -> str:
        """PEFT keeps adapters in ModuleDicts, whose keys may not contain '.'."""
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", name) + f"-v{version}"
        candidate, suffix = stem, 1
        while candidate in self._adapter_names:
            suffix += 1
            candidate = f"{stem}-{suffix}"
        self._adapter_names.add(candidate)
        return candidate

    def _require_registry(self, model: str) -> RegistryReader:
        if self._registry is None:
            raise ModelNotFound(model, "this server has no model registry")
        return self._registry


def _epoch(iso_time: str) -> int:
    try:
        return int(datetime.fromisoformat(iso_time).timestamp())
    except ValueError:
        return 0
