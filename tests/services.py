"""Real servers for tests and benchmarks: redis-server and nginx (the shipped edge config).

Each runs as a child process on a free loopback port with its files in a temporary directory,
and is stopped by its PID (terminate, then kill) when the ``with`` block ends. Nothing assumes a
service is already running; a missing binary raises :class:`MissingBinary` (tests skip on it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.procs import free_port, stop

REPO = Path(__file__).resolve().parents[1]
EDGE_TEMPLATE = REPO / "deploy" / "nginx" / "hlsrelay-edge.conf.template"
START_TIMEOUT_S = 10.0


class MissingBinary(RuntimeError):
    """A system program the test needs is not installed."""


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise MissingBinary(f"{name} is not installed (make system-deps installs it)")
    return found


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"not listening on {port} after {START_TIMEOUT_S} s: {_tail(log)}")


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError:
        return "(no log)"


@dataclass(frozen=True)
class Redis:
    port: int
    pid: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@contextlib.contextmanager
def redis_server() -> Iterator[Redis]:
    """A throwaway redis-server: loopback only, no persistence, its dir a temp dir."""
    binary = _binary("redis-server")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="hlsrelay-redis-") as tmp:
        log = Path(tmp) / "redis.log"
        args = [
            binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
            "no", "--dir", tmp, "--logfile", str(log), "--daemonize", "no",
        ]  # fmt: skip
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            _wait_port(port, proc, log)
            yield Redis(port, proc.pid)
        finally:
            stop(proc)


@dataclass(frozen=True)
class Edge:
    port: int
    pid: int
    prefix: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def access_log(self) -> str:
        return _tail(self.prefix / "access.log")


def render_edge_config(
    listen: str, upstreams: Sequence[str], cache_dir: str, cache_size: str = "1g"
) -> str:
    """The shipped template with its placeholders filled (and only those)."""
    text = EDGE_TEMPLATE.read_text()
    for name, value in {
        "HLSRELAY_EDGE_LISTEN": listen,
        "HLSRELAY_EDGE_SERVERS": " ".join(f"server {u};" for u in upstreams),
        "HLSRELAY_EDGE_CACHE_DIR": cache_dir,
        "HLSRELAY_EDGE_CACHE_SIZE": cache_size,
    }.items():
        text = text.replace("${" + name + "}", value)
    return text


@contextlib.contextmanager
def nginx_edge(
    upstream_port: int, *more_ports: int, cpu: int | None = None, max_fails: int | None = None
) -> Iterator[Edge]:
    """nginx with deploy/nginx/hlsrelay-edge.conf.template in front of ``upstream_port`` (and
    ``more_ports``: several instances, as in deploy/docker-compose.yml)."""
    binary = _binary("nginx")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="hlsrelay-nginx-") as tmp:
        prefix = Path(tmp)
        (prefix / "tmp").mkdir()
        conf = prefix / "nginx.conf"
        conf.write_text(
            render_edge_config(
                f"127.0.0.1:{port}",
                [
                    f"127.0.0.1:{p}" + (f" max_fails={max_fails}" if max_fails is not None else "")
                    for p in (upstream_port, *more_ports)
                ],
                str(prefix / "cache"),
            )
        )
        # As root, nginx's workers would switch to "nobody" and could not write the temp dir.
        directives = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
        args = [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
        args += ["-g", directives]
        if cpu is not None and shutil.which("taskset"):
            args = ["taskset", "-c", str(cpu), *args]
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            _wait_port(port, proc, prefix / "error.log")
            yield Edge(port, proc.pid, prefix)
        finally:
            stop(proc)
