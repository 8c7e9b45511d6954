"""The algorithms of the thesis, each a strategy with its round logic in one module."""

from __future__ import annotations

from splitfed.algorithms.base import Algorithm, RoundTrain
from splitfed.algorithms.centralized import Centralized
from splitfed.algorithms.fedavg import FedAvg
from splitfed.algorithms.sflv1 import SFLV1
from splitfed.algorithms.sflv2 import SFLV2
from splitfed.algorithms.sl import SplitLearning

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (Centralized, FedAvg, SplitLearning, SFLV1, SFLV2)
}

__all__ = ["ALGORITHMS", "Algorithm", "RoundTrain"]
