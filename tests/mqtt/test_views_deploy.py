"""Multi-camera PyVertical deployed: each `edge-agent --role owner --views` process is one camera
that holds only its own view's photos, `aggregator serve --views` holds the labels, and the run
over a real Mosquitto gives `aggregator simulate --views`'s numbers exactly.

The cameras name each record from its file name (session + subject + emotion) and the
federation's salt, so the ids agree without any camera seeing another's photos; private set
intersection finds the records every camera caught, and a tap on `#` checks that no id of a
record outside the intersection crosses the wire.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.data.conftest import kdef_views_dir  # noqa: F401 - the fixture of real photos

from .fed import AGENT_CMD, THREADS, Mosquitto, Procs, Tap, read_metrics, serve_cmd
from .test_deploy import RECORD_ID
from .test_e2e import assert_equal_metrics

VIEWS = ("S", "HL", "HR")
ROUNDS = 2


def camera_dir(kdef: Path, view: str, root: Path) -> Path:
    """What camera `view` holds on its own disk: only its pictures, in a folder of its own."""
    out = root / f"camera-{view}" / "photos"
    for f in sorted(kdef.rglob("*.JPG")):
        if f.stem[6:] == view:  # KDEF names: session, subject (3), emotion (2), angle
            rel = f.relative_to(kdef)
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, out / rel)
    return out


def owner_cmd(url: str, k: int, data: Path, run_id: str) -> list[str]:
    return [*AGENT_CMD, "--broker", url, "--client-id", f"owner-{k:02d}", "--role", "owner",
            "--views", ",".join(VIEWS), "--owner-index", str(k), "--dataset", str(data),
            "--seed", "0", "--threads", str(THREADS), "--run-id", run_id,
            "--exit-when-done"]  # fmt: skip


def simulated(kdef: Path) -> tuple[dict[str, Any], Any]:
    """`simulate --algo pyvertical --views S,HL,HR` in this process, and its parties' tables."""
    import torch

    from splitfed.data.views import load_views, views_partition
    from splitfed.simulate import SimSpec, simulate

    ds = load_views(kdef, VIEWS)
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # as every process of the MQTT run
    try:
        metrics = simulate(ds, SimSpec("pyvertical", len(VIEWS), ROUNDS, seed=0))
    finally:
        torch.set_num_threads(old)
    return metrics, views_partition(ds, VIEWS, seed=0)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Crops cached under the test's folder (the agents inherit the variable)."""
    d = tmp_path / "cache"
    monkeypatch.setenv("SPLITFED_CACHE", str(d))
    return d


def test_camera_folders_hold_one_view_each(kdef_views_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    for view in VIEWS:
        files = list(camera_dir(kdef_views_dir, view, tmp_path).rglob("*.JPG"))
        assert files and all(f.stem[6:] == view for f in files), (view, files)


def test_owner_agent_of_one_camera_holds_its_simulated_twins_table(
    kdef_views_dir: Path,  # noqa: F811
    tmp_path: Path,
    cache: Path,
) -> None:
    """`owner_table` of an agent whose disk holds only its view: `views_partition`'s owner k."""
    from edge_agent.cli import owner_table
    from edge_agent.config import load_config
    from splitfed.data.views import load_views, views_partition

    sim = views_partition(load_views(kdef_views_dir, VIEWS), VIEWS, seed=2)
    for k, view in enumerate(VIEWS):
        cfg = load_config(None, {
            "client_id": f"owner-{k:02d}", "role": "owner", "owner.views": ",".join(VIEWS),
            "owner.index": k, "data.dataset": str(camera_dir(kdef_views_dir, view, tmp_path)),
            "data.seed": 2,
        })  # fmt: skip
        assert cfg.owner.owners == len(VIEWS)
        table = owner_table(cfg)
        assert table.ids.tolist() == sim.owners[k].ids.tolist()
        assert np.array_equal(table.images, sim.owners[k].images)
        assert table.box == sim.owners[k].box


@pytest.mark.mqtt
@pytest.mark.slow
def test_cameras_over_mosquitto_equal_simulate(
    kdef_views_dir: Path,  # noqa: F811
    mosquitto: Mosquitto,
    procs: Procs,
    tmp_path: Path,
    cache: Path,
) -> None:
    run_id, out = "deploy-views", tmp_path / "out"
    owners = [f"owner-{k:02d}" for k in range(len(VIEWS))]
    tap = Tap(mosquitto.url)
    try:
        procs.start("aggregator", serve_cmd(
            out, mosquitto.url, "pyvertical", len(VIEWS), ROUNDS, run_id, "--views",
            ",".join(VIEWS), "--data", str(kdef_views_dir), "--round-timeout", "120",
        ))  # fmt: skip
        for k, view in enumerate(VIEWS):
            data = camera_dir(kdef_views_dir, view, tmp_path)
            procs.start(owners[k], owner_cmd(mosquitto.url, k, data, run_id))
        assert procs.wait("aggregator", 300) == 0, procs.logs()
        for name in owners:  # --exit-when-done: they leave when the aggregator stops
            assert procs.wait(name, 60) == 0, procs.logs()
        metrics = read_metrics(out)
    finally:
        tap.close()
    ref, parties = simulated(kdef_views_dir)
    assert_equal_metrics(metrics, ref)
    assert metrics["data"]["partition"] == ref["data"]["partition"] == "views:S,HL,HR"
    common = parties.true_intersection()
    assert metrics["psi"]["intersection"] == ref["psi"]["intersection"] == len(common) > 0
    assert metrics["psi"]["owner_records"] == [len(o) for o in parties.owners] == [10, 9, 9]
    assert metrics["comm"]["rejected_messages"] == 0 and metrics["comm"]["transport_dropped"] == 0

    # The wire: ids of the intersection (the alignment lists) only; never a record a camera missed.
    every = set(parties.labels.ids.tolist())
    outside = every - common
    assert len(outside) == 2  # a missing HR file, a faceless HL picture
    found = {m.decode() for _, payload, _, _ in tap.snapshot() for m in RECORD_ID.findall(payload)}
    assert not found & outside, f"{len(found & outside)} ids outside the intersection on the wire"
    assert found & common, "the alignment lists (the intersection's ids) should cross"
