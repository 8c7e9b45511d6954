"""A tiny sd_notify(3): tell systemd READY=1, STOPPING=1, STATUS=... and WATCHDOG=1.

The units are Type=notify with WatchdogSec=, so the apps say when they are ready and keep
proving they are alive. Without $NOTIFY_SOCKET (tests, a terminal) every call is a no-op; a
failing send is logged and never raised: telling systemd must not take the app down.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def _address() -> str | None:
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return None
    if path.startswith("@"):
        return "\0" + path[1:]  # Linux abstract namespace
    if path.startswith("/"):
        return path
    log.debug("NOTIFY_SOCKET=%s is not a unix socket path; not notifying", path)
    return None  # e.g. vsock:..., which this minimal client does not speak


def notify(state: str) -> bool:
    """Send `state` (e.g. 'READY=1', 'STATUS=round 3', newline-separated) to systemd.

    True when it was sent; False without $NOTIFY_SOCKET or when sending failed.
    """
    address = _address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError as e:
        log.warning("sd_notify(%s) failed: %s", state.split("\n", 1)[0], e)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when not watched.

    Half, as sd_watchdog_enabled(3) advises, so one late ping does not kill the service.
    $WATCHDOG_PID, when set, must be this process: a child must not ping for its parent.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not an integer; watchdog pings disabled", usec)
        return None
    if value <= 0:
        return None
    return value / 2e6


class Watchdog:
    """Rate-limited WATCHDOG=1 pings.

    Call `ping()` from the loop that must stay alive (it sends at most once per interval), or
    `start(healthy)` for a thread that pings while `healthy()` returns True, for apps whose main
    loop blocks in the network; `healthy` should check that the real work still progresses
    (e.g. the camera delivered a frame recently), or the watchdog proves nothing.
    """

    def __init__(self, interval: float | None = None) -> None:
        self.interval = watchdog_interval() if interval is None else interval
        self._last = float("-inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.interval is not None

    def ping(self, force: bool = False) -> bool:
        """Send WATCHDOG=1 if an interval has passed since the last one; True when sent."""
        if self.interval is None:
            return False
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return False
        self._last = now
        return notify("WATCHDOG=1")

    def start(self, healthy: Callable[[], bool] = lambda: True) -> None:
        """Ping from a daemon thread while `healthy()` is True (no-op when not watched)."""
        if self.interval is None or self._thread is not None:
            return
        interval = self.interval

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    ok = healthy()
                except Exception:  # noqa: BLE001 - an unhealthy check means: do not ping
                    log.exception("watchdog health check failed")
                    ok = False
                if ok:
                    self.ping(force=True)
                else:
                    log.warning("not healthy: skipping the watchdog ping")

        self._thread = threading.Thread(target=loop, name="sd-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
