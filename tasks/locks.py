"""Cross-process locks: one finetune per adapter name, one champion move per name.

(The third, one store migration, is `lorafleet/mlflow_store.py`'s: the server takes it too.)

All are advisory `flock` locks on small files. The kernel drops a `flock` when its holder dies, however
it dies (SIGKILL included), so a lock file naming a dead process is simply taken over by the next
caller: there is no stale-lock clean-up to get wrong, and a reused pid cannot keep a lock alive. The
finetune lock file also records who holds it (pid, host, start time) so the second caller's error can
name them.

What they guarantee, and where they stop: a `flock` orders processes of one machine (on a network
filesystem only where it implements `flock`, e.g. NFSv4, with its caveats). With a tracking server shared
by several machines (`MLFLOW_TRACKING_URI=http://...`, PostgreSQL behind it):
- finetune (`LORAFLEET_HOME/locks/finetune-<name>.lock`): one finetune of a name per home. Two machines,
  each with its own home, can fine-tune one name at the same time and do not see each other; the
  registry still stays consistent (each run registers at most one version, and the server's database
  numbers versions), but the work is done twice, and resuming a run works only on the machine whose
  checkpoint folder recorded it.
- promotion (a machine-local folder keyed by the tracking URI; beside the database for SQLite): every
  champion move of a name from this machine is a compare-and-set against the others from this machine.
  Across machines there is no mutual exclusion: MLflow's registry has no conditional write (setting an
  alias overwrites it), so `tasks/registry.py` re-reads the champion under this lock before it moves it
  and reads it back after: a move another machine overtook in that window is reported, not recorded.
  A whole read-decide-write of another machine that falls between our read and our write is still
  lost to "last writer wins".
- store creation (`lorafleet/mlflow_store.py`): migrations of a database opened directly, per machine.
  A server migrates its store once when it starts; a shared database used directly needs
  `mlflow db upgrade <uri>` once at deployment.
What closes the cross-machine gaps without a new lock service: serialise per adapter name in the
orchestrator already in use, i.e. run finetunes and promotions of a name only as Prefect deployments
under a concurrency limit of 1 (a global concurrency limit or a work queue with limit 1), which the
Prefect server enforces across workers; or, for writers that talk to PostgreSQL directly, a transaction
holding `pg_advisory_xact_lock(hashtext('lorafleet.promote.' || name))` around read and move, which the
MLflow REST API does not expose.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from lorafleet.mlflow_store import LOCKS_FOLDER, store_lock_dir
from lorafleet.models.cache import file_lock
from lorafleet.names import NAME_PATTERN, NAME_RULE

_PEEK_RETRIES = 20
_PEEK_WAIT_S = 0.05


class AlreadyRunning(RuntimeError):
    """Another process holds the finetune lock of this adapter name."""


@dataclass(frozen=True)
class Holder:
    """Who holds a finetune lock, as recorded in its file."""

    pid: int | None
    host: str
    started_at: str

    def describe(self) -> str:
        pid = "unknown pid" if self.pid is None else f"pid {self.pid}"
        return f"{pid} on host {self.host or 'unknown'}, since {self.started_at or 'an unknown time'}"


@contextlib.contextmanager
def promotion_lock(tracking_uri: str, name: str) -> Iterator[None]:
    """Held while `champion` of `name` is read, decided on and moved: champion moves are compare-and-set."""
    with file_lock(store_lock_dir(tracking_uri) / f"promote-{_safe(name)}.lock"):
        yield


def finetune_lock_path(home: Path, name: str) -> Path:
    return Path(home) / LOCKS_FOLDER / f"finetune-{_safe(name)}.lock"


@contextlib.contextmanager
def finetune_lock(home: Path, name: str) -> Iterator[Holder]:
    """Exclusive right to fine-tune `name` in this LORAFLEET_HOME, for the whole flow.

    Two finetunes of one name would share the MLflow run, the checkpoint and adapter folders and the
    registered versions; the second caller gets `AlreadyRunning` naming the first, at once (no waiting).
    """
    path = finetune_lock_path(home, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, name)
        holder = Holder(pid=os.getpid(), host=socket.gethostname(),
                        started_at=datetime.now(UTC).isoformat(timespec="seconds"))
        _write_holder(fd, holder)
        try:
            yield holder
        finally:
            os.ftruncate(fd, 0)  # an unheld lock names nobody
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def finetune_holder(home: Path, name: str) -> Holder | None:
    """Who is fine-tuning `name` now, or None: a quick check before starting an expensive flow."""
    path = finetune_lock_path(home, name)
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        if _try_flock(fd, shared=True):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        return _read_holder(fd)
    finally:
        os.close(fd)


def already_running_message(name: str, holder: Holder) -> str:
    return (f"a finetune of {name!r} is already running ({holder.describe()}); wait for it to finish or stop "
            "it. A lock left by a process that died is taken over automatically.")


def _acquire(fd: int, name: str) -> None:
    """Take the lock at once, or raise `AlreadyRunning` naming the holder."""
    for _ in range(_PEEK_RETRIES):
        if _try_flock(fd):
            return
        holder = _read_holder(fd)
        if holder.pid is not None:
            raise AlreadyRunning(already_running_message(name, holder))
        # Nobody named: `finetune_holder` peeking (it holds a shared lock for an instant), or a finetune
        # between taking the lock and writing its name. Ask again shortly.
        time.sleep(_PEEK_WAIT_S)
    raise AlreadyRunning(already_running_message(name, _read_holder(fd)))


def _try_flock(fd: int, *, shared: bool = False) -> bool:
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _write_holder(fd: int, holder: Holder) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": holder.pid, "host": holder.host, "started_at": holder.started_at}).encode(), 0)


def _read_holder(fd: int) -> Holder:
    """The recorded holder; fields stay unknown while the holder is between taking the lock and writing."""
    try:
        raw = json.loads(os.pread(fd, 4096, 0) or b"{}")
        pid = raw.get("pid")
        return Holder(pid=pid if isinstance(pid, int) else None, host=str(raw.get("host", "")),
                      started_at=str(raw.get("started_at", "")))
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return Holder(pid=None, host="", started_at="")


def _safe(name: str) -> str:
    """Lock files are named after adapters: only names that are valid adapter names (no '/', no '..')."""
    if not NAME_PATTERN.match(name):
        raise ValueError(f"adapter name {name[:80]!r} is not valid: it must be {NAME_RULE}")
    return name
