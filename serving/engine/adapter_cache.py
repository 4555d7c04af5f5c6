"""Adapters in LoRA slots on demand: LRU under the slot capacity, files read off the step loop.

Reading an adapter (safetensors, PEFT key mapping, Turbo heads) takes tens to hundreds of ms; inside
`Engine.step` it would stall every running sequence. So a miss only *starts* a read on a background
thread; the step loop later calls `install_ready()` between two forwards to copy finished reads into
the slot tensors, which nothing else writes, so no forward ever sees a slot change under it.

Choices, each for a reason:
* All slots taken: the least recently used *unpinned* adapter is evicted. Running sequences pin theirs,
  so a slot is never reassigned under a forward; with every slot pinned, a finished read waits.
* A failed read or copy becomes `error(name)` (naming the adapter and folder) so the engine can fail
  the requests waiting for it; a failed copy clears its slot. The next `request(name)` retries.
* `refresh()` re-resolves resident names and reads a changed identity in the background; it is swapped
  in place only while the name is unpinned, so running requests keep the weights they started with
  (a never-idle adapter keeps its old version until its first idle step: the price of name-level pins).
  A new version that fails to read leaves the old one serving and is not retried until it changes again.
* `unload` refuses (False) while pinned rather than deferring: the admin gets a definite answer now.
* A Turbo adapter without LoRA weights (heads on the bare base) needs no slot: it is resident at slot 0
  (the base) with its heads; at most `num_slots` such entries, same LRU rule, so they stay bounded.

`_lock` guards the bookkeeping and is never held while resolving, reading files or copying tensors;
`_install_lock` serialises the one slot writer, `install_ready`.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet.models import adapter_dir as files
from lorafleet.models.lora_weights import LoraWeights, read_peft_adapter
from lorafleet.models.turbo_heads import TurboHeads, load_heads
from lorafleet.serving.engine.merged_adapters import MergePlan, read_merge
from lorafleet.serving.engine.openmp_pool import release_thread_pool

if TYPE_CHECKING:
    from lorafleet.serving.engine.lora_slots import LoraSlots
    from lorafleet.serving.engine.model import LlamaShape

log = logging.getLogger(__name__)

LOAD_MS_KEPT = 1024  # load-time samples kept for metrics; older ones are dropped


@dataclass(frozen=True)
class ResolvedAdapter:
    """What a served name means right now; `identity` changes when the name should be reloaded."""

    name: str
    identity: str
    path: Path
    merge: MergePlan | None = None  # a per-request merge: its parents are read and merged (`merged_adapters`)


class AdapterNotFound(LookupError):
    """The resolver knows no adapter by this name (the service answers 404)."""


class AdapterLoadError(RuntimeError):
    """An adapter folder could not be read or copied into a slot."""

    def __init__(self, resolved: ResolvedAdapter, reason: str) -> None:
        super().__init__(f"adapter {resolved.name!r} (identity {resolved.identity}) at {resolved.path}: "
                         f"{reason}")
        self.name, self.path = resolved.name, resolved.path


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter read into CPU memory, ready to copy into a slot."""

    weights: LoraWeights | None  # None: a Turbo adapter on the bare base (heads only)
    heads: TurboHeads | None


AdapterReader = Callable[[Path, "LlamaShape"], LoadedAdapter]


def read_adapter_dir(path: Path, shape: LlamaShape, *, device: Any = "cpu") -> LoadedAdapter:
    """The default reader: PEFT LoRA files and/or Turbo heads of one adapter directory.

    Either file of a pair triggers its reader, so a folder missing one half fails with that reader's
    error naming the missing file instead of being served silently without it. Both readers check
    every tensor against `shape` (names, shapes, dtypes from the header, then finite values) before
    the adapter can become resident."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    has_lora = (path / files.PEFT_CONFIG_FILE).exists() or (path / files.PEFT_WEIGHTS_FILE).exists()
    has_heads = (path / files.TURBO_CONFIG_FILE).exists() or (path / files.TURBO_WEIGHTS_FILE).exists()
    if not has_lora and not has_heads:
        raise FileNotFoundError(f"{path} holds neither PEFT LoRA files ({files.PEFT_CONFIG_FILE}) "
                                f"nor Turbo heads ({files.TURBO_CONFIG_FILE})")
    weights = read_peft_adapter(path, shape) if has_lora else None
    # Heads are checked against the base model's sizes before anything is allocated for them.
    heads = load_heads(path, device=device, hidden_size=shape.hidden_size, vocab_size=shape.vocab_size) \
        if has_heads else None
    return LoadedAdapter(weights=weights, heads=heads)


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the counters (safe to read from a metrics thread)."""

    hits: int = 0  # request() found the adapter resident
    misses: int = 0  # request() started a load
    loads: int = 0  # adapters installed (first loads and reloads)
    evictions: int = 0  # resident adapters dropped to make room
    failures: int = 0  # reads or copies that failed
    load_ms: list[float] = field(default_factory=list)  # background read time of each installed load
    resident: int = 0  # adapters resident now (LoRA slots in use + heads-only entries)


@dataclass
class _Entry:
    resolved: ResolvedAdapter
    slot: int  # 0: heads only, no slot
    heads: TurboHeads | None


@dataclass
class _Pending:
    resolved: ResolvedAdapter
    future: cf.Future[tuple[LoadedAdapter, float]]


@dataclass
class _Job:
    name: str
    pending: _Pending
    loaded: LoadedAdapter
    ms: float
    slot: int
    error: Exception | None = None


class AdapterCache:
    """Resident adapters of one engine; `request`/`pin`/`unpin` from the step loop, admin calls anywhere."""

    def __init__(self, slots: LoraSlots, shape: LlamaShape, resolver: Callable[[str], ResolvedAdapter], *,
                 max_workers: int = 1, reader: AdapterReader | None = None, device: Any = None) -> None:
        if slots.num_slots < 1:
            raise ValueError(f"slots.num_slots must be >= 1, got {slots.num_slots}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.slots, self.shape = slots, shape
        self._resolver = resolver
        # Turbo heads run on the hidden states, so by default they live where the slots do.
        self._reader = reader or functools.partial(read_adapter_dir, device=device or slots.device)
        self._executor = cf.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="adapter-load")
        self._lock = threading.Lock()
        self._install_lock = threading.Lock()
        self._resident: collections.OrderedDict[str, _Entry] = collections.OrderedDict()  # LRU first
        self._pending: dict[str, _Pending] = {}
        self._errors: dict[str, Exception] = {}
        self._failed_identity: dict[str, str] = {}  # name -> new identity whose reload failed
        self._pins: collections.Counter[str] = collections.Counter()
        self._free: set[int] = set(range(1, slots.num_slots + 1))
        self._stale: set[int] = set()  # slots still holding the tensors of an adapter no longer resident
        self._counts = collections.Counter[str]()
        self._load_ms: collections.deque[float] = collections.deque(maxlen=LOAD_MS_KEPT)

    # ----- the step loop's calls ---------------------------------------------------------------
    def request(self, name: str) -> int | None:
        """The slot of `name` if resident (an LRU touch), else start loading it and return None.

        Resolution happens here, on the caller's thread, so an unknown name raises AdapterNotFound
        at once; reading files never does. Asking again while the read runs is neither hit nor miss."""
        with self._lock:
            slot = self._touch(name)
            if slot is not None or name in self._pending:
                return slot
        resolved = self._resolver(name)  # outside the lock: it may ask a registry
        with self._lock:
            slot = self._touch(name)
            if slot is not None or name in self._pending:
                return slot
            self._start(name, resolved)
            self._errors.pop(name, None)
            self._counts["misses"] += 1
            return None

    def install_ready(self) -> list[str]:
        """Copy finished reads into slots (between forwards); return the names installed.

        A read that cannot get a slot (every candidate pinned) stays pending for a later call."""
        with self._install_lock:
            with self._lock:
                jobs = self._plan()
            for job in jobs:  # tensor writes, outside the bookkeeping lock
                self._write(job)
            with self._lock:
                installed = [job.name for job in jobs if self._commit(job)]
                stale = sorted(self._stale & self._free)
                self._stale -= set(stale)
            for slot in stale:  # free slots of unloaded adapters: zeroed so no module looks targeted
                self.slots.clear(slot)
            return installed

    def slot_of(self, name: str) -> int | None:
        """The slot of a resident adapter (0 for heads only), else None; no LRU touch, no load."""
        with self._lock:
            entry = self._resident.get(name)
            return None if entry is None else entry.slot

    def identity_of(self, name: str) -> str | None:
        """The resolver identity of the resident `name` (None when not resident): what its weights are."""
        with self._lock:
            entry = self._resident.get(name)
            return None if entry is None else entry.resolved.identity

    def pin(self, name: str) -> None:
        """One more user of `name`: pinned adapters are never evicted, unloaded or reloaded.

        A name still loading may be pinned too: once installed, it then cannot be evicted."""
        with self._lock:
            self._pins[name] += 1

    def unpin(self, name: str) -> None:
        with self._lock:
            if not self._pins.get(name):
                raise ValueError(f"unpin({name!r}) without a matching pin")
            self._pins[name] -= 1
            if not self._pins[name]:
                del self._pins[name]

    def error(self, name: str) -> Exception | None:
        """Why the last load of `name` failed (AdapterLoadError), until a new request retries it."""
        with self._lock:
            return self._errors.get(name)

    def heads(self, name: str) -> TurboHeads | None:
        with self._lock:
            entry = self._resident.get(name)
            return None if entry is None else entry.heads

    # ----- admin calls -------------------------------------------------------------------------
    def unload(self, name: str) -> bool:
        """Drop `name` (resident or loading); False when pinned (refused) or unknown.

        The slot is only marked free: an admin thread may run this during a forward, so its tensors
        are cleared by the next `install_ready`, on the step loop."""
        with self._lock:
            if self._pins.get(name):
                return False
            pending = self._pending.pop(name, None)
            if pending is not None:
                pending.future.cancel()
            entry = self._resident.pop(name, None)
            if entry is not None:
                self._release(entry)
            return pending is not None or entry is not None

    def refresh(self) -> list[str]:
        """Re-resolve resident names; start reloading those whose identity changed; return them.

        A name the resolver no longer knows (or cannot answer for now) keeps what is resident: this
        is a background poll, and a registry outage must not empty the cache."""
        with self._lock:
            current = [(name, entry.resolved.identity) for name, entry in self._resident.items()]
        started = []
        for name, identity in current:
            try:
                resolved = self._resolver(name)
            except Exception as error:  # noqa: BLE001 - one bad name must not stop the others
                log.warning("refresh: keeping %s (identity %s): %s", name, identity, error)
                continue
            if resolved.identity == identity:
                continue
            with self._lock:
                entry, pending = self._resident.get(name), self._pending.get(name)
                if (entry is None or entry.resolved.identity == resolved.identity
                        or (pending is not None and pending.resolved.identity == resolved.identity)
                        or self._failed_identity.get(name) == resolved.identity):
                    continue
                if pending is not None:  # an older reload, superseded
                    pending.future.cancel()
                self._start(name, resolved)
                started.append(name)
        return started

    def resident(self) -> list[str]:
        """Resident names, least recently used first."""
        with self._lock:
            return list(self._resident)

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return self._snapshot(list(self._load_ms))

    def stats_since(self, loads: int) -> CacheStats:
        """`stats`, with `load_ms` holding only the installs after the first `loads` (the newest last).

        Metrics read the cache after every engine step and take deltas; copying all kept samples
        each time would cost more than the step's bookkeeping, so this copies only the new ones."""
        with self._lock:
            new = min(max(self._counts["loads"] - loads, 0), len(self._load_ms))
            recent = list(itertools.islice(self._load_ms, len(self._load_ms) - new, None)) if new else []
            return self._snapshot(recent)

    def wait_loading(self, timeout: float | None = None, return_when: str = cf.ALL_COMPLETED) -> bool:
        """Block until the reads in flight finish (or one does, with FIRST_COMPLETED); True if so.

        For an engine with nothing runnable but loads in flight (instead of spinning on `step`), and
        for tests, which wait on the reads themselves rather than sleep."""
        with self._lock:
            futures = [pending.future for pending in self._pending.values()]
        if not futures:
            return True
        done, not_done = cf.wait(futures, timeout=timeout, return_when=return_when)
        return not not_done if return_when == cf.ALL_COMPLETED else bool(done)

    def wait_read(self, name: str, timeout: float | None = None) -> bool:
        """Block until the read of `name` in flight (if any) ends; True if so, False on timeout.

        Only this adapter's read: an admin warm-up of one adapter must not time out behind a slow,
        unrelated one (which `wait_loading` would wait for too)."""
        with self._lock:
            pending = self._pending.get(name)
        if pending is None:
            return True
        done, _ = cf.wait([pending.future], timeout=timeout)
        return bool(done)

    def close(self) -> None:
        """Stop the reader threads; reads not started yet are cancelled."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    # ----- internals (callers hold _lock unless noted) ------------------------------------------
    def _snapshot(self, load_ms: list[float]) -> CacheStats:
        counts = self._counts
        return CacheStats(hits=counts["hits"], misses=counts["misses"], loads=counts["loads"],
                          evictions=counts["evictions"], failures=counts["failures"], load_ms=load_ms,
                          resident=len(self._resident))

    def _touch(self, name: str) -> int | None:
        entry = self._resident.get(name)
        if entry is None:
            return None
        self._resident.move_to_end(name)
        self._counts["hits"] += 1
        return entry.slot

    def _start(self, name: str, resolved: ResolvedAdapter) -> None:
        self._pending[name] = _Pending(resolved, self._executor.submit(self._read, resolved))

    def _read(self, resolved: ResolvedAdapter) -> tuple[LoadedAdapter, float]:
        """Runs on a reader thread: files to CPU tensors, never touching the slots or shared state."""
        start = time.perf_counter()
        try:
            loaded = self._reader(resolved.path, self.shape) if resolved.merge is None \
                else read_merge(resolved.merge, self._reader, self.shape)
        except Exception as error:
            raise AdapterLoadError(resolved, f"{type(error).__name__}: {error}") from error
        finally:  # this idle reader thread must not keep an OpenMP team: it slows every engine step
            release_thread_pool()
        if loaded.weights is None and loaded.heads is None:
            raise AdapterLoadError(resolved, "the reader returned neither LoRA weights nor Turbo heads")
        if loaded.weights is not None and loaded.weights.rank > self.slots.max_rank:
            # Checked here, before anything is evicted for it (LoraSlots.load would refuse it later).
            raise AdapterLoadError(resolved, f"LoRA rank {loaded.weights.rank} exceeds the slots' "
                                             f"max_rank {self.slots.max_rank}")
        return loaded, (time.perf_counter() - start) * 1000.0

    def _plan(self) -> list[_Job]:
        """Pick the finished reads to install now and reserve (evicting if needed) a slot for each."""
        jobs: list[_Job] = []
        for name, pending in list(self._pending.items()):
            future = pending.future
            if not future.done() or self._pending.get(name) is not pending:  # or cancelled by an eviction
                continue
            if future.cancelled() or future.exception() is not None:
                self._fail_read(name, pending)
                continue
            loaded, ms = future.result()
            needs_slot = loaded.weights is not None
            entry = self._resident.get(name)
            if entry is not None and self._pins.get(name):
                continue  # a reload waits until nobody runs on the old version
            if entry is not None and (entry.slot > 0) == needs_slot:
                slot = entry.slot  # reload in place
                del self._resident[name]
            else:
                slot = self._reserve(needs_slot, jobs)
                if slot is None:
                    continue  # every candidate is pinned: stays pending, installed later
                if entry is not None:  # a reload that gains or loses LoRA weights
                    del self._resident[name]
                    self._release(entry)
            self._stale.discard(slot)  # `LoraSlots.load` replaces the whole slot
            jobs.append(_Job(name, pending, loaded, ms, slot))
        return jobs

    def _fail_read(self, name: str, pending: _Pending) -> None:
        del self._pending[name]
        if pending.future.cancelled():
            return
        error = pending.future.exception()
        self._counts["failures"] += 1
        if name in self._resident:  # a failed reload: the old version keeps serving
            self._failed_identity[name] = pending.resolved.identity
            log.warning("reload failed, keeping the resident version: %s", error)
        else:
            self._errors[name] = error
            log.warning("adapter load failed: %s", error)

    def _reserve(self, needs_slot: bool, jobs: list[_Job]) -> int | None:
        """A free slot, else the LRU unpinned adapter's (evicted); 0 for heads only; None if all pinned.

        What this same call installs (`jobs`) is not resident yet, so it is never the victim:
        evicting what was just loaded would only thrash."""
        if needs_slot and self._free:
            slot = min(self._free)
            self._free.discard(slot)
            return slot
        if not needs_slot:
            heads_only = sum(1 for entry in self._resident.values() if entry.slot == 0)
            if heads_only + sum(1 for job in jobs if job.slot == 0) < self.slots.num_slots:
                return 0
        for name, entry in self._resident.items():  # least recently used first
            if (entry.slot > 0) == needs_slot and not self._pins.get(name):
                del self._resident[name]
                self._counts["evictions"] += 1
                reload = self._pending.pop(name, None)
                if reload is not None:  # nobody asked for the new version of what is evicted now
                    reload.future.cancel()
                return entry.slot
        return None

    def _release(self, entry: _Entry) -> None:
        if entry.slot:
            self._free.add(entry.slot)
            self._stale.add(entry.slot)

    def _write(self, job: _Job) -> None:
        """Step-loop thread, no bookkeeping lock: the reserved slot belongs to this job alone."""
        if job.slot == 0:
            return
        try:
            self.slots.load(job.slot, job.loaded.weights)
        except Exception as error:  # noqa: BLE001 - recorded for the waiting requests
            job.error = AdapterLoadError(job.pending.resolved, f"copy into slot {job.slot} failed: "
                                                               f"{type(error).__name__}: {error}")
            job.error.__cause__ = error
            self.slots.clear(job.slot)  # never leave a half-written slot behind

    def _commit(self, job: _Job) -> bool:
        """Publish a written slot; a job unloaded or superseded while copying gives its slot back."""
        current = self._pending.get(job.name)
        if current is not job.pending:
            self._release(_Entry(job.pending.resolved, job.slot, None))
            return False
        del self._pending[job.name]
        if job.error is not None:
            self._counts["failures"] += 1
            self._errors[job.name] = job.error
            if job.slot:
                self._free.add(job.slot)
            log.warning("adapter install failed: %s", job.error)
            return False
        self._resident[job.name] = _Entry(job.pending.resolved, job.slot, job.loaded.heads)
        self._errors.pop(job.name, None)
        self._failed_identity.pop(job.name, None)
        self._counts["loads"] += 1
        self._load_ms.append(job.ms)
        return True
