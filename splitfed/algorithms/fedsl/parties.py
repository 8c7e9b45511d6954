"""Who holds what in a FedSL federation, computed the same way by every party.

`simulate` builds every device in one process; deployed, each `edge-agent --role segment`
builds only its own (group G, segment K) and `aggregator serve --algo fedsl` only the network.
All call `sequence_shards` with the same data set, seed, split, partition, frames and groups,
so a deployed device holds exactly what its simulated twin holds.

On still images (anything but the synthetic clip set, or a clip loader) FedSL reads each crop
as `frames` row bands, top (forehead) to bottom (eyes), as time steps: the FedSL paper does the
same with sequential MNIST. `ROW_BANDS_NOTE` says so wherever such a run is reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from splitfed.algorithms.fedsl.model import DEFAULT_FRAMES, DEFAULT_SEGMENTS, SeqModelConfig
from splitfed.data.clips import ClipDataset, clips_for, shard_indices
from splitfed.data.dataset import EmotionDataset, SplitKind
from splitfed.errors import UserError
from splitfed.model import ModelConfig

log = logging.getLogger(__name__)

ROW_BANDS_NOTE = (
    "FedSL on still images: each crop is read as {frames} row bands (top to bottom) as time "
    "steps, as the FedSL paper does with sequential MNIST"
)


@dataclass(frozen=True)
class SegmentSpec:
    """What every party of one FedSL run agrees on."""

    groups: int
    frames: int = DEFAULT_FRAMES
    segments: int = DEFAULT_SEGMENTS
    seed: int = 0
    partition: str | None = None
    split: SplitKind | None = None


def is_row_bands(clips: ClipDataset) -> bool:
    """True when the sequences are row bands of still images (`row_sequences`), not clips."""
    return str(clips.meta.get("sequence", "")).endswith("rows")


@dataclass
class SequenceShards:
    """The run's sequences and the sample indices of each client group."""

    clips: ClipDataset
    train_idx: np.ndarray
    test_idx: np.ndarray
    shards: list[tuple[np.ndarray, np.ndarray]]
    split: str
    partition: str

    @property
    def row_bands(self) -> bool:
        """True when the sequences are row bands of still images, not clips."""
        return is_row_bands(self.clips)

    @property
    def sequence(self) -> str:
        return str(self.clips.meta.get("sequence", f"clips of {self.clips.frames} frames"))


def sequence_shards(data: EmotionDataset, spec: SegmentSpec) -> SequenceShards:
    """The sequences of `data` (clips, or row bands of stills) shared among the groups."""
    clips = clips_for(data, spec.frames)
    if spec.segments > clips.frames:
        raise UserError(
            f"{spec.segments} segments need sequences of at least {spec.segments} frames"
        )
    split = spec.split or ("subject" if clips.subjects is not None else "random")
    partition = spec.partition or ("subject" if clips.subjects is not None else "iid")
    train_idx, test_idx, shards = shard_indices(
        clips.labels, clips.subjects, spec.groups, partition, split, spec.seed, clips.name
    )
    out = SequenceShards(clips, train_idx, test_idx, shards, split, partition)
    if out.row_bands:
        log.warning(ROW_BANDS_NOTE.format(frames=clips.frames))
    return out


def seq_model_config(
    clips: ClipDataset, segments: int, base: ModelConfig | None = None
) -> SeqModelConfig:
    """The segmented recurrent network for these sequences (dropout and classes from `base`).

    It says whether they are row bands of stills: every device learns it with the model, and
    the augmentation depends on it (`jitter_problem`, `sequence_camera`)."""
    base = base or ModelConfig()
    if base.antialias:
        raise UserError(
            "fedsl's frame encoder has no anti-aliased downsampling: leave --antialias out "
            "(it applies to the one-crop algorithms and PyVertical's heads)"
        )
    return SeqModelConfig(
        frame_shape=clips.frame_shape,
        frames=clips.frames,
        segments=segments,
        dropout=base.dropout,
        num_classes=base.num_classes,
        row_bands=is_row_bands(clips),
    )


@dataclass
class SegmentPart:
    """What device (group, segment) holds: its frames of each sequence, labels if last."""

    train: np.ndarray  # uint8 (N, T_k, C, H, W)
    test: np.ndarray
    train_labels: np.ndarray | None
    test_labels: np.ndarray | None


def segment_part(data: EmotionDataset, spec: SegmentSpec, group: int, segment: int) -> SegmentPart:
    """Device (group, segment)'s part of the run's sequences: the simulator's, exactly."""
    if not 0 <= group < spec.groups or not 0 <= segment < spec.segments:
        raise UserError(
            f"device (group {group}, segment {segment}) outside {spec.groups} group(s) of "
            f"{spec.segments} segments"
        )
    sh = sequence_shards(data, spec)
    t0, t1 = seq_model_config(sh.clips, spec.segments).bounds(segment)
    tr, te = sh.shards[group]
    last = segment == spec.segments - 1
    c = sh.clips
    log.info(
        "FedSL device: group %d of %d, segment %d of %d (frames %d-%d of %s), %d training "
        "and %d held-out sequences%s",
        group,
        spec.groups,
        segment,
        spec.segments,
        t0,
        t1 - 1,
        sh.sequence,
        len(tr),
        len(te),
        ", with their labels" if last else "",
    )
    return SegmentPart(
        np.ascontiguousarray(c.clips[tr, t0:t1]),
        np.ascontiguousarray(c.clips[te, t0:t1]),
        c.labels[tr] if last else None,
        c.labels[te] if last else None,
    )
