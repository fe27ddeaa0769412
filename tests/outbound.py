"""Real outbound proxies for tests and benchmarks: tinyproxy (HTTP) and microsocks (SOCKS5).

Each runs as its own process on a free 127.0.0.1 port, in the foreground, with its log in a
temporary directory, and is stopped by its PID (never by name). Their logs are the proof that
traffic really went through them: tinyproxy logs every ``CONNECT ip:port``, microsocks every
``connected to ip:port``.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.procs import free_port, stop

START_TIMEOUT_S = 5.0


def dead_port() -> int:
    """A loopback port nothing listens on (bound and released: connecting is refused)."""
    return free_port()


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (tests/system-deps.sh installs it)")
    return path


def _wait_listening(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"proxy exited early: {log.read_text(errors='replace')[-500:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"proxy did not listen on {port} within {START_TIMEOUT_S} s")


@dataclass
class RealProxy:
    url: str
    """With credentials when it has some."""
    port: int
    log: Path
    pid: int

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tunnels_to(self, port: int) -> int:
        """Tunnels this proxy opened to 127.0.0.1:``port`` (from its own log)."""
        text = self.log_text()
        return len(
            re.findall(
                rf"(?:CONNECT 127\.0\.0\.1:{port} |connected to 127\.0\.0\.1:{port}\b)", text
            )
        )


@contextlib.contextmanager
def tinyproxy(user: str | None = None, password: str | None = None) -> Iterator[RealProxy]:
    """tinyproxy in the foreground on a free port; BasicAuth when ``user`` is given."""
    binary = need("tinyproxy")
    with tempfile.TemporaryDirectory(prefix="hlsrelay-tinyproxy-") as tmp:
        port = free_port()
        log = Path(tmp) / "tinyproxy.log"
        conf = Path(tmp) / "tinyproxy.conf"
        lines = [
            f"Port {port}",
            "Listen 127.0.0.1",
            "Allow 127.0.0.1",
            f'LogFile "{log}"',
            f'PidFile "{Path(tmp) / "tinyproxy.pid"}"',
            "LogLevel Connect",
            "MaxClients 200",
            "Timeout 30",
        ]
        if user is not None:
            lines.append(f"BasicAuth {user} {password}")
        conf.write_text("\n".join(lines) + "\n")
        with (Path(tmp) / "stdout.txt").open("wb") as out:
            process = subprocess.Popen(
                [binary, "-d", "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT
            )
        try:
            _wait_listening(port, process, log)
            auth = f"{user}:{password}@" if user is not None else ""
            yield RealProxy(f"http://{auth}127.0.0.1:{port}", port, log, process.pid)
        finally:
            stop(process, 3)


@contextlib.contextmanager
def microsocks(user: str | None = None, password: str | None = None) -> Iterator[RealProxy]:
    """microsocks (SOCKS5) on a free port; username/password auth when ``user`` is given."""
    binary = need("microsocks")
    with tempfile.TemporaryDirectory(prefix="hlsrelay-microsocks-") as tmp:
        port = free_port()
        log = Path(tmp) / "microsocks.log"
        args = [binary, "-i", "127.0.0.1", "-p", str(port)]
        if user is not None:
            args += ["-u", user, "-P", str(password)]
        with log.open("wb") as out:
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_listening(port, process, log)
            auth = f"{user}:{password}@" if user is not None else ""
            yield RealProxy(f"socks5://{auth}127.0.0.1:{port}", port, log, process.pid)
        finally:
            stop(process, 3)
