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
    angles). Views cannot be placed side by side, so they fuse late (`ViewFusion`): each view's
    maps go through their own copy of the server blocks, and one linear classifier reads the
    concatenated features.
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
        return len(self.boxes) > 1 and self.whole

    @property
    def whole(self) -> bool:
        """Every owner holds whole crops (one owner, or views), not parts of one crop."""
        _, h, w = self.input_shape
        return all(tuple(b) == (0, h, 0, w) for b in self.boxes)

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


class ViewFusion(nn.Module):
    """Late fusion of camera views: each view has its own copy of the server half (blocks,
    pooling, classifier), and the fused scores are the views' scores weighted by a learned
    softmax gate, which starts even (the mean of k single-view models).

    Why not average the views' maps before the server blocks (the first design, a 1x1
    convolution starting as the mean)? A noisy camera's maps are then mixed into a good
    camera's before any nonlinearity, and on the synthetic three-camera proxy
    (scripts/bench_views.py) three cameras ended well below the best one. Here each view keeps
    its own features; training (`Trunk.objective`) also scores each view on its own, so every
    camera's branch learns as it would alone, and the gate learns how much each view is worth.
    """

    def __init__(self, server: ServerNet, views: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(copy.deepcopy(server) for _ in range(views))
        self.gate = nn.Parameter(torch.zeros(views))

    def view_logits(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(parts) != len(self.branches):
            raise ValueError(f"{len(parts)} views for {len(self.branches)} branches")
        return [b(p) for b, p in zip(self.branches, parts, strict=True)]

    def combine(self, logits: list[torch.Tensor]) -> torch.Tensor:
        w = torch.softmax(self.gate, dim=0)
        return sum(w[k] * z for k, z in enumerate(logits))  # type: ignore[return-value]

    def forward(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return self.combine(self.view_logits(parts))


class Trunk(nn.Module):
    """The label holder's half: puts the heads' maps where their parts were, then the CNN's rest
    (tiles); or fuses the views' maps late (views, `ViewFusion`)."""

    def __init__(self, server: ServerNet, cfg: VerticalModelConfig) -> None:
        super().__init__()
        self.boxes = [tuple(v // cfg.scale for v in b) for b in cfg.boxes]
        self.grid = cfg.grid()
        self.mirror = cfg.mirror_map()
        self.server: ServerNet | None = None
        self.fusion: ViewFusion | None = None
        if cfg.views:
            self.fusion = ViewFusion(server, len(cfg.boxes))
        else:
            self.server = server

    def _place(self, parts: list[torch.Tensor], boxes: list[tuple[int, ...]]) -> torch.Tensor:
        out = parts[0].new_zeros((parts[0].shape[0], *self.grid))
        for (y0, y1, x0, x1), p in zip(boxes, parts, strict=True):
            out[:, :, y0:y1, x0:x1] = p
        return out

    def stitch(self, parts: list[torch.Tensor], flip: torch.Tensor | None = None) -> torch.Tensor:
        """The heads' maps in the crop's layout; a mirrored record's maps go to mirrored places."""
        if len(parts) != len(self.boxes):
            raise ValueError(f"{len(parts)} parts for {len(self.boxes)} heads")
        if self.fusion is not None:
            raise ValueError("views are not stitched into one map: they fuse late")
        out = self._place(parts, self.boxes)
        if flip is not None and bool(flip.any()):
            if self.mirror is None:
                raise ValueError("mirrored records, but the parts are not laid out symmetrically")
            mirrored = self._place(parts, [self.boxes[m] for m in self.mirror])
            out = torch.where(flip[:, None, None, None], mirrored, out)
        return out

    def forward(self, parts: list[torch.Tensor], flip: torch.Tensor | None = None) -> torch.Tensor:
        if self.fusion is not None:  # views never mirror (see mirror_map)
            return self.fusion(parts)
        assert self.server is not None
        return self.server(self.stitch(parts, flip))

    def objective(
        self,
        parts: list[torch.Tensor],
        flip: torch.Tensor | None,
        y: torch.Tensor,
        loss_fn: nn.Module,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(what training minimises, the model's loss, its scores) of one batch.

        Tiles: the loss of the stitched model. Views: the fused loss plus each view's own loss
        (deep supervision of every branch), so a camera's branch gets the gradient it would get
        trained alone, however little the gate trusts it yet."""
        if self.fusion is None:
            out = self(parts, flip)
            loss = loss_fn(out, y)
            return loss, loss, out
        logits = self.fusion.view_logits(parts)
        out = self.fusion.combine(logits)
        loss = loss_fn(out, y)
        return loss + sum(loss_fn(z, y) for z in logits), loss, out


def build_vertical_model(cfg: VerticalModelConfig, seed: int) -> tuple[list[ClientNet], Trunk]:
    """Heads and trunk from the seeded split CNN: every head starts as its device half."""
    client, server = build_split_model(cfg.split, seed)
    return [copy.deepcopy(client) for _ in cfg.boxes], Trunk(server, cfg)
