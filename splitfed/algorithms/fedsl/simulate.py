"""`aggregator simulate --algo fedsl`: client groups of segment devices in one process."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from splitfed.algorithm_io import AlgorithmIO
from splitfed.algorithms.fedsl.model import (
    DEFAULT_FRAMES,
    DEFAULT_SEGMENTS,
    SeqModelConfig,
    jitter_problem,
)
from splitfed.algorithms.fedsl.parties import (
    SegmentSpec,
    SequenceShards,
    seq_model_config,
    sequence_shards,
)
from splitfed.algorithms.fedsl.strategy import FedSL
from splitfed.config import AggregationConfig, TrainConfig
from splitfed.data.clips import ClipDataset
from splitfed.data.dataset import EmotionDataset
from splitfed.devices.segment import SegmentRuntime
from splitfed.errors import UserError, refuse
from splitfed.runner import RunOptions, run, write_outputs
from splitfed.transport import InProcessTransport

log = logging.getLogger(__name__)


def device_id(group: int, segment: int) -> str:
    return f"client-{group:02d}-s{segment}"


def build_federation(
    clips: ClipDataset,
    shards: list[tuple[np.ndarray, np.ndarray]],
    model_cfg: SeqModelConfig,
    train_cfg: TrainConfig,
    seed: int,
    run_id: str = "sim",
    aggregation: AggregationConfig | None = None,
) -> tuple[FedSL, AlgorithmIO, list[SegmentRuntime]]:
    """Devices (groups x segments), transport and aggregator for one in-process run."""
    if clips.frames != model_cfg.frames:
        raise UserError(
            f"sequences have {clips.frames} frames, the model expects {model_cfg.frames}"
        )
    runtimes = []
    last = model_cfg.segments - 1
    for g, (tr, te) in enumerate(shards):
        for k in range(model_cfg.segments):
            t0, t1 = model_cfg.bounds(k)
            runtimes.append(
                SegmentRuntime(
                    device_id(g, k),
                    run_id,
                    g,
                    k,
                    clips.clips[tr, t0:t1],
                    clips.clips[te, t0:t1],
                    clips.labels[tr] if k == last else None,
                    clips.labels[te] if k == last else None,
                )
            )
    algo = FedSL(model_cfg, train_cfg, seed, aggregation)
    io = AlgorithmIO(InProcessTransport(runtimes), run_id, train_cfg, algo.specs())  # type: ignore[arg-type]
    return algo, io, runtimes


def _federation_inputs(
    data: EmotionDataset, spec: Any, frames: int = DEFAULT_FRAMES, segments: int = DEFAULT_SEGMENTS
) -> tuple[SequenceShards, SeqModelConfig, TrainConfig]:
    """The sequences, shards and configs of `spec`'s run (`spec.frames` and `spec.segments`,
    when it has them, over the defaults), or a UserError naming why not."""
    frames = getattr(spec, "frames", None) or frames
    segments = getattr(spec, "segments", None) or segments
    sh = sequence_shards(
        data, SegmentSpec(spec.clients, frames, segments, spec.seed, spec.partition, spec.split)
    )
    return sh, seq_model_config(sh.clips, segments, spec.model), spec.train or TrainConfig()


def check_fedsl(data: EmotionDataset, spec: Any) -> None:
    """Raise the UserError `simulate_fedsl` would raise before its first round, if any
    (`compare` asks every run before it starts the first)."""
    _, model_cfg, train_cfg = _federation_inputs(data, spec)
    refuse(jitter_problem(model_cfg, train_cfg))


def simulate_fedsl(
    data: EmotionDataset,
    spec: Any,
    on_round: Any = None,
    frames: int = DEFAULT_FRAMES,
    segments: int = DEFAULT_SEGMENTS,
) -> dict[str, Any]:
    """`aggregator simulate --algo fedsl`: spec.clients client groups of `segments` devices each.

    `spec.frames` and `spec.segments`, when the spec has them, override the defaults."""
    sh, model_cfg, train_cfg = _federation_inputs(data, spec, frames, segments)
    segments = model_cfg.segments
    clips, train_idx, test_idx, shards = sh.clips, sh.train_idx, sh.test_idx, sh.shards
    split, partition = sh.split, sh.partition
    if train_cfg.compression == "int8":
        log.info("fedsl sends hidden states as fp16 (int8 is for conv feature maps)")
    algo, io, _ = build_federation(
        clips, shards, model_cfg, train_cfg, spec.seed, spec.run_id, spec.aggregation
    )
    data_info = {
        "name": data.name,
        "n_train": int(len(train_idx)),
        "n_test": int(len(test_idx)),
        "split": split,
        "partition": partition,
        "synthetic": bool(data.meta.get("synthetic", False)),
        "clients_samples": [int(len(tr)) for tr, _ in shards],
        "sequence": sh.sequence,
    }
    opts = RunOptions(
        rounds=spec.rounds,
        min_clients=spec.clients * segments,
        checkpoint_dir=spec.out_dir / "checkpoint" if spec.out_dir else None,
        resume=False,
        data_info=data_info,
        on_round=on_round,
    )
    metrics = run(algo, io, opts)
    metrics["clients"] = spec.clients
    metrics["fedsl"] = {
        "segments": segments,
        "frames": clips.frames,
        "devices": spec.clients * segments,
        "hidden": model_cfg.hidden,
    }
    if spec.out_dir is not None:
        write_outputs(metrics, spec.out_dir)
    return metrics
