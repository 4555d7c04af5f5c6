"""The served-adapter catalogue: what a request's `model` string means and which adapter it runs.

`model` may be
  * the base model id (e.g. `smollm2-135m-instruct`): the bare base model;
  * `NAME`: a local adapter loaded under that name, else the registry's `champion` version as this
    server last saw it (at start-up, on first use, or at the last reload: see `registry_poller`);
  * `NAME@VERSION` (digits) or `models:/NAME/VERSION`: that registry version;
  * `NAME@ALIAS` or `models:/NAME@ALIAS`: whatever version the alias points at right now
    (`NAME@champion` = `NAME`).
Fetching a version that is neither the champion nor the challenger (nor served here already) is an admin
capability (`resolve(any_version=True)`): it costs disk and memory, so the HTTP layer allows it only for
callers with admin rights (`serving/api/auth.py`).

Every registry version (and every load of a local folder) gets its own generator adapter name, so moving
`NAME` to another version is only a change of which entry `NAME` means: requests that already resolved
`NAME` finish on the version they started with, and no weights are ever replaced under them.

"Attached" entries have been handed to the generator (`TokenGenerator.load`); the engine then reads them
into its LRU adapter cache, the PEFT runner loads them at once. At start-up only the first `warm_limit`
champions are attached (the cache's capacity: attaching 100 champions to 16 slots would only evict in a
loop); the rest are attached on first use. Adapters trained on a different base model are refused: their deltas would be applied to
weights they were never trained against. Local folders follow the rules of `local_adapters`. A failed
admin load undoes only what it added: an entry that was already served stays served.

`model` comes from unauthenticated clients: `model_names.split_model` checks every spelling against the
name rules before anything is looked up, so a bad name is a 404 that touched neither the registry nor
the disk.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from lorafleet.models.adapter_dir import AdapterManifest, InvalidAdapterDir
from lorafleet.models.embedded import EMBEDDED_MODEL_ID
from lorafleet.names import shorten
from lorafleet.registry_read import CHALLENGER, CHAMPION, FetchedAdapter, RegistryReader, VersionNotFound
from lorafleet.serving.catalogue.local_adapters import (
    Fingerprint,
    InvalidLocalAdapter,
    check_local_name,
    folder_fingerprint,
    inside_roots,
    read_local_manifest,
)
from lorafleet.serving.catalogue.model_names import MODELS_URI, ModelNotFound, split_model
from lorafleet.serving.generation.interface import AdapterLoader, UnloadNotSupported

log = logging.getLogger(__name__)


class VersionNotAllowed(PermissionError):
    """A registry version beyond champion and challenger, asked for without admin rights (HTTP 403)."""


class AdapterIncompatible(ValueError):
    """The adapter exists but cannot run on the served base model (HTTP 400)."""


class AdapterLoadFailed(RuntimeError):
    """The adapter's files could not be loaded into the generator; nothing was changed (HTTP 400)."""


Warm = Callable[["ServedModel"], object]  # make an attached adapter resident now; raises if it cannot load


@dataclass(frozen=True)
class ServedModel:
    id: str  # as listed in /v1/models
    adapter: str | None  # the generator's adapter name; None = bare base model
    created: int
    parent: str | None = None  # the base model id for adapters
    name: str | None = None
    version: int | None = None  # registry version; None for the base and local adapters
    system_prompt: str | None = None  # prepended to chats that bring no system message
    source: str | None = None  # `models:/NAME/VERSION` or the local folder


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
        adapter_roots: Sequence[Path] = (),
        warm_limit: int | None = None,
    ) -> None:
        self.base = ServedModel(id=base_model_id, adapter=None, created=int(time.time()))
        self.registry = registry
        self._base_revision = base_revision
        self._loader = loader
        self._roots = tuple(Path(root).resolve() for root in adapter_roots)
        self._warm_limit = warm_limit
        self._lock = threading.Lock()  # guards the dicts below, never held while loading
        self._gates: dict[str, threading.Lock] = {}  # one download / one attach at a time per key
        self._versions: dict[tuple[str, int], ServedModel] = {}
        self._champions: dict[str, int] = {}
        self._local: dict[str, tuple[ServedModel, Fingerprint]] = {}  # name -> (entry, folder fingerprint)
        self._paths: dict[str, Path] = {}  # generator adapter name -> folder
        self._by_adapter: dict[str, ServedModel] = {}
        self._attached: set[str] = set()
        self._used_names: set[str] = set()  # never reused, even when forgotten: PEFT keeps what it loaded

    # -- start-up ------------------------------------------------------------------------------

    def install_champions(self, fetched: Iterable[FetchedAdapter]) -> list[ServedModel]:
        """Serve these champions; attach (start reading) only as many as the generator keeps resident."""
        served = []
        for adapter in fetched:
            try:
                entry, _ = self._install(adapter)
            except AdapterIncompatible as error:
                log.warning("not serving champion %s version %s: %s", adapter.name, adapter.version, error)
                continue
            with self._lock:
                self._champions[adapter.name] = adapter.version
            if self._warm_limit is None or len(served) < self._warm_limit:
                self._attach(entry)
            served.append(entry)
        return served

    # -- requests ------------------------------------------------------------------------------

    def resolve(self, model: str, *, load: bool = True, any_version: bool = False) -> ServedModel:
        """Map a request's `model` to an adapter, downloading and attaching it first if needed (blocking).

        With `load=False` nothing is downloaded or attached: what is not installed yet is ModelNotFound.
        Fetching a registry version that is neither the champion nor the challenger (nor served here already)
        is an admin capability: without `any_version` it is VersionNotAllowed, before anything is written."""
        return self._resolve(model, load, any_version)[0]

    def load(self, model: str, *, warm: Warm | None = None) -> ServedModel:
        """The admin load: resolve, attach and make resident now.

        A registry version this call added that cannot be loaded is forgotten again (unless it is a
        champion), so a failed load changes nothing. A version that was served before stays served:
        requests may be running on it, and its read may still finish (the failure is reported)."""
        entry, created = self._resolve(model, True, True)
        if entry.adapter is None or warm is None:
            return entry
        try:
            warm(entry)
        except Exception as error:
            with self._lock:
                champion = entry.name is not None and self._champions.get(entry.name) == entry.version
            if created and entry.version is not None and not champion:
                self._forget(entry)
                raise AdapterLoadFailed(f"{entry.id} could not be loaded: {error}") from error
            raise AdapterLoadFailed(f"{entry.id} could not be loaded now: {error}; it stays served and is read "
                                    "again by its next request") from error
        return entry

    def models(self) -> list[ServedModel]:
        """The base, each champion and local adapter as `NAME`, every other version as `NAME@VERSION`."""
        with self._lock:
            champions = dict(self._champions)
            versions = dict(self._versions)
            local = [entry for entry, _ in self._local.values()]
        listed = [self.base]
        for name, version in sorted(champions.items()):
            entry = versions.get((name, version))
            if entry is not None:
                listed.append(replace(entry, id=name))
        listed.extend(sorted(local, key=lambda entry: entry.id))
        listed.extend(entry for key, entry in sorted(versions.items()) if champions.get(key[0]) != key[1])
        return listed

    # -- admin ---------------------------------------------------------------------------------

    def champions(self) -> dict[str, int]:
        """name -> the version `NAME` means on this server now."""
        with self._lock:
            return dict(self._champions)

    def is_attached(self, adapter: str) -> bool:
        with self._lock:
            return adapter in self._attached

    def is_local(self, name: str) -> bool:
        """`NAME` is a local folder here (it shadows a registry model of that name)."""
        with self._lock:
            return name in self._local

    def by_adapter(self, adapter: str) -> ServedModel | None:
        """The catalogue entry behind a generator adapter name (for the admin listing)."""
        with self._lock:
            return self._by_adapter.get(adapter)

    def set_champion(self, adapter: FetchedAdapter, *, warm: Warm | None = None) -> int | None:
        """Make `NAME` mean `adapter.version`; return the version it meant before (None: new name).

        The new version is loaded *before* `NAME` moves, and only if the old one was attached: a name
        nobody used stays lazy. If loading fails, `NAME` keeps its old version (the error propagates)."""
        with self._lock:
            if adapter.name in self._local:
                raise AdapterIncompatible(f"`{adapter.name}` is served from a local folder on this server")
            old = self._champions.get(adapter.name)
            old_entry = self._versions.get((adapter.name, old)) if old is not None else None
        entry, _ = self._install(adapter)
        if old_entry is not None and self.is_attached(old_entry.adapter or ""):
            self._attach(entry)
            if warm is not None:
                warm(entry)
        with self._lock:
            self._champions[adapter.name] = adapter.version
        if old != adapter.version:
            log.info("%s now serves version %s (was %s)", adapter.name, adapter.version, old)
        return old

    def load_local(self, name: str, path: Path, *, warm: Warm | None = None) -> ServedModel:
        """Serve the adapter folder `path` (under an adapter root) as `name`; loaded before it is published.

        Loading the same unchanged folder again is a no-op; a changed folder (or another one) gets a new
        generator adapter name, so requests in flight keep the weights they started with."""
        folder = inside_roots(Path(path), self._roots)
        check_local_name(name, self.base.id)
        with self._lock:
            if name in self._champions or any(key[0] == name for key in self._versions):
                raise InvalidLocalAdapter(f"`{name}` names a registry model on this server: pick another name")
        manifest = read_local_manifest(folder)
        if manifest is not None:
            self._check_compatible(str(folder), None, manifest)
        fingerprint = folder_fingerprint(folder)
        with self._lock:
            current = self._local.get(name)
            fresh = current is None or current[1] != fingerprint
            if fresh:
                entry = ServedModel(
                    id=name,
                    adapter=self._unique_adapter_name(name, "local"),
                    created=int(time.time()) if manifest is None else _epoch(manifest.created_at),
                    parent=self.base.id,
                    name=name,
                    system_prompt=None if manifest is None else manifest.task.system_prompt,
                    source=str(folder),
                )
                self._paths[entry.adapter] = folder
                self._by_adapter[entry.adapter] = entry
            else:
                entry = current[0]
        try:
            self._attach(entry)
            if warm is not None:
                warm(entry)
        except Exception as error:
            if fresh:
                self._forget(entry)
            raise AdapterLoadFailed(f"{folder} could not be loaded as `{name}`: {error}") from error
        if fresh:
            with self._lock:
                self._local[name] = (entry, fingerprint)
            log.info("serving local adapter %s from %s (adapter %s)", name, folder, entry.adapter)
        return entry

    # -- internals -----------------------------------------------------------------------------

    def _resolve(self, model: str, load: bool, any_version: bool) -> tuple[ServedModel, bool]:
        """`resolve`, and whether this call added the entry (only the base and registry versions are added)."""
        if model == self.base.id:
            return self.base, False
        name, selector = split_model(model)
        if selector is None:
            with self._lock:
                local = self._local.get(name)
            if local is not None:
                return (self._attach(local[0]) if load else local[0]), False
        if selector is None or selector == CHAMPION:
            version = self._champion_version(model, name, load)
        elif selector.isdigit():
            version = int(selector)
        else:
            version = self._alias_version(model, name, selector)
        return self._version(model, name, version, load, any_version)

    def _champion_version(self, model: str, name: str, load: bool) -> int:
        with self._lock:
            pinned = self._champions.get(name)
        if pinned is not None:
            return pinned
        if not load:
            raise ModelNotFound(model, f"`{name}` is not loaded on this server")
        version = self._alias_version(model, name, CHAMPION)
        with self._lock:
            return self._champions.setdefault(name, version)

    def _alias_version(self, model: str, name: str, alias: str) -> int:
        registry = self._require_registry(model)
        try:
            return registry.version_for_alias(name, alias)
        except VersionNotFound as error:
            raise ModelNotFound(model, str(error)) from None

    def _version(
        self, model: str, name: str, version: int, load: bool, any_version: bool
    ) -> tuple[ServedModel, bool]:
        key = (name, version)
        with self._lock:
            entry = self._versions.get(key)
        created = False
        if entry is None and not load:
            raise ModelNotFound(model, f"{name} version {version} is not loaded on this server")
        if entry is None:
            if not any_version:
                self._check_version_allowed(model, name, version)
            with self._gate(f"fetch:{name}@{version}"):  # one download per version, however many ask
                registry = self._require_registry(model)
                try:
                    fetched = registry.fetch(name, version)
                except VersionNotFound as error:
                    raise ModelNotFound(model, str(error)) from None
                except InvalidAdapterDir as error:
                    raise AdapterIncompatible(f"{name} version {version} is not a usable adapter: {error}") from None
                entry, created = self._install(fetched)
        return (self._attach(entry) if load else entry), created

    def _check_version_allowed(self, model: str, name: str, version: int) -> None:
        """Anyone may fetch the champion and the challenger; other versions (a 404 if missing) need admin."""
        with self._lock:
            if self._champions.get(name) == version:
                return
        registry = self._require_registry(model)
        for alias in (CHAMPION, CHALLENGER):
            try:
                if registry.version_for_alias(name, alias) == version:
                    return
            except VersionNotFound:
                pass
        if not registry.has_version(name, version):
            raise ModelNotFound(model, f"registered model {name!r} has no version {version}")
        raise VersionNotAllowed(f"`{shorten(model)}` is version {version} of `{name}`, which is neither its "
                                f"{CHAMPION} nor its {CHALLENGER}: loading other versions is an admin capability")

    def _install(self, adapter: FetchedAdapter) -> tuple[ServedModel, bool]:
        """Record a version (idempotent: True only for the call that added it); nothing is read into the
        generator until `_attach`."""
        self._check_compatible(adapter.name, adapter.version, adapter.manifest)
        key = (adapter.name, adapter.version)
        with self._lock:
            if key in self._versions:
                return self._versions[key], False
            runner_name = self._unique_adapter_name(adapter.name, f"v{adapter.version}")
            entry = ServedModel(
                id=f"{adapter.name}@{adapter.version}",
                adapter=runner_name,
                created=_epoch(adapter.manifest.created_at),
                parent=self.base.id,
                name=adapter.name,
                version=adapter.version,
                system_prompt=adapter.manifest.task.system_prompt,
                source=f"{MODELS_URI}{adapter.name}/{adapter.version}",
            )
            self._versions[key] = entry
            self._paths[runner_name] = adapter.path
            self._by_adapter[runner_name] = entry
        return entry, True

    def _attach(self, entry: ServedModel) -> ServedModel:
        """Hand the entry to the generator once (blocking for PEFT; the engine reads in the background).

        An entry forgotten since the caller resolved it (its admin load failed) is ModelNotFound: asking
        again resolves the name afresh."""
        adapter = entry.adapter
        if adapter is None or self.is_attached(adapter):
            return entry
        with self._gate(f"attach:{adapter}"):  # `_forget` takes it too: never half attached, half forgotten
            if not self.is_attached(adapter):
                with self._lock:
                    path = self._paths.get(adapter)
                if path is None:
                    raise ModelNotFound(entry.id, "its loading failed just now and it was dropped: ask again")
                self._loader.load(adapter, path)
                with self._lock:
                    self._attached.add(adapter)
                log.info("attached %s (adapter %s)", entry.id, adapter)
        return entry

    def _gate(self, key: str) -> threading.Lock:
        with self._lock:
            return self._gates.setdefault(key, threading.Lock())

    def _forget(self, entry: ServedModel) -> None:
        """Undo what a failed load added, in the generator's cache too: the read it started may still be
        running, and would otherwise fill a slot under a name nothing can request any more."""
        adapter = entry.adapter or ""
        with self._gate(f"attach:{adapter}"):
            with self._lock:
                if entry.version is not None and entry.name is not None:
                    self._versions.pop((entry.name, entry.version), None)
                self._by_adapter.pop(adapter, None)
                self._paths.pop(adapter, None)
                attached = adapter in self._attached
                self._attached.discard(adapter)
            if attached:  # refused while running requests use it: LRU drops it later
                with contextlib.suppress(UnloadNotSupported):  # PEFT keeps it; the name is never asked again
                    self._loader.unload(adapter)

    def _check_compatible(self, name: str, version: int | None, manifest: AdapterManifest) -> None:
        label = f"adapter {name}" + ("" if version is None else f" version {version}")
        if manifest.base_model.id != self.base.id:
            raise AdapterIncompatible(
                f"{label} was trained on base model `{manifest.base_model.id}`, but this server serves "
                f"`{self.base.id}`"
            )
        if manifest.base_model.revision != self._base_revision:
            log.warning("%s was trained on revision %s of %s; serving revision %s", label,
                        manifest.base_model.revision, self.base.id, self._base_revision)

    def _unique_adapter_name(self, name: str, tag: str) -> str:
        """PEFT keeps adapters in ModuleDicts, whose keys may not contain '.'. Caller holds _lock."""
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", name) + f"-{tag}"
        candidate, suffix = stem, 1
        while candidate in self._used_names:
            suffix += 1
            candidate = f"{stem}-{suffix}"
        self._used_names.add(candidate)
        return candidate

    def _require_registry(self, model: str) -> RegistryReader:
        if self.registry is None:
            raise ModelNotFound(model, "this server has no model registry")
        return self.registry


def _epoch(iso_time: str) -> int:
    try:
        return int(datetime.fromisoformat(iso_time).timestamp())
    except ValueError:
        return 0
