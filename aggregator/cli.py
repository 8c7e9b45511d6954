"""`aggregator`: simulate, compare, prepare, serve."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from splitfed.cliutil import user_errors
from splitfed.config import TrainConfig
from splitfed.data.dataset import EmotionDataset
from splitfed.errors import UserError
from splitfed.model import ModelConfig

F = TypeVar("F", bound=Callable[..., Any])
console = Console(stderr=True)
log = logging.getLogger("aggregator")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
        force=True,
    )


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
            type=click.Choice(["synth", "kdef", "folder", "fer2013"]),
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
        click.option(
            "--cut", type=int, default=2, show_default=True, help="conv blocks on the device"
        ),
        click.option(
            "--compression",
            type=click.Choice(["fp32", "fp16", "int8"]),
            default="fp32",
            show_default=True,
            help="activations on the wire",
        ),
        click.option(
            "--synth-identities",
            type=int,
            default=80,
            show_default=True,
            help="people in the synthetic set",
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
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def quiet_simulation(verbose: bool) -> None:
    """In-process clients join in a blink; their join lines are noise unless asked for."""
    if not verbose:
        logging.getLogger("splitfed.server").setLevel(logging.WARNING)


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))


def load_data(data: str, data_format: str | None, identities: int) -> EmotionDataset:
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
    try:
        model = ModelConfig(input_shape=ds.input_shape, cut=kw["cut"])
        train = TrainConfig(
            batch_size=kw["batch_size"],
            lr=kw["lr"],
            local_epochs=kw["local_epochs"],
            compression=kw["compression"],
        )
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "--cut"
        raise UserError(f"bad setting {where}: {first['msg']}") from None
    return model, train


def round_progress(total: int, label: str) -> tuple[Progress, Callable[[dict[str, Any]], None]]:
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task = progress.add_task(label, total=total)

    def on_round(row: dict[str, Any]) -> None:
        progress.update(
            task,
            advance=1,
            description=(
                f"{label}  loss {row['train_loss']:.3f}  test acc {row['test_accuracy']:.1%}"
            ),
        )

    return progress, on_round


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Aggregator of splitfed-edge: trains the server half and averages the federation."""


@main.command()
@click.option(
    "--algo", required=True, help="centralized, fedavg, sl, sflv1, sflv2, pyvertical, fedsl"
)
@click.option("--clients", type=int, default=2, show_default=True)
@click.option("--rounds", type=int, default=15, show_default=True)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("runs/simulate"),
    show_default=True,
)
@data_options
@user_errors
def simulate(algo: str, clients: int, rounds: int, out_dir: Path, **kw: Any) -> None:
    """Run one algorithm in-process on the same code the MQTT deployment runs."""
    from splitfed.simulate import SimSpec, algorithm_names
    from splitfed.simulate import simulate as run_sim

    setup_logging(kw["verbose"])
    quiet_simulation(kw["verbose"])
    set_threads(kw["threads"])
    if algo not in algorithm_names():
        raise UserError(f"unknown algorithm {algo!r}: choose from {', '.join(algorithm_names())}")
    ds = load_data(kw["data"], kw["data_format"], kw["synth_identities"])
    model, train = make_configs(kw, ds)
    spec = SimSpec(
        algo, clients, rounds, kw["seed"], kw["partition"], kw["split"], model, train, out_dir
    )
    progress, on_round = round_progress(rounds, f"{algo} x{clients}")
    with progress:
        metrics = run_sim(ds, spec, on_round)
    print_table([metrics])
    console.print(f"wrote {out_dir}/metrics.json, curves.png, confusion.png, checkpoint/")


@main.command()
@click.option(
    "--algos", default="centralized,fedavg,sl,sflv1,sflv2,pyvertical,fedsl", show_default=True
)
@click.option("--clients", "clients_list", default="2,5,10", show_default=True)
@click.option("--rounds", type=int, default=15, show_default=True)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("runs/compare"),
    show_default=True,
)
@data_options
@user_errors
def compare(algos: str, clients_list: str, rounds: int, out_dir: Path, **kw: Any) -> None:
    """Run several algorithms and client counts on one split; write a table and a plot."""
    from splitfed.metrics import plot_comparison
    from splitfed.simulate import SimSpec, algorithm_names
    from splitfed.simulate import simulate as run_sim

    setup_logging(kw["verbose"])
    quiet_simulation(kw["verbose"])
    set_threads(kw["threads"])
    names = [a.strip() for a in algos.split(",") if a.strip()]
    unknown = [a for a in names if a not in algorithm_names()]
    if unknown:
        raise UserError(
            f"unknown algorithm(s) {', '.join(unknown)}: choose from {', '.join(algorithm_names())}"
        )
    try:
        counts = [int(c) for c in clients_list.split(",") if c.strip()]
    except ValueError:
        raise UserError(
            f"--clients takes numbers separated by commas, got {clients_list!r}"
        ) from None
    ds = load_data(kw["data"], kw["data_format"], kw["synth_identities"])
    model, train = make_configs(kw, ds)
    results: list[dict[str, Any]] = []
    jobs = [(a, n) for n in counts for a in names if not (a == "centralized" and n != counts[0])]
    for a, n in jobs:
        sub = out_dir / f"{a}-{n}" if a != "centralized" else out_dir / "centralized"
        spec = SimSpec(a, n, rounds, kw["seed"], kw["partition"], kw["split"], model, train, sub)
        progress, on_round = round_progress(rounds, f"{a} x{n}" if a != "centralized" else a)
        with progress:
            results.append(run_sim(ds, spec, on_round))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_results(results, out_dir)
    plot_comparison(results, out_dir / "comparison.png")
    print_table(results)
    console.print(f"wrote {out_dir}/results.md, results.csv, comparison.png")


COLUMNS = ["algo", "clients", "train acc", "test acc", "macro-F1", "wall s", "MB/round"]


def result_row(m: dict[str, Any]) -> list[str]:
    return [
        m["algo"],
        str(m["clients"]),
        f"{m['final']['train_accuracy']:.1%}",
        f"{m['final']['test_accuracy']:.1%}",
        f"{m['final']['macro_f1']:.3f}",
        f"{m['wall_seconds']:.1f}",
        f"{m['comm']['train_bytes_per_round'] / 1e6:.2f}",
    ]


def print_table(results: list[dict[str, Any]]) -> None:
    table = Table(
        title="results (test = people never seen in training)"
        if results and results[0]["data"].get("split") == "subject"
        else "results"
    )
    for c in COLUMNS:
        table.add_column(c, justify="left" if c == "algo" else "right")
    for m in results:
        table.add_row(*result_row(m))
    Console().print(table)


def write_results(results: list[dict[str, Any]], out_dir: Path) -> None:
    data = results[0]["data"]
    lines = [
        f"# Comparison on `{data['name']}`"
        + (" (synthetic eye regions, not real faces)" if data.get("synthetic") else ""),
        "",
        f"Split: **{data['split']}** ({data['n_train']} train / {data['n_test']} test pictures); "
        f"partition among clients: **{data.get('partition', '-')}**; "
        f"rounds: {len(results[0]['rounds'])}; seed {results[0]['seed']}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|",
    ]
    lines += ["| " + " | ".join(result_row(m)) + " |" for m in results]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "algo",
                "clients",
                "train_accuracy",
                "test_accuracy",
                "macro_f1",
                "wall_seconds",
                "train_bytes_per_round",
                "bytes_up",
                "bytes_down",
            ]
        )
        for m in results:
            w.writerow(
                [
                    m["algo"],
                    m["clients"],
                    m["final"]["train_accuracy"],
                    m["final"]["test_accuracy"],
                    m["final"]["macro_f1"],
                    m["wall_seconds"],
                    m["comm"]["train_bytes_per_round"],
                    m["comm"]["bytes_up"],
                    m["comm"]["bytes_down"],
                ]
            )


@main.command()
@click.argument("path")
@click.option("--data-format", type=click.Choice(["synth", "kdef", "folder", "fer2013"]))
@click.option("--all-angles", is_flag=True, help="KDEF: keep the profile and half-profile pictures")
@click.option("-v", "--verbose", is_flag=True)
@user_errors
def prepare(path: str, data_format: str | None, all_angles: bool, verbose: bool) -> None:
    """Detect faces and cache eye-region crops ahead of training; print counts."""
    from splitfed.data.loaders import prepare as run_prepare
    from splitfed.data.loaders import render_report

    setup_logging(verbose)
    _, report = run_prepare(path, data_format=data_format, progress=True, all_angles=all_angles)
    Console().print(render_report(report))


def _register_optional() -> None:
    # Commands whose modules are optional at import time (serve needs the MQTT stack).
    try:
        from aggregator.serve import serve
    except ModuleNotFoundError as e:
        if e.name != "aggregator.serve":
            raise
    else:
        main.add_command(serve)


_register_optional()

if __name__ == "__main__":
    main()
