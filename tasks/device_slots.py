"""How many fine-tunes train at once, and on which device each one trains.

N fine-tunes share M devices in two layers, because they answer two different questions:

1. *How many at once, across every process and machine* — a Prefect global concurrency limit
   (`gpu` by default). Each finetune holds one slot of it for its whole body, so however the jobs are
   started (one after another, a retrain fanning out deployments, workers on several machines) at most
   `limit` of them train at the same time. Prefect owns this count; lorafleet invents no scheduler.
2. *Which device on this machine* — inside its slot, a job claims one of this machine's configured
   devices with a file lock, so two slot holders on one machine never land on the same GPU. The kernel
   drops the lock when its holder dies, however it dies, so nothing stale is left to clean up. The CPU is
   shared by time-slicing and never locked: with no GPU every job gets `cpu`.

A job trained on N processes (`training.distributed.num_processes`) needs N devices: it holds N slots
and claims N devices, all or none, and its launcher sees only those (`CUDA_VISIBLE_DEVICES`). On the
shared CPU its ranks share the one device, so it holds one slot like any other job.

The global limit needs a Prefect server (`PREFECT_API_URL`). On Prefect's ephemeral API (a laptop, no
server) it is not used: there is only one machine, whose device locks already bound the jobs, and a
temporary API server keeps slot leases in memory, so a holder killed together with it would leave its
slot taken in the persistent database for good and every later finetune would wait forever. File locks
are released by the kernel however their holder dies.

On a server, a limit that does not exist yet is created, sized to this machine's device count, with a
warning that names the command to resize it. Prefect's own behaviour for a missing limit is to log a
warning and run *unbounded*, which on a GPU box means out-of-memory crashes; failing instead would make
the first run on a new server an error for a limit nobody was told to create. The operator sizes it to
the fleet (`prefect gcl update gpu --limit N`) and it is then never touched.

Defaults live here, read once at an entry point (`SlotSettings.from_env`): the variables are
`LORAFLEET_CONCURRENCY_LIMIT` (the limit's name; `none` turns the global limit off),
`LORAFLEET_DEVICES` (comma-separated, e.g. `cuda:0,cuda:1`; default: every visible CUDA device, else `cpu`)
and `LORAFLEET_DEVICE_LOCKS` (the lock folder; machine-wide by default, since devices are).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LIMIT_NAME = "gpu"
DEFAULT_LOCK_DIR = Path(tempfile.gettempdir()) / "lorafleet-device-locks"
SHARED_DEVICES = frozenset({"cpu"})  # time-sliced by the OS: any number of jobs may use it at once
AUTO = "auto"
_OFF = {"", "none", "off"}
_LIMIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_DEVICE = re.compile(r"^(cpu|mps|(cuda|xpu)(:\d+)?)$")
_POLL_S = 1.0
_log = logging.getLogger(__name__)


class SlotSettingsError(ValueError):
    """A device list or limit name that cannot be used; the message names the variable."""


@dataclass(frozen=True)
class SlotSettings:
    """The global limit's name (None: no global limit) and this machine's devices, in claim order."""

    limit_name: str | None = DEFAULT_LIMIT_NAME
    devices: tuple[str, ...] = ("cpu",)
    lock_dir: Path = DEFAULT_LOCK_DIR

    def __post_init__(self) -> None:
        if self.limit_name is not None and not _LIMIT_NAME.match(self.limit_name):
            raise SlotSettingsError(f"LORAFLEET_CONCURRENCY_LIMIT={self.limit_name!r} is not a valid limit name: "
                                    "use letters, digits, '_', '.', '-' (or 'none' for no global limit)")
        if not self.devices:
            raise SlotSettingsError("LORAFLEET_DEVICES is empty: name at least one device (e.g. cpu or cuda:0)")
        bad = [device for device in self.devices if not _DEVICE.match(device)]
        if bad:
            raise SlotSettingsError(f"LORAFLEET_DEVICES: {', '.join(map(repr, bad))} is not a device; "
                                    "use cpu, mps, cuda, cuda:N or xpu:N, comma-separated")
        if len(set(self.devices)) != len(self.devices):
            raise SlotSettingsError(f"LORAFLEET_DEVICES lists a device twice: {','.join(self.devices)}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SlotSettings:
        env = os.environ if environ is None else environ
        name = env.get("LORAFLEET_CONCURRENCY_LIMIT", DEFAULT_LIMIT_NAME).strip()
        listed = env.get("LORAFLEET_DEVICES", "").strip()
        devices = tuple(part.strip() for part in listed.split(",")) if listed else detect_devices()
        lock_dir = Path(env.get("LORAFLEET_DEVICE_LOCKS") or DEFAULT_LOCK_DIR).expanduser()
        return cls(limit_name=None if name.lower() in _OFF else name, devices=devices, lock_dir=lock_dir)

    @property
    def default_limit(self) -> int:
        """The size a missing limit is created with: one job per device of this machine."""
        return len(self.devices)


def detect_devices() -> tuple[str, ...]:
    """Every CUDA device this process can see (CUDA_VISIBLE_DEVICES applies), else the CPU."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return tuple(f"cuda:{index}" for index in range(count)) or ("cpu",)


@contextlib.contextmanager
def device_slot(slots: SlotSettings, requested: str = AUTO,
                log: logging.Logger | logging.LoggerAdapter = _log, *, count: int = 1) -> Iterator[tuple[str, ...]]:
    """Hold global slots, then claim devices of this machine; yields the devices to train on.

    `requested` is the config's `device`: `auto` takes the first free configured device(s), anything else
    is claimed as named (waiting while another job on this machine holds it). `count` > 1 (a run on that
    many processes) claims that many exclusive devices and holds as many slots; on the shared CPU, one of
    each (see the module docstring). Raises SlotSettingsError, before waiting, when the machine or the
    limit could never give that many.
    """
    candidates = _candidates(slots, requested, count)
    occupy = 1 if candidates == ("cpu",) else count
    with _global_slot(slots, log, occupy=occupy), _claim(slots, candidates, count, log) as devices:
        yield devices


def _candidates(slots: SlotSettings, requested: str, count: int) -> tuple[str, ...]:
    """The devices a claim may take: the configured ones for `auto`, else the one named; for several
    processes, this machine's exclusive devices (or the CPU when it has none)."""
    if count < 1:
        raise SlotSettingsError(f"a job needs at least one device, not {count}")
    if count == 1:
        return slots.devices if requested == AUTO else (requested,)
    pool = slots.devices if requested in (AUTO, "cuda") else (requested,)
    exclusive = tuple(device for device in pool if device not in SHARED_DEVICES)
    if not exclusive and any(device in SHARED_DEVICES for device in pool):
        return ("cpu",)
    if len(exclusive) < count:
        raise SlotSettingsError(f"training.distributed.num_processes is {count}, but device {requested!r} gives "
                                f"{len(exclusive)} exclusive device(s) of LORAFLEET_DEVICES="
                                f"{','.join(slots.devices)}: one process per device")
    return exclusive


@contextlib.contextmanager
def _global_slot(slots: SlotSettings, log: logging.Logger | logging.LoggerAdapter, *,
                 occupy: int = 1) -> Iterator[None]:
    if slots.limit_name is None:
        yield
        return
    from prefect.concurrency.sync import concurrency
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        log.info(f"no Prefect server (ephemeral API): concurrency limit {slots.limit_name!r} not used; "
                 "this machine's device locks bound the fine-tunes")
        yield
        return

    size = ensure_limit(slots.limit_name, slots.default_limit, log)
    if occupy > size:  # Prefect would wait for ever
        raise SlotSettingsError(f"this job needs {occupy} slots of concurrency limit {slots.limit_name!r}, which "
                                f"has {size}: `prefect gcl update {slots.limit_name} --limit {occupy}` or fewer "
                                "training.distributed.num_processes")
    log.info(f"waiting for {occupy} slot(s) of concurrency limit {slots.limit_name!r} ({size} at once)")
    # strict: a limit deleted between ensure_limit and here fails loudly instead of running unbounded.
    with concurrency(slots.limit_name, occupy=occupy, strict=True):
        log.info(f"holding {occupy} slot(s) of concurrency limit {slots.limit_name!r}")
        yield


def ensure_limit(name: str, size: int, log: logging.Logger | logging.LoggerAdapter = _log) -> int:
    """The limit's size, creating it with `size` slots when it does not exist (see the module docstring)."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=size))
                log.warning(f"created the missing global concurrency limit {name!r} with {size} slot(s), one per "
                            f"device of this machine; size it for your fleet with "
                            f"`prefect gcl update {name} --limit N` (or create it before the first run)")
            except ObjectAlreadyExists:  # another job created it between our read and our create
                pass
            limit = client.read_global_concurrency_limit_by_name(name)
    if not limit.active:
        log.warning(f"global concurrency limit {name!r} is inactive, so Prefect bounds nothing: "
                    f"`prefect gcl enable {name}` to apply it")
    return limit.limit


@contextlib.contextmanager
def claim_device(slots: SlotSettings, requested: str = AUTO,
                 log: logging.Logger | logging.LoggerAdapter = _log) -> Iterator[str]:
    """Claim a device of this machine for as long as the block runs (see the module docstring)."""
    with _claim(slots, _candidates(slots, requested, 1), 1, log) as devices:
        yield devices[0]


@contextlib.contextmanager
def _claim(slots: SlotSettings, candidates: tuple[str, ...], count: int,
           log: logging.Logger | logging.LoggerAdapter) -> Iterator[tuple[str, ...]]:
    """`count` devices of `candidates`, held together until the block ends.

    With a shared device among the candidates (one process, or the CPU for several) nothing waits: an
    exclusive device that is free right now is preferred, else the shared one. Otherwise the claim
    takes `count` free devices or none, releasing what it found before it waits (no hold-and-wait, so
    two multi-device jobs never deadlock each other).
    """
    shared = [device for device in candidates if device in SHARED_DEVICES]
    if shared:
        exclusive = [device for device in candidates if device not in SHARED_DEVICES]
        with _try_claim_any(slots.lock_dir, exclusive) as device:
            yield (device or shared[0],)
        return
    waited = False
    while True:
        with contextlib.ExitStack() as stack:
            held: list[str] = []
            for device in candidates:
                if len(held) == count:
                    break
                if stack.enter_context(_try_claim_any(slots.lock_dir, [device])) is not None:
                    held.append(device)
            if len(held) == count:
                yield tuple(held)
                return
        if not waited:
            log.info(f"fewer than {count} of {', '.join(candidates)} on this machine are free (claimed by other "
                     "jobs); waiting (the global limit allows more jobs than this machine has devices)")
            waited = True
        time.sleep(_POLL_S)


@contextlib.contextmanager
def _try_claim_any(lock_dir: Path, devices: list[str]) -> Iterator[str | None]:
    """The first of `devices` whose lock is free, held until the block ends; None when all are held."""
    if not devices:
        yield None
        return
    lock_dir.mkdir(parents=True, exist_ok=True)
    for device in devices:
        fd = os.open(lock_dir / f"{device.replace(':', '-')}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                continue
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)  # who holds it, for a human looking at the folder
            yield device
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        return
    yield None
