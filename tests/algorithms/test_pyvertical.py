"""PyVertical: vertical partition, PSI alignment through the transport, the multi-head SplitNN."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from splitfed.algorithms.pyvertical import VerticalModelConfig, build_vertical_model
from splitfed.algorithms.pyvertical.augment import jitter_part, owner_batches
from splitfed.algorithms.pyvertical.simulate import build_federation
from splitfed.config import CameraConfig, JitterConfig, TrainConfig
from splitfed.data.batches import PIXEL_MEAN, PIXEL_STD
from splitfed.data.partition import client_shards
from splitfed.data.synth import SynthConfig, generate_synth
from splitfed.data.vertical import (
    LabelTable,
    OwnerTable,
    VerticalConfig,
    VerticalData,
    check_overlap,
    part_batches,
    part_boxes,
    vertical_partition,
)
from splitfed.errors import UserError
from splitfed.model import ModelConfig
from splitfed.wire import decode
from tests.oracles import CentralVertical

SEED = 3
ALIGN = 8  # the scale of the device half: stride-2 stem, then two pools
JITTER = JitterConfig(scale=0.1, camera=CameraConfig(p=0.5))
PLAIN = JitterConfig(camera=CameraConfig(p=0.0))  # no jitter: the camera is on by default
CAMERA = JitterConfig(camera=CameraConfig(p=0.5))  # what parts of a crop can take


@pytest.fixture(scope="module")
def small_ds():
    return generate_synth(SynthConfig(identities=6, per_emotion=2, height=24, width=48))


@pytest.fixture(scope="module")
def vdata(small_ds) -> VerticalData:
    return vertical_partition(small_ds, VerticalConfig(owners=3, align=ALIGN, seed=SEED), seed=SEED)


def tiny_model(v: VerticalData) -> VerticalModelConfig:
    split = ModelConfig(input_shape=v.input_shape, widths=(4, 8, 8, 8), cut=2)
    return VerticalModelConfig(split=split, boxes=v.boxes, mirror=True)  # the harder arithmetic


def start(v: VerticalData, cfg: VerticalModelConfig, tcfg: TrainConfig, seed: int = SEED):
    algo, io, owners = build_federation(v, cfg, tcfg, seed)
    io.wait_for_clients(len(owners), 1.0)
    algo.enrol(io.online())
    return algo, io, owners


def train(algo, io, rounds: int) -> list[float]:
    losses = []
    for rnd in range(rounds):
        io.round = rnd
        algo.start_round(rnd, rounds)  # as the runner does: this round's learning rate
        res = algo.run_round(io, rnd, io.online(), 60.0)
        assert not res.dropped
        losses.append(res.loss_sum / res.seen)
    return losses


# ---- the partition ------------------------------------------------------------------------------


def test_parts_tile_the_crop_and_ids_overlap_in_part(small_ds, vdata: VerticalData) -> None:
    assert part_boxes(2, 48, 96) == [(0, 48, 0, 48), (0, 48, 48, 96)]
    assert len(part_boxes(10, 48, 96)) == 10
    # A mirrored record's maps swap places; a lopsided layout cannot be mirrored.
    split = ModelConfig(input_shape=(1, 24, 48), widths=(4, 8, 8, 8))
    two = VerticalModelConfig(split=split, boxes=part_boxes(2, 24, 48, ALIGN))
    assert two.mirror_map() == [1, 0]
    left, right = torch.ones(2, 8, 3, 3), torch.zeros(2, 8, 3, 3)
    stitched = build_vertical_model(two, 0)[1].stitch([left, right], torch.tensor([False, True]))
    assert stitched[0, :, :, :3].eq(1).all() and stitched[0, :, :, 3:].eq(0).all()
    assert stitched[1, :, :, :3].eq(0).all() and stitched[1, :, :, 3:].eq(1).all()
    lopsided = VerticalModelConfig(split=split, boxes=[(0, 24, 0, 16), (0, 24, 16, 48)])
    assert lopsided.mirror_map() is None
    cover = np.zeros(small_ds.input_shape[1:], int)
    for y0, y1, x0, x1 in vdata.boxes:
        cover[y0:y1, x0:x1] += 1
    assert (cover == 1).all()
    sets = [set(o.ids.tolist()) for o in vdata.owners] + [set(vdata.labels.ids.tolist())]
    common = set.intersection(*sets)
    assert common == vdata.true_intersection()
    assert 0 < len(common) < min(len(s) for s in sets)  # overlap only in part
    # Every party stores its rows in its own order.
    assert vdata.owners[0].ids[:20].tolist() != vdata.owners[1].ids[:20].tolist()
    # The held-out records are the people every other algorithm tests on.
    _, test, _ = client_shards(small_ds, 1, "iid", "subject", SEED)
    test_people = set(test.subjects.tolist())
    inv = {v: k for k, v in vdata.source_rows.items()}
    lab_test = dict(zip(vdata.labels.ids.tolist(), vdata.labels.test.tolist(), strict=True))
    for i in common:
        assert lab_test[i] == (small_ds.subjects[vdata.source_rows[i]] in test_people)
    assert len(inv) == len(small_ds)


# ---- PSI and alignment through the transport ----------------------------------------------------


def test_psi_aligns_exactly_and_owners_learn_only_the_intersection(
    vdata: VerticalData, small_ds
) -> None:
    algo, io, owners = start(vdata, tiny_model(vdata), TrainConfig(batch_size=8))
    received: dict[str, list[bytes]] = {o.client_id: [] for o in owners}
    send = io.transport.send

    def spy(cid: str, data: bytes) -> None:
        received[cid].append(data)
        send(cid, data)

    io.transport.send = spy  # type: ignore[method-assign]
    al = algo.align(io, 60.0)
    common = vdata.true_intersection()
    assert set(al.train_ids) | set(al.test_ids) == common
    assert not set(al.train_ids) & set(al.test_ids)
    lab = dict(zip(vdata.labels.ids.tolist(), vdata.labels.labels.tolist(), strict=True))
    assert al.y_train.tolist() == [lab[i] for i in al.train_ids]
    everyone = set(vdata.labels.ids.tolist()).union(*(set(o.ids.tolist()) for o in vdata.owners))
    outside = everyone - common
    assert outside
    for o in owners:
        assert o.aligned is not None
        assert o.aligned.ids == {"train": al.train_ids, "test": al.test_ids}
        # Its aligned rows are the same records: its part of the original crops.
        y0, y1, x0, x1 = o.table.box
        rows = [vdata.source_rows[i] for i in al.train_ids]
        assert np.array_equal(
            o.table.images[o.aligned.train], small_ds.images[rows][:, :, y0:y1, x0:x1]
        )
        # All it heard: the query's size, and ids it holds itself; no id outside the intersection.
        assert o.responder.queries_seen == [len(vdata.labels.ids)]
        blobs = b"".join(received[o.client_id])
        assert any(i.encode() in blobs for i in common)  # the check below can fail
        assert not [i for i in outside if i.encode() in blobs]
        types = [decode(b).env.type.value for b in received[o.client_id]]
        assert types == ["round_start", "round_start"]


def test_no_overlap_and_partitions_of_different_people_are_user_errors(small_ds) -> None:
    people = np.unique(small_ds.subjects)
    a = small_ds.subset(np.flatnonzero(np.isin(small_ds.subjects, people[:3])))
    b = small_ds.subset(np.flatnonzero(np.isin(small_ds.subjects, people[3:])))
    va = vertical_partition(a, VerticalConfig(owners=2, align=ALIGN), seed=0)
    vb = vertical_partition(b, VerticalConfig(owners=2, align=ALIGN), seed=0)
    mixed = VerticalData([va.owners[0], vb.owners[1]], va.labels, va.input_shape)
    with pytest.raises(UserError, match="different people"):
        check_overlap(mixed)
    # The label holder finds the same through PSI, without seeing anyone's ids.
    algo, io, _ = start(mixed, tiny_model(mixed), TrainConfig(batch_size=8))
    with pytest.raises(UserError, match="no record id"):
        algo.run_round(io, 0, io.online(), 60.0)
    # Owners that each share records with the label holder, but no record with all of them.
    lab = LabelTable(np.asarray(["r1", "r2"]), np.asarray([0, 1]), np.asarray([False, False]))
    img = np.zeros((1, 1, 24, 24), np.uint8)
    split = [
        OwnerTable("o0", np.asarray(["r1"]), img, (0, 24, 0, 24)),
        OwnerTable("o1", np.asarray(["r2"]), img, (0, 24, 24, 48)),
    ]
    with pytest.raises(UserError, match="different people"):
        check_overlap(VerticalData(split, lab, (1, 24, 48)))
    nothing = VerticalData(split, lab, (1, 24, 48))
    algo, io, _ = start(nothing, tiny_model(nothing), TrainConfig(batch_size=8))
    with pytest.raises(UserError, match="no overlap"):
        algo.run_round(io, 0, io.online(), 60.0)


def test_bad_tables_and_layouts_are_user_errors(vdata: VerticalData) -> None:
    img = np.zeros((2, 1, 24, 24), np.uint8)
    with pytest.raises(UserError, match="more than once"):
        OwnerTable("o", np.asarray(["a", "a"]), img, (0, 24, 0, 24))
    with pytest.raises(UserError, match="box"):
        OwnerTable("o", np.asarray(["a", "b"]), img, (0, 24, 0, 20))
    # An owner whose part is not the one the model expects.
    cfg = tiny_model(vdata)
    swapped = cfg.model_copy(update={"boxes": [cfg.boxes[0], cfg.boxes[2], cfg.boxes[1]]})
    algo, io, _ = start(vdata, swapped, TrainConfig(batch_size=8))
    with pytest.raises(UserError, match="holds part"):
        algo.run_round(io, 0, io.online(), 60.0)


# ---- the split changes no arithmetic ------------------------------------------------------------


def _equals_central(
    v: VerticalData, cfg: VerticalModelConfig, tcfg: TrainConfig
) -> tuple[Any, ...]:
    """Train two rounds over the transport and in the central network; assert that losses,
    trunk and heads are equal. Returns (algo, io, owners, central, parts, reference losses)."""
    algo, io, owners = start(v, cfg, tcfg)
    losses = train(algo, io, 2)
    central = CentralVertical(cfg, tcfg, SEED)
    assert algo.aligned is not None
    parts = [o.table.images[o.aligned.train] for o in owners]
    ref = [central.train_round(rnd, parts, algo.aligned.y_train, 2)[0] for rnd in range(2)]
    np.testing.assert_allclose(losses, ref, rtol=1e-6)
    for k, val in central.trunk.state_dict().items():
        torch.testing.assert_close(algo.trunk.state_dict()[k], val, rtol=1e-5, atol=1e-6)
    for o, head in zip(owners, central.heads, strict=True):
        assert o.head is not None
        for k, val in head.state_dict().items():
            torch.testing.assert_close(o.head.state_dict()[k], val, rtol=1e-5, atol=1e-6)
    return algo, io, owners, central, parts, ref


def test_transport_training_equals_central_multihead_step_for_step(vdata: VerticalData) -> None:
    cfg, tcfg = tiny_model(vdata), TrainConfig(batch_size=8)
    initial = [
        {k: v.clone() for k, v in h.state_dict().items()}
        for h in build_vertical_model(cfg, SEED)[0]
    ]
    algo, io, owners, central, _, _ = _equals_central(vdata, cfg, tcfg)
    for o, init in zip(owners, initial, strict=True):
        assert o.head is not None
        # Gradients reached every head: each of its parameters moved.
        for name, p in o.head.named_parameters():
            assert not torch.equal(p.detach(), init[name]), f"{o.client_id} {name} never trained"
    # Evaluation through the owners equals the central network's predictions.
    conf = algo.evaluate(io, io.online(), "test", 60.0)
    test_parts = [o.table.images[o.aligned.test] for o in owners]
    pred = central.predict(test_parts)
    assert int(np.trace(conf)) == int((pred == algo.aligned.y_test).sum())
    assert conf.sum() == len(algo.aligned.test_ids)


def test_deterministic_under_a_seed(vdata: VerticalData) -> None:
    cfg, tcfg = tiny_model(vdata), TrainConfig(batch_size=8)
    runs = []
    for _ in range(2):
        algo, io, _ = start(vdata, cfg, tcfg)
        runs.append((train(algo, io, 1), algo.trunk.state_dict()))
    assert runs[0][0] == runs[1][0]
    for k, v in runs[0][1].items():
        assert torch.equal(v, runs[1][1][k])


# ---- jitter -------------------------------------------------------------------------------------


def views(ds) -> VerticalData:
    """Two cameras of the same records, each owner holding whole crops (the second one sees
    the scene from the other side), in orders of their own."""
    one = vertical_partition(ds, VerticalConfig(owners=1, align=ALIGN, seed=SEED), seed=SEED)
    a = one.owners[0]
    order = np.random.default_rng(SEED).permutation(len(a))
    b = OwnerTable("owner-1", a.ids[order], a.images[order][..., ::-1].copy(), a.box)
    return VerticalData([a, b], one.labels, one.input_shape, views=["A", "B"])


@pytest.mark.parametrize("layout", ["tiles", "views"])
def test_jittered_training_equals_central_step_for_step(vdata, small_ds, layout: str) -> None:
    """Every owner jitters its parts as the central network does: parts of a crop take the
    camera (mirrored records too), whole crops (views) the geometry as well."""
    v, jitter = (vdata, CAMERA) if layout == "tiles" else (views(small_ds), JITTER)
    cfg, tcfg = tiny_model(v), TrainConfig(batch_size=8, jitter=jitter)
    assert cfg.views == (layout == "views") and cfg.mirrors() == (layout == "tiles")
    algo, _, _, _, parts, ref = _equals_central(v, cfg, tcfg)
    plain = CentralVertical(cfg, TrainConfig(batch_size=8, jitter=PLAIN), SEED)
    assert plain.train_round(0, parts, algo.aligned.y_train, 2)[0] != ref[0]


def _parts_seen(v: VerticalData, tcfg: TrainConfig) -> list[list[torch.Tensor]]:
    """The parts each owner runs its head on in the second round."""
    algo, io, owners = start(v, tiny_model(v), tcfg)
    train(algo, io, 1)
    seen: list[list[torch.Tensor]] = [[] for _ in owners]
    for o, out in zip(owners, seen, strict=True):
        assert o.head is not None  # the same head trains on in the next round

        def grab(_m: torch.nn.Module, args: tuple, out: list = out) -> None:
            if torch.is_grad_enabled():  # training, not evaluation
                out.append(args[0].detach().clone())

        o.head.register_forward_pre_hook(grab)
    io.round = 1
    algo.start_round(1, 2)
    assert not algo.run_round(io, 1, io.online(), 60.0).dropped
    return seen


def test_jitter_changes_the_parts_every_owner_trains_on(vdata: VerticalData) -> None:
    plain = _parts_seen(vdata, TrainConfig(batch_size=8, jitter=PLAIN))
    jittered = _parts_seen(vdata, TrainConfig(batch_size=8, jitter=CAMERA))
    for k, (a, b) in enumerate(zip(plain, jittered, strict=True)):
        assert a and len(a) == len(b), k
        assert all(x.shape == y.shape for x, y in zip(a, b, strict=True))
        assert not all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), f"owner {k}"


def test_geometric_jitter_of_parts_is_refused(vdata: VerticalData) -> None:
    cfg = tiny_model(vdata)
    for jitter in (JitterConfig(scale=0.1), JitterConfig(rotation=5.0), JitterConfig(shift_y=0.1)):
        with pytest.raises(UserError, match="cannot jitter the geometry .* of parts"):
            build_federation(vdata, cfg, TrainConfig(batch_size=8, jitter=jitter), SEED)
    # Without augmentation there is no jitter to refuse; the camera alone applies.
    build_federation(vdata, cfg, TrainConfig(batch_size=8, augment=False, jitter=JITTER), SEED)
    build_federation(vdata, cfg, TrainConfig(batch_size=8, jitter=CAMERA), SEED)


def test_owner_batches_without_jitter_are_the_old_batches(vdata: VerticalData) -> None:
    cfg, tcfg = tiny_model(vdata), TrainConfig(batch_size=8, local_epochs=2, jitter=PLAIN)
    images, key = vdata.owners[1].images, (SEED, 1, 0)
    new = list(owner_batches(images, cfg, tcfg, key, 1))
    old = list(part_batches(images, 8, key, 2, True, cfg.mirrors()))
    assert len(new) == len(old)
    for (x, f), (xo, fo) in zip(new, old, strict=True):
        assert torch.equal(x, xo) and torch.equal(f, fo)


def test_parts_of_a_crop_take_one_camera_across_the_crop(vdata: VerticalData) -> None:
    """The light ramp of a record runs across the stitched crop, mirrored records included;
    each owner draws its own sensor noise."""
    cfg = tiny_model(vdata)
    _, h, w = cfg.input_shape
    ramp = CameraConfig(p=1.0, gamma=0.0, gradient=80.0, blur=0.0, lowres=1.0, noise=0.0, jpeg=95)
    n = 8
    flip = torch.arange(n) % 2 == 1
    mirror = cfg.mirror_map()
    assert mirror is not None
    crop = torch.zeros(n, h, w, dtype=torch.float64)
    for k, (y0, y1, x0, x1) in enumerate(cfg.boxes):
        part = torch.zeros(n, 1, y1 - y0, x1 - x0)  # mid grey
        out = jitter_part(part, flip, JitterConfig(camera=ramp), cfg, k, (SEED, 0, 0), 0)
        g = ((out * PIXEL_STD + PIXEL_MEAN) * 255.0)[:, 0].double()
        my0, my1, mx0, mx1 = cfg.boxes[mirror[k]]  # where a mirrored record's part goes
        crop[~flip, y0:y1, x0:x1] = g[~flip]
        crop[flip, my0:my1, mx0:mx1] = g[flip]
    yy, xx = torch.meshgrid(torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
    plane = torch.stack([torch.ones_like(yy), yy, xx], -1).view(-1, 3).double()
    for g in crop:
        fit = torch.linalg.lstsq(plane, g.reshape(-1, 1)).solution
        assert (plane @ fit - g.reshape(-1, 1)).abs().max() < 4.0  # JPEG at 95 remains
    assert float(crop.std(dim=(1, 2)).max()) > 10  # and there is a ramp
    noise = JitterConfig(camera=ramp.model_copy(update={"gradient": 0.0, "noise": 16.0}))
    y0, y1, x0, x1 = cfg.boxes[1]
    assert cfg.boxes[2][1] - cfg.boxes[2][0] == y1 - y0  # two parts of the same size
    same = torch.zeros(n, 1, y1 - y0, x1 - x0)
    a, b = (jitter_part(same, flip, noise, cfg, k, (SEED, 0, 0), 0) for k in (1, 2))
    assert not torch.equal(a, b)


# ---- the command line ---------------------------------------------------------------------------


def test_cli_simulate_writes_the_common_metrics(tmp_path: Path) -> None:
    from aggregator.cli import main

    out = tmp_path / "pv"
    res = CliRunner().invoke(
        main,
        [
            "simulate",
            "--algo",
            "pyvertical",
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
    m = json.loads((out / "metrics.json").read_text())
    assert m["algo"] == "pyvertical" and m["clients"] == 2
    assert set(m["final"]) >= {"train_accuracy", "test_accuracy", "macro_f1", "test_confusion"}
    assert set(m["comm"]) >= {
        "bytes_up",
        "bytes_down",
        "train_bytes_per_round",
        "rejected_messages",
    }
    assert set(m["rounds"][0]) >= {
        "round",
        "train_loss",
        "train_accuracy",
        "test_accuracy",
        "bytes_up",
        "bytes_down",
        "seconds",
        "samples",
    }
    assert m["data"]["n_train"] > 0 and m["data"]["partition"] == "vertical:2"
    assert m["psi"]["intersection"] == m["data"]["n_train"] + m["data"]["n_test"]
    assert (out / "curves.png").is_file() and (out / "confusion.png").is_file()
    bad = CliRunner().invoke(
        main,
        [
            "simulate",
            "--algo",
            "pyvertical",
            "--clients",
            "40",
            "--rounds",
            "1",
            "--synth-identities",
            "2",
            "--out",
            str(tmp_path / "bad"),
        ],
    )
    assert bad.exit_code == 2
    assert (
        bad.output.strip().splitlines()[-1]
        == "error: pyvertical takes 1 to 32 data owners (--clients), got 40"
    )
