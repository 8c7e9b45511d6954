"""FedSL's model: a frame encoder and a GRU per segment in time, chained by the hidden state."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from splitfed.config import CameraConfig, TrainConfig
from splitfed.data.batches import camera_jitter, iterate_batches, keyed_generator
from splitfed.data.dataset import EmotionDataset
from splitfed.emotions import NUM_CLASSES

log = logging.getLogger(__name__)


PREFIX = "w."
EVAL_BATCH = 256
DEFAULT_FRAMES = 4
DEFAULT_SEGMENTS = 2
FLOATS = frozenset({"F32", "F16"})
# Seed streams of the camera jitter, apart from the batch order and the other augmentation.
CAMERA_STREAM = 0xCA3E
_DRAWS, _NOISE = 1, 2


class SeqModelConfig(BaseModel):
    """The recurrent network and how it is cut in time."""

    model_config = ConfigDict(extra="forbid")

    frame_shape: tuple[int, int, int] = Field((1, 48, 96), description="C, H, W of one frame")
    frames: int = Field(DEFAULT_FRAMES, ge=1, description="frames per sequence")
    segments: int = Field(DEFAULT_SEGMENTS, ge=1, description="devices per client group")
    widths: tuple[int, ...] = Field(
        (16, 32, 64, 96), description="channels of each conv block of the frame encoder"
    )
    stem: int = Field(2, ge=1, le=4, description="stride of the encoder's first convolution")
    double: bool = Field(True, description="two convolutions per block, as in the split CNN")
    grid: tuple[int, int] = Field(
        (3, 6), description="pooled map that is flattened per frame; keeps where brows and lids are"
    )
    features: int = Field(128, ge=1, description="per-frame features fed to the GRU")
    hidden: int = Field(128, ge=1, description="GRU hidden size (what crosses between devices)")
    dropout: float = Field(0.3, ge=0.0, lt=1.0, description="dropout before the classifier")
    num_classes: int = Field(NUM_CLASSES, description="number of emotions")
    row_bands: bool = Field(
        False, description="the frames are row bands of one still crop (top to bottom), not a clip"
    )

    def model_post_init(self, _context: object) -> None:
        if self.segments > self.frames:
            raise ValueError(
                f"{self.segments} segments need at least as many frames, got {self.frames}"
            )

    def bounds(self, k: int) -> tuple[int, int]:
        """Frames [t0, t1) of segment k (as even as possible, earlier segments longer)."""
        cuts = np.cumsum(
            [0] + [len(a) for a in np.array_split(np.arange(self.frames), self.segments)]
        )
        return int(cuts[k]), int(cuts[k + 1])

    def segment_frames(self, k: int) -> int:
        t0, t1 = self.bounds(k)
        return t1 - t0


class FrameEncoder(nn.Module):
    """Each frame to a feature vector, with the conv stack of the split CNN.

    Blocks of (two) 3x3 convolutions with batch norm, pooling between blocks; the first
    convolution strides by `stem`. The last map is pooled to a small grid and flattened, which
    keeps where things are (how high a brow sits above its eye), then projected and normalised.
    """

    def __init__(self, cfg: SeqModelConfig) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = cfg.frame_shape[0]
        for i, width in enumerate(cfg.widths):
            layers: list[nn.Module] = [
                nn.Conv2d(c_in, width, 3, stride=cfg.stem if i == 0 else 1, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            if cfg.double:
                layers += [
                    nn.Conv2d(width, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
            if i < len(cfg.widths) - 1:  # ceil: row bands of a crop are only a few rows high
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            blocks.append(nn.Sequential(*layers))
            c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(cfg.grid)
        # Batch norm here keeps the GRU's inputs in range: without it the recurrent net does not
        # learn at the learning rate that suits the picture models (Adam, 2e-3).
        self.proj = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(c_in * cfg.grid[0] * cfg.grid[1], cfg.features, bias=False),
            nn.BatchNorm1d(cfg.features),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(self.blocks(x)))


class Segment(nn.Module):
    """Sub-network k: encodes its frames and runs its GRU on, from the hidden state handed over."""

    def __init__(self, cfg: SeqModelConfig, k: int) -> None:
        super().__init__()
        self.k = k
        self.last = k == cfg.segments - 1
        self.encoder = FrameEncoder(cfg)
        self.gru = nn.GRU(cfg.features, cfg.hidden, batch_first=True)
        if self.last:
            self.dropout = nn.Dropout(cfg.dropout)
            self.fc = nn.Linear(cfg.hidden, cfg.num_classes)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
        """x: (B, T_k, C, H, W); h: (B, hidden) or None. Hidden state out, or logits if last."""
        b, t = x.shape[:2]
        feats = self.encoder(x.flatten(0, 1)).view(b, t, -1)
        _, hn = self.gru(feats, None if h is None else h.unsqueeze(0).contiguous())
        out = hn[0]
        return self.fc(self.dropout(out)) if self.last else out


def build_seq_model(cfg: SeqModelConfig, seed: int) -> nn.ModuleList:
    """All segments from one seed, so every device and the central model start alike."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return nn.ModuleList([Segment(cfg, k) for k in range(cfg.segments)])
    finally:
        torch.random.set_rng_state(gen_state)


def frames_proxy(frames: np.ndarray, labels: np.ndarray | None) -> EmotionDataset:
    """(N, T, C, H, W) as (N, T*C, H, W): the shared batcher then draws one shift, mirror and
    lighting change per sequence, the same on every device of a group and in the un-split net."""
    n = len(frames)
    y = np.zeros(n, dtype=np.int64) if labels is None else labels
    return EmotionDataset("frames", frames.reshape(n, -1, *frames.shape[3:]), y)


def as_frames(x: torch.Tensor, c: int) -> torch.Tensor:
    return x.view(x.shape[0], -1, c, *x.shape[2:])


def jitter_problem(cfg: SeqModelConfig, train_cfg: TrainConfig) -> str | None:
    """Why `train_cfg.jitter` cannot apply to these sequences, or None.

    Geometric jitter (zoom, roll, offset about the picture's centre) moves pixels across the
    whole picture. A clip's frames are whole pictures: one draw per clip moves every frame
    alike, on each device as in the un-split network. A row band is a few rows of a still
    crop, the other rows on other devices: zoomed or rolled about its own centre, each band
    would tear the crop into strips, and no device holds the rows it would need, so that is
    refused. The camera applies to both (`sequence_batches`).
    """
    if cfg.row_bands and train_cfg.augment and train_cfg.jitter.geometric:
        return (
            "fedsl on row bands of still crops cannot take geometric jitter (jitter scale, "
            "rotation, shift_y): each device holds a few rows of a crop, and zoom, roll and "
            "offset move pixels across the whole crop; the camera jitter applies"
        )
    return None


def sequence_camera(
    x: torch.Tensor,
    cam: CameraConfig,
    cfg: SeqModelConfig,
    key: tuple[int, ...],
    step: int,
    first: int = 0,
) -> torch.Tensor:
    """Training batch `step`'s camera jitter of frames `first`.. of each sequence, x (B, T_k,
    C, H, W): `camera_jitter` frame by frame.

    One camera per sequence: every frame gets the same draws (tone curve, light, blur,
    resolution, noise level, JPEG quality; a generator seeded alike for each), and fresh
    sensor noise of its own, keyed by the frame's place in the whole sequence. So device k,
    which holds frames t0..t1-1, changes them exactly as the un-split network changes those
    frames of the whole clip. Row bands are pieces of one picture: the light ramp runs across
    the whole crop (`window`). Seeded per (run, round, group, step), apart from the stream of
    the other augmentation, which draws per sequence too and so stays the same on every device.
    """
    _, t, _, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(t):
        frame = first + i
        window = (frame * h, 0, cfg.frames * h, w) if cfg.row_bands else None
        out[:, i] = camera_jitter(
            x[:, i].contiguous(),
            keyed_generator(*key, CAMERA_STREAM, _DRAWS, step),
            cam,
            noise_gen=keyed_generator(*key, CAMERA_STREAM, _NOISE, step, frame),
            window=window,
        )
    return out


def sequence_batches(
    frames: np.ndarray,
    labels: np.ndarray | None,
    cfg: SeqModelConfig,
    train_cfg: TrainConfig,
    key: tuple[int, ...],
    first: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches (B, T_k, C, H, W) of frames `first`.. of sequences, and their labels.

    The same on every device of a group and in the un-split network: the shared batcher draws
    one mirror, shift, lighting change and geometric jitter (`TrainConfig.jitter`) per sequence,
    from the generator of (run, round, group), as it does for the split CNN's crops; then one
    camera per sequence (`sequence_camera`).
    """
    jitter = train_cfg.jitter
    # (`jitter_problem` is checked where the run is configured: FedSL and the segment device.)
    # The camera is drawn per frame below: in the batcher it would take the sequence's frames
    # for one picture's channels, and its noise would depend on how many frames a device holds.
    geometry = jitter.model_copy(update={"camera": CameraConfig(p=0.0)})
    batches = iterate_batches(
        frames_proxy(frames, labels),
        train_cfg.batch_size,
        key,
        train_cfg.local_epochs,
        train=True,
        augment=train_cfg.augment,
        jitter=geometry,
    )
    camera = train_cfg.augment and jitter.camera.enabled
    for step, (x, y) in enumerate(batches):
        seq = as_frames(x, cfg.frame_shape[0])
        if camera:
            seq = sequence_camera(seq, jitter.camera, cfg, key, step, first)
        yield seq, y
