"""Multi-view PyVertical data: a KDEF camera angle per owner, records by session+subject+emotion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from splitfed.algorithms.pyvertical.model import VerticalModelConfig, build_vertical_model
from splitfed.data.dataset import EmotionDataset
from splitfed.data.views import (
    DEFAULT_SALT,
    ViewSpec,
    load_views,
    parse_views,
    record_id,
    record_key,
    view_labels,
    view_owner,
    views_partition,
)
from splitfed.errors import UserError
from splitfed.model import ModelConfig
from tests.data.conftest import VIEW_ABSENT, VIEW_EMOTIONS, VIEW_FACELESS, VIEW_PEOPLE

VIEWS = ("S", "HL", "HR")


@pytest.fixture(scope="module")
def views_ds(kdef_views_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> EmotionDataset:
    return load_views(kdef_views_dir, VIEWS, cache_dir=tmp_path_factory.mktemp("views-cache"))


def _key_of(who: str, emo: str) -> str:
    return who + emo


def test_parse_views() -> None:
    assert parse_views("s, HL,hr") == ("S", "HL", "HR")
    assert parse_views(["FR"]) == ("FR",)
    for bad in ("", "S,XX", "S,S"):
        with pytest.raises(UserError):
            parse_views(bad)


def test_load_views_keeps_the_views_and_counts_the_skipped(views_ds: EmotionDataset) -> None:
    records = len(VIEW_PEOPLE) * len(VIEW_EMOTIONS)
    counts = views_ds.meta["view_counts"]
    assert counts["S"] == {"files": records, "kept": records, "skipped": 0}
    assert counts["HL"] == {"files": records, "kept": records - 1, "skipped": 1}  # faceless
    assert counts["HR"] == {"files": records - 1, "kept": records - 1, "skipped": 0}  # absent
    assert set(np.asarray(views_ds.meta["angles"]).tolist()) == set(VIEWS)  # FL left out
    assert views_ds.meta["excluded_angle"] == records
    assert views_ds.meta["no_face"] == 1
    assert len(views_ds) == 3 * records - 2


def test_owner_k_holds_view_k_under_the_record_ids(views_ds: EmotionDataset) -> None:
    data = views_partition(views_ds, VIEWS, seed=0)
    assert data.views == list(VIEWS)
    angles = np.asarray(views_ds.meta["angles"])
    sessions = np.asarray(views_ds.meta["sessions"])
    assert views_ds.subjects is not None
    label_of = dict(zip(data.labels.ids.tolist(), data.labels.labels.tolist(), strict=True))
    for k, owner in enumerate(data.owners):
        _, h, w = views_ds.input_shape
        assert owner.box == (0, h, 0, w)  # a whole crop per owner
        for rid, image in zip(owner.ids.tolist(), owner.images, strict=True):
            # the picture of this record in this view, found by its pixels in the loaded set
            rows = [
                i
                for i in np.flatnonzero(angles == VIEWS[k])
                if np.array_equal(views_ds.images[i], image)
            ]
            assert len(rows) == 1
            r = rows[0]
            key = record_key(sessions[r], views_ds.subjects[r], int(views_ds.labels[r]))
            assert rid == record_id(key)
            assert label_of[rid] == int(views_ds.labels[r])
    # The views of one record differ (other cameras), and records differ from each other.
    common = sorted(data.true_intersection())
    a = data.owners[0].images[data.owners[0].rows(common)]
    b = data.owners[2].images[data.owners[2].rows(common)]
    assert not np.array_equal(a, b)


def test_records_missing_in_a_view_are_absent_from_that_owner_only(
    views_ds: EmotionDataset,
) -> None:
    data = views_partition(views_ds, VIEWS, seed=0)
    ids = {
        (who, emo): record_id(_key_of(who, emo))
        for who, _, _ in VIEW_PEOPLE
        for emo in VIEW_EMOTIONS
    }
    assert set(data.labels.ids.tolist()) == set(ids.values())  # the label holder has all
    gone = VIEW_ABSENT | VIEW_FACELESS
    for k, owner in enumerate(data.owners):
        held = set(owner.ids.tolist())
        for (who, emo), rid in ids.items():
            assert (rid in held) == ((who, emo, VIEWS[k]) not in gone), (who, emo, VIEWS[k])
    assert data.true_intersection() == set(ids.values()) - {ids[w, e] for w, e, _ in gone}


def test_subject_split_keeps_test_people_out_of_training(views_ds: EmotionDataset) -> None:
    subject_of = {
        record_id(_key_of(who, emo)): who[1:] for who, _, _ in VIEW_PEOPLE for emo in VIEW_EMOTIONS
    }
    for seed in (0, 1, 2):
        data = views_partition(views_ds, VIEWS, seed=seed)
        assert data.split == "subject"
        ids = data.labels.ids.tolist()
        test = {subject_of[i] for i, t in zip(ids, data.labels.test, strict=True) if t}
        train = {subject_of[i] for i, t in zip(ids, data.labels.test, strict=True) if not t}
        assert test and train and not test & train  # F01's two sessions stay together


def test_view_model_fuses_late_and_starts_as_the_mean_of_single_view_models(
    views_ds: EmotionDataset,
) -> None:
    from splitfed.model import build_split_model

    data = views_partition(views_ds, VIEWS, seed=0)
    cfg = VerticalModelConfig(split=ModelConfig(input_shape=data.input_shape), boxes=data.boxes)
    assert cfg.views and cfg.mirror_map() is None and not cfg.mirrors()
    heads, trunk = build_vertical_model(cfg, seed=0)
    assert len(heads) == 3 and trunk.fusion is not None and trunk.server is None
    maps = [torch.randn(2, *cfg.head_shape(k)) for k in range(3)]
    assert cfg.head_shape(0) == cfg.grid()
    _, server = build_split_model(cfg.split, 0)
    server.eval()
    trunk.eval()
    with torch.no_grad():
        torch.testing.assert_close(trunk(maps), sum(server(m) for m in maps) / 3)
        # Each view keeps its own branch: changing one camera's maps moves only its scores.
        z = trunk.fusion.view_logits(maps)
        z2 = trunk.fusion.view_logits([maps[0], maps[1], torch.randn_like(maps[2])])
    torch.testing.assert_close(z[0], z2[0])
    torch.testing.assert_close(z[1], z2[1])
    assert not torch.allclose(z[2], z2[2])
    with pytest.raises(ValueError, match="fuse late"):
        trunk.stitch(maps)
    # Training scores the fused model and every view on its own; the loss it reports is the
    # fused model's.
    y = torch.tensor([0, 3])
    loss_fn = torch.nn.CrossEntropyLoss()
    with torch.no_grad():
        objective, loss, out = trunk.objective(maps, None, y, loss_fn)
    torch.testing.assert_close(out, trunk(maps))
    torch.testing.assert_close(loss, loss_fn(out, y))
    torch.testing.assert_close(objective, loss + sum(loss_fn(v, y) for v in z))
    # The gate decides how much each view counts.
    with torch.no_grad():
        trunk.fusion.gate.copy_(torch.tensor([0.0, -30.0, -30.0]))
        torch.testing.assert_close(trunk(maps), server(maps[0]), atol=1e-6, rtol=1e-5)
    trunk.train()
    assert trunk(maps).shape == (2, 7)
    # Tiles keep their rules: one whole-crop box is a tile, overlapping parts are refused.
    _, h, w = data.input_shape
    one = VerticalModelConfig(split=cfg.split, boxes=[(0, h, 0, w)])
    assert not one.views and build_vertical_model(one, 0)[1].fusion is None
    with pytest.raises(ValueError, match="overlaps"):
        VerticalModelConfig(split=cfg.split, boxes=[(0, h, 0, w), (0, h, 0, w // 2)])


def test_views_need_kdef_angles() -> None:
    ds = EmotionDataset("x", np.zeros((2, 1, 48, 96), np.uint8), np.array([0, 1]), None)
    with pytest.raises(UserError, match="KDEF"):
        views_partition(ds, VIEWS)


def test_simulate_pyvertical_on_views(
    kdef_views_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aggregator.cli import main

    monkeypatch.setenv("SPLITFED_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    res = CliRunner().invoke(
        main,
        ["simulate", "--algo", "pyvertical", "--data", str(kdef_views_dir), "--views",
         "S,HL,HR", "--rounds", "2", "--batch-size", "4", "--no-shift", "--out", str(out)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output + repr(res.exception)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["clients"] == 3
    assert metrics["data"]["partition"] == "views:S,HL,HR"
    assert metrics["data"]["clients_samples"] == [10, 9, 9]
    assert len(metrics["rounds"]) == 2
    assert np.isfinite(metrics["rounds"][-1]["train_loss"])


def test_an_owner_table_depends_on_its_own_view_only(views_ds: EmotionDataset) -> None:
    """A deployed camera builds its table alone: other views' pictures do not change it."""
    full = views_partition(views_ds, VIEWS, seed=3)
    angles = np.asarray(views_ds.meta["angles"])
    two = views_ds.subset(np.flatnonzero(angles != "HR"))
    part = views_partition(two, ("S", "HL"), seed=3)
    for k in (0, 1):
        assert part.owners[k].ids.tolist() == full.owners[k].ids.tolist()
        np.testing.assert_array_equal(part.owners[k].images, full.owners[k].images)
    spec = ViewSpec(VIEWS, seed=3)
    owner = view_owner(views_ds, spec, 2)
    assert owner.ids.tolist() == full.owners[2].ids.tolist()
    with pytest.raises(UserError):
        view_owner(views_ds, spec, 3)


def test_a_camera_that_loaded_only_its_view_holds_its_simulated_twins_table(
    kdef_views_dir: Path, views_ds: EmotionDataset, tmp_path: Path
) -> None:
    """Each camera loads its own photos only; its table is `views_partition`'s owner k, row for
    row, and the label holder's ids are the same pseudonyms."""
    for seed in (0, 5):
        full = views_partition(views_ds, VIEWS, seed=seed)
        for k, view in enumerate(VIEWS):
            own = load_views(kdef_views_dir, [view], cache_dir=tmp_path / "cache")
            assert set(np.asarray(own.meta["angles"]).tolist()) == {view}
            table = view_owner(own, ViewSpec(VIEWS, seed), k)
            assert table.ids.tolist() == full.owners[k].ids.tolist()
            np.testing.assert_array_equal(table.images, full.owners[k].images)
            assert table.box == full.owners[k].box
        labels, _ = view_labels(views_ds, VIEWS, None, seed)
        assert labels.ids.tolist() == full.labels.ids.tolist()
        np.testing.assert_array_equal(labels.test, full.labels.test)
    # The row order is the seed's: another seed stores the same records in another order.
    a = views_partition(views_ds, VIEWS, seed=0).owners[0].ids.tolist()
    b = views_partition(views_ds, VIEWS, seed=5).owners[0].ids.tolist()
    assert sorted(a) == sorted(b) and a != b


def test_record_ids_come_from_the_record_and_the_salt_not_the_folder(
    views_ds: EmotionDataset,
) -> None:
    renamed = EmotionDataset(
        "another-folder", views_ds.images, views_ds.labels, views_ds.subjects, dict(views_ds.meta)
    )
    a = views_partition(views_ds, VIEWS, seed=0)
    b = views_partition(renamed, VIEWS, seed=0)
    assert [o.ids.tolist() for o in a.owners] == [o.ids.tolist() for o in b.owners]
    salted = views_partition(views_ds, VIEWS, seed=0, salt="another-federation")
    assert not set(salted.labels.ids.tolist()) & set(a.labels.ids.tolist())
    assert record_id("AF01AN") == record_id("AF01AN", DEFAULT_SALT) != record_id("AF01HA")
