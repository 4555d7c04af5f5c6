"""A real nginx in front of serving replicas, for tests: the shipped deploy/nginx/lorafleet.conf, run as is.

`nginx_config` wraps that file (an `http {}` context file) in a main config whose pid, logs and temp folders
are under the test's folder, and replaces only its upstream servers and listen address, so what the tests
exercise is what users deploy (buffering off for SSE, timeouts, the body limit). `start_nginx` runs
`nginx -p PREFIX -c CONF -g 'daemon off;'` in its own process group and waits until it accepts connections.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lorafleet.processes import stop_process_group

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "deploy" / "nginx" / "lorafleet.conf"
NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/bin/nginx")
_UPSTREAM = re.compile(r"(upstream\s+lorafleet_replicas\s*\{)(.*?)(\})", re.DOTALL)
_SERVER_LINE = re.compile(r"^\s*server\s+\S+;[^\n]*\n", re.MULTILINE)
_LISTEN = re.compile(r"^(\s*)listen\s+[^;]+;", re.MULTILINE)


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    return found or next((path for path in NGINX_CANDIDATES if os.access(path, os.X_OK)), None)


def site_config(replicas: Sequence[str], listen: str, example: str | None = None) -> str:
    """The shipped site file with its upstream servers set to `replicas` (host:port) and `listen` replaced."""
    text = EXAMPLE.read_text() if example is None else example
    upstream = _UPSTREAM.search(text)
    if upstream is None or len(_UPSTREAM.findall(text)) != 1:
        raise ValueError(f"{EXAMPLE} must define exactly one `upstream lorafleet_replicas {{...}}`")
    body = upstream.group(2)
    if not _SERVER_LINE.search(body):
        raise ValueError(f"{EXAMPLE}: the upstream block lists no `server` line to replace")
    servers = "".join(f"    server {replica};\n" for replica in replicas)
    body = servers + _SERVER_LINE.sub("", body)
    text = text[: upstream.start(2)] + "\n" + body + text[upstream.end(2):]
    text, count = _LISTEN.subn(lambda match: f"{match.group(1)}listen {listen};", text)
    if count != 1:
        raise ValueError(f"{EXAMPLE} must have exactly one `listen` directive, found {count}")
    return text


def nginx_config(prefix: Path, site: Path) -> str:
    """A main config: one worker, everything nginx writes under `prefix`, the site file included in `http`."""
    temp = {name: prefix / "temp" / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for folder in temp.values():
        folder.mkdir(parents=True, exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""  # as root, workers would switch to `nobody`
    return (
        f"{user}worker_processes 1;\n"
        f"pid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} info;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"    access_log {prefix / 'access.log'};\n"
        + "".join(f"    {name}_temp_path {path};\n" for name, path in temp.items())
        + f"    include {site};\n"
        "}\n"
    )


@dataclass
class Nginx:
    process: subprocess.Popen
    port: int
    prefix: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def upstreams_used(self) -> dict[str, int]:
        """Requests per upstream address, from the access log (the `upstream` format below)."""
        counts: dict[str, int] = {}
        log = self.prefix / "upstream.log"
        for line in log.read_text().splitlines() if log.exists() else []:
            for address in line.split(" ", 1)[0].split(","):  # "a, b" when nginx tried two
                address = address.strip()
                if address and address != "-":
                    counts[address] = counts.get(address, 0) + 1
        return counts


def check_config(nginx: str, prefix: Path, conf: Path) -> None:
    tested = subprocess.run([nginx, "-t", "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
                            check=False, capture_output=True, text=True, timeout=60)
    if tested.returncode != 0:
        raise RuntimeError(f"nginx -t rejected {conf}:\n{tested.stderr}")


@contextmanager
def start_nginx(prefix: Path, replicas: Sequence[str], port: int, *, timeout: float = 60.0) -> Iterator[Nginx]:
    """Run nginx with the shipped site file in front of `replicas`; stopped (its whole group) on exit."""
    nginx = nginx_binary()
    if nginx is None:
        raise FileNotFoundError("nginx is not installed")
    prefix.mkdir(parents=True, exist_ok=True)
    site = prefix / "lorafleet.conf"
    site.write_text(site_config(replicas, f"127.0.0.1:{port}")
                    # which replica answered each request, for the test's report
                    + f"log_format upstream '$upstream_addr $status $request_time';\n"
                      f"access_log {prefix / 'upstream.log'} upstream;\n")
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_config(prefix, site))
    check_config(nginx, prefix, conf)
    process = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    handle = Nginx(process, port, prefix)
    try:
        deadline = time.monotonic() + timeout
        while not _accepts(port):
            if process.poll() is not None:
                raise RuntimeError(f"nginx exited with {process.returncode}:\n{handle.error_log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not listen on {port} within {timeout} s:\n{handle.error_log()}")
            time.sleep(0.05)
        yield handle
    finally:
        _stop(process)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _stop(process: subprocess.Popen) -> None:
    """SIGQUIT (nginx's graceful stop), then SIGKILL to the group and to a worker that outlived its master."""
    stop_process_group(process, signal.SIGQUIT, grace=10)
