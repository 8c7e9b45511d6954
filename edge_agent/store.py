"""The device's local data: collected eye crops (never leave the device) and training shards.

Collected crops live in `state_dir/crops/<emotion>/*.png`, a folder per class, already cut to
the crop size; they are read back as they are (no second face detection). A data set given by
path goes through `splitfed.data.loaders`, and `--shard I/N` takes the I-th of the N shards
that `client_shards` makes, exactly as the simulator does, so this device holds the samples
(and held-out samples) of its simulated twin.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import cv2
import numpy as np

from edge_agent.config import AgentConfig
from splitfed.data.crop import CropConfig
from splitfed.data.dataset import EmotionDataset
from splitfed.data.partition import client_shards
from splitfed.emotions import EMOTIONS, emotion_index
from splitfed.errors import UserError

log = logging.getLogger(__name__)

MARKER = ".splitfed-crops"


class CropStore:
    """Eye crops per emotion on the device's own disk."""

    def __init__(self, root: Path, crop: CropConfig) -> None:
        self.root = Path(root)
        self.crop = crop

    def save(self, emotion: str, crop: np.ndarray, n: int) -> Path:
        """Store one uint8 (C, H, W) crop as PNG; returns its path."""
        if emotion not in EMOTIONS:
            raise ValueError(f"unknown emotion {emotion!r}")
        folder = self.root / emotion
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (self.root / MARKER).write_text(self.crop.model_dump_json())
        except OSError as e:
            raise UserError(
                f"cannot store crops in {self.root}: {e.strerror}; use --state-dir"
            ) from None
        img = (
            crop[0]
            if crop.shape[0] == 1
            else cv2.cvtColor(crop.transpose(1, 2, 0), cv2.COLOR_RGB2BGR)
        )
        path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{n:05d}.png"
        if not cv2.imwrite(str(path), img):
            raise UserError(f"cannot write {path}")
        return path

    def counts(self) -> dict[str, int]:
        return {
            e: len(list((self.root / e).glob("*.png")))
            for e in EMOTIONS
            if (self.root / e).is_dir()
        }

    def exists(self) -> bool:
        return (self.root / MARKER).is_file() and sum(self.counts().values()) > 0

    def load(self, name: str = "crops") -> EmotionDataset:
        """All stored crops; a wrong-sized or unreadable file is skipped with a warning."""
        c, h, w = self.crop.channels, self.crop.height, self.crop.width
        images: list[np.ndarray] = []
        labels: list[int] = []
        skipped = 0
        for d in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            idx = emotion_index(d.name) if d.is_dir() else None
            if idx is None:
                continue
            for f in sorted(d.glob("*.png")):
                img = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE if c == 1 else cv2.IMREAD_COLOR)
                if img is None or img.shape[:2] != (h, w):
                    skipped += 1
                    continue
                arr = (
                    img[None] if c == 1 else cv2.cvtColor(img, cv2.COLOR_BGR2RGB).transpose(2, 0, 1)
                )
                images.append(arr)
                labels.append(idx)
        if skipped:
            log.warning(
                "skipped %d crop file(s) in %s that are unreadable or not %dx%d",
                skipped,
                self.root,
                w,
                h,
            )
        if not images:
            raise UserError(f"no collected crops in {self.root}: run `edge-agent collect` first")
        return EmotionDataset(
            name=name,
            images=np.stack(images).astype(np.uint8),
            labels=np.asarray(labels, dtype=np.int64),
            meta={"source": str(self.root), "format": "crops"},
        )


def load_local_data(cfg: AgentConfig) -> EmotionDataset | None:
    """The whole local data set named in the config, or None when the device has none."""
    d = cfg.data
    store = CropStore(cfg.crops_dir, cfg.crop)
    source = d.dataset
    if source is None:
        return store.load(f"crops:{cfg.client_id}") if store.exists() else None
    if source == "crops":
        return store.load(f"crops:{cfg.client_id}")
    if source == "synth" or d.data_format == "synth":
        from splitfed.data.synth import SynthConfig, generate_synth

        ds = generate_synth(SynthConfig(identities=d.synth_identities))
        log.info(
            "synthetic eye-region set: %d pictures of %d synthetic people (not real faces)",
            len(ds),
            d.synth_identities,
        )
        return ds
    p = Path(source).expanduser()
    if (p / MARKER).is_file():
        return CropStore(p, cfg.crop).load(f"crops:{p.name}")
    from splitfed.data.loaders import load_dataset

    return load_dataset(source, data_format=d.data_format, crop=cfg.crop)


def training_shard(cfg: AgentConfig) -> tuple[EmotionDataset, EmotionDataset] | None:
    """(train, held-out) of this device: shard I of N, split exactly as the simulator splits."""
    ds = load_local_data(cfg)
    if ds is None:
        return None
    i, n = cfg.data.shard_index()
    _, _, shards = client_shards(ds, n, cfg.data.partition, cfg.data.split, cfg.data.seed)
    train, test = shards[i]
    log.info(
        "local data %s: shard %d/%d = %d training and %d held-out samples",
        ds.name,
        i,
        n,
        len(train),
        len(test),
    )
    return train, test
