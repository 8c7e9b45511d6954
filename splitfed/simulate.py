"""The in-process federation: the product's algorithms and client runtime, without a network."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitfed.algorithms import ALGORITHMS
from splitfed.algorithms.centralized import Centralized
from splitfed.client import ClientRuntime
from splitfed.config import TrainConfig
from splitfed.data.dataset import EmotionDataset, SplitKind
from splitfed.data.partition import client_shards, default_partition
from splitfed.errors import UserError
from splitfed.model import ModelConfig
from splitfed.runner import RunOptions, run
from splitfed.server import ServerIO
from splitfed.transport import InProcessTransport

log = logging.getLogger(__name__)


@dataclass
class SimSpec:
    algo: str
    clients: int
    rounds: int
    seed: int = 0
    partition: str | None = None
    split: SplitKind | None = None
    model: ModelConfig | None = None
    train: TrainConfig | None = None
    out_dir: Path | None = None
    run_id: str = "sim"


def client_id(i: int) -> str:
    return f"client-{i:02d}"


# Algorithms whose data layout differs from one-crop-per-sample (vertical partitions, sequences)
# register a simulator of their own here: name -> callable(data, spec, on_round) -> metrics.
EXTRA_SIMULATORS: dict[str, Callable[[EmotionDataset, SimSpec, Any], dict[str, Any]]] = {}


def algorithm_names() -> list[str]:
    _load_extras()
    return [*ALGORITHMS, *EXTRA_SIMULATORS]


def _load_extras() -> None:
    # Importing the package registers the extra simulators it provides.
    import importlib

    for mod in ("splitfed.algorithms.pyvertical", "splitfed.algorithms.fedsl"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def simulate(data: EmotionDataset, spec: SimSpec, on_round: Any = None) -> dict[str, Any]:
    _load_extras()
    if spec.algo in EXTRA_SIMULATORS:
        return EXTRA_SIMULATORS[spec.algo](data, spec, on_round)
    if spec.algo not in ALGORITHMS:
        raise UserError(
            f"unknown algorithm {spec.algo!r}: choose from {', '.join(algorithm_names())}"
        )
    split = spec.split or ("subject" if data.has_subjects else "random")
    partition = spec.partition or default_partition(data)
    n = 1 if spec.algo == "centralized" else spec.clients
    train, test, shards = client_shards(data, n, partition, split, spec.seed)
    model_cfg = spec.model or ModelConfig(input_shape=data.input_shape)
    if tuple(model_cfg.input_shape) != data.input_shape:
        model_cfg = model_cfg.model_copy(update={"input_shape": data.input_shape})
    train_cfg = spec.train or TrainConfig()
    algo = ALGORITHMS[spec.algo](model_cfg, train_cfg, spec.seed)
    data_info = {
        "name": data.name,
        "n_train": len(train),
        "n_test": len(test),
        "split": split,
        "partition": partition,
        "synthetic": bool(data.meta.get("synthetic", False)),
        "clients_samples": [len(s[0]) for s in shards],
    }
    opts = RunOptions(
        rounds=spec.rounds,
        min_clients=n,
        out_dir=spec.out_dir,
        checkpoint_dir=spec.out_dir / "checkpoint" if spec.out_dir else None,
        resume=False,
        data_info=data_info,
        on_round=on_round,
    )
    if isinstance(algo, Centralized):
        algo.attach_data(train, test)
        metrics = run(algo, None, opts)
    else:
        runtimes = [
            ClientRuntime(client_id(i), spec.run_id, tr, te) for i, (tr, te) in enumerate(shards)
        ]
        transport = InProcessTransport(runtimes)
        io = ServerIO(transport, spec.run_id, model_cfg, train_cfg)
        metrics = run(algo, io, opts)
    metrics["clients"] = spec.clients if spec.algo != "centralized" else 1
    return metrics
