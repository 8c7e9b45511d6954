"""Training under a defence, so the report can give each setting its test accuracy.

`train_setting` is `simulate` with the defence set: the product's `ClientRuntime` applies it
(`splitfed.defences.to_wire` and `nopeek_backward`), each simulated device with its own noise
secret, so the report measures exactly what `simulate` and `serve` put on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitfed.algorithms.cnn import SMASHED_ALGORITHMS
from splitfed.checkpoint import load_model
from splitfed.config import TrainConfig
from splitfed.data.dataset import EmotionDataset
from splitfed.defences import DefenceConfig
from splitfed.errors import UserError
from splitfed.model import ClientNet, ModelConfig
from splitfed.simulate import SimSpec, simulate

SPLIT_ALGORITHMS = SMASHED_ALGORITHMS


@dataclass
class RunSetup:
    """How a run was trained: enough to train it again with a defence on the same split."""

    algo: str = "sflv1"
    clients: int = 2
    rounds: int = 15
    seed: int = 0
    partition: str | None = None
    model: ModelConfig | None = None
    train: TrainConfig | None = None


def train_setting(
    data: EmotionDataset, setup: RunSetup, defence: DefenceConfig, out_dir: Path
) -> tuple[dict[str, Any], ClientNet]:
    """Train `setup` with `defence` by the simulator, subject split; (metrics, client half).

    The run's metrics, plots and checkpoint are left in `out_dir`, and the client half is read
    back from that checkpoint, so the report attacks what a deployment would have saved.
    """
    if setup.algo not in SPLIT_ALGORITHMS:
        raise UserError(
            f"privacy-report measures smashed data, which only {', '.join(SPLIT_ALGORITHMS)} "
            f"send; got a {setup.algo} run"
        )
    base = setup.model or ModelConfig(input_shape=data.input_shape)
    spec = SimSpec(
        setup.algo,
        setup.clients,
        setup.rounds,
        setup.seed,
        setup.partition,
        "subject",
        base.model_copy(update={"input_shape": data.input_shape}),
        setup.train or TrainConfig(),
        out_dir,
        defence=defence,
    )
    metrics = simulate(data, spec)
    _, client_net, _ = load_model(out_dir / "checkpoint")
    return metrics, client_net
