"""`aggregator simulate --algo pyvertical`: owners, transport and label holder in one process."""

from __future__ import annotations

import logging
from typing import Any

from splitfed.algorithm_io import AlgorithmIO
from splitfed.algorithms.pyvertical.model import VerticalModelConfig, head_scale
from splitfed.algorithms.pyvertical.strategy import PyVertical
from splitfed.config import TrainConfig
from splitfed.data.dataset import EmotionDataset
from splitfed.data.vertical import VerticalConfig, VerticalData, vertical_partition
from splitfed.devices.owner import OwnerRuntime
from splitfed.errors import UserError
from splitfed.model import ModelConfig
from splitfed.runner import RunOptions, run, write_outputs
from splitfed.transport import InProcessTransport

log = logging.getLogger(__name__)


MAX_OWNERS = 32


def owner_id(i: int) -> str:
    return f"owner-{i:02d}"


def model_config_for(data: VerticalData, base: ModelConfig | None) -> VerticalModelConfig:
    base = base or ModelConfig(input_shape=data.input_shape)
    if tuple(base.input_shape) != data.input_shape:
        base = base.model_copy(update={"input_shape": data.input_shape})
    return VerticalModelConfig(split=base, boxes=data.boxes)


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


def simulate_pyvertical(data: EmotionDataset, spec: Any, on_round: Any = None) -> dict[str, Any]:
    """`aggregator simulate --algo pyvertical`: spec.clients data owners, one part each."""
    base = spec.model or ModelConfig(input_shape=data.input_shape)
    if tuple(base.input_shape) != data.input_shape:
        base = base.model_copy(update={"input_shape": data.input_shape})
    if spec.partition not in (None, "vertical"):
        log.info("pyvertical partitions vertically; --partition %s is not used", spec.partition)
    if not 1 <= spec.clients <= MAX_OWNERS:
        raise UserError(
            f"pyvertical takes 1 to {MAX_OWNERS} data owners (--clients), got {spec.clients}"
        )
    try:
        scale = head_scale(base)
    except ValueError as e:
        raise UserError(f"pyvertical cannot cut these crops into parts: {e}") from None
    vcfg = VerticalConfig(owners=spec.clients, align=scale, seed=spec.seed)
    vdata = vertical_partition(data, vcfg, spec.split, spec.seed)
    model_cfg = model_config_for(vdata, base)
    train_cfg = spec.train or TrainConfig()
    algo, io, _ = build_federation(vdata, model_cfg, train_cfg, spec.seed, spec.run_id)
    data_info: dict[str, Any] = {
        "name": data.name,
        "n_train": 0,
        "n_test": 0,
        "split": vdata.split,
        "partition": f"vertical:{spec.clients}",
        "synthetic": bool(data.meta.get("synthetic", False)),
        "clients_samples": [len(o) for o in vdata.owners],
    }
    opts = RunOptions(
        rounds=spec.rounds,
        min_clients=spec.clients,
        checkpoint_dir=spec.out_dir / "checkpoint" if spec.out_dir else None,
        resume=False,
        data_info=data_info,
        on_round=on_round,
    )
    metrics = run(algo, io, opts)
    al = algo.aligned
    assert al is not None
    metrics["data"].update(n_train=len(al.train_ids), n_test=len(al.test_ids))
    metrics["clients"] = spec.clients
    metrics["psi"] = {
        "label_records": len(vdata.labels.ids),
        "owner_records": [len(o) for o in vdata.owners],
        "held_by_each_owner": [al.per_owner[c] for c in algo.owners()],
        "intersection": len(al.train_ids) + len(al.test_ids),
        "bytes": al.psi_bytes,
        "seconds": al.psi_seconds,
        "boxes": [list(b) for b in vdata.boxes],
    }
    if spec.out_dir is not None:
        write_outputs(metrics, spec.out_dir)
    return metrics
