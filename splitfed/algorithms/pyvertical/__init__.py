"""PyVertical: PSI-aligned vertical parts of the eye region, a multi-head SplitNN.

`model` holds the heads and trunk, `strategy` the label holder's round logic, `simulate` the
in-process wiring; the data owner's runtime is `splitfed.devices.owner.OwnerRuntime`.
"""

from __future__ import annotations

from splitfed.algorithms.pyvertical.model import (
    Trunk,
    VerticalModelConfig,
    build_vertical_model,
    head_scale,
)
from splitfed.algorithms.pyvertical.strategy import Alignment, PyVertical

__all__ = [
    "Alignment",
    "PyVertical",
    "Trunk",
    "VerticalModelConfig",
    "build_vertical_model",
    "head_scale",
]
