"""A real Prometheus server for tests: temp config and storage, loopback port, stopped by PID.

``prometheus_server(targets, rule_files)`` scrapes ``targets`` (``host:port`` of hlsrelay
instances) every ``scrape_interval`` and evaluates ``rule_files``; the test talks to it through
its HTTP API (:func:`query`). Raises :class:`MissingBinary` when prometheus is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from tests.procs import free_port

START_TIMEOUT_S = 15.0


class MissingBinary(RuntimeError):
    """A system program the test needs is not installed."""


def binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise MissingBinary(f"{name} is not installed (make system-deps installs it)")
    return found


@dataclass(frozen=True)
class Prometheus:
    url: str
    pid: int
    session: aiohttp.ClientSession

    async def api(self, path: str, **params: str) -> Any:
        async with self.session.get(f"{self.url}{path}", params=params) as resp:
            doc = await resp.json()
        if doc.get("status") != "success":
            raise AssertionError(f"{path} {params}: {doc}")
        return doc["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.api("/api/v1/query", query=expr)
        return list(data["result"])


@contextlib.asynccontextmanager
async def prometheus_server(
    targets: Sequence[str], rule_files: Sequence[Path] = (), scrape_interval: str = "1s"
) -> AsyncIterator[Prometheus]:
    exe = binary("prometheus")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="hlsrelay-prometheus-") as tmp:
        config = {
            "global": {
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "evaluation_interval": scrape_interval,
            },
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {"job_name": "hlsrelay", "static_configs": [{"targets": list(targets)}]}
            ],
        }
        # JSON is YAML: no YAML library needed to write the config.
        (Path(tmp) / "prometheus.yml").write_text(json.dumps(config))
        log = Path(tmp) / "prometheus.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                exe,
                f"--config.file={tmp}/prometheus.yml",
                f"--storage.tsdb.path={tmp}/data",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        try:
            async with aiohttp.ClientSession() as session:
                server = Prometheus(f"http://127.0.0.1:{port}", proc.pid, session)
                await _wait_ready(server, proc, log)
                yield server
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


async def _wait_ready(server: Prometheus, proc: asyncio.subprocess.Process, log: Path) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT_S
    while loop.time() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"prometheus exited: {_tail(log)}")
        with contextlib.suppress(aiohttp.ClientError):
            async with server.session.get(f"{server.url}/-/ready") as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"prometheus not ready: {_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:]
