"""Fixtures for the MQTT tests (helpers in fed.py): Mosquitto, subprocesses, reference runs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .fed import IDENTITIES, THREADS, Mosquitto, Procs


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh Mosquitto on a free 127.0.0.1 port, stopped after the test."""
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Subprocesses of the test; whatever still runs at the end gets SIGTERM, then SIGKILL."""
    d = tmp_path / "logs"
    d.mkdir()
    p = Procs(d)
    yield p
    p.stop_all()


@pytest.fixture(scope="session")
def reference() -> Callable[..., dict[str, Any]]:
    """`aggregator simulate`'s metrics for the runs the MQTT tests repeat (computed once each)."""
    cache: dict[tuple[Any, ...], dict[str, Any]] = {}

    def get(
        algo: str, compression: str = "fp32", clients: int = 3, rounds: int = 2
    ) -> dict[str, Any]:
        key = (algo, compression, clients, rounds)
        if key not in cache:
            import torch

            from splitfed.config import TrainConfig
            from splitfed.data.synth import SynthConfig, generate_synth
            from splitfed.simulate import SimSpec, simulate

            old = torch.get_num_threads()
            torch.set_num_threads(THREADS)  # as every process of the MQTT run
            try:
                ds = generate_synth(SynthConfig(identities=IDENTITIES))
                spec = SimSpec(
                    algo, clients, rounds, seed=0, train=TrainConfig(compression=compression)
                )
                cache[key] = simulate(ds, spec)
            finally:
                torch.set_num_threads(old)
        return cache[key]

    return get
