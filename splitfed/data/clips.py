"""Short clips of an expression unfolding from neutral: the sequential data of FedSL.

SYNTHETIC, like `splitfed.data.synth`, whose people, drawing and action units these clips reuse:
person p of a clip set with seed s is person p of the picture set with seed s, so the two sets
split into the same training and test people. In each clip the expression's intensity ramps
linearly from 0 (the person's resting face) to the clip's target over `frames` frames; pose,
lighting and the lower-face mask stay put, as in a video, and each frame gets fresh sensor noise.

Real clips (a folder per class of frame folders or videos) load in `splitfed.data.clip_folders`.
For data without clips (real photos), `row_sequences` reads an eye crop as a sequence of row
bands instead, top to bottom.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from splitfed.data.dataset import EmotionDataset, SplitKind
from splitfed.data.partition import client_shards
from splitfed.data.synth import SynthConfig, emotion_aus, make_identity, render
from splitfed.emotions import EMOTIONS
from splitfed.errors import UserError

log = logging.getLogger(__name__)

CLIP_CACHE_VERSION = 1
# The picture set's defaults: a clip set made with defaults shows the same people, drawn alike.
_SYNTH = SynthConfig().model_dump()


class ClipConfig(BaseModel):
    """Size of the clip set; the people and their looks follow `SynthConfig` with the same seed."""

    model_config = ConfigDict(extra="forbid")

    identities: int = Field(_SYNTH["identities"], ge=2, description="number of synthetic people")
    per_emotion: int = Field(
        _SYNTH["per_emotion"], ge=1, description="clips per person and emotion"
    )
    frames: int = Field(4, ge=2, le=64, description="frames per clip, neutral first")
    height: int = Field(_SYNTH["height"], ge=16, description="frame height in pixels")
    width: int = Field(_SYNTH["width"], ge=32, description="frame width in pixels")
    seed: int = Field(0, description="generator seed; same seed, same people as the picture set")
    intensity: tuple[float, float] = Field(
        _SYNTH["intensity"], description="range of the final intensity"
    )
    au_noise: float = Field(_SYNTH["au_noise"], ge=0, description="per-clip jitter of each unit")
    resting: float = Field(_SYNTH["resting"], ge=0, description="how far resting faces differ")
    pixel_noise: float = Field(
        _SYNTH["pixel_noise"], ge=0, description="sensor noise of the scene (grey levels)"
    )
    frame_noise: float = Field(3.0, ge=0, description="extra sensor noise drawn afresh per frame")

    @classmethod
    def from_synth(cls, synth: SynthConfig, frames: int = 4) -> ClipConfig:
        keep = (
            "identities",
            "per_emotion",
            "height",
            "width",
            "seed",
            "intensity",
            "au_noise",
            "resting",
            "pixel_noise",
        )
        return cls(frames=frames, **{k: getattr(synth, k) for k in keep})


@dataclass
class ClipDataset:
    """Clips as uint8 (N, T, C, H, W), with a label and a person per clip."""

    name: str
    clips: np.ndarray
    labels: np.ndarray
    subjects: np.ndarray | None = None
    meta: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.clips.ndim != 5 or self.clips.dtype != np.uint8:
            raise ValueError(
                f"clips must be uint8 (N, T, C, H, W), got {self.clips.dtype} {self.clips.shape}"
            )
        if len(self.labels) != len(self.clips):
            raise ValueError("labels and clips differ in length")
        if self.subjects is not None and len(self.subjects) != len(self.clips):
            raise ValueError("subjects and clips differ in length")
        self.labels = self.labels.astype(np.int64, copy=False)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def frames(self) -> int:
        return int(self.clips.shape[1])

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        c, h, w = self.clips.shape[2:]
        return int(c), int(h), int(w)

    def subset(self, index: np.ndarray, name: str | None = None) -> ClipDataset:
        return ClipDataset(
            name=name or self.name,
            clips=self.clips[index],
            labels=self.labels[index],
            subjects=None if self.subjects is None else self.subjects[index],
            meta=dict(self.meta),
        )

    @classmethod
    def from_sequences(
        cls,
        name: str,
        sequences: list[np.ndarray],
        labels: np.ndarray,
        subjects: np.ndarray | None = None,
    ) -> ClipDataset:
        """Stack per-sample sequences (T, C, H, W); they must all have the same length and size."""
        if not sequences:
            raise UserError(f"{name}: no sequences")
        shapes = {tuple(s.shape) for s in sequences}
        if len({s[0] for s in shapes}) > 1:
            lengths = sorted({s[0] for s in shapes})
            raise UserError(
                f"{name}: sequences of different lengths {lengths}; every clip needs the same "
                "number of frames"
            )
        if len(shapes) > 1 or len(next(iter(shapes))) != 4:
            raise UserError(f"{name}: frames of different shapes {sorted(shapes)[:3]}")
        return cls(name, np.stack(sequences).astype(np.uint8), np.asarray(labels), subjects)


def _person_clips(cfg: ClipConfig, p: int) -> tuple[np.ndarray, np.ndarray]:
    """All clips of person p: the identity is drawn exactly as `generate_synth` draws it."""
    rng = np.random.default_rng([cfg.seed, p])
    ident = make_identity(rng, cfg.resting)
    clips, labels = [], []
    for e, emotion in enumerate(EMOTIONS):
        for _ in range(cfg.per_emotion):
            target = float(rng.uniform(*cfg.intensity))
            scene_seed, au_seed = (int(v) for v in rng.integers(2**62, size=2))
            frames = []
            for t in range(cfg.frames):
                level = target * t / (cfg.frames - 1)
                aus = emotion_aus(
                    emotion, level, ident, np.random.default_rng(au_seed), cfg.au_noise
                )
                # The same scene generator per frame keeps pose, lighting and mask fixed.
                img = render(
                    ident,
                    aus,
                    np.random.default_rng(scene_seed),
                    cfg.height,
                    cfg.width,
                    cfg.pixel_noise,
                ).astype(np.float32)
                img += rng.normal(0, cfg.frame_noise, img.shape)
                frames.append(np.clip(img, 0, 255).astype(np.uint8))
            clips.append(np.stack(frames)[:, None])
            labels.append(e)
    return np.stack(clips), np.asarray(labels, dtype=np.int64)


def _cache_path(cfg: ClipConfig, cache_dir: Path | None) -> Path:
    from splitfed.data.loaders import default_cache_dir

    payload = json.dumps({"v": CLIP_CACHE_VERSION, **cfg.model_dump(mode="json")}, sort_keys=True)
    key = hashlib.sha256(payload.encode()).hexdigest()[:20]
    return (cache_dir or default_cache_dir()) / f"clips-{key}.npz"


def generate_clips(
    config: ClipConfig | None = None,
    cache: bool = True,
    cache_dir: Path | None = None,
) -> ClipDataset:
    """The whole clip set, from the on-disk cache when it was made before (drawing is slow)."""
    cfg = config or ClipConfig()
    path = _cache_path(cfg, cache_dir) if cache else None
    if path is not None and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as npz:
                ds = ClipDataset("synth-clips", npz["clips"], npz["labels"], npz["subjects"])
            ds.meta = {"synthetic": True, "config": cfg.model_dump(mode="json"), "cache_hit": True}
            return ds
        except (OSError, ValueError, KeyError) as e:
            log.warning("ignoring unreadable clip cache %s: %s", path, e)
    log.info(
        "drawing %d synthetic clips of %d frames (once; cached in %s)",
        cfg.identities * len(EMOTIONS) * cfg.per_emotion,
        cfg.frames,
        path.parent if path else "-",
    )
    people = range(cfg.identities)
    parts = [_person_clips(cfg, p) for p in people]
    clips = np.concatenate([c for c, _ in parts])
    labels = np.concatenate([y for _, y in parts])
    subjects = np.repeat([f"S{p:03d}" for p in people], len(EMOTIONS) * cfg.per_emotion)
    ds = ClipDataset(
        "synth-clips",
        clips,
        labels,
        subjects,
        {"synthetic": True, "config": cfg.model_dump(mode="json"), "cache_hit": False},
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        try:
            with tmp.open("wb") as fh:
                np.savez_compressed(fh, clips=clips, labels=labels, subjects=subjects.astype(str))
            tmp.replace(path)
        except OSError as e:
            log.warning("could not write the clip cache %s: %s", path, e)
            tmp.unlink(missing_ok=True)
    return ds


def row_sequences(ds: EmotionDataset, frames: int) -> ClipDataset:
    """An eye crop read as `frames` horizontal bands, top (forehead) to bottom (eyes)."""
    c, h, w = ds.input_shape
    if not 2 <= frames <= h:
        raise UserError(f"cannot cut {h}-row crops into {frames} row bands")
    band = h // frames
    x = (
        ds.images[:, :, : band * frames]
        .reshape(len(ds), c, frames, band, w)
        .transpose(0, 2, 1, 3, 4)
    )
    meta = {**ds.meta, "sequence": f"{frames} row bands of {band} rows"}
    return ClipDataset(
        f"{ds.name}:rows", np.ascontiguousarray(x), ds.labels.copy(), ds.subjects, meta
    )


def clips_for(data: EmotionDataset, frames: int, cache: bool = True) -> ClipDataset:
    """The sequences that go with a loaded data set: clips of the same synthetic people, the
    clips of a clip folder (`splitfed.data.clip_folders`) whose peak frames `data` holds, or
    row bands of still crops."""
    if data.meta.get("format") == "clips" and isinstance(data.meta.get("source"), str):
        from splitfed.data.clip_folders import load_clips
        from splitfed.data.crop import CropConfig

        crop = data.meta.get("crop")
        crop_cfg = CropConfig.model_validate(crop) if isinstance(crop, dict) else None
        return load_clips(str(data.meta["source"]), frames, crop_cfg, use_cache=cache)
    cfg = data.meta.get("config")
    if data.meta.get("synthetic") and isinstance(cfg, dict) and data.name == "synth":
        synth = SynthConfig.model_validate(cfg)
        return generate_clips(ClipConfig.from_synth(synth, frames), cache=cache)
    log.info("%s has no clips: reading each crop as %d row bands", data.name, frames)
    return row_sequences(data, frames)


def _index_proxy(labels: np.ndarray, subjects: np.ndarray | None, name: str) -> EmotionDataset:
    """A data set whose 'pixels' are each sample's index, so the shared splitters can be reused."""
    n = len(labels)
    idx = np.arange(n, dtype=np.uint32).view(np.uint8).reshape(n, 1, 1, 4)
    return EmotionDataset(name, np.ascontiguousarray(idx), np.asarray(labels), subjects)


def _indices(ds: EmotionDataset) -> np.ndarray:
    return (
        np.ascontiguousarray(ds.images.reshape(len(ds), 4)).view(np.uint32).ravel().astype(np.int64)
    )


def shard_indices(
    labels: np.ndarray,
    subjects: np.ndarray | None,
    n: int,
    partition: str | None,
    split: SplitKind | None,
    seed: int,
    name: str = "data",
) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """`client_shards` as sample indices: the same people per client as every other algorithm."""
    train, test, shards = client_shards(
        _index_proxy(labels, subjects, name), n, partition, split, seed
    )
    return _indices(train), _indices(test), [(_indices(a), _indices(b)) for a, b in shards]
