"""Hot reload: when a registry `champion` alias moves, `NAME` moves with it, on demand or by polling.

Design: every registry version already has its own generator adapter name (`alpha-v1`, `alpha-v2`), so
a moved alias needs no weights swapped in place. Reloading `NAME` downloads the new version, loads it
(when the old one was in use, so a lazy name stays lazy), and only then re-points `NAME` in the
catalogue. Requests that resolved `NAME` earlier hold the old adapter name and finish on the old
weights; the old version stays servable as `NAME@OLD` and leaves the engine's cache by LRU like any
idle adapter. (The engine's own `AdapterCache.refresh()` is for a name whose *folder* changed; a
registry version's folder never does.)

`ChampionReloader` is shared by the admin endpoint and the poller thread, and serialises them: two
reloads racing could otherwise re-point `NAME` to the older of two moves. A reload can take minutes
(a download and a warm-up per moved name), so the poller hands it its stop event: a stopping poller
gives up waiting for another reload at once and ends its own after the name in progress.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from lorafleet.registry_read import CHAMPION, VersionNotFound
from lorafleet.serving.catalogue.adapters import AdapterCatalogue, Warm
from lorafleet.serving.catalogue.model_names import ModelNotFound

log = logging.getLogger(__name__)

_STOP_CHECK_S = 0.1  # how often a reload waiting for another one checks whether it should give up


@dataclass(frozen=True)
class ChampionChange:
    """One name's outcome: `old_version` -> `new_version` (equal: unchanged); `error`: kept the old one."""

    name: str
    old_version: int | None
    new_version: int | None
    error: str | None = None

    @property
    def changed(self) -> bool:
        return self.error is None and self.old_version != self.new_version


class ChampionReloader:
    def __init__(self, catalogue: AdapterCatalogue, *, warm: Warm | None = None, add_new: bool = True) -> None:
        """`add_new`: a reload of everything also serves champions this server has not seen yet."""
        self.catalogue = catalogue
        self._warm = warm
        self._add_new = add_new
        self._lock = threading.Lock()

    def reload(self, names: Sequence[str] | None = None, *, stop: threading.Event | None = None
               ) -> list[ChampionChange]:
        """Follow the registry's `champion` aliases for `names` (None: every served name, plus, with
        `add_new`, champions promoted since start-up). A registry outage raises (nothing changes); a version that cannot
        be downloaded or loaded is reported in its change and the name keeps serving what it did.

        Once `stop` is set, the names not started yet are left as they are (and not listed)."""
        registry = self.catalogue.registry
        if registry is None:
            raise ModelNotFound(", ".join(names or ()) or "*", "this server has no model registry")
        with self._held(stop) as held:
            if not held:
                return []
            serving = self.catalogue.champions()
            if names is None:
                targets: dict[str, int | None] = {name: None for name in serving}
                targets.update((name, version) for name, version in registry.champions().items()
                               if self._add_new or name in serving)
            else:
                targets = {name: self._champion_alias(name) for name in names}
            changes = []
            for name, version in sorted(targets.items()):
                if stop is not None and stop.is_set():
                    log.info("reload stopped before %s: %d of %d names done", name, len(changes), len(targets))
                    break
                changes.append(self._follow(name, version, serving.get(name)))
            return changes

    @contextmanager
    def _held(self, stop: threading.Event | None) -> Iterator[bool]:
        """The reload lock; without it (False) once `stop` is set while another reload holds it."""
        if stop is None:
            self._lock.acquire()
        else:
            while not self._lock.acquire(timeout=_STOP_CHECK_S):
                if stop.is_set():
                    yield False
                    return
        try:
            yield True
        finally:
            self._lock.release()

    def _champion_alias(self, name: str) -> int:
        try:
            return self.catalogue.registry.version_for_alias(name, CHAMPION)
        except VersionNotFound as error:
            raise ModelNotFound(name, str(error)) from None

    def _follow(self, name: str, version: int | None, current: int | None) -> ChampionChange:
        if self.catalogue.is_local(name):  # checked first: no warning on every poll
            return ChampionChange(name, None, None, error="served from a local folder under the same name")
        if version is None:  # the alias was removed: keep answering `NAME` rather than break clients
            return ChampionChange(name, current, current, error="the registry has no champion alias for it")
        if version == current:
            return ChampionChange(name, current, current)
        try:
            fetched = self.catalogue.registry.fetch(name, version)
            old = self.catalogue.set_champion(fetched, warm=self._warm)
        except Exception as error:  # noqa: BLE001 - one broken version must not stop the others (retried next time)
            log.warning("%s: keeping version %s, version %s could not be loaded: %s", name, current, version,
                        error)
            return ChampionChange(name, current, current, error=f"version {version}: {error}")
        return ChampionChange(name, old, version)


class RegistryPoller:
    """A daemon thread that runs `reloader.reload()` every `interval_s` seconds until `stop()`.

    Registry errors are logged and the server keeps serving what it has; the next poll tries again."""

    def __init__(self, reloader: ChampionReloader, interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.reloader, self.interval_s = reloader, interval_s
        self.polls = 0  # completed polls, failed ones included
        self.last_error: str | None = None
        self._done = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lorafleet-registry-poller", daemon=True)

    def start(self) -> RegistryPoller:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Returns once the thread has ended or after `timeout`. A poll in progress finishes the name it is
        loading and skips the rest; one waiting for an admin reload gives up."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def wait_polls(self, count: int, timeout: float) -> bool:
        """Block until `count` polls have completed; False on timeout (tests wait on this, not on sleep)."""
        with self._done:
            return self._done.wait_for(lambda: self.polls >= count, timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            error = None
            try:
                for change in self.reloader.reload(stop=self._stop):
                    if change.changed:
                        log.info("registry poll: %s moved from version %s to %s", change.name,
                                 change.old_version, change.new_version)
            except Exception as failure:  # noqa: BLE001 - a registry outage must not stop serving
                error = f"{type(failure).__name__}: {failure}"
                log.warning("registry poll failed, serving what is loaded: %s", error)
            with self._done:
                self.polls += 1
                self.last_error = error
                self._done.notify_all()
