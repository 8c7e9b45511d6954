"""FedSL: a recurrent network cut in time across a chain of devices, averaged across chains.

`model` holds the segments, `strategy` the aggregator's relay and averaging, `simulate` the
in-process wiring; a device's runtime is `splitfed.devices.segment.SegmentRuntime`.
"""

from __future__ import annotations

from splitfed.algorithms.fedsl.model import SeqModelConfig, build_seq_model
from splitfed.algorithms.fedsl.strategy import FedSL

__all__ = ["FedSL", "SeqModelConfig", "build_seq_model"]
