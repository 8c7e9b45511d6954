"""What the aggregator's commands share: logging, data and training flags, progress, tables.

Its own module so that `cli` (simulate, compare, prepare) and `serve` both import it and
neither imports the other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, get_args

import click
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from splitfed.checkpoint import checkpoint_file, read_model_config
from splitfed.config import (
    SFLV2_ORDERS,
    AggregationConfig,
    CameraConfig,
    JitterConfig,
    TrainConfig,
)
from splitfed.data.dataset import EmotionDataset
from splitfed.defences import DEFAULT_DEFENCE, DEFAULT_HELP, DEFENCES
from splitfed.errors import UserError
from splitfed.model import ModelConfig

F = TypeVar("F", bound=Callable[..., Any])
console = Console(stderr=True)
log = logging.getLogger("aggregator")
# What --server-opt takes: AggregationConfig.server_opt's choices.
SERVER_OPTS: tuple[str, ...] = get_args(AggregationConfig.model_fields["server_opt"].annotation)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
        force=True,
    )


class ServerLr(click.ParamType):
    """`--server-lr`: a number, `auto` (the number of copies combined that round) or `sqrt`
    (its square root)."""

    name = "auto|sqrt|FLOAT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return AggregationConfig.parse_server_lr(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither auto, sqrt nor a number", param, ctx)


def server_option_list(defaults: bool) -> list[Callable[[Any], Any]]:
    """`--server-opt`, `--server-lr`, `--server-momentum`: one definition for simulate, compare
    and serve. `defaults=False` (serve): an unset flag is None, so its YAML config's value (or
    `AggregationConfig`'s default) stands; the help names the default instead."""
    opt_default = {"default": "none", "show_default": True} if defaults else {"default": None}
    momentum_default = {"default": 0.9, "show_default": True} if defaults else {"default": None}
    return [
        click.option(
            "--server-opt",
            type=click.Choice(list(SERVER_OPTS)),
            help="server optimizer on each round's aggregate (FedAvg, SFLV1, SFLV2, FedSL): "
            "sgd = FedAvg with a server lr, momentum = FedAvgM, adam = FedAdam"
            + ("" if defaults else " [none]"),
            **opt_default,
        ),
        click.option(
            "--server-lr",
            type=ServerLr(),
            default=None,
            help="server learning rate, or auto: the number of clients (the sum of their "
            "updates), or sqrt: its square root [auto for sgd, 1.0 for momentum, 0.01 for adam]",
        ),
        click.option(
            "--server-momentum",
            type=float,
            help="FedAvgM's momentum, FedAdam's beta1" + ("" if defaults else " [0.9]"),
            **momentum_default,
        ),
    ]


def _apply(fn: F, options: list[Callable[[Any], Any]]) -> F:
    """Decorate `fn` with `options`, the first one listed first in `--help`."""
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def server_options(fn: F) -> F:
    """The server-optimizer flags without defaults of their own (serve: flags over YAML)."""
    return _apply(fn, server_option_list(defaults=False))


# The geometric jitter's flags: the JitterConfig field each sets, and what it does.
GEOMETRY_FLAGS = {
    "--zoom-jitter": (
        "scale",
        "zoom each training crop by a factor drawn from 1 +- this, as face detectors disagree "
        "on the band's size",
    ),
    "--roll-jitter": (
        "rotation",
        "roll each training crop by up to +- this many degrees, as a detector levels the band "
        "less well",
    ),
    "--offset-jitter": (
        "shift_y",
        "move each training crop up or down by up to this fraction of its height, as detectors "
        "place the band higher or lower",
    ),
}


def geometry_settings(kw: dict[str, Any]) -> dict[str, tuple[str, float | None]]:
    """Each geometric-jitter flag's JitterConfig field and its parsed value (None: unset)."""
    return {
        flag: (field, kw.get(flag.removeprefix("--").replace("-", "_")))
        for flag, (field, _) in GEOMETRY_FLAGS.items()
    }


# Named recipes: settings one `--recipe` turns on together, each still overridden by its own
# flag. `other-cameras` is README's "For cameras unlike the training photos" (BENCHMARKS.md,
# "The shift levers at 80 epochs"): every jitter and the blur, with the twice longer training
# that heavy jitter needs.
RECIPES: dict[str, dict[str, Any]] = {
    "other-cameras": {
        "antialias": True,
        "camera_jitter": 1.0,
        "zoom_jitter": 0.2,
        "roll_jitter": 5.0,
        "offset_jitter": 0.1,
        "rounds": 160,
    },
}


def recipe_help(name: str) -> str:
    """A recipe's settings as the flags a user would type."""
    words = []
    for key, value in RECIPES[name].items():
        flag = "--" + key.replace("_", "-")
        words.append(flag if value is True else f"{flag} {value:g}")
    return " ".join(words)


def apply_recipe(kw: dict[str, Any]) -> dict[str, Any]:
    """`kw` with `--recipe`'s settings where their own flags are unset (None). A pretrained
    start (`--init-from`) keeps its checkpoint's anti-aliasing: the architecture is its own."""
    name = kw.get("recipe")
    if not name:
        return kw
    out = dict(kw)
    for key, value in RECIPES[name].items():
        if out.get(key) is None and not (key == "antialias" and out.get("init_from")):
            out[key] = value
    return out


def recipe_option_list() -> list[Callable[[Any], Any]]:
    """`--input-norm`, `--antialias`, `--camera-jitter`, the geometric jitter (`--zoom-jitter`,
    `--roll-jitter`, `--offset-jitter`), `--syncs-per-round`,
    `--warmup-rounds`, `--split-batch`: the input recipe, how often halves are averaged, how
    the learning rate starts and whether side-by-side devices share the batch, one definition
    for simulate, compare and serve. Unset, they are None: the model's and training's own
    defaults stand (serve: the YAML's), and a pretrained checkpoint (`--init-from`) keeps the
    norm it was trained with. `--recipe` names a set of them (`RECIPES`, `apply_recipe`)."""
    return [
        click.option(
            "--recipe",
            type=click.Choice(list(RECIPES)),
            default=None,
            help="a named set of the flags below, each of which still overrides it; "
            f"other-cameras: {recipe_help('other-cameras')} (README, 'For cameras unlike the "
            "training photos')",
        ),
        click.option(
            "--input-norm",
            type=click.Choice(list(get_args(ModelConfig.model_fields["input_norm"].annotation))),
            default=None,
            help="per-crop: the client half standardises each crop first, so exposure and "
            f"contrast drop out (training, ONNX export and live inference alike) "
            f"[default: {ModelConfig.model_fields['input_norm'].default}]",
        ),
        click.option(
            "--antialias/--no-antialias",
            default=None,
            help="blur before every subsampling of the CNN (BlurPool; not FedSL's frame "
            "encoder, which refuses it), so a band a few pixels off or a softer camera moves "
            "the features less; about twice the training compute "
            f"[default: {'on' if ModelConfig.model_fields['antialias'].default else 'off'}]",
        ),
        click.option(
            "--camera-jitter",
            type=click.FloatRange(0.0, 1.0),
            default=None,
            help="chance that each of another camera's changes (tone, side light, blur, lower "
            "resolution, noise, JPEG) is applied to a training crop; 0 turns it off "
            f"[default: {CameraConfig.model_fields['p'].default}]",
        ),
        *(
            click.option(
                flag,
                type=click.FloatRange(min=0.0),
                default=None,
                help=f"{what}; one-crop algorithms only (PyVertical's parts and FedSL's row "
                f"bands refuse it) [default: {JitterConfig.model_fields[field].default}]",
            )
            for flag, (field, what) in GEOMETRY_FLAGS.items()
        ),
        click.option(
            "--syncs-per-round",
            type=click.IntRange(1, 64),
            default=None,
            help="average the devices' halves this many times per round, each device training "
            "1/N of its round in between (SL, SFLV1, SFLV2, FedAvg; others average once) "
            f"[default: {TrainConfig.model_fields['syncs_per_round'].default}]",
        ),
        click.option(
            "--warmup-rounds",
            type=click.IntRange(0, 100),
            default=None,
            help="rounds over which the learning rate climbs linearly to its peak before the "
            "cosine schedule; it keeps Adam's first steps from stalling a run at chance "
            f"[default: {TrainConfig.model_fields['warmup_rounds'].default}]",
        ),
        click.option(
            "--split-batch/--whole-batch",
            default=None,
            help="SFLV1, SFLV2, FedAvg: K devices share --batch-size, each stepping on 1/K of "
            "it (at least 2), so an epoch takes centralized training's number of steps; "
            "--whole-batch gives each device the whole batch "
            f"[default: {'split' if TrainConfig.model_fields['split_batch'].default else 'whole'}]",
        ),
    ]


def recipe_options(fn: F) -> F:
    return _apply(fn, recipe_option_list())


def data_options(fn: F) -> F:
    options = [
        click.option(
            "--data",
            "data",
            default="synth",
            show_default=True,
            help="synth, or a KDEF folder, a folder per class, or a FER2013 CSV",
        ),
        click.option(
            "--data-format",
            type=click.Choice(["synth", "kdef", "folder", "fer2013", "clips"]),
            help="force the format instead of detecting it from the path",
        ),
        click.option(
            "--partition",
            default=None,
            help="subject (default with subject ids), iid, or dirichlet:ALPHA",
        ),
        click.option(
            "--split",
            type=click.Choice(["subject", "random"]),
            default=None,
            help="test split; subject (default with ids) keeps people out of training",
        ),
        click.option("--seed", type=int, default=0, show_default=True, help="run seed"),
        click.option("--batch-size", type=int, default=32, show_default=True),
        click.option("--lr", type=float, default=2e-3, show_default=True),
        click.option("--local-epochs", type=int, default=1, show_default=True),
        *recipe_option_list(),
        click.option(
            "--cut",
            type=int,
            default=2,
            show_default=True,
            help="conv blocks on the device; a defence's own cut overrides it (`recommended`, "
            f"the default for sl, sflv1 and sflv2: {DEFENCES[DEFAULT_DEFENCE].cut})",
        ),
        click.option(
            "--compression",
            type=click.Choice(["fp32", "fp16", "int8"]),
            default="fp32",
            show_default=True,
            help="activations on the wire",
        ),
        click.option(
            "--aggregation",
            type=click.Choice(["mean", "trimmed-mean", "median"]),
            default="mean",
            show_default=True,
            help="how client (and SFLV1/FedAvg server) halves are combined",
        ),
        click.option(
            "--trim-ratio",
            type=float,
            default=0.2,
            show_default=True,
            help="trimmed-mean: share of copies cut at each end",
        ),
        click.option(
            "--clip-update-norm",
            type=float,
            default=None,
            help="clip each device's update to this L2 norm before combining",
        ),
        click.option(
            "--sflv2-order",
            type=click.Choice(SFLV2_ORDERS),
            default=TrainConfig.model_fields["sflv2_order"].default,
            show_default=True,
            help="SFLV2's server schedule: batches of all clients shuffled together, the "
            "clients one after another in random order (the paper's), or lockstep: the "
            "clients' i-th batches together, one server step on their mean gradient",
        ),
        *server_option_list(defaults=True),
        click.option(
            "--init-from",
            type=click.Path(path_type=Path, exists=True),
            default=None,
            help="start both halves from this checkpoint (e.g. pretrained by `simulate --algo "
            "centralized --data PUBLIC_SET`); its architecture is used, and the cut, input "
            "shape and classes must match",
        ),
        click.option(
            "--synth-identities",
            type=int,
            default=80,
            show_default=True,
            help="people in the synthetic set",
        ),
        click.option(
            "--frames",
            type=int,
            default=None,
            help="fedsl: time steps per sequence; on still images FedSL reads row bands (top "
            "to bottom) as time steps, as its paper does with sequential MNIST [default: 4]",
        ),
        click.option(
            "--segments", type=int, default=None, help="fedsl: devices per client group [2]"
        ),
        click.option(
            "--views",
            default=None,
            help="KDEF: camera angles as PyVertical data owners, e.g. S,HL,HR (owner k holds "
            "view k of each record: session + subject + emotion); other algorithms train on "
            "the pictures of these angles",
        ),
        click.option(
            "--threads",
            type=int,
            default=1,
            show_default=True,
            help="torch CPU threads; 1 is fastest for this small network on a busy CPU",
        ),
        click.option("-v", "--verbose", is_flag=True),
    ]
    return _apply(fn, options)


def defence_options(fn: F) -> F:
    """What `simulate` lets leave the devices: the defence (default: `default_defence`)."""
    return _defence_options(fn, DEFAULT_HELP)


def compare_defence_options(fn: F) -> F:
    """`compare` runs every algorithm as it is unless a defence is named: a fair comparison."""
    return _defence_options(fn, "none; a named one applies to sl, sflv1 and sflv2 only")


def _defence_options(fn: F, default_help: str) -> F:
    fn = click.option(
        "--shape",
        type=click.Choice(["standard", "u"]),
        default=None,
        help="u: U-shaped split, the device keeps the classifier head and the labels (sl, "
        "sflv1, sflv2) [default: standard]",
    )(fn)
    return click.option(
        "--defence",
        type=click.Choice(list(DEFENCES)),
        default=None,
        help=f"device-side defence of the smashed data (splitfed/defences.py) "
        f"[default: {default_help}]",
    )(fn)


def evaluation_options(fn: F) -> F:
    """How `simulate` and `compare` score a run: cross-validation and the domain-shift proxy."""
    fn = click.option(
        "--shift/--no-shift",
        default=True,
        show_default=True,
        help="also score the final model on the domain-shift proxy (other crop scale, camera "
        "noise, blur, JPEG, lighting); one-crop algorithms",
    )(fn)
    return click.option(
        "--folds",
        type=int,
        default=None,
        help="K-fold cross-validation by person: K runs, each person tested once; "
        "metrics.json gains folds and cv (mean and std)",
    )(fn)


def jobs_option(fn: F) -> F:
    """`--jobs N` of `simulate` and `compare` (aggregator.jobs.run_tasks)."""
    return click.option(
        "--jobs",
        "parallel",
        type=click.IntRange(1, 64, clamp=True),
        default=1,
        show_default=True,
        help="runs at once (with --folds, each fold is a run), each in its own process with "
        "--threads torch threads; the numbers are those of --jobs 1 (on 2 cores, --jobs 2 "
        "takes about half the time)",
    )(fn)


def quiet_simulation(verbose: bool) -> None:
    """In-process clients join in a blink; their join lines are noise unless asked for."""
    if not verbose:
        logging.getLogger("splitfed.server").setLevel(logging.WARNING)


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))


def load_data(
    data: str, data_format: str | None, identities: int, views: str | None = None
) -> EmotionDataset:
    if views:
        from splitfed.data.views import load_views, parse_views

        return load_views(data, parse_views(views), progress=True)
    if data == "synth" or data_format == "synth":
        from splitfed.data.synth import SynthConfig, generate_synth

        ds = generate_synth(SynthConfig(identities=identities))
        log.info(
            "synthetic eye-region set: %d pictures of %d synthetic people (not real faces)",
            len(ds),
            identities,
        )
        return ds
    from splitfed.data.loaders import load_dataset

    return load_dataset(data, data_format=data_format, progress=True)


def make_configs(kw: dict[str, Any], ds: EmotionDataset) -> tuple[ModelConfig, TrainConfig]:
    """The network and training settings of the options; `--init-from` brings its network."""
    try:
        norm, antialias = kw.get("input_norm"), kw.get("antialias")
        if kw.get("init_from") is not None:
            # The checkpoint's architecture (widths, bottleneck, input norm, anti-aliasing); the
            # data's shape and --cut stay this run's, so a mismatch is named when the weights
            # are loaded.
            saved = read_model_config(checkpoint_file(kw["init_from"]))
            if norm is not None and norm != saved.input_norm:
                raise UserError(
                    f"--input-norm {norm}: {kw['init_from']} was trained with "
                    f"{saved.input_norm}; leave --input-norm out to keep it"
                )
            if antialias is not None and antialias != saved.antialias:
                flag = "--antialias" if antialias else "--no-antialias"
                raise UserError(
                    f"{flag}: {kw['init_from']} was trained "
                    f"{'with' if saved.antialias else 'without'} it; leave {flag} out to keep "
                    "the checkpoint's"
                )
            model = saved.model_copy(update={"input_shape": ds.input_shape, "cut": kw["cut"]})
        else:
            extra: dict[str, Any] = {} if norm is None else {"input_norm": norm}
            if antialias is not None:
                extra["antialias"] = antialias
            model = ModelConfig(input_shape=ds.input_shape, cut=kw["cut"], **extra)
        if kw.get("shape"):
            model = model.model_copy(update={"shape": kw["shape"]})
        train = TrainConfig(
            batch_size=kw["batch_size"],
            lr=kw["lr"],
            local_epochs=kw["local_epochs"],
            compression=kw["compression"],
            sflv2_order=kw.get("sflv2_order", TrainConfig.model_fields["sflv2_order"].default),
        )
        for key in ("syncs_per_round", "warmup_rounds", "split_batch"):
            if kw.get(key) is not None:
                train = train.model_copy(update={key: kw[key]})
        if kw.get("camera_jitter") is not None:
            train = train.with_camera(kw["camera_jitter"])
        for flag, (key, value) in geometry_settings(kw).items():
            if value is None:
                continue
            try:
                train = train.with_geometry(**{key: value})
            except ValidationError as e:
                raise UserError(f"{flag}: {e.errors()[0]['msg']}") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "--cut"
        raise UserError(f"bad setting {where}: {first['msg']}") from None
    return model, train


def make_aggregation(kw: dict[str, Any]) -> AggregationConfig:
    try:
        return AggregationConfig(
            method=kw["aggregation"],
            trim_ratio=kw["trim_ratio"],
            clip_update_norm=kw["clip_update_norm"],
            server_opt=kw.get("server_opt", "none"),
            server_lr=kw.get("server_lr"),
            server_momentum=kw.get("server_momentum", 0.9),
        )
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise UserError(f"bad setting {where}: {first['msg']}") from None


def round_progress(
    runs: list[tuple[int, str]],
) -> tuple[Progress, list[Callable[[dict[str, Any]], None]]]:
    """One progress bar per run (its number of rounds, its label) and each run's callback."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )

    def callback(total: int, label: str) -> Callable[[dict[str, Any]], None]:
        task = progress.add_task(label, total=total)

        def on_round(row: dict[str, Any]) -> None:
            desc = f"{label}  loss {row['train_loss']:.3f}  test acc {row['test_accuracy']:.1%}"
            progress.update(task, advance=1, description=desc)

        return on_round

    return progress, [callback(total, label) for total, label in runs]


COLUMNS = ["algo", "clients", "train acc", "test acc", "macro-F1", "wall s", "MB/round"]


def result_row(m: dict[str, Any]) -> list[str]:
    """One table row; a cross-validated run shows mean ± std over its folds."""
    cv = m.get("cv")

    def pct(key: str) -> str:
        if cv is None:
            return f"{m['final'][key]:.1%}"
        return f"{cv[key + '_mean']:.1%} ± {100 * cv[key + '_std']:.1f}"

    f1 = f"{m['final']['macro_f1']:.3f}"
    if cv is not None:
        f1 = f"{cv['macro_f1_mean']:.3f} ± {cv['macro_f1_std']:.3f}"
    return [
        m["algo"] + (" pretrained" if m.get("data", {}).get("init_from") else ""),
        str(m["clients"]),
        pct("train_accuracy"),
        pct("test_accuracy"),
        f1,
        f"{m['wall_seconds']:.1f}",
        f"{m['comm']['train_bytes_per_round'] / 1e6:.2f}",
    ]


def run_label(m: dict[str, Any]) -> str:
    name = m["algo"] + (" pretrained" if m.get("data", {}).get("init_from") else "")
    return name if m["algo"] == "centralized" else f"{name} x{m['clients']}"


def still_rising(m: dict[str, Any], points: float = 0.02) -> bool:
    """Whether the test curve still climbs at the end: the last two rounds' mean beats the two
    before by more than `points` (then more rounds would change the ranking)."""
    acc = [r["test_accuracy"] for r in m["rounds"]]
    return len(acc) >= 4 and (acc[-1] + acc[-2]) / 2 - (acc[-3] + acc[-4]) / 2 > points


def verdict(results: list[dict[str, Any]]) -> list[str]:
    """Which run is best at each client count and by how much, and which still rise."""
    lines: list[str] = []
    central = [m for m in results if m["algo"] == "centralized"]
    for n in sorted({m["clients"] for m in results if m["algo"] != "centralized"}):
        runs = sorted(
            (m for m in results if m["algo"] != "centralized" and m["clients"] == n),
            key=lambda m: -m["final"]["test_accuracy"],
        )
        best = runs[0]
        acc = best["final"]["test_accuracy"]
        line = f"Best at {n} clients: **{run_label(best)}**, {acc:.1%}"
        if len(runs) > 1:
            lead = 100 * (acc - runs[1]["final"]["test_accuracy"])
            line += f", {lead:.1f} points ahead of {run_label(runs[1])}"
        if central:
            gap = 100 * (acc - central[0]["final"]["test_accuracy"])
            line += f"; {gap:+.1f} points against centralized"
        lines.append(line + ".")
    rising = [run_label(m) for m in results if still_rising(m)]
    if rising:
        lines.append(
            f"Still rising at the last round (more rounds may change the ranking): "
            f"{', '.join(rising)}."
        )
    elif results and len(results[0]["rounds"]) >= 4:
        lines.append(
            "Every run's test accuracy is flat over its last rounds. Under the cosine schedule "
            "(the default) that holds at any number of rounds, so only a run with more rounds "
            "shows whether they would help."
        )
    return lines


def print_table(results: list[dict[str, Any]]) -> None:
    table = Table(
        title="results (test = people never seen in training)"
        if results and str(results[0]["data"].get("split", "")).startswith("subject")
        else "results"
    )
    for c in COLUMNS:
        table.add_column(c, justify="left" if c == "algo" else "right")
    for m in results:
        table.add_row(*result_row(m))
    Console().print(table)
