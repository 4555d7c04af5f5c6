"""Start the BentoML service as a subprocess: for tests, demos, benchmarks and `lorafleet serve`.

The server is a separate `bentoml serve` process (never imported in-process: BentoML's in-process
test client hangs on `/metrics`, and a real process is what users run). It gets its configuration
only through the environment, so the launcher passes `LORAFLEET_HOME`, `MLFLOW_TRACKING_URI`, the
model cache, any `LORAFLEET_BASE_MODEL` / `LORAFLEET_SERVE_*` overrides, and the address it binds. A background server runs
in its own process group, but BentoML starts each worker in a session of its own: a signal to the group
reaches the arbiter only, and an arbiter killed before it stopped its workers leaves them running with
their model and port. So stopping always ends with the whole process tree, found from the live process
table (`psutil`), not with the process group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Self

from lorafleet.processes import kill_survivors, process_tree, stop_process_group
from lorafleet.settings import Settings

# Named for the subprocess, never imported here (only `bentoml serve` loads the service module).
SERVICE = "lorafleet.serving.service:LoraFleetService"  # run by `bentoml serve`, never imported here
# Logged by the service when its __init__ fails. BentoML then respawns the worker every ~10 s instead
# of exiting, so the launcher watches the log for this line rather than waiting for the process to die.
STARTUP_FAILED = "lorafleet service failed to start"
DEFAULT_HOST = "127.0.0.1"
# How the service learns the address it listens on (a `ServiceSettings` field): it decides whether admin is
# on without a key and which Host headers are answered (serving/api/auth.py). Set from `host`, never from `env`.
BIND_HOST_ENV = "LORAFLEET_SERVE_BIND_HOST"


class ServerStartError(RuntimeError):
    """The server exited or never became ready; the message ends with its log tail."""


@dataclass
class ServerHandle:
    process: subprocess.Popen
    host: str
    port: int
    log_file: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """Where a client on this machine reaches it: a wildcard bind is reached through loopback."""
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the process group (BentoML stops its workers), SIGKILL after `timeout`, then kill
        whatever of the server's process tree is still alive: workers live in sessions of their own."""
        stop_process_group(self.process, grace=timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_file.exists():
            return ""
        text = self.log_file.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def server_env(
    settings: Settings, env: Mapping[str, str] | None = None, *, host: str | None = None
) -> dict[str, str]:
    """The current environment plus where lorafleet's state lives, plus `env`, plus the bind `host`.

    `env` wins over the rest, except for the bind host: the service must learn where it really listens."""
    merged = dict(os.environ)
    merged.update(
        {
            "LORAFLEET_HOME": str(settings.home),
            "MLFLOW_TRACKING_URI": settings.tracking_uri,
            "LORAFLEET_MODEL_CACHE": str(settings.model_cache_dir),
            "LORAFLEET_DATA": str(settings.data_root),
            "BENTOML_DO_NOT_TRACK": "True",
            "PYTHONUNBUFFERED": "1",
        }
    )
    merged.setdefault("BENTOML_HOME", str(settings.home / "bentoml"))
    merged.update(env or {})
    if host is not None:
        merged[BIND_HOST_ENV] = host
    return merged


def serve_command(port: int, host: str = DEFAULT_HOST) -> list[str]:
    return [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port)]


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def start_server(
    settings: Settings,
    *,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    log_file: Path | None = None,
    host: str = DEFAULT_HOST,
    startup_timeout: float = 180.0,
) -> ServerHandle:
    """Spawn `bentoml serve` and return once `/readyz` answers 200.

    Raises `ServerStartError` (with the log tail) if the process exits first or is not ready within
    `startup_timeout` seconds; the process is stopped in both cases.
    """
    settings.ensure()
    port = port or free_port(host)
    log_file = Path(log_file or settings.home / "logs" / f"serve-{port}.log")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_file, "wb")  # noqa: SIM115 - owned by the handle, closed in stop()
    # cwd = home: anything that writes relative paths (MLflow's ./mlruns default) lands there.
    process = subprocess.Popen(
        serve_command(port, host),
        env=server_env(settings, env, host=host),
        cwd=settings.home,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    handle = ServerHandle(process=process, host=host, port=port, log_file=log_file, _log=log)
    try:
        _wait_ready(handle, startup_timeout)
    except BaseException:
        handle.stop()
        raise
    return handle


def _wait_ready(handle: ServerHandle, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not handle.running():
            raise ServerStartError(
                f"`bentoml serve` exited with code {handle.process.returncode} before it "
                f"was ready; log {handle.log_file}:\n{handle.log_tail()}"
            )
        if _log_contains(handle.log_file, STARTUP_FAILED):
            raise ServerStartError(
                f"the service failed to start; log {handle.log_file}:\n{handle.log_tail()}"
            )
        try:
            if httpx.get(f"{handle.url}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.25)
    raise ServerStartError(
        f"the server was not ready within {timeout:.0f} s; log {handle.log_file}:\n{handle.log_tail()}"
    )


def _log_contains(log_file: Path, marker: str) -> bool:
    try:
        return marker.encode() in log_file.read_bytes()
    except FileNotFoundError:
        return False


def serve_foreground(
    settings: Settings, port: int = 3000, *, host: str = DEFAULT_HOST, env: Mapping[str, str] | None = None
) -> int:
    """Run the server attached to this terminal until it exits, Ctrl-C or SIGTERM; returns its exit code.

    SIGTERM is what process managers, `docker stop` and Kubernetes send to `lorafleet serve`; Python's
    default would end this process alone and leave BentoML serving, so it is forwarded as a shutdown.
    """
    settings.ensure()
    process = subprocess.Popen(serve_command(port, host), env=server_env(settings, env, host=host),
                               cwd=settings.home)

    def _shutdown(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _shutdown)
    try:
        return process.wait()
    except KeyboardInterrupt:
        # A terminal's Ctrl-C reached BentoML too; a SIGINT or SIGTERM sent to this process alone did not.
        tree = process_tree(process.pid)
        process.terminate()
        try:
            return process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()
        finally:
            kill_survivors(tree, grace=5.0)
    finally:
        signal.signal(signal.SIGTERM, previous)
