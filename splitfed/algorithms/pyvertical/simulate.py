"""`aggregator simulate --algo pyvertical`: owners, transport and label holder in one process."""

from __future__ import annotations

import logging
from typing import Any

from splitfed.algorithm_io import AlgorithmIO
from splitfed.algorithms.pyvertical.augment import jitter_problem
from splitfed.algorithms.pyvertical.model import VerticalModelConfig
from splitfed.algorithms.pyvertical.parties import (
    MAX_OWNERS,
    PartySpec,
    base_model,
    model_config_for,
    vertical_parties,
)
from splitfed.algorithms.pyvertical.strategy import PyVertical
from splitfed.config import TrainConfig
from splitfed.data.dataset import EmotionDataset
from splitfed.data.vertical import VerticalData
from splitfed.data.views import views_partition
from splitfed.devices.owner import OwnerRuntime
from splitfed.errors import UserError, refuse
from splitfed.runner import RunOptions, run, write_outputs
from splitfed.transport import InProcessTransport

log = logging.getLogger(__name__)


__all__ = [
    "MAX_OWNERS",
    "build_federation",
    "check_pyvertical",
    "model_config_for",
    "owner_id",
    "simulate_pyvertical",
]


def owner_id(i: int) -> str:
    return f"owner-{i:02d}"


def build_federation(
    data: VerticalData,
    model_cfg: VerticalModelConfig,
    train_cfg: TrainConfig,
    seed: int,
    run_id: str = "sim",
) -> tuple[PyVertical, AlgorithmIO, list[OwnerRuntime]]:
    """Owners, transport and label holder for one in-process run."""
    runtimes = [OwnerRuntime(owner_id(i), run_id, t) for i, t in enumerate(data.owners)]
    algo = PyVertical(model_cfg, train_cfg, seed, data.labels)
    io = AlgorithmIO(InProcessTransport(runtimes), run_id, train_cfg, algo.specs())  # type: ignore[arg-type]
    return algo, io, runtimes


def _federation_inputs(
    data: EmotionDataset, spec: Any
) -> tuple[VerticalData, VerticalModelConfig, TrainConfig]:
    """The owners' parts and the configs of `spec`'s run, or a UserError naming why not."""
    base = base_model(data.input_shape, spec.model)
    if not 1 <= spec.clients <= MAX_OWNERS:
        raise UserError(
            f"pyvertical takes 1 to {MAX_OWNERS} data owners (--clients), got {spec.clients}"
        )
    if data.meta.get("views"):  # `--views`: one camera angle per owner, not --clients parts
        vdata = views_partition(data, split=spec.split, seed=spec.seed)
    else:
        vdata = vertical_parties(data, PartySpec(spec.clients, spec.seed, spec.split, base))
    return vdata, model_config_for(vdata, base), spec.train or TrainConfig()


def check_pyvertical(data: EmotionDataset, spec: Any) -> None:
    """Raise the UserError `simulate_pyvertical` would raise before its first round, if any
    (`compare` asks every run before it starts the first)."""
    _, model_cfg, train_cfg = _federation_inputs(data, spec)
    refuse(jitter_problem(model_cfg, train_cfg))


def simulate_pyvertical(data: EmotionDataset, spec: Any, on_round: Any = None) -> dict[str, Any]:
    """`aggregator simulate --algo pyvertical`: spec.clients data owners, one part each."""
    if spec.partition not in (None, "vertical"):
        log.info("pyvertical partitions vertically; --partition %s is not used", spec.partition)
    vdata, model_cfg, train_cfg = _federation_inputs(data, spec)
    owners = len(vdata.owners)
    algo, io, _ = build_federation(vdata, model_cfg, train_cfg, spec.seed, spec.run_id)
    data_info: dict[str, Any] = {
        "name": data.name,
        "n_train": 0,
        "n_test": 0,
        "split": vdata.split,
        "partition": f"views:{','.join(vdata.views)}" if vdata.views else f"vertical:{owners}",
        "synthetic": bool(data.meta.get("synthetic", False)),
        "clients_samples": [len(o) for o in vdata.owners],
    }
    opts = RunOptions(
        rounds=spec.rounds,
        min_clients=owners,
        checkpoint_dir=spec.out_dir / "checkpoint" if spec.out_dir else None,
        resume=False,
        data_info=data_info,
        on_round=on_round,
    )
    metrics = run(algo, io, opts)
    metrics["clients"] = owners
    algo.add_report(metrics, io)
    if spec.out_dir is not None:
        write_outputs(metrics, spec.out_dir)
    return metrics
