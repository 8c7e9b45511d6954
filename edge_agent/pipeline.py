"""The live pipeline: capture -> detect/crop -> client half -> publish, a thread per stage.

Each stage reads a bounded queue and offers to the next; a full queue drops the frame and
counts it, so a slow stage sheds load instead of building a backlog (latency stays bounded).
All stages share one stop event. Only smashed data of the eye crop leaves the device.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edge_agent.camera import END, Camera, Frame, offer
from edge_agent.config import CameraConfig, LiveConfig
from splitfed.data.batches import to_tensor
from splitfed.data.crop import CropConfig, EyeRegionCropper

log = logging.getLogger(__name__)

ClientHalf = Callable[[np.ndarray], np.ndarray | None]  # uint8 (N,C,H,W) crops -> activations


@dataclass
class Crop:
    index: int
    captured_at: float
    crop: np.ndarray  # uint8 (C, H, W)


@dataclass
class Smashed:
    index: int
    captured_at: float
    activations: np.ndarray  # float32 (1, C', H', W')


def torch_client_half(get_net: Callable[[], torch.nn.Module | None]) -> ClientHalf:
    """The float torch client half; `get_net` returns the latest snapshot of global weights."""

    def run(crops: np.ndarray) -> np.ndarray | None:
        net = get_net()
        if net is None:
            return None
        with torch.no_grad():
            return net(to_tensor(crops)).numpy()

    return run


class LivePipeline:
    """Runs the stages until `stop`; `done` is set when a video file has been fully processed."""

    def __init__(
        self,
        camera: CameraConfig,
        live: LiveConfig,
        crop: CropConfig,
        client_half: ClientHalf,
        publish: Callable[[int, np.ndarray, float], bool],
        stop: threading.Event,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self.live = live
        self.crop_cfg = crop
        self.client_half = client_half
        self.publish = publish
        self.stop = stop
        self.ready = ready
        self.done = threading.Event()
        self._detector_ready = threading.Event()
        self.frames: queue.Queue[Frame | None] = queue.Queue(maxsize=live.queue_size)
        self.crops: queue.Queue[Crop | None] = queue.Queue(maxsize=live.queue_size)
        self.smashed: queue.Queue[Smashed | None] = queue.Queue(maxsize=live.queue_size)
        self.camera = Camera(camera, self.frames, stop, live.loop_file, live.pace_files)
        self.counts: Counter[str] = Counter()
        self.drops: Counter[str] = self.camera.drops  # one counter for every stage's drops
        self.stage_seconds: Counter[str] = Counter()
        self._threads: list[threading.Thread] = []
        self.started_at = time.perf_counter()

    def start(self) -> None:
        """Start the stages; the camera starts once the detector and a client half are ready."""
        for name, target in (
            ("detect", self._detect), ("infer", self._infer), ("publish", self._publish),
            ("start", self._start_camera),
        ):  # fmt: skip
            t = threading.Thread(target=target, name=f"live-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def _start_camera(self) -> None:
        waited = False
        while not self.stop.is_set():
            if self._detector_ready.is_set() and self.ready():
                break
            if not waited and self._detector_ready.is_set():
                log.info("camera waits for the global client weights from the aggregator")
                waited = True
            self.stop.wait(0.1)
        if not self.stop.is_set():
            self.started_at = time.perf_counter()
            self.camera.start()

    def join(self, timeout: float | None = None) -> None:
        for t in self._threads:
            t.join(timeout)

    def _get(self, q: queue.Queue[Any]) -> Any:
        while not self.stop.is_set():
            try:
                return q.get(timeout=0.2)
            except queue.Empty:
                continue
        return END

    def _forward_end(self, q: queue.Queue[Any]) -> None:
        while not self.stop.is_set():
            try:
                q.put(END, timeout=0.2)
                return
            except queue.Full:
                continue

    def _detect(self) -> None:
        with EyeRegionCropper(self.crop_cfg) as cropper:
            self._detector_ready.set()
            while not self.stop.is_set():
                frame = self._get(self.frames)
                if frame is END:
                    if not self.stop.is_set():
                        self._forward_end(self.crops)
                    return
                t0 = time.perf_counter()
                try:
                    crop = cropper.crop(frame.image)
                except (ValueError, RuntimeError) as e:
                    log.warning("frame %d: crop failed: %s", frame.index, e)
                    crop = None
                self.stage_seconds["detect"] += time.perf_counter() - t0
                if crop is None:
                    self.counts["no_face"] += 1
                    continue
                self.counts["faces"] += 1
                offer(self.crops, Crop(frame.index, frame.captured_at, crop), self.drops, "detect")

    def _infer(self) -> None:
        waiting_logged = False
        while not self.stop.is_set():
            item = self._get(self.crops)
            if item is END:
                if not self.stop.is_set():
                    self._forward_end(self.smashed)
                return
            t0 = time.perf_counter()
            act = self.client_half(item.crop[None])
            self.stage_seconds["infer"] += time.perf_counter() - t0
            if act is None:
                self.counts["no_weights"] += 1
                if not waiting_logged:
                    log.info("live frames wait for the global client weights from the aggregator")
                    waiting_logged = True
                continue
            self.counts["inferred"] += 1
            offer(self.smashed, Smashed(item.index, item.captured_at, act), self.drops, "infer")

    def _publish(self) -> None:
        while not self.stop.is_set():
            item = self._get(self.smashed)
            if item is END:
                self.done.set()
                return
            if self.publish(item.index, item.activations, item.captured_at):
                self.counts["published"] += 1
            else:
                self.counts["not_published"] += 1

    def stats(self) -> dict[str, Any]:
        elapsed = max(time.perf_counter() - self.started_at, 1e-9)
        return {
            "frames": self.camera.captured,
            "fps": self.camera.captured / elapsed,
            "counts": dict(self.counts),
            "drops": dict(self.drops),
            "reconnects": self.camera.reconnects,
            "stage_ms_per_frame": {
                k: 1e3 * v / max(self.counts["faces"] if k == "infer" else self.camera.captured, 1)
                for k, v in self.stage_seconds.items()
            },
        }
