"""`edge-agent`: train with the federation over MQTT, classify camera frames live, collect crops.

edge-agent --broker mqtt://HOST:PORT --client-id pi-01 --dataset synth --shard 0/3
edge-agent --broker mqtt://HOST:PORT --client-id pi-01 --camera 0
edge-agent --broker mqtt://HOST:PORT --client-id owner-00 --role owner --owner-index 0 --owners 2
edge-agent --broker mqtt://HOST:PORT --client-id owner-01 --role owner --views S,HL,HR \
    --owner-index 1 --dataset KDEF_DIR
edge-agent collect --camera 0 --per-emotion 20
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import numpy as np

from edge_agent.config import AgentConfig, load_config
from splitfed.cliutil import broker_options, broker_overrides, plain_logging, user_errors
from splitfed.errors import UserError
from splitfed.mqtt import LinkSettings

if TYPE_CHECKING:  # torch-heavy modules load only when the agent runs, not for --help
    from splitfed.data.dataset import EmotionDataset
    from splitfed.data.vertical import OwnerTable
    from splitfed.device import DeviceRuntime

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("edge_agent")


setup_logging = plain_logging


def _overrides(kw: dict[str, Any]) -> dict[str, Any]:
    """CLI flags -> dotted config paths (None = not given, the YAML or default stands)."""
    o = {
        "client_id": kw.get("client_id"),
        "broker.url": kw.get("broker"),
        **broker_overrides(kw),
        "camera.source": kw.get("camera"),
        "state_dir": kw.get("state_dir"),
        "data.dataset": kw.get("dataset"),
        "data.data_format": kw.get("data_format"),
        "data.shard": kw.get("shard"),
        "data.partition": kw.get("partition"),
        "data.split": kw.get("split"),
        "data.seed": kw.get("seed"),
        "data.synth_identities": kw.get("synth_identities"),
        "threads": kw.get("threads"),
        "live.loop_file": True if kw.get("loop") else None,
        "live.pace_files": False if kw.get("no_pace") else None,
        "exit_when_done": True if kw.get("exit_when_done") else None,
        "role": kw.get("role"),
        "owner.index": kw.get("owner_index"),
        "owner.owners": kw.get("owners"),
        "owner.views": kw.get("views"),
        "owner.record_salt": kw.get("record_salt"),
        "segment.group": kw.get("group"),
        "segment.groups": kw.get("groups"),
        "segment.segment": kw.get("segment"),
        "segment.segments": kw.get("segments"),
        "segment.frames": kw.get("frames"),
    }
    if kw.get("camera") is not None:
        o["live.enabled"] = True
    return o


def link_settings(cfg: AgentConfig) -> LinkSettings:
    """The broker connection of the config; bad TLS or password files are a UserError here."""
    b = cfg.broker
    return b.link_settings(b.url, keepalive=b.keepalive, session_expiry=b.session_expiry)


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="YAML configuration (AgentConfig); flags override it",
)
@click.option(
    "--validate-config", is_flag=True, help="check the configuration, report the bad field, exit"
)
@click.option(
    "--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT [default: mqtt://127.0.0.1:1883]"
)
@click.option("--client-id", help="this device's id, e.g. client-00 (letters, digits, _ and -)")
@broker_options("this device's")
@click.option(
    "--role",
    type=click.Choice(["client", "owner", "segment"]),
    help="client: split CNN or FedAvg on whole crops (serve --algo sl/sflv1/sflv2/fedavg); "
    "owner: a PyVertical data owner holding one part of every crop (--algo pyvertical); "
    "segment: a FedSL device holding one stretch in time of every sequence (--algo fedsl) "
    "[default: client]",
)
@click.option(
    "--owner-index",
    type=int,
    help="owner: the part this device holds, 0-based, of the --owners parts the simulator cuts "
    "(2: left and right half; 3 and more: brow band and eye band in strips). Owners take the "
    "parts in the sorted order of their client ids, so give owner K the K-th id "
    "(owner-00, owner-01, ...); with --views, the camera: view K of --views [default: 0]",
)
@click.option(
    "--owners", type=int, help="owner: data owners in the run [default: 2, or the --views count]"
)
@click.option(
    "--views",
    help="owner: this device is one camera of a multi-camera rig: the run's KDEF angles, e.g. "
    "S,HL,HR (as `aggregator serve --views`); it holds the pictures of view --owner-index of "
    "--dataset (a KDEF tree that may hold only that view)",
)
@click.option(
    "--record-salt",
    help="owner --views: the federation's shared salt of the record ids, as `serve "
    "--record-salt` [default: splitfed-views]",
)
@click.option("--group", type=int, help="segment: this device's client group, 0-based [default: 0]")
@click.option(
    "--groups",
    type=int,
    help="segment: client groups in the run (the people are shared among them as among "
    "simulated clients) [default: 1]",
)
@click.option(
    "--segment", type=int, help="segment: this device's stretch of each sequence, 0-based [0]"
)
@click.option("--segments", type=int, help="segment: devices per group [default: 2]")
@click.option(
    "--frames",
    type=int,
    help="segment: time steps per sequence; on still images FedSL reads row bands (top to "
    "bottom) as time steps [default: 4]",
)
@click.option("--camera", help="live frames from a camera index (0), a video file or a stream URL")
@click.option(
    "--dataset", help="train on: synth, a data-set path, or 'crops' (collected on this device)"
)
@click.option("--data-format", type=click.Choice(["synth", "kdef", "folder", "fer2013"]))
@click.option(
    "--shard", help="I/N: hold shard I (0-based) of N, as simulated client I [default: 0/1]"
)
@click.option("--partition", help="subject, iid or dirichlet:ALPHA (as aggregator simulate)")
@click.option(
    "--split", type=click.Choice(["subject", "random"]), help="held-out split (as simulate)"
)
@click.option("--seed", type=int, help="the run's seed, for the split and partition [default: 0]")
@click.option("--synth-identities", type=int, help="people in the synthetic set [default: 80]")
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="weights, models and collected crops [default: /var/lib/splitfed]",
)
@click.option("--threads", type=int, help="torch threads [default: torch's]")
@click.option("--exit-when-done", is_flag=True, help="exit when the aggregator stops")
@click.option("--loop", is_flag=True, help="play a video file in a loop")
@click.option("--no-pace", is_flag=True, help="read a video file as fast as the pipeline takes it")
@click.option(
    "--stats-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="write counters and latencies as JSON here on exit",
)
@click.option("-v", "--verbose", is_flag=True)
@click.pass_context
@user_errors
def main(
    ctx: click.Context,
    config_path: Path | None,
    validate_config: bool,
    stats_file: Path | None,
    verbose: bool,
    **kw: Any,
) -> None:
    """Edge agent of splitfed-edge: trains its half of the model and classifies live frames."""
    ctx.ensure_object(dict)
    ctx.obj.update({"config_path": config_path, "kw": kw, "verbose": verbose})
    if ctx.invoked_subcommand is not None:
        return
    setup_logging(verbose)
    cfg = load_config(config_path, _overrides(kw))
    if validate_config:
        click.echo(f"ok: {config_path or 'defaults'} is a valid agent configuration")
        return
    run_agent(cfg, stats_file, ctx.obj.get("runtime_factory"))


def run_agent(
    cfg: AgentConfig,
    stats_file: Path | None = None,
    runtime_factory: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Join the federation and train and/or classify until stopped; returns the agent's stats.

    `runtime_factory` (ClientRuntime's signature) swaps the device runtime: tests run
    misbehaving devices (tests/adversaries.py) through the real agent with it."""
    import torch

    from edge_agent.agent import Agent, Prediction
    from splitfed.devices.owner import OwnerRuntime

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.role != "client" and cfg.live.enabled:
        raise UserError(
            f"--camera classifies frames with the split CNN's client half: --role {cfg.role} "
            "holds none (use --role client)"
        )
    if cfg.live.enabled:
        from edge_agent.camera import check_camera

        check_camera(cfg.camera)  # said now, not after the global weights arrive
    settings = link_settings(cfg)
    runtime: DeviceRuntime
    if cfg.role == "owner":
        runtime = OwnerRuntime(cfg.client_id, cfg.broker.run_id, owner_table(cfg))
    elif cfg.role == "segment":
        runtime = segment_runtime(cfg)
    else:
        runtime = _client_runtime(cfg, runtime_factory)
    stop = threading.Event()
    _stop_on_signals(stop)

    def show(p: Prediction) -> None:
        click.echo(f"frame {p.frame}: {p.emotion} {p.confidence:.2f} ({p.latency_ms:.0f} ms)")

    agent = Agent(
        runtime,
        settings,
        cfg.broker.prefix,
        cfg.broker.run_id,
        stop,
        exit_when_done=cfg.exit_when_done,
        predict_ttl=cfg.live.ttl_seconds,
        on_prediction=show,
    )
    agent.start()
    if not agent.link.wait_connected(10.0):
        log.warning(
            "no MQTT broker at %s:%d yet; retrying in the background", settings.host, settings.port
        )
    pipeline = None
    if cfg.live.enabled:
        pipeline = _start_live(cfg, agent, stop, train=len(getattr(runtime, "train", ())) > 0)
    from splitfed import sdnotify

    sdnotify.notify(f"READY=1\nSTATUS={cfg.client_id} on {cfg.broker.url}")
    try:
        agent.run(sdnotify.Watchdog())
    finally:
        sdnotify.notify("STOPPING=1")
        stop.set()
        agent.close()
        stats = agent.stats()
        if pipeline is not None:
            pipeline.join(2.0)
            stats["live"] = pipeline.stats()
            log.info("live: %s", json.dumps(stats["live"]))
        log.info("agent %s: %s", cfg.client_id, json.dumps(stats["counters"]))
        if stats_file is not None:
            stats_file.parent.mkdir(parents=True, exist_ok=True)
            stats_file.write_text(json.dumps(stats, indent=1))
    return stats


def _client_runtime(cfg: AgentConfig, runtime_factory: Callable[..., Any] | None) -> Any:
    """`--role client`: shard I/N of the local data, or no training data with --camera only."""
    from edge_agent.store import training_shard
    from splitfed.client import ClientRuntime
    from splitfed.data.dataset import EmotionDataset

    shard = training_shard(cfg)
    if shard is None and not cfg.live.enabled:
        raise UserError(
            "nothing to do: give --dataset (synth or a path) to train, or --camera to classify "
            "live (or collect crops first with `edge-agent collect`)"
        )
    if shard is None:
        c = cfg.crop
        empty = EmotionDataset(
            "none", np.zeros((0, c.channels, c.height, c.width), np.uint8), np.zeros(0, np.int64)
        )
        shard = (empty, empty)
    make = runtime_factory or ClientRuntime
    return make(cfg.client_id, cfg.broker.run_id, shard[0], shard[1])


def _local_data(cfg: AgentConfig) -> EmotionDataset:
    from edge_agent.store import load_local_data

    ds = load_local_data(cfg)
    if ds is None:
        raise UserError(f"--role {cfg.role} trains on local data: give --dataset (synth or a path)")
    return ds


def owner_table(cfg: AgentConfig) -> OwnerTable:
    """`--role owner`: this device's part of each record, under the records' ids.

    With `--views` this device is one camera: it loads only the KDEF pictures of its own view
    (view --owner-index of --views) and names each record from its file name and the
    federation's salt, so it needs no other camera's photos and no split (the label holder
    keeps the split). Without, the simulator's vertical partition of the local data set (the
    same owners, seed and split as `simulate --algo pyvertical`), of which it keeps one part."""
    if cfg.owner.views is not None:
        return _view_owner_table(cfg)
    from splitfed.algorithms.pyvertical.parties import PartySpec, partitioned_owner

    spec = PartySpec(cfg.owner.owners, cfg.data.seed, cfg.data.split)
    return partitioned_owner(_local_data(cfg), spec, cfg.owner.index)


def _view_owner_table(cfg: AgentConfig) -> OwnerTable:
    from splitfed.data.views import ViewSpec, load_views, parse_views, view_owner

    views = parse_views(cfg.owner.views or "")
    if cfg.data.dataset in (None, "synth", "crops") or cfg.data.data_format not in (None, "kdef"):
        raise UserError("--role owner --views reads KDEF pictures: give --dataset KDEF_DIR")
    view = views[cfg.owner.index]
    ds = load_views(cfg.data.dataset, [view], cfg.crop)  # this camera's photos only
    spec = ViewSpec(views, cfg.data.seed, cfg.owner.record_salt)
    return view_owner(ds, spec, cfg.owner.index)


def segment_runtime(cfg: AgentConfig) -> DeviceRuntime:
    """`--role segment`: group G's sequences, frames of segment K, the labels if K is last."""
    from splitfed.algorithms.fedsl.parties import SegmentSpec, segment_part
    from splitfed.devices.segment import SegmentRuntime

    sc = cfg.segment
    spec = SegmentSpec(
        sc.groups, sc.frames, sc.segments, cfg.data.seed, cfg.data.partition, cfg.data.split
    )
    part = segment_part(_local_data(cfg), spec, sc.group, sc.segment)
    return SegmentRuntime(
        cfg.client_id, cfg.broker.run_id, sc.group, sc.segment, part.train, part.test,
        part.train_labels, part.test_labels,
    )  # fmt: skip


def _start_live(cfg: AgentConfig, agent: Any, stop: threading.Event, train: bool) -> Any:
    from edge_agent.pipeline import LivePipeline, torch_client_half

    publish = agent.send_predict
    offline = cfg.inference.full_model is not None
    if offline:
        from splitfed.onnx_client import OnnxClient

        c = cfg.crop
        full = OnnxClient(cfg.inference.full_model, cfg.inference,  # type: ignore[arg-type]
                          expected_input=(c.channels, c.height, c.width))  # fmt: skip
        half = full.run_crops  # logits
        if cfg.inference.tta:
            from splitfed.data.tta import averaged_logits

            half = averaged_logits(full.run_crops)
        publish = agent.local_prediction
        log.info("live: full ONNX model %s on the device (offline, no aggregator round trip%s)",
                 cfg.inference.full_model, ", averaged over nine band placements"
                 if cfg.inference.tta else "")  # fmt: skip
    elif cfg.inference.model is not None:
        half = _onnx_half(cfg, agent)
        log.info("live client half: ONNX model %s", cfg.inference.model)
    else:
        half = torch_client_half(lambda: agent.live_net)
        log.info("live client half: torch, from the aggregator's retained global weights")
    onnx = offline or cfg.inference.model is not None

    def ready() -> bool:  # joined, told the run's defence, and holding a client half
        return offline or (agent.live_ready() and (onnx or agent.live_net is not None))

    pipeline = LivePipeline(cfg.camera, cfg.live, cfg.crop, half, publish, stop, ready)
    pipeline.start()

    def watch() -> None:
        last = time.monotonic()
        while not stop.wait(0.2):
            if time.monotonic() - last >= cfg.live.stats_seconds:
                last = time.monotonic()
                s = pipeline.stats()
                lat = agent.stats()["predict_latency_ms"]
                log.info(
                    "live: %.1f frames/s, %d predictions, p50 latency %s ms, drops %s, "
                    "reconnects %d",
                    s["fps"],
                    agent.counters["predictions"],
                    "-" if lat["p50"] is None else f"{lat['p50']:.0f}",
                    s["drops"],
                    s["reconnects"],
                )
            if pipeline.done.is_set():
                # A video file ended: wait a little for the last answers, then stop if not training.
                deadline = time.monotonic() + cfg.live.drain_seconds
                while agent.predict_sent and time.monotonic() < deadline and not stop.is_set():
                    time.sleep(0.05)
                if not train:
                    stop.set()
                return

    threading.Thread(target=watch, name="live-watch", daemon=True).start()
    return pipeline


def _onnx_half(cfg: AgentConfig, agent: Any) -> Any:
    """The exported ONNX client half; re-quantized on the device when new weights arrive."""
    from splitfed.onnx_client import LiveModel, OnnxClient

    c = cfg.crop
    live = LiveModel(OnnxClient(cfg.inference.model, cfg.inference,  # type: ignore[arg-type]
                                expected_input=(c.channels, c.height, c.width)))  # fmt: skip
    if cfg.inference.requantize:
        calibration = _calibration_crops(cfg, agent)
        if calibration is None:
            log.warning("inference.requantize: no local crops to calibrate with; the exported "
                        "model stays live until it is replaced")  # fmt: skip
        else:
            holder: dict[str, Any] = {}

            def on_weights(net: Any, version: int) -> None:
                from splitfed.training import state_to_numpy

                if "rq" not in holder:
                    from splitfed.quantize import Requantizer

                    holder["rq"] = Requantizer(
                        agent.runtime.model_cfg, cfg.state_dir / "models", cfg.inference,
                        on_ready=lambda client, _manifest: live.swap(client),
                    )  # fmt: skip
                holder["rq"].submit(state_to_numpy(net), calibration, str(version))

            agent.on_weights = on_weights
    return lambda crops: np.asarray(live.get().run_crops(crops), dtype=np.float32)  # type: ignore[union-attr]


def _calibration_crops(cfg: AgentConfig, agent: Any) -> np.ndarray | None:
    """This device's own crops (training shard, else collected ones): the aggregator has none."""
    from edge_agent.store import CropStore

    if len(agent.runtime.train):
        return agent.runtime.train.images
    store = CropStore(cfg.crops_dir, cfg.crop)
    return store.load().images if store.exists() else None


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="YAML configuration (AgentConfig)",
)
@click.option("--camera", help="camera index (0), video file or stream URL")
@click.option("--per-emotion", type=int, help="crops to store per emotion [default: 20]")
@click.option("--every", type=int, help="keep one crop every N frames with a face [default: 3]")
@click.option("--emotions", help="comma-separated subset of the seven emotions")
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="crops go to STATE_DIR/crops/<emotion>/ [default: /var/lib/splitfed]",
)
@click.option("-y", "--yes", is_flag=True, help="do not wait for Enter before each emotion")
@click.option("-v", "--verbose", is_flag=True)
@click.pass_context
@user_errors
def collect(
    ctx: click.Context,
    config_path: Path | None,
    verbose: bool,
    yes: bool,
    emotions: str | None,
    **kw: Any,
) -> None:
    """Guided collection: show each emotion to the camera; crops stay on this device."""
    from edge_agent.collect import collect_crops

    parent = ctx.obj or {}
    setup_logging(verbose or parent.get("verbose", False))
    config_path = config_path or parent.get("config_path")
    pk = parent.get("kw", {})
    overrides = {
        "client_id": pk.get("client_id") or "local",
        "camera.source": kw["camera"] or pk.get("camera"),
        "state_dir": kw["state_dir"] or pk.get("state_dir"),
        "collect.per_emotion": kw["per_emotion"],
        "collect.every": kw["every"],
    }
    cfg = load_config(config_path, overrides)
    from splitfed.emotions import EMOTIONS

    chosen = list(EMOTIONS)
    if emotions:
        chosen = [e.strip() for e in emotions.split(",") if e.strip()]
        bad = [e for e in chosen if e not in EMOTIONS]
        if bad:
            raise UserError(
                f"unknown emotion(s) {', '.join(bad)}: choose from {', '.join(EMOTIONS)}"
            )
    counts = collect_crops(cfg, chosen, interactive=not yes)
    for e, n in counts.items():
        click.echo(f"{e:10s} {n:5d} crops")
    click.echo(f"stored in {cfg.crops_dir} (they never leave this device)")


if __name__ == "__main__":
    main()
