"""Guided collection of labelled eye crops on the device (`edge-agent collect`).

The person in front of the camera is asked to show each emotion in turn; N crops of each are
stored under `state_dir/crops/<emotion>/`. Only crops are kept (never whole frames), and they
never leave the device: training sends smashed data, not pictures.
"""

from __future__ import annotations

import logging

import click
import cv2

from edge_agent.camera import is_file, open_capture
from edge_agent.config import AgentConfig
from edge_agent.store import CropStore
from splitfed.data.crop import EyeRegionCropper
from splitfed.errors import UserError

log = logging.getLogger(__name__)


def collect_crops(
    cfg: AgentConfig, emotions: list[str], interactive: bool = True
) -> dict[str, int]:
    """Store `cfg.collect.per_emotion` crops of each emotion; returns the counts now stored."""
    store = CropStore(cfg.crops_dir, cfg.crop)
    c = cfg.collect
    source = cfg.camera.source
    cap = open_capture(cfg.camera)
    if not cap.isOpened():
        raise UserError(
            f"cannot open camera {source!r}: give --camera with an index, a video file or a URL"
        )
    file = is_file(source)
    try:
        with EyeRegionCropper(cfg.crop) as cropper:
            for emotion in emotions:
                if interactive:
                    click.prompt(
                        f"Show a {emotion.upper()} face to the camera, then press Enter",
                        default="",
                        show_default=False,
                        err=True,
                    )
                else:
                    click.echo(f"collecting {emotion} ...", err=True)
                saved = faces = frames = failures = 0
                base = store.counts().get(emotion, 0)
                while saved < c.per_emotion:
                    ok, image = cap.read()
                    if not ok:
                        failures += 1
                        if file and failures < 3:
                            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)  # a video file: play it again
                            continue
                        if failures > 50:
                            raise UserError(f"no frames from camera {source!r}")
                        continue
                    failures = 0
                    frames += 1
                    if frames > c.max_frames:
                        raise UserError(
                            f"only {saved} of {c.per_emotion} {emotion} crops after {frames - 1} "
                            "frames: "
                            "is a face in view and lit?"
                        )
                    crop = cropper.crop(image)
                    if crop is None:
                        continue
                    faces += 1
                    if (faces - 1) % c.every:
                        continue
                    store.save(emotion, crop, base + saved)
                    saved += 1
                log.info(
                    "%s: stored %d crops (%d frames, %d with a face)", emotion, saved, frames, faces
                )
    finally:
        cap.release()
    return store.counts()
