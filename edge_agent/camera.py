"""Frames from a camera index, a video file or a stream URL, with a watchdog (after Frigate).

A reader thread pulls frames and offers them to a bounded queue; a full queue drops the frame
(counted) instead of blocking the camera. A watchdog thread reopens the capture when no frame
has arrived for `watchdog_seconds` (a camera unplugged, a stream stalled) and counts reconnects;
a reader stuck inside OpenCV is abandoned, not waited for.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_agent.config import CameraConfig
from splitfed.errors import UserError

log = logging.getLogger(__name__)

BACKENDS = {
    "any": cv2.CAP_ANY,
    "v4l2": cv2.CAP_V4L2,
    "gstreamer": cv2.CAP_GSTREAMER,
    "ffmpeg": cv2.CAP_FFMPEG,
}

END = None  # sentinel that travels down the pipeline when a video file ends


@dataclass
class Frame:
    index: int
    captured_at: float  # time.perf_counter()
    image: np.ndarray  # BGR


def is_file(source: str) -> bool:
    return not source.isdigit() and "://" not in source and Path(source).is_file()


def open_capture(cfg: CameraConfig) -> cv2.VideoCapture:
    """An OpenCV capture for an index ("0"), a file, or a URL (rtsp://, http://)."""
    api = BACKENDS.get(cfg.backend.lower(), cv2.CAP_ANY)
    if cfg.source.isdigit():
        cap = cv2.VideoCapture(int(cfg.source), api)
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, cfg.width)
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, cfg.height)
        cap.set(cv2.CAP_PROP_FPS, cfg.fps)
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not a backlog
    else:
        cap = cv2.VideoCapture(cfg.source, api)
    return cap


def describe(source: str) -> str:
    """The device a person would look for: /dev/videoN for an index, else the file or URL."""
    return f"camera {source} (/dev/video{source})" if source.isdigit() else source


def check_camera(cfg: CameraConfig) -> None:
    """Open the camera and read one frame now, or raise a UserError naming it and the fix.

    Live mode waits for the global weights before it starts capturing; a missing camera must
    be said at start-up, not minutes later as a watchdog warning.
    """
    source = cfg.source
    if not source.isdigit() and "://" not in source and not Path(source).exists():
        raise UserError(
            f"cannot open {source}: no such file; give a camera index (--camera 0), a video "
            "file or a stream URL"
        )
    cap = open_capture(cfg)
    try:
        ok = cap.isOpened()
        got_frame = ok and bool(cap.read()[0])
    finally:
        cap.release()
    if got_frame:
        return
    what = describe(source)
    if source.isdigit():
        fix = (
            f"check that /dev/video{source} exists (ls /dev/video*), that this user is in group "
            "`video` (sudo usermod -aG video $USER, then log in again) and that no other program "
            "holds it; or classify a recording with --camera FILE"
        )
    elif "://" in source:
        fix = "check the URL, the network and the stream's credentials"
    else:
        fix = "check that it is a video file OpenCV can decode (mp4, avi, mkv)"
    state = "opens but gives no frames" if ok else "cannot be opened"
    raise UserError(f"{what} {state}: {fix}")


def offer(q: queue.Queue[Any], item: Any, drops: Counter[str], name: str) -> bool:
    """Put without blocking; a full queue drops the item and counts it."""
    try:
        q.put_nowait(item)
        return True
    except queue.Full:
        drops[name] += 1
        return False


class Camera:
    """Reader + watchdog threads that feed `out` with `Frame`s until `stop` (or a file's end)."""

    def __init__(
        self,
        cfg: CameraConfig,
        out: queue.Queue[Frame | None],
        stop: threading.Event,
        loop_file: bool = False,
        pace_files: bool = True,
    ) -> None:
        self.cfg = cfg
        self.out = out
        self.stop = stop
        self.loop_file = loop_file
        self.pace = pace_files and is_file(cfg.source)
        self.file = is_file(cfg.source)
        self.drops: Counter[str] = Counter()
        self.captured = 0
        self.reconnects = 0
        self.ended = threading.Event()
        self._generation = 0
        self._last_frame = time.monotonic()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._spawn_reader()
        w = threading.Thread(target=self._watchdog, name="camera-watchdog", daemon=True)
        w.start()
        self._threads.append(w)

    def _spawn_reader(self) -> None:
        with self._lock:
            self._generation += 1
            gen = self._generation
            self._last_frame = time.monotonic()
        t = threading.Thread(target=self._reader, args=(gen,), name=f"camera-{gen}", daemon=True)
        t.start()
        self._threads.append(t)

    def _current(self, gen: int) -> bool:
        return gen == self._generation and not self.stop.is_set()

    def _reader(self, gen: int) -> None:
        cap = open_capture(self.cfg)
        if not cap.isOpened():
            log.warning(
                "cannot open camera %s; the watchdog retries in %.0f s",
                self.cfg.source,
                self.cfg.watchdog_seconds,
            )
            cap.release()
            return
        period = 1.0 / self.cfg.fps
        next_at = time.perf_counter()
        try:
            while self._current(gen):
                ok, image = cap.read()
                if not ok:
                    if self.file:
                        if self.loop_file:
                            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                            continue
                        self._end()
                        return
                    time.sleep(0.01)  # a camera hiccup; the watchdog decides when to reopen
                    continue
                if not self._current(gen):
                    return
                self._last_frame = time.monotonic()
                frame = Frame(self.captured, time.perf_counter(), image)
                self.captured += 1
                offer(self.out, frame, self.drops, "capture")
                if self.pace:
                    next_at += period
                    time.sleep(max(0.0, next_at - time.perf_counter()))
        finally:
            cap.release()

    def _end(self) -> None:
        log.info("end of video %s after %d frames", self.cfg.source, self.captured)
        self.ended.set()
        while not self.stop.is_set():  # the end marker must not be dropped
            try:
                self.out.put(END, timeout=0.2)
                return
            except queue.Full:
                continue

    def _watchdog(self) -> None:
        while not self.stop.wait(0.2) and not self.ended.is_set():
            if time.monotonic() - self._last_frame > self.cfg.watchdog_seconds:
                self.reconnects += 1
                log.warning(
                    "no frame from %s for %.1f s: reopening (reconnect %d)",
                    self.cfg.source,
                    self.cfg.watchdog_seconds,
                    self.reconnects,
                )
                self._spawn_reader()
