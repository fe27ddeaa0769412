"""Child processes (ffmpeg) in their own process group, always reaped.

:func:`spawn` starts a program in a new session (its own process group, so a signal to the
group reaches anything it forks and a Ctrl-C at the terminal never hits it directly);
:func:`terminate` sends SIGTERM to the group, SIGKILL after a short grace, and always awaits
the exit status: no zombie, no orphan. Should the proxy itself be killed with SIGKILL, the
children still end: ffmpeg reading a pipe sees EOF, ffmpeg writing one gets EPIPE.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import Sequence

from proxy.errors import ServiceUnavailable

TERM_GRACE_SECONDS = 2.0


def find_ffmpeg(setting: str) -> str:
    """The ffmpeg binary for ``live.ffmpeg``: a path, or "auto" (PATH, else imageio-ffmpeg)."""
    if setting != "auto":
        return setting
    system = shutil.which("ffmpeg")
    if system is not None:
        return system
    try:
        import imageio_ffmpeg

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError):
        raise ServiceUnavailable(
            "no ffmpeg: not on PATH and imageio-ffmpeg has no binary here", retry_after=60
        ) from None


async def spawn(
    args: Sequence[str], *, stdin: bool, stdout: bool = True
) -> asyncio.subprocess.Process:
    """Start ``args`` in its own process group with the chosen pipes (stderr always piped)."""
    try:
        return await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if stdout else asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        raise ServiceUnavailable(
            f"cannot start ffmpeg ({exc.strerror or type(exc).__name__})", retry_after=30
        ) from None


def _signal_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        # start_new_session made the child its group's leader: pgid == pid.
        os.killpg(proc.pid, sig)


async def terminate(proc: asyncio.subprocess.Process, grace: float = TERM_GRACE_SECONDS) -> int:
    """Stop the process and its group; return its exit status. Safe to call twice."""
    if proc.stdin is not None and not proc.stdin.is_closing():
        proc.stdin.close()
    # Only while the leader is not reaped: after that its pid (the group id) may be reused by
    # an unrelated process. ffmpeg does not fork, so its group is the leader alone.
    if proc.returncode is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            async with asyncio.timeout(grace):
                await proc.wait()
        except TimeoutError:
            _signal_group(proc, signal.SIGKILL)
    # Shielded: a cancelled caller must still not leave a zombie behind.
    return await asyncio.shield(proc.wait())
