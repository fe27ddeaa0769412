"""Several ``hlsrelay serve`` processes sharing one redis-server, for scale-out tests and the
observability benchmark. Each instance runs with a config file written by the caller, listens
on a free loopback port, logs to a file in the caller's temp dir, and is stopped by its PID
(SIGTERM, then SIGKILL); ffmpeg processes it leaves behind are found by scanning /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.procs import free_port, process_table

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 20.0


@dataclass
class Instance:
    name: str
    port: int
    proc: asyncio.subprocess.Process
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def metric(self, session: aiohttp.ClientSession, name: str) -> float:
        """The sum of every sample called ``name`` in this instance's exposition."""
        async with session.get(f"{self.url}/metrics") as resp:
            text = await resp.text()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
        )


@contextlib.asynccontextmanager
async def instance(name: str, config: Path, workdir: Path) -> AsyncIterator[Instance]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HLSRELAY_")}
    env.update({"HLSRELAY_SERVER__PORT": str(port), "HLSRELAY_LIVE__INSTANCE_NAME": name})
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "--config", str(config),
            env=env, cwd=REPO, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
        )  # fmt: skip
    node = Instance(name, port, proc, log)
    children: set[int] = set()
    try:
        await _wait_ready(node)
        yield node
    finally:
        children = set(ffmpeg_children(proc.pid))
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await reap_ffmpegs(children)


async def _wait_ready(node: Instance) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while loop.time() < deadline:
            if node.proc.returncode is not None:
                raise RuntimeError(f"{node.name} exited: {node.log.read_text()[-2000:]}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{node.url}/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{node.name} not ready: {node.log.read_text()[-2000:]}")


def is_ffmpeg(pid: int) -> bool:
    try:
        return b"ffmpeg" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def ffmpeg_children(pid: int) -> list[int]:
    """Running ffmpeg processes started by ``pid`` (its direct children)."""
    return [
        child
        for child, (ppid, _pgid, state) in process_table().items()
        if ppid == pid and state != "Z" and is_ffmpeg(child)
    ]


def alive(pid: int) -> bool:
    state = process_table().get(pid)
    return state is not None and state[1] != "Z"


async def reap_ffmpegs(pids: set[int], grace: float = 5.0) -> list[int]:
    """Wait for ``pids`` (ffmpegs of a stopped or killed instance) to end on their own (their
    stdin closes with their parent); kill those still running after ``grace`` seconds, by PID,
    and only if they are still ffmpeg. Returns the ones that had to be killed."""
    for _ in range(int(grace * 10)):  # nothing to wait on but /proc: poll
        if not any(alive(p) for p in pids):
            break
        await asyncio.sleep(0.1)
    killed = [p for p in pids if alive(p) and is_ffmpeg(p)]
    for pid in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return killed
