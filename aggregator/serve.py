"""`aggregator serve`: the federation over MQTT, with the simulator's algorithm code.

The rounds run through `splitfed.runner.run` exactly as in `aggregator simulate`; only the
transport under `ServerIO` is MQTT instead of in-process calls. Without `--broker` an embedded
broker (amqtt) starts on 127.0.0.1:1883, so one machine needs no setup. Every round is
checkpointed; the same command resumes after a crash.

PyVertical (`--algo pyvertical`, agents `--role owner`) and FedSL (`--algo fedsl`, agents
`--role segment`) take `--data`: the label holder's labels and the owners' layout, or the shape
of the sequences, computed from that data set exactly as `simulate` computes them.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Group
from rich.live import Live
from rich.table import Table

from aggregator.options import apply_recipe, geometry_settings, recipe_options, server_options
from aggregator.serve_config import (
    OWN_DATA_ALGOS,
    SERVE_ALGOS,
    SERVE_SPLIT_ALGOS,
    ServeConfig,
    load_allow_list,
    load_serve_config,
)
from aggregator.serve_io import ServeAlgorithmIO, ServeIO
from splitfed.checkpoint import checkpoint_file, planned_rounds, read_model_config
from splitfed.cliutil import broker_options, broker_overrides, user_errors
from splitfed.config import DEFAULT_ROUNDS, SFLV2_ORDERS, TrainConfig
from splitfed.defences import DEFAULT_HELP, DEFENCES, DefenceConfig, default_defence, get_defence
from splitfed.errors import UserError
from splitfed.server import ServerIO
from splitfed.wire import Message

log = logging.getLogger("aggregator.serve")


def evaluate_on(algo: Any, ds: Any) -> dict[str, float]:
    """Accuracy of the global model on the aggregator's own evaluation set."""
    import torch

    from splitfed.data.batches import iterate_batches
    from splitfed.training import accuracy, confusion, macro_f1

    conf = np.zeros((7, 7), dtype=np.int64)
    algo.client_net.eval()
    algo.server_net.eval()
    with torch.no_grad():
        for x, y in iterate_batches(ds, 256, (0,), train=False):
            pred = algo.server_net(algo.client_net(x)).argmax(1).numpy()
            conf += confusion(y.numpy(), pred)
    return {"eval_data_accuracy": accuracy(conf), "eval_data_macro_f1": macro_f1(conf)}


class Dashboard:
    """What a person watching the aggregator wants: who is online, which round, how good."""

    def __init__(self, cfg: ServeConfig, io: ServeIO, broker: str) -> None:
        self.cfg = cfg
        self.io = io
        self.broker = broker
        self.rows: list[dict[str, Any]] = []
        self.phase = "waiting for agents"

    def __rich__(self) -> Group:
        try:
            return self._render()
        except RuntimeError:  # the round logic changed a dict while we read it; next refresh
            return Group(Table.grid())

    def _render(self) -> Group:
        clients = sorted(self.io.clients.items())
        online = [c for c, i in clients if i.online]
        head = Table.grid(padding=(0, 2))
        head.add_row("broker", self.broker, "run", self.cfg.broker.run_id, "algo", self.cfg.algo)
        head.add_row(
            "round",
            f"{len(self.rows)}/{self.cfg.rounds}",
            "phase",
            self.phase,
            "rejected",
            str(self.io.rejected_total),
        )
        head.add_row(
            "online",
            f"{len(online)} ({', '.join(online[:8])}{' ...' if len(online) > 8 else ''})",
            "need",
            str(self.cfg.min_clients),
            "",
            "",
        )
        t = Table(show_edge=False)
        for c in ("round", "loss", "train acc", "test acc", "clients", "dropped", "s"):
            t.add_column(c, justify="right")
        for r in self.rows[-5:]:
            t.add_row(
                str(r["round"]),
                f"{r['train_loss']:.3f}",
                f"{r['train_accuracy']:.1%}",
                f"{r['test_accuracy']:.1%}",
                str(len(r["clients"])),
                str(len(r["dropped"])),
                f"{r['seconds']:.1f}",
            )
        return Group(head, t)


@click.command()
@click.option(
    "--broker", help="mqtt://HOST:PORT of Mosquitto or another broker; default: embedded broker"
)
@click.option("--listen", help="HOST:PORT of the embedded broker [default: 127.0.0.1:1883]")
@click.option("--algo", type=click.Choice(SERVE_ALGOS), help="algorithm [default: sflv1]")
@click.option("--min-clients", type=int, help="agents to wait for [default: 2]")
@click.option(
    "--rounds",
    type=int,
    help=f"rounds [default: a resumed run's own, else {DEFAULT_ROUNDS} as simulate]",
)
@click.option(
    "--round-timeout", type=float, help="seconds; then the round ends without stragglers [600]"
)
@click.option("--join-timeout", type=float, help="seconds to wait for --min-clients agents [3600]")
@click.option(
    "--checkpoint-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="checkpoint every round here [default: OUT/checkpoint]",
)
@click.option("--no-resume", is_flag=True, help="start afresh even if a checkpoint exists")
@click.option(
    "--compression", type=click.Choice(["fp32", "fp16", "int8"]), help="activations on the wire"
)
@click.option(
    "--grad-compression", type=click.Choice(["fp32", "fp16"]), help="gradients on the wire"
)
@click.option("--seed", type=int, help="run seed [default: 0]")
@click.option("--batch-size", type=int)
@click.option("--lr", type=float)
@click.option("--local-epochs", type=int)
@click.option("--cut", type=int, help="conv blocks on the device")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="YAML with ServeConfig keys; flags override it",
)
@click.option(
    "--data",
    help="pyvertical: the data set whose labels the aggregator holds, cut among --min-clients "
    "owners as simulate cuts it; fedsl: the data set whose sequences the network reads "
    "(on still images FedSL reads row bands, top to bottom, as time steps) [default: synth]",
)
@click.option(
    "--data-format", type=click.Choice(["synth", "kdef", "folder", "fer2013"]), help="of --data"
)
@click.option(
    "--split", type=click.Choice(["subject", "random"]), help="pyvertical: held-out split"
)
@click.option("--frames", type=int, help="fedsl: time steps (or row bands) per sequence [4]")
@click.option(
    "--views",
    help="pyvertical: KDEF camera angles, one owner (camera) each, e.g. S,HL,HR; --data is the "
    "KDEF tree whose labels stay here; --min-clients defaults to the number of views",
)
@click.option(
    "--record-salt", help="pyvertical --views: shared salt of the record ids [splitfed-views]"
)
@click.option(
    "--segments",
    type=int,
    help="fedsl: devices per client group; --min-clients counts devices [2]",
)
@click.option("--eval-data", help="evaluation set held by the aggregator: a data-set path or synth")
@click.option("--eval-data-format", type=click.Choice(["synth", "kdef", "folder", "fer2013"]))
@click.option(
    "--synth-identities",
    type=int,
    default=80,
    show_default=True,
    help="people in a synthetic --eval-data",
)
@broker_options("the aggregator's")
@click.option(
    "--broker-users",
    help="embedded broker: file of USER:HASH logins (python -m splitfed.broker add-user)",
)
@click.option(
    "--insecure", is_flag=True, help="embedded broker: listen beyond loopback without logins"
)
@click.option(
    "--shared-subscription",
    "shared_group",
    metavar="GROUP",
    help="subscribe as MQTT 5 shared subscriptions $share/GROUP/... [default: plain]",
)
@click.option(
    "--allow-clients",
    type=click.Path(path_type=Path, dir_okay=False),
    help="only these client ids (one a line, # comments) may join and train",
)
@click.option(
    "--presence-grace", type=float, help="seconds a last will waits for the agent to reconnect [5]"
)
@click.option(
    "--rejoin-grace", type=float, help="seconds a round waits for dropped agents to reconnect [5]"
)
@click.option(
    "--serve-forever", is_flag=True, help="after training, keep answering live predictions"
)
@click.option(
    "--init-from",
    type=click.Path(path_type=Path, exists=True),
    help="start both halves from this checkpoint (pretrained); its architecture is used",
)
@click.option(
    "--checkpoint",
    "live_checkpoint",
    type=click.Path(path_type=Path, exists=True),
    help="with --live: the trained checkpoint to serve",
)
@click.option(
    "--live",
    is_flag=True,
    help="no training: publish --checkpoint's client weights and answer live predictions",
)
@server_options  # as simulate's, unset = the config's (aggregator.options)
@recipe_options  # --recipe, --input-norm, --camera-jitter, --syncs-per-round: as simulate's
@click.option(
    "--sflv2-order",
    type=click.Choice(SFLV2_ORDERS),
    help="SFLV2's schedule: batches interleaved, clients one after another, or lockstep (the "
    "clients' i-th batches, one server step) [the config's: "
    f"{TrainConfig.model_fields['sflv2_order'].default}]",
)
@click.option("--threads", type=int, help="torch threads [default: torch's]")
@click.option(
    "--aggregation",
    type=click.Choice(["mean", "trimmed-mean", "median"]),
    help="how client (and SFLV1/FedAvg server) halves are combined [default: mean]",
)
@click.option("--trim-ratio", type=float, help="trimmed-mean: share cut at each end [0.2]")
@click.option("--clip-update-norm", type=float, help="clip each update to this L2 norm [off]")
@click.option(
    "--step-timeout", type=float, help="SL/SFLV2: seconds before a silent agent is skipped [off]"
)
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path, file_okay=False),
    help="metrics.json, curves.png, confusion.png [default: runs/serve]",
)
@click.option(
    "--workers",
    type=int,
    default=1,
    show_default=True,
    help="worker processes on this host, agents sharded across them (sflv1, fedavg only)",
)
@click.option("--rank", type=int, help="this worker's rank, for workers on several hosts")
@click.option("--world-size", type=int, help="number of workers on all hosts, with --rank")
@click.option("--master", help="ADDR:PORT where the workers meet (torch.distributed), with --rank")
@click.option("-v", "--verbose", is_flag=True)
@click.option(
    "--fed-server",
    is_flag=True,
    help="sflv1/sflv2: `aggregator fed-server` averages the client halves; this main server "
    "never holds one",
)
@click.option(
    "--defence",
    type=click.Choice(list(DEFENCES)),
    help=f"defence the agents apply to their smashed data [default: {DEFAULT_HELP}]",
)
@click.option(
    "--shape",
    type=click.Choice(["standard", "u"]),
    help="u: U-shaped split, the agents keep the head and the labels [default: standard]",
)
@user_errors
def serve(
    config_path: Path | None,
    verbose: bool,
    eval_data_format: str | None,
    synth_identities: int,
    **kw: Any,
) -> None:
    """Train with edge agents over MQTT (same algorithms and metrics as simulate).

    Agents: `edge-agent --role client` for sl, sflv1, sflv2 and fedavg; `--role owner` for
    pyvertical (one per part; the labels stay here); `--role segment` for fedsl (groups x
    segments devices; on still images FedSL reads row bands, top to bottom, as time steps)."""
    from aggregator.options import setup_logging

    setup_logging(verbose)
    kw = apply_recipe(kw)
    overrides = {
        "broker.url": kw["broker"],
        "broker.listen": kw["listen"],
        **broker_overrides(kw),
        "broker.users_file": kw["broker_users"],
        "broker.insecure": True if kw["insecure"] else None,
        "broker.shared_group": kw["shared_group"],
        "allow_clients": kw["allow_clients"],
        "algo": kw["algo"],
        "min_clients": kw["min_clients"],
        "rounds": kw["rounds"],
        "round_timeout": kw["round_timeout"],
        "join_timeout": kw["join_timeout"],
        "checkpoint_dir": kw["checkpoint_dir"],
        "resume": False if kw["no_resume"] else None,
        "seed": kw["seed"],
        "train.compression": kw["compression"],
        "train.grad_compression": kw["grad_compression"],
        "train.batch_size": kw["batch_size"],
        "train.lr": kw["lr"],
        "train.local_epochs": kw["local_epochs"],
        "train.syncs_per_round": kw["syncs_per_round"],
        "train.warmup_rounds": kw["warmup_rounds"],
        "train.split_batch": kw["split_batch"],
        "model.cut": kw["cut"],
        "model.input_norm": kw["input_norm"],
        "model.antialias": kw["antialias"],
        "train.jitter.camera.p": kw["camera_jitter"],
        **{f"train.jitter.{key}": value for key, value in geometry_settings(kw).values()},
        "model.shape": kw["shape"],
        "defence": kw["defence"],
        "out": kw["out"],
        "eval_data": kw["eval_data"],
        "serve_forever": True if kw["serve_forever"] else None,
        "rejoin_grace": kw["rejoin_grace"],
        "presence_grace": kw["presence_grace"],
        "threads": kw["threads"],
        "aggregation.method": kw["aggregation"],
        "aggregation.trim_ratio": kw["trim_ratio"],
        "aggregation.clip_update_norm": kw["clip_update_norm"],
        "step_timeout": kw["step_timeout"],
        "init_from": kw["init_from"],
        "live_model": _live_model(kw["live"], kw["live_checkpoint"]),
        "aggregation.server_opt": kw["server_opt"],
        "aggregation.server_lr": kw["server_lr"],
        "aggregation.server_momentum": kw["server_momentum"],
        "train.sflv2_order": kw["sflv2_order"],
        "data": kw["data"],
        "data_format": kw["data_format"],
        "split": kw["split"],
        "frames": kw["frames"],
        "segments": kw["segments"],
        "views": kw["views"],
        "record_salt": kw["record_salt"],
        "fed_server": True if kw["fed_server"] else None,
    }
    if kw["views"] and kw["min_clients"] is None:  # one owner per camera
        overrides["min_clients"] = len(kw["views"].split(","))
    cfg = load_serve_config(config_path, overrides)
    try:
        if kw["workers"] != 1 or kw["rank"] is not None or kw["world_size"] is not None:
            from aggregator.workers import serve_workers

            metrics = serve_workers(
                cfg, kw["workers"], kw["rank"], kw["world_size"], kw["master"], verbose,
                eval_data_format, synth_identities,
            )  # fmt: skip
        else:
            metrics = run_serve(
                cfg, eval_data_format=eval_data_format, synth_identities=synth_identities
            )
    except RuntimeError as e:  # no agents: the checkpoint lets the same command carry on later
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    if metrics is not None:
        from aggregator.options import console, print_table

        print_table([metrics])
        sequence = str(metrics.get("fedsl", {}).get("sequence", ""))
        if sequence.endswith("rows"):
            from splitfed.algorithms.fedsl.parties import ROW_BANDS_NOTE

            console.print(ROW_BANDS_NOTE.format(frames=metrics["fedsl"]["frames"]) + ".")
        console.print(
            f"wrote {cfg.out}/metrics.json, curves.png, confusion.png; "
            f"checkpoints in {checkpoint_dir(cfg)}"
        )


def _host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise UserError(f"--listen takes HOST:PORT, got {listen!r}") from None


def _live_model(live: bool, checkpoint: Path | None) -> Path | None:
    if live != (checkpoint is not None):
        raise UserError("--live and --checkpoint go together: serve this checkpoint live")
    return checkpoint


def _start_model(cfg: ServeConfig) -> ServeConfig:
    """The network of --init-from or --checkpoint --live: the checkpoint's architecture (for
    --init-from with this run's cut, so that a mismatch is named when the weights load)."""
    start = cfg.live_model or cfg.init_from
    if start is None:
        return cfg
    if cfg.init_from is not None and cfg.live_model is not None:
        raise UserError("--init-from starts a training run; --checkpoint --live serves one")
    if cfg.algo not in SERVE_SPLIT_ALGOS:
        raise UserError(
            f"--init-from and --live take a split-CNN checkpoint: {', '.join(SERVE_SPLIT_ALGOS)} "
            f"(not {cfg.algo})"
        )
    saved = read_model_config(checkpoint_file(start))
    model = saved if cfg.live_model is not None else saved.model_copy(update={"cut": cfg.model.cut})
    return cfg.model_copy(update={"model": model})


def resolve_rounds(cfg: ServeConfig, group: Any = None) -> ServeConfig:
    """`cfg` with its rounds set: the flag or file's, else the plan of the run it resumes (its
    learning-rate schedule was laid out for that many rounds, whatever today's default is),
    else DEFAULT_ROUNDS. Several workers take rank 0's checkpoint, as they resume from it."""
    if cfg.rounds is not None:
        return cfg
    planned = planned_rounds(checkpoint_dir(cfg), cfg.algo) if cfg.resume else None
    if group is not None:
        planned = group.broadcast(planned)
    if planned is not None:
        log.info("resuming a run planned for %d rounds: training to round %d", planned, planned)
    return cfg.model_copy(update={"rounds": planned or DEFAULT_ROUNDS})


def checkpoint_dir(cfg: ServeConfig) -> Path:
    """Where `serve` checkpoints every round and resumes from."""
    return cfg.checkpoint_dir or cfg.out / "checkpoint"


def run_serve(
    cfg: ServeConfig,
    eval_data_format: str | None = None,
    synth_identities: int = 80,
    stop: threading.Event | None = None,
    live: bool = True,
    group: Any = None,
) -> dict[str, Any] | None:
    """Start (or reach) the broker, train, write the outputs; returns the metrics.

    `group` (a splitfed.distributed.Group): this is one of several workers (aggregator.workers).
    """
    import torch

    from splitfed import sdnotify
    from splitfed.broker import EmbeddedBroker
    from splitfed.metrics import write_json
    from splitfed.mqtt import MqttTransport
    from splitfed.runner import RunOptions, run
    from splitfed.simulate import strategy_class

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():

        def on_signal(signum: int, _f: Any) -> None:
            stop.set()
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_signal)
    from aggregator.options import console, load_data
    from splitfed.algorithms.cnn import SMASHED_ALGORITHMS, SplitCNN

    cfg = resolve_rounds(_start_model(cfg), group)
    if cfg.fed_server:
        from aggregator.fed_server import check_fed_serve

        check_fed_serve(cfg, group)
    defence = get_defence(cfg.defence or default_defence(cfg.algo))
    defended = defence != DefenceConfig() or cfg.model.shape == "u"
    if cfg.algo not in SMASHED_ALGORITHMS and defended:
        raise UserError(
            f"--defence and --shape u act on smashed data, which only "
            f"{', '.join(SMASHED_ALGORITHMS)} send (not {cfg.algo})"
        )
    train = cfg.train.model_copy(
        update={"compression": defence.wire_compression(cfg.train.compression)}
    )
    cfg = cfg.model_copy(update={"model": defence.model(cfg.model), "train": train})
    own: tuple[Any, dict[str, Any]] | None = None
    if cfg.algo in OWN_DATA_ALGOS:
        if cfg.eval_data:
            raise UserError(
                f"--eval-data scores a split CNN on whole crops; {cfg.algo} is scored on its "
                "devices' held-out records"
            )
        if cfg.serve_forever:
            raise UserError(f"--serve-forever answers live frames of whole crops: not {cfg.algo}")
        own = own_data_strategy(cfg, synth_identities)
    eval_ds = None
    if cfg.eval_data:
        eval_ds = load_data(cfg.eval_data, eval_data_format, synth_identities)
    model_cfg = cfg.model
    if eval_ds is not None and tuple(model_cfg.input_shape) != eval_ds.input_shape:
        raise UserError(
            f"--eval-data crops are {eval_ds.input_shape}, the model takes {model_cfg.input_shape}"
        )
    b = cfg.broker
    embedded = None
    if b.url is None:
        host, port = _host_port(b.listen)
        embedded = EmbeddedBroker(host, port, users_file=b.users_file, insecure=b.insecure)
        embedded.check()  # before anything binds or connects
        if b.users_file is not None and not (b.username and b.password_file):
            raise UserError(
                "with --broker-users the aggregator logs in to its broker too: give --username "
                "and --password-file of a user in that file"
            )
        url = embedded.url
    elif b.users_file is not None or b.insecure:
        raise UserError("--broker-users and --insecure are for the embedded broker (no --broker)")
    else:
        url = b.url
    settings = b.link_settings(url)
    allowed = load_allow_list(cfg.allow_clients) if cfg.allow_clients is not None else None
    if allowed is not None:
        log.info("enrolment: %d client id(s) may join (%s)", len(allowed), cfg.allow_clients)
    shard: dict[str, Any] = {}
    if group is not None:
        shard = {"owns": group.owns, "worker": (group.rank, group.world_size)}
    transport = MqttTransport(
        settings, b.prefix, b.run_id, presence_grace=cfg.presence_grace,
        shared_group=b.shared_group, **shard,
    )  # fmt: skip
    if group is not None:  # enrolled agents are homed up front: no JOIN of theirs can race
        group.on_joined = lambda local: transport.pin_clients([*local, *sorted(allowed or ())])
    data_info: dict[str, Any] = {"source": "agents"}
    live_kw: dict[str, Any] = dict(
        data_info=data_info, min_clients=cfg.min_clients, grace=cfg.rejoin_grace,
        outage_timeout=cfg.round_timeout, allowed=allowed,
    )  # fmt: skip
    io: ServeIO
    if own is not None:
        algo = own[0]
        io = ServeAlgorithmIO(transport, b.run_id, cfg.train, algo.specs(), **live_kw)
    else:
        io = ServeIO(transport, b.run_id, model_cfg, cfg.train, **live_kw)
        algo = strategy_class(cfg.algo)(model_cfg, cfg.train, cfg.seed, cfg.aggregation)
    # Sequence numbers that grow across restarts, so agents accept a resumed aggregator.
    io.seq.seq = time.time_ns() // 1000
    if group is not None:  # several workers speak as `aggregator`: one clock orders them
        from splitfed.distributed import ClockSequencer

        io.seq = ClockSequencer(io.seq.src, io.seq.run_id)
    algo.step_timeout = cfg.step_timeout
    if cfg.fed_server:  # before the transport starts: it subscribes to the fed server's sync
        from aggregator.fed_server import attach_fed_server

        attach_fed_server(algo, io, transport, cfg.round_timeout)
    if isinstance(algo, SplitCNN):
        algo.defence = defence
        if cfg.live_model or cfg.init_from:
            algo.start_from(cfg.live_model or cfg.init_from)  # type: ignore[arg-type]
    dash = Dashboard(cfg, io, url + (" (embedded)" if embedded else ""))

    def on_round(row: dict[str, Any]) -> None:
        if eval_ds is not None:
            row.update(evaluate_on(algo, eval_ds))
        dash.rows.append(row)
        dash.phase = "training"
        sdnotify.notify(f"STATUS=round {row['round']}/{cfg.rounds}: test accuracy "
                        f"{row['test_accuracy']:.1%}")  # fmt: skip
        log.info(
            "round %d: loss %.4f, train acc %.3f, test acc %.3f, %d clients, %d dropped, %.1f s",
            row["round"],
            row["train_loss"],
            row["train_accuracy"],
            row["test_accuracy"],
            len(row["clients"]),
            len(row["dropped"]),
            row["seconds"],
        )

    assert cfg.rounds is not None  # resolve_rounds
    opts = RunOptions(
        rounds=cfg.rounds, min_clients=cfg.min_clients, join_timeout=cfg.join_timeout,
        round_timeout=cfg.round_timeout, out_dir=cfg.out, checkpoint_dir=checkpoint_dir(cfg),
        resume=cfg.resume, data_info=data_info, on_round=on_round, group=group,
    )  # fmt: skip
    metrics: dict[str, Any] | None = None
    view = Live(dash, console=console, refresh_per_second=2, transient=False) if live else None
    watchdog = sdnotify.Watchdog()
    try:
        if embedded is not None:
            embedded.start()
        transport.start(wait=10.0)
        if group is not None:  # agents join rank 0 only once every worker listens
            group.barrier()
            transport.announce()
        if not transport.link.online():
            log.warning("no MQTT broker at %s yet; retrying in the background", url)
        sdnotify.notify(f"READY=1\nSTATUS=waiting for {cfg.min_clients} agents on {url}")
        # Alive while the round logic keeps polling the network (it does at least every second).
        watchdog.start(lambda: time.monotonic() - io.last_poll < 120)
        log.info(
            "waiting for %d agent(s) on %s (run %s, prefix %s)",
            cfg.min_clients,
            url,
            b.run_id,
            b.prefix,
        )
        if view is not None:
            view.start()
        if cfg.live_model is not None:  # a trained model, served: no agent needs data
            dash.phase = "serving predictions"
            io.publish_global(algo.round_body("live"), algo.global_tensors())
            log.info("serving %s live; answering predictions until stopped", cfg.live_model)
            serve_predictions(algo, io, stop)
            return None
        metrics = run(algo, io, opts)
        if own is not None:
            add_own_report(algo, io, metrics, own[1])
        if eval_ds is not None:
            metrics["final"].update(evaluate_on(algo, eval_ds))
        comm: dict[str, Any] = {
            "messages_up": transport.messages_up,
            "messages_down": transport.messages_down,
            "transport_dropped": transport.dropped_total,
            "transport_dropped_by_reason": dict(transport.dropped),
            "rejected_by_reason": dict(io.rejected),
        }
        if group is not None:
            from aggregator.workers import pool_counts

            comm = pool_counts(group, comm)
            metrics["workers"] = group.world_size
        metrics["comm"].update(comm)
        metrics["defence"] = defence.model_dump(mode="json")
        if cfg.fed_server:
            from aggregator.fed_server import held_report

            metrics["held"] = held_report()
        metrics["mqtt"] = {
            "broker": url,
            "embedded": embedded is not None,
            "prefix": b.prefix,
            "run_id": b.run_id,
        }
        if group is None or group.is_main:
            write_json(cfg.out / "metrics.json", metrics)
        dash.phase = "done"
        if cfg.serve_forever:
            dash.phase = "serving predictions"
            log.info("training done; answering live predictions until stopped")
            serve_predictions(algo, io, stop)
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        sdnotify.notify("STOPPING=1")
        watchdog.stop()
        if view is not None:
            view.stop()
        transport.close()
        if embedded is not None:
            embedded.stop()
    return metrics


def own_data_strategy(cfg: ServeConfig, synth_identities: int) -> tuple[Any, dict[str, Any]]:
    """PyVertical's label holder or FedSL's relay, from `cfg.data` as simulate builds them.

    Returns the strategy and what metrics.json says of the run's data beyond the rounds."""
    from aggregator.options import load_data

    if cfg.algo == "pyvertical" and cfg.views:
        return _views_label_holder(cfg)
    ds = load_data(cfg.data, cfg.data_format, synth_identities)
    if cfg.algo == "pyvertical":
        from splitfed.algorithms.pyvertical.parties import PartySpec, label_holder
        from splitfed.algorithms.pyvertical.strategy import PyVertical

        labels, vmodel = label_holder(
            ds, PartySpec(cfg.min_clients, cfg.seed, cfg.split, cfg.model)
        )
        log.info(
            "label holder: %d labelled records of %s; %d data owners hold the parts %s",
            len(labels.ids),
            ds.name,
            cfg.min_clients,
            [list(b) for b in vmodel.boxes],
        )
        info = {"partition": f"vertical:{cfg.min_clients}", "name": ds.name}
        return PyVertical(vmodel, cfg.train, cfg.seed, labels), info
    from splitfed.algorithms.fedsl.parties import ROW_BANDS_NOTE, seq_model_config
    from splitfed.algorithms.fedsl.strategy import FedSL
    from splitfed.data.clips import clips_for

    if cfg.min_clients % cfg.segments:
        raise UserError(
            f"fedsl: --min-clients counts devices, {cfg.segments} per group (--segments): "
            f"{cfg.min_clients} is not a multiple"
        )
    clips = clips_for(ds, cfg.frames)
    if cfg.segments > clips.frames:
        raise UserError(f"{cfg.segments} segments need sequences of at least as many frames")
    seq = str(clips.meta.get("sequence", f"clips of {clips.frames} frames"))
    if seq.endswith("rows"):
        log.warning(ROW_BANDS_NOTE.format(frames=clips.frames))
    if cfg.train.compression == "int8":
        log.info("fedsl sends hidden states as fp16 (int8 is for conv feature maps)")
    model_cfg = seq_model_config(clips, cfg.segments, cfg.model)
    info = {
        "fedsl": {
            "segments": cfg.segments,
            "frames": clips.frames,
            "devices": cfg.min_clients,
            "hidden": model_cfg.hidden,
            "sequence": seq,
        },
        "groups": cfg.min_clients // cfg.segments,
    }
    return FedSL(model_cfg, cfg.train, cfg.seed, cfg.aggregation), info


def _views_label_holder(cfg: ServeConfig) -> tuple[Any, dict[str, Any]]:
    """PyVertical over cameras: the labels of the KDEF tree `cfg.data`, an owner per view."""
    from splitfed.algorithms.pyvertical.model import VerticalModelConfig
    from splitfed.algorithms.pyvertical.parties import base_model
    from splitfed.algorithms.pyvertical.strategy import PyVertical
    from splitfed.data.views import load_views, parse_views, view_labels

    views = parse_views(cfg.views or "")
    if cfg.min_clients != len(views):
        raise UserError(f"--views {cfg.views}: one owner per view, not --min-clients "
                        f"{cfg.min_clients}")  # fmt: skip
    ds = load_views(cfg.data, views, progress=True)
    labels, _ = view_labels(ds, views, cfg.split, cfg.seed, cfg.record_salt)
    _, h, w = ds.input_shape
    vmodel = VerticalModelConfig(
        split=base_model(ds.input_shape, cfg.model), boxes=[(0, h, 0, w)] * len(views)
    )
    log.info("label holder: %d labelled records of %s; cameras %s", len(labels.ids), ds.name,
             ",".join(views))  # fmt: skip
    info = {"partition": f"views:{','.join(views)}", "name": ds.name}
    return PyVertical(vmodel, cfg.train, cfg.seed, labels), info


def add_own_report(algo: Any, io: ServeIO, metrics: dict[str, Any], info: dict[str, Any]) -> None:
    """What `simulate` reports of PyVertical's alignment or FedSL's chains, from the serve side."""
    if algo.name == "pyvertical":
        algo.add_report(metrics, io)
        metrics["data"].update(name=info["name"], partition=info["partition"])
        return
    metrics["clients"] = info["groups"]  # as simulate counts FedSL: client groups
    metrics["fedsl"] = info["fedsl"]
    metrics["data"]["sequence"] = info["fedsl"]["sequence"]


def serve_predictions(algo: Any, io: ServerIO, stop: threading.Event) -> None:
    """After training: answer PREDICT messages (agents keep joining and leaving) until `stop`."""
    from splitfed.wire import MsgType

    while not stop.is_set():
        ev = io.next(time.monotonic() + 0.5)
        if isinstance(ev, Message) and ev.type is MsgType.PREDICT:
            try:
                algo.answer_predict(io, ev)
            except Exception as e:  # noqa: BLE001 - a bad frame must not stop the server
                log.warning("could not answer a prediction from %s: %s", ev.src, e)
                io.rejected["semantic"] += 1
