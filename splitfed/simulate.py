"""The in-process federation: the product's algorithms and client runtime, without a network."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from splitfed.algorithms.base import Strategy
from splitfed.algorithms.centralized import Centralized
from splitfed.algorithms.cnn import SMASHED_ALGORITHMS, SplitCNN
from splitfed.algorithms.fedavg import FedAvg
from splitfed.algorithms.fedsl.simulate import check_fedsl, simulate_fedsl
from splitfed.algorithms.fedsl.strategy import FedSL
from splitfed.algorithms.pyvertical.simulate import check_pyvertical, simulate_pyvertical
from splitfed.algorithms.pyvertical.strategy import PyVertical
from splitfed.algorithms.sflv1 import SFLV1
from splitfed.algorithms.sflv2 import SFLV2
from splitfed.algorithms.sl import SplitLearning
from splitfed.client import ClientRuntime
from splitfed.config import AggregationConfig, TrainConfig
from splitfed.data.dataset import EmotionDataset, SplitKind, default_split
from splitfed.data.partition import client_shards, default_partition
from splitfed.data.shift import OtherCamera, shift_metrics
from splitfed.data.tta import tta_metrics
from splitfed.defences import DefenceConfig
from splitfed.errors import UserError
from splitfed.metrics import write_json
from splitfed.model import ModelConfig
from splitfed.runner import RunOptions, run
from splitfed.server import ServerIO
from splitfed.transport import InProcessTransport

log = logging.getLogger(__name__)


def proxy_metrics(model: Any, test: EmotionDataset, seed: int) -> dict[str, Any]:
    """A trained model's `shift_metrics` and `tta_metrics`, on one `other_camera` set."""
    shifted = OtherCamera.of(test.images, seed)
    return {
        **shift_metrics(model, test, seed=seed, shifted=shifted),
        **tta_metrics(model, test, seed, shifted=shifted),
    }


@dataclass
class SimSpec:
    """One in-process run: algorithm, clients, rounds and everything that shapes the numbers."""

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
    aggregation: AggregationConfig | None = None
    step_timeout: float | None = None  # SL, SFLV2: skip a device silent this long (s)
    # Device runtimes in place of the honest ones (tests: attackers, silent devices).
    runtime_factory: Callable[..., ClientRuntime] | None = None
    # Also score the final model on the domain-shift proxy (`splitfed.data.shift`): other crop
    # scale, camera noise, blur, JPEG, lighting. One-crop algorithms only.
    report_shift: bool = False
    # Start both halves from this checkpoint (pretrained elsewhere) instead of the seed's init.
    init_from: Path | None = None
    # FedSL: time steps per sequence and devices per group (None: the model's defaults). On
    # still images the time steps are row bands of each crop, top to bottom.
    frames: int | None = None
    segments: int | None = None
    # What the devices do to their smashed data (`splitfed.defences`); None: no defence.
    defence: DefenceConfig | None = None


def client_id(i: int) -> str:
    return f"client-{i:02d}"


def device_secret(seed: int, index: int) -> int:
    """A simulated device's noise secret: its own per runtime, but drawn from the run seed so a
    simulation is reproducible. A real device draws its own (`ClientRuntime(secret=None)`)."""
    return int(np.random.default_rng([seed, index, 0x5EC2E7]).integers(2**62))


Simulator = Callable[[EmotionDataset, SimSpec, Any], dict[str, Any]]


@dataclass(frozen=True)
class Entry:
    """One algorithm: its strategy, how the simulator runs it, whether `serve` deploys it."""

    strategy: type[Strategy]
    simulate: Simulator | None = None  # None: one crop per sample, `simulate_split` runs it
    served: bool = False
    # The simulator's own refusals before its first round (a UserError), for `preflight`.
    check: Callable[[EmotionDataset, SimSpec], None] | None = None


# The one list of algorithms. Those whose data differ from one crop per sample (vertical
# parts, clip segments) bring their own simulator; the others share `simulate_split`.
REGISTRY: dict[str, Entry] = {
    "centralized": Entry(Centralized),
    "fedavg": Entry(FedAvg, served=True),
    "sl": Entry(SplitLearning, served=True),
    "sflv1": Entry(SFLV1, served=True),
    "sflv2": Entry(SFLV2, served=True),
    "pyvertical": Entry(PyVertical, simulate_pyvertical, served=True, check=check_pyvertical),
    "fedsl": Entry(FedSL, simulate_fedsl, served=True, check=check_fedsl),
}


def algorithm_names() -> list[str]:
    return list(REGISTRY)


def served_names() -> list[str]:
    """Algorithms `aggregator serve` runs with edge agents over MQTT."""
    return [name for name, e in REGISTRY.items() if e.served]


def strategy_class(name: str) -> type[Strategy]:
    if name not in REGISTRY:
        raise UserError(f"unknown algorithm {name!r}: choose from {', '.join(REGISTRY)}")
    return REGISTRY[name].strategy


def simulate(data: EmotionDataset, spec: SimSpec, on_round: Any = None) -> dict[str, Any]:
    """Run `spec` in-process and return its metrics (also written to spec.out_dir)."""
    entry = _refuse(spec)
    if entry.simulate is not None:
        return entry.simulate(data, spec, on_round)
    return simulate_split(data, spec, on_round)


def preflight(data: EmotionDataset, spec: SimSpec) -> None:
    """Raise the UserError `simulate(data, spec)` would raise before its first round, if any:
    `compare` asks every run before it starts the first, so that the seventh run's refusal of
    a flag does not come after the first six have trained."""
    entry = _refuse(spec)
    if entry.check is not None:
        entry.check(data, spec)


def _refuse(spec: SimSpec) -> Entry:
    """`spec`'s algorithm, after the refusals its settings alone decide."""
    if spec.algo not in REGISTRY:
        raise UserError(
            f"unknown algorithm {spec.algo!r}: choose from {', '.join(algorithm_names())}"
        )
    entry = REGISTRY[spec.algo]
    if entry.simulate is not None and spec.init_from is not None:
        raise UserError(
            f"--init-from starts a split-CNN model; {spec.algo} has a network of its own "
            "(use centralized, fedavg, sl, sflv1 or sflv2)"
        )
    if spec.defence not in (None, DefenceConfig()) and spec.algo not in SMASHED_ALGORITHMS:
        raise UserError(
            f"--defence acts on smashed data, which only {', '.join(SMASHED_ALGORITHMS)} send; "
            f"use --defence none with {spec.algo}"
        )
    if entry.simulate is not None and spec.model is not None and spec.model.shape == "u":
        raise UserError(
            f"--shape u needs an algorithm with smashed data: {', '.join(SMASHED_ALGORITHMS)}"
            f" (not {spec.algo})"
        )
    return entry


def simulate_split(data: EmotionDataset, spec: SimSpec, on_round: Any = None) -> dict[str, Any]:
    """The split-CNN algorithms: one crop per sample, clients with subject-wise shards."""
    split = spec.split or default_split(data)
    partition = spec.partition or default_partition(data)
    n = 1 if spec.algo == "centralized" else spec.clients
    train, test, shards = client_shards(data, n, partition, split, spec.seed)
    model_cfg = spec.model or ModelConfig(input_shape=data.input_shape)
    if tuple(model_cfg.input_shape) != data.input_shape:
        model_cfg = model_cfg.model_copy(update={"input_shape": data.input_shape})
    train_cfg = spec.train or TrainConfig()
    defence = spec.defence or DefenceConfig()
    model_cfg = defence.model(model_cfg)
    train_cfg = train_cfg.model_copy(
        update={"compression": defence.wire_compression(train_cfg.compression)}
    )
    algo = strategy_class(spec.algo)(model_cfg, train_cfg, spec.seed, spec.aggregation)
    algo.step_timeout = spec.step_timeout
    if isinstance(algo, SplitCNN):
        algo.defence = defence
    if spec.init_from is not None:
        algo.start_from(spec.init_from)
    data_info = {
        "name": data.name,
        "n_train": len(train),
        "n_test": len(test),
        "split": split,
        "partition": partition,
        "synthetic": bool(data.meta.get("synthetic", False)),
        "clients_samples": [len(s[0]) for s in shards],
        "init_from": str(spec.init_from) if spec.init_from is not None else None,
    }
    opts = RunOptions(
        rounds=spec.rounds,
        min_clients=n,
        out_dir=spec.out_dir,
        checkpoint_dir=spec.out_dir / "checkpoint" if spec.out_dir else None,
        resume=False,
        data_info=data_info,
        on_round=on_round,
        final_hook=partial(proxy_metrics, test=test, seed=spec.seed) if spec.report_shift else None,
    )
    if isinstance(algo, Centralized):
        algo.attach_data(train, test)
        metrics = run(algo, None, opts)
    else:
        runtimes = [
            spec.runtime_factory(client_id(i), spec.run_id, tr, te)
            if spec.runtime_factory is not None
            else ClientRuntime(
                client_id(i), spec.run_id, tr, te, secret=device_secret(spec.seed, i)
            )
            for i, (tr, te) in enumerate(shards)
        ]
        transport = InProcessTransport(runtimes)
        io = ServerIO(transport, spec.run_id, model_cfg, train_cfg)
        metrics = run(algo, io, opts)
    metrics["clients"] = spec.clients if spec.algo != "centralized" else 1
    metrics["defence"] = defence.model_dump(mode="json")
    if spec.out_dir is not None:
        write_json(spec.out_dir / "metrics.json", metrics)  # the privacy report reads it
    return metrics
