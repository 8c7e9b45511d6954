"""The training batches of a data owner's part, jitter (`TrainConfig.jitter`) included.

`splitfed.data.vertical.part_batches` draws the mirror, shift and lighting change per record
from the generator that every owner and the label holder share, so each record is changed
alike in every part. The jitter is drawn here, on top, from generators of its own seeded per
(run, round, step): the label holder, which replays the shared generator for the mirror flags
alone, stays in step whatever the jitter draws, and so do owners whose parts differ in size.

What one picture is decides who shares a draw. Parts (tiles) of one crop are one picture:
every owner draws the same camera for a record, and its own sensor noise; the light ramp runs
across the whole crop. Views are pictures of their own, from cameras of their own: each owner
draws its own jitter. Geometric jitter of a part is refused (`jitter_problem`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from splitfed.algorithms.pyvertical.model import VerticalModelConfig
from splitfed.config import JitterConfig, TrainConfig
from splitfed.data.batches import camera_jitter, geometric_jitter, keyed_generator
from splitfed.data.vertical import part_batches

# Seed streams of the jitter, apart from the batch order and the other augmentation.
JITTER_STREAM = 0x717E
_DRAWS, _NOISE = 1, 2


def jitter_problem(cfg: VerticalModelConfig, train_cfg: TrainConfig) -> str | None:
    """Why `train_cfg.jitter` cannot apply to these parts, or None.

    Geometric jitter zooms, rolls and moves the crop about its centre: a pixel of one part
    comes from another part, which another owner holds (an owner may not even see the others'
    pixels), and the same change about each part's own centre would tear the stitched crop
    apart. So it applies only where every owner holds whole crops (one owner, or views). The
    camera applies to parts: what it changes is a pixel or its near neighbours, with one light
    ramp across the crop.
    """
    if not cfg.whole and train_cfg.augment and train_cfg.jitter.geometric:
        return (
            "pyvertical cannot jitter the geometry (jitter scale, rotation, shift_y) of parts "
            "of a crop: zoom, roll and offset move pixels across the parts, which no owner "
            "holds together; the camera jitter applies"
        )
    return None


def jitter_part(
    x: torch.Tensor,
    flip: torch.Tensor,
    jitter: JitterConfig,
    cfg: VerticalModelConfig,
    index: int,
    key: tuple[int, ...],
    step: int,
) -> torch.Tensor:
    """Owner `index`'s augmented parts of training batch `step`, jittered.

    Drawn as `augment_batch` draws it, geometry before camera. The camera works on a part in
    its place in the un-mirrored crop (`camera_jitter`'s window), so the light ramp of a
    mirrored record is mirrored with the record, as in a crop changed whole.
    """
    gen = keyed_generator(*key, JITTER_STREAM, _DRAWS, step, index if cfg.views else 0)
    if jitter.geometric:  # whole crops only (jitter_problem)
        x = geometric_jitter(x, gen, jitter)
    if jitter.camera.enabled:
        y0, _, x0, _ = cfg.boxes[index]
        _, h, w = cfg.input_shape
        mirrored = flip[:, None, None, None]
        x = torch.where(mirrored, x.flip(-1), x)
        noise = keyed_generator(*key, JITTER_STREAM, _NOISE, step, index)
        x = camera_jitter(x, gen, jitter.camera, noise_gen=noise, window=(y0, x0, h, w))
        x = torch.where(mirrored, x.flip(-1), x)
    return x


def owner_batches(
    images: np.ndarray,
    cfg: VerticalModelConfig,
    train_cfg: TrainConfig,
    key: tuple[int, ...],
    index: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(parts, mirror flags) of each training batch of owner `index`, in the shared plan.

    `jitter_problem` is checked where the run is configured (PyVertical and the owner)."""
    batches = part_batches(
        images,
        train_cfg.batch_size,
        key,
        train_cfg.local_epochs,
        train_cfg.augment,
        cfg.mirrors(),
    )
    jitter = train_cfg.jitter
    if not (train_cfg.augment and jitter.enabled):
        yield from batches
        return
    for step, (x, flip) in enumerate(batches):
        yield jitter_part(x, flip, jitter, cfg, index, key, step), flip
