"""FedSL: clips, the segmented recurrent network through the transport, and bad sequences."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from splitfed.algorithm_io import AlgorithmIO
from splitfed.algorithms.fedsl import FedSL, SeqModelConfig
from splitfed.algorithms.fedsl.simulate import build_federation, device_id
from splitfed.config import TrainConfig
from splitfed.data.clips import (
    ClipConfig,
    ClipDataset,
    generate_clips,
    row_sequences,
    shard_indices,
)
from splitfed.data.dataset import EmotionDataset
from splitfed.data.partition import client_shards
from splitfed.data.synth import SynthConfig, generate_synth
from splitfed.devices.segment import SegmentRuntime
from splitfed.errors import UserError
from splitfed.simulate import SimSpec, simulate
from splitfed.transport import InProcessTransport
from tests.oracles import CentralSequence

SEED = 5
SIZE = {"identities": 4, "per_emotion": 1, "height": 24, "width": 48}


@pytest.fixture(scope="module")
def clips() -> ClipDataset:
    return generate_clips(ClipConfig(frames=4, **SIZE), cache=False)


def tiny(segments: int = 2) -> SeqModelConfig:
    return SeqModelConfig(
        frame_shape=(1, 24, 48), frames=4, segments=segments, widths=(4, 8), features=16, hidden=8
    )


def start(clips: ClipDataset, groups: int, cfg: SeqModelConfig, seed: int = SEED):
    _, _, shards = shard_indices(clips.labels, clips.subjects, groups, None, None, seed)
    algo, io, devices = build_federation(clips, shards, cfg, TrainConfig(batch_size=8), seed)
    io.wait_for_clients(len(devices), 1.0)
    algo.enrol(io.online())
    return algo, io, devices, shards


def train(algo, io, rounds: int) -> list[float]:
    losses = []
    for rnd in range(rounds):
        io.round = rnd
        algo.start_round(rnd, rounds)  # as the runner does: this round's learning rate
        res = algo.run_round(io, rnd, io.online(), 60.0)
        assert not res.dropped and res.seen > 0
        losses.append(res.loss_sum / res.seen)
    return losses


def test_clips_unfold_from_neutral_with_the_same_people(clips: ClipDataset) -> None:
    assert clips.clips.shape == (4 * 7, 4, 1, 24, 48)
    x = clips.clips.astype(np.float32)
    change = np.abs(x - x[:, :1]).mean(axis=(2, 3, 4))  # (N, T): distance from the first frame
    expressive = clips.labels != 4  # everything but neutral
    assert (change[expressive, 3] > change[expressive, 1]).mean() > 0.8
    assert change[expressive, 3].mean() > 1.5 * change[~expressive, 3].mean()
    # The same people, split and shared as the picture set with the same seed.
    pictures = generate_synth(SynthConfig(**SIZE))
    _, test, shards = client_shards(pictures, 2, None, None, SEED)
    _, test_idx, idx = shard_indices(clips.labels, clips.subjects, 2, None, None, SEED)
    assert set(clips.subjects[test_idx]) == set(test.subjects)
    for (tr, _), (pic_tr, _) in zip(idx, shards, strict=True):
        assert set(clips.subjects[tr]) == set(pic_tr.subjects)


def test_rows_of_a_crop_as_time_steps() -> None:
    ds = generate_synth(SynthConfig(identities=2, per_emotion=1, height=24, width=48))
    seq = row_sequences(ds, 4)
    assert seq.clips.shape == (len(ds), 4, 1, 6, 48)
    assert np.array_equal(seq.clips[:, 2, 0], ds.images[:, 0, 12:18])
    with pytest.raises(UserError, match="row bands"):
        row_sequences(ds, 30)
    # Data without clips (real photos) train FedSL on row bands, through the same simulator.
    photos = EmotionDataset("photos", ds.images, ds.labels, ds.subjects)
    spec = SimSpec("fedsl", 1, 1, seed=SEED, train=TrainConfig(batch_size=4))
    m = simulate(photos, spec)
    assert m["data"]["sequence"] == "4 row bands of 6 rows" and m["rounds"][0]["samples"] > 0


def test_transport_equals_the_unsplit_network_step_for_step(clips: ClipDataset) -> None:
    cfg = tiny(segments=3)  # a middle segment both relays a hidden state and a gradient
    algo, io, devices, shards = start(clips, 1, cfg)
    losses = train(algo, io, 2)
    tr, te = shards[0]
    central = CentralSequence(cfg, TrainConfig(batch_size=8), SEED)
    ref = [central.train_round(rnd, clips.clips[tr], clips.labels[tr], 2)[0] for rnd in range(2)]
    np.testing.assert_allclose(losses, ref, rtol=1e-6)
    for k, seg in enumerate(central.segments):
        assert devices[k].net is not None
        for name, v in seg.state_dict().items():
            torch.testing.assert_close(algo.segments[k].state_dict()[name], v, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(devices[k].net.state_dict()[name], v, rtol=1e-5, atol=1e-6)
    conf = algo.evaluate(io, io.online(), "test", 60.0)
    pred = central.predict(clips.clips[te])
    assert conf.sum() == len(te)
    assert int(np.trace(conf)) == int((pred == clips.labels[te]).sum())


def test_hidden_state_crosses_devices(clips: ClipDataset) -> None:
    algo, io, devices, _ = start(clips, 1, tiny())
    train(algo, io, 1)
    first, last = devices
    algo.evaluate(io, io.online(), "test", 60.0)
    before = last.last_logits["test"].copy()
    algo.evaluate(io, io.online(), "test", 60.0)
    assert np.array_equal(last.last_logits["test"], before)  # a fair comparison
    original = first.test
    first.test = original[:, :, :, :, ::-1].copy()  # only the first device's frames change
    algo.evaluate(io, io.online(), "test", 60.0)
    assert not np.allclose(last.last_logits["test"], before)
    first.test = original
    algo.evaluate(io, io.online(), "test", 60.0)
    assert np.array_equal(last.last_logits["test"], before)


def test_groups_average_and_runs_are_deterministic(clips: ClipDataset) -> None:
    runs = []
    for _ in range(2):
        algo, io, devices, _ = start(clips, 2, tiny())
        assert [d.client_id for d in devices] == [
            device_id(g, k) for g in range(2) for k in range(2)
        ]
        losses = train(algo, io, 1)
        runs.append((losses, algo.segments.state_dict(), [d.net.state_dict() for d in devices]))
    assert runs[0][0] == runs[1][0]
    for k, v in runs[0][1].items():
        assert torch.equal(v, runs[1][1][k])
    # The global segment is the sample-weighted mean of the two groups' copies.
    _, _, shards = shard_indices(clips.labels, clips.subjects, 2, None, None, SEED)
    w = np.asarray([len(tr) for tr, _ in shards], dtype=np.float64)
    w /= w.sum()
    dev = runs[0][2]
    name = "gru.weight_hh_l0"
    mean = w[0] * dev[1][name].double() + w[1] * dev[3][name].double()
    torch.testing.assert_close(runs[0][1][f"1.{name}"].double(), mean, rtol=1e-6, atol=1e-7)


def test_sequences_of_different_lengths_are_user_errors(clips: ClipDataset) -> None:
    seqs = [np.zeros((4, 1, 8, 8), np.uint8), np.zeros((3, 1, 8, 8), np.uint8)]
    with pytest.raises(UserError, match="different lengths"):
        ClipDataset.from_sequences("mixed", seqs, np.asarray([0, 1]))
    with pytest.raises(UserError, match="frames"):
        build_federation(
            clips,
            [(np.arange(8), np.arange(8, 10))],
            tiny().model_copy(update={"frames": 6}),
            TrainConfig(),
            0,
        )
    with pytest.raises(UserError, match="different lengths"):
        SegmentRuntime("d", "sim", 0, 0, clips.clips[:4, :2], clips.clips[:4, :1])
    with pytest.raises(ValueError, match="segments need"):
        SeqModelConfig(frames=2, segments=3)
    # A device whose segment is shorter than the model's: refused before any training.
    cfg, tcfg = tiny(), TrainConfig(batch_size=8)
    x, y = clips.clips, clips.labels
    devices = [
        SegmentRuntime(device_id(0, 0), "sim", 0, 0, x[:8, :2], x[8:, :2]),
        SegmentRuntime(device_id(0, 1), "sim", 0, 1, x[:8, 2:3], x[8:, 2:3], y[:8], y[8:]),
    ]
    algo = FedSL(cfg, tcfg, 0)
    io = AlgorithmIO(InProcessTransport(devices), "sim", tcfg, algo.specs())
    algo.enrol(io.wait_for_clients(2, 1.0))
    with pytest.raises(UserError, match="sequences of different lengths"):
        algo.run_round(io, 0, io.online(), 60.0)
    # Devices of one group that hold different numbers of sequences.
    devices = [
        SegmentRuntime(device_id(0, 0), "sim", 0, 0, x[:8, :2], x[8:, :2]),
        SegmentRuntime(device_id(0, 1), "sim", 0, 1, x[:9, 2:], x[9:, 2:], y[:9], y[9:]),
    ]
    algo = FedSL(cfg, tcfg, 0)
    io = AlgorithmIO(InProcessTransport(devices), "sim", tcfg, algo.specs())
    algo.enrol(io.wait_for_clients(2, 1.0))
    with pytest.raises(UserError, match="different numbers of sequences"):
        algo.run_round(io, 0, io.online(), 60.0)


def test_cli_compare_runs_both_new_algorithms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aggregator.cli import main

    monkeypatch.setenv("SPLITFED_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cmp"
    res = CliRunner().invoke(
        main,
        [
            "compare",
            "--algos",
            "fedsl,pyvertical",
            "--clients",
            "2",
            "--rounds",
            "1",
            "--synth-identities",
            "4",
            "--batch-size",
            "16",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    table = (out / "results.md").read_text()
    assert "| fedsl | 2 |" in table and "| pyvertical | 2 |" in table
    m = json.loads((out / "fedsl-2" / "metrics.json").read_text())
    assert m["algo"] == "fedsl" and m["clients"] == 2 and m["fedsl"]["devices"] == 4
    assert set(m["final"]) >= {"train_accuracy", "test_accuracy", "macro_f1", "test_confusion"}
    assert m["data"]["n_train"] + m["data"]["n_test"] == 4 * 7 * 6
    assert m["comm"]["bytes_up"] > 0 and m["comm"]["rejected_messages"] == 0
    assert (out / "fedsl-2" / "curves.png").is_file()
    assert list((tmp_path / "cache").glob("clips-*.npz"))  # drawn once, then cached
