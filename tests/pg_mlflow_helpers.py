"""A private PostgreSQL cluster and a real `mlflow server` on it, with proxied artifacts, for the
scale-out tests (tests/test_mlflow_postgres.py); registered as a pytest plugin in conftest.py.

Both are started once per session (initdb + the MLflow migrations on PostgreSQL cost tens of seconds on
a busy machine) and torn down with their whole process groups. PostgreSQL refuses to run as root, so
when the tests run as root the cluster runs as the `postgres` user, in a folder under the system temp
dir that user can reach (pytest's own tmp folders are private to root). The cluster trusts every local
connection: it listens on 127.0.0.1 and a private socket folder only, and lives for one test session.

The MLflow server stores runs and the registry in PostgreSQL and serves artifacts itself
(`--artifacts-destination`): experiments it creates get `mlflow-artifacts:/` locations, so clients
upload and download adapters over HTTP and share no folder with the server.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lorafleet.processes import stop_process_group

PG_USER = "postgres"  # the cluster's superuser, and the OS user it runs as when we are root
MLFLOW_DATABASE = "mlflow"
# Readiness waits, not timing checks: on a loaded 2-core machine the first MLflow start on an empty
# database (its alembic migrations) can take minutes.
PG_START_TIMEOUT_S = 180.0
MLFLOW_START_TIMEOUT_S = 420.0
STOP_TIMEOUT_S = 30.0


class ServiceStartError(RuntimeError):
    """A server the tests need did not come up; the message ends with its log tail."""


def postgres_bin_dir() -> Path | None:
    """The folder holding `initdb`/`postgres`: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda path: int(Path(path).parts[-3]) if Path(path).parts[-3].isdigit() else 0)
    return Path(found[-1]).parent if found else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _as_pg_user() -> list[str]:
    """PostgreSQL will not start as root: run its programs as `postgres` then (needs `runuser`)."""
    return ["runuser", "-u", PG_USER, "--"] if os.geteuid() == 0 else []


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def stop_group(process: subprocess.Popen, first: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> None:
    """Signal a process group started with `start_new_session=True` with `first` and wait until all of it
    is gone; SIGKILL whatever is left after `timeout` (children that outlive their leader included)."""
    stop_process_group(process, first, grace=timeout)


@dataclass
class PostgresCluster:
    """A running private cluster: reach it at 127.0.0.1:`port` (or the socket in `socket_dir`)."""

    bin_dir: Path
    root: Path
    port: int
    process: subprocess.Popen
    log_file: Path
    databases: list[str] = field(default_factory=list)  # made by `createdb`

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    def url(self, database: str, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def createdb(self, name: str) -> str:
        """Create a database and return its SQLAlchemy URL."""
        _run([str(self.bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, name])
        self.databases.append(name)
        return self.url(name)

    def stop(self) -> None:
        # SIGINT is PostgreSQL's "fast" shutdown: it does not wait for clients (MLflow's pool) to leave.
        stop_group(self.process, signal.SIGINT)
        shutil.rmtree(self.root, ignore_errors=True)
        for name in self.databases:
            remove_store_locks(self.url(name))


def remove_store_locks(tracking_uri: str) -> None:
    """lorafleet keeps the locks of a store that is not a SQLite file in a temp folder named after its URI
    (`lorafleet/mlflow_store.py`); a test server's URI is never used again, so its folder goes with it."""
    from lorafleet.mlflow_store import store_lock_dir

    shutil.rmtree(store_lock_dir(tracking_uri), ignore_errors=True)


def _run(command: Sequence[str], timeout: float = 120.0) -> None:
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, check=False,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise ServiceStartError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")


def start_postgres(bin_dir: Path, *, timeout: float = PG_START_TIMEOUT_S) -> PostgresCluster:
    """initdb a fresh cluster in a new temp folder and start `postgres` on a free port."""
    root = Path(tempfile.mkdtemp(prefix="lorafleet-pg-"))
    (root / "socket").mkdir()
    if os.geteuid() == 0:
        for path in (root, root / "socket"):
            shutil.chown(path, user=PG_USER, group=None)
    user = _as_pg_user()
    # Test data: no fsync, no crash safety; trust auth for local connections only.
    _run([*user, str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", PG_USER, "--auth=trust",
          "-E", "UTF8", "--no-sync", "--no-instructions"], timeout=timeout)
    port = free_port()
    log_file = root / "postgres.log"
    with open(log_file, "wb") as log:
        if os.geteuid() == 0:
            shutil.chown(log_file, user=PG_USER, group=None)
        process = subprocess.Popen(
            [*user, str(bin_dir / "postgres"), "-D", str(root / "data"), "-p", str(port), "-h", "127.0.0.1",
             "-k", str(root / "socket"), "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=200"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    cluster = PostgresCluster(bin_dir=bin_dir, root=root, port=port, process=process, log_file=log_file)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise ServiceStartError(f"postgres exited with code {process.returncode}:\n{_tail(log_file)}")
            ready = subprocess.run([str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)],
                                   check=False, stdin=subprocess.DEVNULL)
            if ready.returncode == 0:
                return cluster
            if time.monotonic() > deadline:
                raise ServiceStartError(f"postgres not ready within {timeout:.0f} s:\n{_tail(log_file)}")
            time.sleep(0.25)
    except BaseException:
        cluster.stop()
        raise


@dataclass
class MlflowServer:
    """A running `mlflow server`: tracking URI `url`, backend `backend_uri`, artifacts under `artifacts_dir`."""

    url: str
    backend_uri: str
    artifacts_dir: Path
    process: subprocess.Popen
    log_file: Path

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_file, lines)

    def stop(self) -> None:
        # Its data is thrown away: no need to wait out uvicorn's graceful shutdown (~20 s here).
        stop_group(self.process, signal.SIGTERM, timeout=5.0)
        remove_store_locks(self.url)


def mlflow_server_command(backend_uri: str, artifacts_dir: Path, port: int) -> list[str]:
    """One worker: the tests are a handful of clients, and each worker holds its own database pool."""
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
            "--artifacts-destination", str(artifacts_dir), "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]


def start_mlflow_server(backend_uri: str, folder: Path, *, timeout: float = MLFLOW_START_TIMEOUT_S) -> MlflowServer:
    """Start `mlflow server` on `backend_uri` with proxied artifacts in `folder/artifacts`; return once
    `/health` answers."""
    import httpx

    folder.mkdir(parents=True, exist_ok=True)
    artifacts = folder / "artifacts"
    port = free_port()
    log_file = folder / "mlflow-server.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    with open(log_file, "wb") as log:
        process = subprocess.Popen(mlflow_server_command(backend_uri, artifacts, port), cwd=folder, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    server = MlflowServer(url=f"http://127.0.0.1:{port}", backend_uri=backend_uri, artifacts_dir=artifacts,
                          process=process, log_file=log_file)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise ServiceStartError(f"mlflow server exited with code {process.returncode}:\n{server.log_tail()}")
            try:
                if httpx.get(f"{server.url}/health", timeout=5.0).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise ServiceStartError(f"mlflow server not healthy within {timeout:.0f} s:\n{server.log_tail()}")
            time.sleep(0.5)
    except BaseException:
        server.stop()
        raise


# ----- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A private PostgreSQL cluster for the session; skipped only when PostgreSQL is not installed."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None or not (bin_dir / "postgres").is_file():
        pytest.skip("PostgreSQL server binaries (initdb, postgres) not found on PATH or in "
                    "/usr/lib/postgresql/*/bin: install Debian's `postgresql` package (.ci/run does)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root, and `runuser` (util-linux) is missing to start PostgreSQL as `postgres`")
    cluster = start_postgres(bin_dir)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def mlflow_server(postgres_cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """`mlflow server` on a PostgreSQL database of the private cluster, artifacts proxied by the server."""
    backend = postgres_cluster.createdb(MLFLOW_DATABASE)
    server = start_mlflow_server(backend, tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server
    finally:
        server.stop()
