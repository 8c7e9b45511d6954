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
from splitfed.algorithms.fedsl.model import frames_proxy, sequence_batches, sequence_camera
from splitfed.algorithms.fedsl.simulate import build_federation, device_id
from splitfed.config import CameraConfig, JitterConfig, TrainConfig
from splitfed.data.batches import PIXEL_MEAN, PIXEL_STD, iterate_batches
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
from splitfed.model import ModelConfig
from splitfed.simulate import SimSpec, simulate
from splitfed.transport import InProcessTransport
from tests.oracles import CentralSequence

SEED = 5
SIZE = {"identities": 4, "per_emotion": 1, "height": 24, "width": 48}
JITTER = JitterConfig(scale=0.1, camera=CameraConfig(p=0.5))
PLAIN = JitterConfig(camera=CameraConfig(p=0.0))  # no jitter: the camera is on by default


@pytest.fixture(scope="module")
def clips() -> ClipDataset:
    return generate_clips(ClipConfig(frames=4, **SIZE), cache=False)


def tiny(segments: int = 2) -> SeqModelConfig:
    return SeqModelConfig(
        frame_shape=(1, 24, 48), frames=4, segments=segments, widths=(4, 8), features=16, hidden=8
    )


def start(
    clips: ClipDataset,
    groups: int,
    cfg: SeqModelConfig,
    seed: int = SEED,
    tcfg: TrainConfig | None = None,
):
    _, _, shards = shard_indices(clips.labels, clips.subjects, groups, None, None, seed)
    tcfg = tcfg or TrainConfig(batch_size=8)
    algo, io, devices = build_federation(clips, shards, cfg, tcfg, seed)
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


def test_jittered_transport_equals_the_unsplit_network_step_for_step(clips: ClipDataset) -> None:
    """Geometric and camera jitter: each device changes its frames as the un-split network
    changes those frames of the whole clip, so the split still changes no arithmetic."""
    cfg, tcfg = tiny(segments=3), TrainConfig(batch_size=8, jitter=JITTER)
    algo, io, devices, shards = start(clips, 1, cfg, tcfg=tcfg)
    losses = train(algo, io, 2)
    tr, _ = shards[0]
    central = CentralSequence(cfg, tcfg, SEED)
    ref = [central.train_round(rnd, clips.clips[tr], clips.labels[tr], 2)[0] for rnd in range(2)]
    np.testing.assert_allclose(losses, ref, rtol=1e-6)
    for k, seg in enumerate(central.segments):
        assert devices[k].net is not None
        for name, v in seg.state_dict().items():
            torch.testing.assert_close(devices[k].net.state_dict()[name], v, rtol=1e-5, atol=1e-6)
    plain = CentralSequence(cfg, TrainConfig(batch_size=8), SEED)
    assert plain.train_round(0, clips.clips[tr], clips.labels[tr], 2)[0] != ref[0]


def _frames_seen(clips: ClipDataset, tcfg: TrainConfig) -> list[list[torch.Tensor]]:
    """The frames each device of one group runs its segment on in the second round."""
    algo, io, devices, _ = start(clips, 1, tiny(segments=3), tcfg=tcfg)
    train(algo, io, 1)
    seen: list[list[torch.Tensor]] = [[] for _ in devices]
    for d, out in zip(devices, seen, strict=True):
        assert d.net is not None  # the same net trains on in the next round

        def grab(_m: torch.nn.Module, args: tuple, out: list = out) -> None:
            if torch.is_grad_enabled():  # training, not evaluation
                out.append(args[0].detach().clone())

        d.net.register_forward_pre_hook(grab)
    io.round = 1
    algo.start_round(1, 2)
    assert not algo.run_round(io, 1, io.online(), 60.0).dropped
    return seen


def test_jitter_changes_the_frames_every_segment_trains_on(clips: ClipDataset) -> None:
    plain = _frames_seen(clips, TrainConfig(batch_size=8, jitter=PLAIN))
    jittered = _frames_seen(clips, TrainConfig(batch_size=8, jitter=JITTER))
    for k, (a, b) in enumerate(zip(plain, jittered, strict=True)):
        assert a and len(a) == len(b), k
        assert all(x.shape == y.shape for x, y in zip(a, b, strict=True))
        assert not all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), f"segment {k}"


def test_sequence_batches_without_jitter_are_the_old_batches(clips: ClipDataset) -> None:
    cfg, tcfg = tiny(), TrainConfig(batch_size=8, local_epochs=2, jitter=PLAIN)
    key = (SEED, 1, 0)
    new = list(sequence_batches(clips.clips, clips.labels, cfg, tcfg, key))
    old = list(iterate_batches(frames_proxy(clips.clips, clips.labels), 8, key, 2))
    assert len(new) == len(old)
    for (x, y), (xo, yo) in zip(new, old, strict=True):
        assert torch.equal(x.flatten(1, 2), xo) and torch.equal(y, yo)


def test_one_camera_per_sequence_fresh_noise_per_frame() -> None:
    cfg = tiny().model_copy(update={"frames": 4})
    x = torch.zeros(6, 4, 1, 24, 48)  # mid grey
    quiet = CameraConfig(p=1.0, noise=0.0)
    out = sequence_camera(x, quiet, cfg, (SEED, 0, 0), 3)
    for t in range(1, 4):  # every frame of a clip through the same camera
        torch.testing.assert_close(out[:, t], out[:, 0], rtol=0, atol=0)
    assert not torch.equal(out[0, 0], out[1, 0])  # another camera per clip
    noisy = sequence_camera(x, CameraConfig(p=1.0), cfg, (SEED, 0, 0), 3)
    assert not torch.equal(noisy[:, 1], noisy[:, 0])  # sensor noise drawn afresh per frame
    # A device holding frames 2.. changes them exactly as the whole clip's frames are changed.
    tail = sequence_camera(x[:, 2:], CameraConfig(p=1.0), cfg, (SEED, 0, 0), 3, first=2)
    torch.testing.assert_close(tail, noisy[:, 2:], rtol=0, atol=0)


def test_row_bands_take_the_camera_across_the_crop_but_no_geometry() -> None:
    ds = generate_synth(SynthConfig(identities=2, per_emotion=1, height=24, width=48))
    photos = EmotionDataset("photos", ds.images, ds.labels, ds.subjects)
    geometric = TrainConfig(batch_size=4, jitter=JITTER)
    with pytest.raises(UserError, match="row bands .* geometric jitter"):
        simulate(photos, SimSpec("fedsl", 1, 1, seed=SEED, train=geometric))
    # Nor does FedSL's frame encoder blur its subsampling: asked to, it says so.
    blurred = ModelConfig(antialias=True)
    with pytest.raises(UserError, match="fedsl's frame encoder .* --antialias"):
        simulate(photos, SimSpec("fedsl", 1, 1, seed=SEED, model=blurred))
    # The camera's light ramp runs across the whole crop, not each band.
    cfg = tiny().model_copy(update={"frame_shape": (1, 6, 48), "row_bands": True})
    ramp = CameraConfig(p=1.0, gamma=0.0, gradient=80.0, blur=0.0, lowres=1.0, noise=0.0, jpeg=95)
    out = sequence_camera(torch.zeros(8, 4, 1, 6, 48), ramp, cfg, (SEED, 0, 0), 0)
    crop = ((out * PIXEL_STD + PIXEL_MEAN) * 255.0).flatten(1, 3).view(8, 24, 48).double()
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(48.0), indexing="ij")
    plane = torch.stack([torch.ones_like(yy), yy, xx], -1).view(-1, 3).double()
    for g in crop:
        fit = torch.linalg.lstsq(plane, g.reshape(-1, 1)).solution
        assert (plane @ fit - g.reshape(-1, 1)).abs().max() < 4.0  # JPEG at 95 remains
    assert float(crop.std(dim=(1, 2)).max()) > 10  # and there is a ramp
    # Trained on row bands with the camera, the split still changes no arithmetic.
    seq = row_sequences(ds, 4)
    tcfg = TrainConfig(batch_size=8, jitter=JitterConfig(camera=CameraConfig(p=0.5)))
    idx = np.arange(len(seq))
    algo, io, devices = build_federation(seq, [(idx, idx[:0])], cfg, tcfg, SEED)
    algo.enrol(io.wait_for_clients(len(devices), 1.0))
    losses = train(algo, io, 1)
    central = CentralSequence(cfg, tcfg, SEED)
    ref = central.train_round(0, seq.clips, seq.labels, 1)[0]
    np.testing.assert_allclose(losses, [ref], rtol=1e-6)


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
