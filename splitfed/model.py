"""The split CNN for eye-region crops.

The network is a stack of blocks; `cut` says how many of them run on the device. Both halves are
built from one seeded full model, so a split run and a centralized run start from the same weights.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F

from splitfed.emotions import NUM_CLASSES


class ModelConfig(BaseModel):
    """Architecture of the split network; stored in every checkpoint and manifest."""

    model_config = ConfigDict(extra="forbid")

    input_shape: tuple[int, int, int] = Field((1, 48, 96), description="C, H, W of an eye crop")
    input_norm: Literal["global", "per-crop"] = Field(
        "per-crop",
        description="'global': the fixed pixel mean/std only; 'per-crop': the client half's first "
        "layer also standardises each crop, so exposure and contrast drop out (in training, the "
        "ONNX export and live inference alike). A checkpoint keeps the norm it was trained with",
    )
    widths: tuple[int, ...] = Field((16, 32, 64, 96), description="channels of each conv block")
    stem_stride: int = Field(2, ge=1, le=4, description="stride of the first convolution")
    cut: int = Field(2, ge=1, description="number of conv blocks on the client (the cut layer)")
    bottleneck: int | None = Field(
        None,
        ge=1,
        description="channels of a 1x1 conv at the cut: fewer bytes and less detail on the wire",
    )
    head_pool: tuple[int, int] = Field(
        (3, 6), description="pooled grid before the classifier; keeps where brows and lids are"
    )
    antialias: bool = Field(
        False,
        description="blur before every subsampling (the strided first convolution and each "
        "max-pool), so a band a few pixels off, or a softer camera, moves the features less. "
        "It has no weights: the weights' names and shapes are the same either way",
    )
    dropout: float = Field(0.3, ge=0.0, lt=1.0, description="dropout before the classifier")
    num_classes: int = Field(NUM_CLASSES, description="number of emotions")
    shape: Literal["standard", "u"] = Field(
        "standard",
        description="'u': U-shaped split, the device also runs the classifier head and keeps "
        "the labels; the aggregator returns the server half's features, never sees a logit",
    )

    def model_post_init(self, _context: object) -> None:
        if not 1 <= self.cut <= len(self.widths):
            raise ValueError(f"cut must be between 1 and {len(self.widths)}, got {self.cut}")


class BlurPool(nn.Module):
    """A fixed binomial low-pass ([1, 2, 1] squared, per channel), then every `stride`-th pixel.

    Anti-aliased downsampling (R. Zhang, "Making Convolutional Networks Shift-Invariant Again",
    ICML 2019): subsampling without a low-pass first lets a one-pixel move of the input change
    the features, which is what another detector's band and another camera's focus do. The
    kernel is a buffer, not a parameter, and is not saved: the state dict, checkpoints and the
    weights on the wire have the same names and shapes as the network without it. Borders are
    repeated. The output has the size of a stride-`stride` convolution with padding 1
    (ceil(H / stride)).
    """

    def __init__(self, channels: int, stride: int = 2) -> None:
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        k = torch.outer(k, k) / 16.0
        self.register_buffer("kernel", k.expand(channels, 1, 3, 3).clone(), persistent=False)
        self.channels = channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (1, 1, 1, 1), mode="replicate")
        return F.conv2d(x, self.kernel, stride=self.stride, groups=self.channels)


def _block(
    c_in: int, c_out: int, pool: bool, stride: int = 1, antialias: bool = False
) -> nn.Sequential:
    """Two 3x3 convolutions; the first may stride, and all but the last block pool by 2.

    `antialias`: the strided convolution runs at stride 1 and a BlurPool subsamples after its
    ReLU, and the max-pool takes the maximum at stride 1 before a BlurPool subsamples (Zhang's
    BlurPool and MaxBlurPool); the output sizes are the same as without.
    """
    blur_stride = antialias and stride > 1
    relu: nn.Module = nn.ReLU(inplace=True)
    if blur_stride:  # in the ReLU's place, so the layers keep their indices and weight names
        relu = nn.Sequential(relu, BlurPool(c_out, stride))
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, 3, stride=1 if blur_stride else stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        relu,
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]
    if pool and antialias:
        layers.append(nn.Sequential(nn.MaxPool2d(2, stride=1), BlurPool(c_out, 2)))
    elif pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def _bottleneck(c_in: int, c_out: int) -> list[nn.Module]:
    """1x1 conv at the cut, part of the device's last block so the cut stays a block boundary."""
    return [nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class PerCropNorm(nn.Module):
    """Standardise each crop over its own pixels (all channels): zero mean, unit variance.

    Another camera or light changes a crop's exposure and contrast, a near-affine map of its
    pixels; this undoes it before the first convolution. It sits inside the client half, so
    training, the ONNX export and live inference apply it alike and no caller can forget it.
    It has no parameters, so weights and checkpoints are the same with and without it.
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        centred = x - mean
        var = centred.pow(2).mean(dim=(1, 2, 3), keepdim=True)
        return centred / torch.sqrt(var + self.eps)


class ClientNet(nn.Module):
    """The device half: conv blocks up to the cut; its output is the smashed data."""

    def __init__(
        self, blocks: list[nn.Module], input_norm: Literal["global", "per-crop"] = "global"
    ) -> None:
        super().__init__()
        self.norm: nn.Module = PerCropNorm() if input_norm == "per-crop" else nn.Identity()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.norm(x))


class ServerNet(nn.Module):
    """The aggregator half: the remaining blocks, pooling and the classifier."""

    def __init__(
        self,
        blocks: list[nn.Module],
        width: int,
        pool: tuple[int, int],
        dropout: float,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(width * pool[0] * pool[1], num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(h))

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """The aggregator's part in a U-shaped split: blocks and pooling, no dropout (no RNG)."""
        return self.pool(self.blocks(h)).flatten(1)

    def head(self, f: torch.Tensor) -> torch.Tensor:
        """The classifier head (dropout, linear): on the device in a U-shaped split, so the
        dropout draws come first under the half's seed exactly as in the unsplit forward."""
        return self.fc(self.dropout(f))


def build_split_model(cfg: ModelConfig, seed: int) -> tuple[ClientNet, ServerNet]:
    """Build the full network from one seed, then cut it into (client, server)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        blocks: list[nn.Module] = []
        c_in = cfg.input_shape[0]
        for i, w in enumerate(cfg.widths):
            stride = cfg.stem_stride if i == 0 else 1
            pool = i < len(cfg.widths) - 1
            blocks.append(_block(c_in, w, pool, stride=stride, antialias=cfg.antialias))
            c_in = w
            if cfg.bottleneck is not None and i == cfg.cut - 1:
                blocks[-1].extend(_bottleneck(w, cfg.bottleneck))
                c_in = cfg.bottleneck
        server = ServerNet(blocks[cfg.cut :], c_in, cfg.head_pool, cfg.dropout, cfg.num_classes)
        client = ClientNet(blocks[: cfg.cut], cfg.input_norm)
    finally:
        torch.random.set_rng_state(gen_state)
    return client, server


def smashed_shape(cfg: ModelConfig) -> tuple[int, int, int]:
    """Shape (C, H, W) of one sample's activations at the cut layer."""
    _, h, w = cfg.input_shape
    h, w = -(-h // cfg.stem_stride), -(-w // cfg.stem_stride)
    for _ in range(min(cfg.cut, len(cfg.widths) - 1)):  # every block but the last pools
        h, w = h // 2, w // 2
    return cfg.bottleneck or cfg.widths[cfg.cut - 1], h, w


def feature_dim(cfg: ModelConfig) -> int:
    """Length of one sample's server-half features (the classifier's input)."""
    last = cfg.widths[-1]
    if cfg.bottleneck is not None and cfg.cut == len(cfg.widths):
        last = cfg.bottleneck
    return last * cfg.head_pool[0] * cfg.head_pool[1]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv_macs(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass for a batch of one (conv and linear layers, and
    the fixed 3x3 blur of each BlurPool)."""
    total = 0

    def hook(m: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
            total += out.numel() * k
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
        elif isinstance(m, BlurPool):
            total += out.numel() * 9

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    was_training = module.training
    module.eval()
    with torch.no_grad():
        module(torch.zeros(1, *input_shape))
    module.train(was_training)
    for h in handles:
        h.remove()
    return total


# Torch's global RNG is one per process: two threads inside `seeded` at once (a device's
# training and live threads, or in-process agents) would draw from each other's seeds.
_GLOBAL_RNG_LOCK = threading.RLock()


def key_seed(*key: int) -> int:
    """The seed a key of ints stands for: the same key, the same draws, in any process."""
    seed = 0
    for k in key:
        seed = (seed * 1_000_003 + int(k) + 1) % (2**63 - 1)
    return seed


def generator(*key: int) -> torch.Generator:
    """A private CPU generator seeded from `key`: draws from it touch no global state, and it
    gives the draws that the global RNG gives under `seeded(*key)`."""
    return torch.Generator().manual_seed(key_seed(*key))


@contextlib.contextmanager
def seeded(*key: int) -> Iterator[None]:
    """Run a block with torch's global RNG seeded from `key`, restoring it afterwards.

    Dropout draws from the global RNG. Seeding every forward pass from (run seed, round, client,
    step, half) makes the draws independent of which process runs the half and in what order,
    which is what lets the MQTT deployment reproduce the simulator bit for bit. Blocks of
    different threads take turns, since they share that RNG.
    """
    with _GLOBAL_RNG_LOCK:
        state = torch.random.get_rng_state()
        torch.manual_seed(key_seed(*key))
        try:
            yield
        finally:
            torch.random.set_rng_state(state)
