"""PyVertical's model: one head per owner's part of the crop, a trunk on the stitched maps."""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from splitfed.model import ClientNet, ModelConfig, ServerNet, build_split_model, smashed_shape

log = logging.getLogger(__name__)


EVAL_BATCH = 256


def head_scale(split: ModelConfig) -> int:
    """How much the device half of `split` shrinks its input (stem stride times its pools)."""
    c, h, w = split.input_shape
    _, sh, sw = smashed_shape(split)
    if h % sh or w % sw or h // sh != w // sw:
        raise ValueError(f"the device half maps {h}x{w} to {sh}x{sw}: not a whole, even scale")
    return h // sh


class VerticalModelConfig(BaseModel):
    """The multi-head network: one head per owner's part, a trunk on the stitched feature maps.

    `split` is the ordinary split CNN; each head is a copy of its device half applied to one
    part, and the trunk is its server half applied to the heads' maps put back in place. Part
    edges are multiples of the device half's scale, so every map lands on whole cells.

    Two layouts: tiles (parts of one crop, which must not overlap) and views (several owners
    whose box is each the whole crop: cameras that photograph the same record from different
    angles). Views cannot be placed side by side, so the trunk fuses their maps with a learned
    1x1 convolution over the stacked channels, which starts as their mean.
    """

    model_config = ConfigDict(extra="forbid")

    split: ModelConfig = Field(description="the split CNN whose halves make the heads and trunk")
    boxes: list[tuple[int, int, int, int]] = Field(description="each owner's part: y0, y1, x0, x1")
    mirror: bool = Field(
        False,
        description="also mirror records in training (needs a symmetric layout); over 10 rounds "
        "on the synthetic set it slowed learning more than it helped",
    )

    def model_post_init(self, _context: object) -> None:
        if not self.boxes:
            raise ValueError("need at least one part")
        _, h, w = self.input_shape
        s = self.scale
        if self.views:
            return
        taken = np.zeros((h, w), dtype=bool)
        for y0, y1, x0, x1 in self.boxes:
            if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
                raise ValueError(f"part {(y0, y1, x0, x1)} is outside the {h}x{w} crop")
            if any(v % s for v in (y0, y1, x0, x1)):
                raise ValueError(f"part {(y0, y1, x0, x1)} edges must be multiples of {s}")
            if taken[y0:y1, x0:x1].any():
                raise ValueError(f"part {(y0, y1, x0, x1)} overlaps another part")
            taken[y0:y1, x0:x1] = True

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.split.input_shape

    @property
    def views(self) -> bool:
        """One whole crop per owner (views of a record), not tiles of one crop."""
        _, h, w = self.input_shape
        return len(self.boxes) > 1 and all(tuple(b) == (0, h, 0, w) for b in self.boxes)

    @property
    def scale(self) -> int:
        return head_scale(self.split)

    def grid(self) -> tuple[int, int, int]:
        """Shape of the stitched map: the device half's output for the whole crop."""
        return smashed_shape(self.split)

    def head_shape(self, k: int) -> tuple[int, int, int]:
        y0, y1, x0, x1 = self.boxes[k]
        return self.grid()[0], (y1 - y0) // self.scale, (x1 - x0) // self.scale

    def part_shape(self, k: int) -> tuple[int, int, int]:
        y0, y1, x0, x1 = self.boxes[k]
        return self.input_shape[0], y1 - y0, x1 - x0

    def mirror_map(self) -> list[int] | None:
        """Which part lies where each part's mirror image does; None if the layout is not
        symmetric left to right (then training augments without mirroring). Views never
        mirror: a mirrored half-left view looks like a half-right one, not like itself."""
        if self.views:
            return None
        w = self.input_shape[2]
        where = {tuple(b): k for k, b in enumerate(self.boxes)}
        out = [where.get((y0, y1, w - x1, w - x0)) for y0, y1, x0, x1 in self.boxes]
        return None if any(k is None for k in out) else out  # type: ignore[misc]

    def mirrors(self) -> bool:
        return self.mirror and self.mirror_map() is not None


class Trunk(nn.Module):
    """The label holder's half: puts the heads' maps where their parts were, then the CNN's rest."""

    def __init__(self, server: ServerNet, cfg: VerticalModelConfig) -> None:
        super().__init__()
        self.server = server
        self.boxes = [tuple(v // cfg.scale for v in b) for b in cfg.boxes]
        self.grid = cfg.grid()
        self.mirror = cfg.mirror_map()
        self.fuse: nn.Conv2d | None = None
        if cfg.views:
            c, k = self.grid[0], len(cfg.boxes)
            self.fuse = nn.Conv2d(k * c, c, kernel_size=1, bias=False)
            with torch.no_grad():  # starts as the mean of the views' maps
                self.fuse.weight.copy_(torch.eye(c).repeat(1, k)[:, :, None, None] / k)

    def _place(self, parts: list[torch.Tensor], boxes: list[tuple[int, ...]]) -> torch.Tensor:
        out = parts[0].new_zeros((parts[0].shape[0], *self.grid))
        for (y0, y1, x0, x1), p in zip(boxes, parts, strict=True):
            out[:, :, y0:y1, x0:x1] = p
        return out

    def stitch(self, parts: list[torch.Tensor], flip: torch.Tensor | None = None) -> torch.Tensor:
        """The heads' maps in the crop's layout; a mirrored record's maps go to mirrored places."""
        if len(parts) != len(self.boxes):
            raise ValueError(f"{len(parts)} parts for {len(self.boxes)} heads")
        if self.fuse is not None:
            return self.fuse(torch.cat(parts, dim=1))
        out = self._place(parts, self.boxes)
        if flip is not None and bool(flip.any()):
            if self.mirror is None:
                raise ValueError("mirrored records, but the parts are not laid out symmetrically")
            mirrored = self._place(parts, [self.boxes[m] for m in self.mirror])
            out = torch.where(flip[:, None, None, None], mirrored, out)
        return out

    def forward(self, parts: list[torch.Tensor], flip: torch.Tensor | None = None) -> torch.Tensor:
        return self.server(self.stitch(parts, flip))


def build_vertical_model(cfg: VerticalModelConfig, seed: int) -> tuple[list[ClientNet], Trunk]:
    """Heads and trunk from the seeded split CNN: every head starts as its device half."""
    client, server = build_split_model(cfg.split, seed)
    return [copy.deepcopy(client) for _ in cfg.boxes], Trunk(server, cfg)
