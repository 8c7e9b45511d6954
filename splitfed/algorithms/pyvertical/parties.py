"""Who holds what in a PyVertical federation, computed the same way by every party.

`simulate` builds all parties in one process; deployed, each process builds only its own:
an owner (`edge-agent --role owner`) its part of the crops, the label holder (`aggregator serve
--algo pyvertical`) the label table. Both call `vertical_parties` with the same data set, seed,
split and owner count, so a deployed party holds exactly what its simulated twin holds.

Loaders of real vertical data (e.g. several cameras per record) plug in as an `OwnerSource`:
any function that returns this owner's `OwnerTable` from its configuration.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from splitfed.algorithms.pyvertical.model import VerticalModelConfig, head_scale
from splitfed.data.dataset import EmotionDataset, SplitKind
from splitfed.data.vertical import (
    LabelTable,
    OwnerTable,
    VerticalConfig,
    VerticalData,
    vertical_partition,
)
from splitfed.errors import UserError
from splitfed.model import ModelConfig

log = logging.getLogger(__name__)

MAX_OWNERS = 32


@dataclass(frozen=True)
class PartySpec:
    """What every party of one run agrees on: owner count, seed, split and the split CNN."""

    owners: int
    seed: int = 0
    split: SplitKind | None = None
    model: ModelConfig | None = None


# A source of one owner's part: (its local data set, the run's PartySpec, its index) -> table.
OwnerSource = Callable[[EmotionDataset, PartySpec, int], OwnerTable]


def base_model(data_shape: tuple[int, int, int], model: ModelConfig | None) -> ModelConfig:
    """The split CNN whose device half is every head, on crops of `data_shape`."""
    base = model or ModelConfig(input_shape=data_shape)
    if tuple(base.input_shape) != tuple(data_shape):
        base = base.model_copy(update={"input_shape": tuple(data_shape)})
    return base


def vertical_parties(data: EmotionDataset, spec: PartySpec) -> VerticalData:
    """All parties' tables: part edges on the heads' scale, `vertical_partition`'s sharing."""
    if not 1 <= spec.owners <= MAX_OWNERS:
        raise UserError(f"pyvertical takes 1 to {MAX_OWNERS} data owners, got {spec.owners}")
    base = base_model(data.input_shape, spec.model)
    try:
        scale = head_scale(base)
    except ValueError as e:
        raise UserError(f"pyvertical cannot cut these crops into parts: {e}") from None
    vcfg = VerticalConfig(owners=spec.owners, align=scale, seed=spec.seed)
    return vertical_partition(data, vcfg, spec.split, spec.seed)


def model_config_for(data: VerticalData, base: ModelConfig | None) -> VerticalModelConfig:
    """The multi-head network for these parts."""
    return VerticalModelConfig(split=base_model(data.input_shape, base), boxes=data.boxes)


def partitioned_owner(data: EmotionDataset, spec: PartySpec, index: int) -> OwnerTable:
    """The default `OwnerSource`: owner `index`'s table of the simulator's partition."""
    if not 0 <= index < spec.owners:
        raise UserError(
            f"owner index {index} outside 0..{spec.owners - 1} (--owners {spec.owners})"
        )
    table = vertical_parties(data, spec).owners[index]
    log.info(
        "data owner %d of %d: part %s of %d records of %s",
        index,
        spec.owners,
        table.box,
        len(table),
        data.name,
    )
    return table


def label_holder(data: EmotionDataset, spec: PartySpec) -> tuple[LabelTable, VerticalModelConfig]:
    """The label holder's table of the simulator's partition, and the network for its parts.

    The owners' parts are computed on the way (the partition draws them in one sequence) and
    dropped: the label holder keeps labels and the parts' layout only."""
    parties = vertical_parties(data, spec)
    return parties.labels, model_config_for(parties, spec.model)
