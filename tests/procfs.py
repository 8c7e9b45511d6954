"""A process's children and whether a process still runs, read from Linux's /proc.

For the tests that kill a command and then look for what it left running. An orphan that has
ended stays a zombie until a reaper takes it, which a container's first process may never do:
a zombie counts as ended.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

HAS_PROC = Path("/proc/self/stat").exists()


def _stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, parent, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def children(pid: int) -> dict[int, str]:
    """The running processes whose parent is `pid`, with their command lines."""
    out = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            state, parent = _stat(entry.name)[:2]
            if int(parent) == pid and state != "Z":
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                out[int(entry.name)] = cmdline.decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue  # gone while we looked
    return out


def alive(pid: int) -> bool:
    try:
        return _stat(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def spawned(pid: int, count: int, timeout: float, check: Callable[[], None]) -> dict[int, str]:
    """`pid`'s multiprocessing children once `count` of them run, or those running when
    `timeout` seconds have passed; `check()` runs at every look (to fail at once if `pid` ended)."""
    deadline = time.monotonic() + timeout
    while True:
        check()
        found = {p: c for p, c in children(pid).items() if "spawn_main" in c}
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def left_running(pids: dict[int, str], timeout: float) -> dict[int, str]:
    """Those of `pids` still running after waiting up to `timeout` seconds for all to end. Each
    is then killed, so that a failing test leaves nothing behind."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {p: c for p, c in pids.items() if alive(p)}
    for p in left:
        os.kill(p, signal.SIGKILL)
    return left
