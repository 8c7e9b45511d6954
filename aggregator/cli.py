"""`aggregator`: simulate, compare, prepare, serve."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from aggregator import evaluate as evaluate_commands
from aggregator import privacy as privacy_commands
from aggregator.jobs import run_tasks
from aggregator.options import (
    COLUMNS,
    apply_recipe,
    compare_defence_options,
    console,
    data_options,
    defence_options,
    evaluation_options,
    jobs_option,
    load_data,
    make_aggregation,
    make_configs,
    print_table,
    quiet_simulation,
    result_row,
    set_threads,
    setup_logging,
    verdict,
)
from splitfed.algorithms.cnn import SMASHED_ALGORITHMS
from splitfed.cliutil import user_errors
from splitfed.config import DEFAULT_ROUNDS
from splitfed.defences import default_defence, get_defence
from splitfed.errors import UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Aggregator of splitfed-edge: trains the server half and averages the federation."""


# simulate's and compare's epochs
rounds_option = click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=None,
    help=f"rounds, each one epoch of every device's data ({DEFAULT_ROUNDS}: on 840 synthetic "
    "pictures it scored 5 points above 40, and 160 no more; BENCHMARKS.md, 'Twice the "
    f"epochs') [default: {DEFAULT_ROUNDS}, or --recipe's]",
)


def with_recipe(rounds: int | None, kw: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The rounds and options once `--recipe` has filled in what the flags left unset."""
    kw = apply_recipe({**kw, "rounds": rounds})
    return kw.pop("rounds") or DEFAULT_ROUNDS, kw


@main.command()
@click.option(
    "--algo", required=True, help="centralized, fedavg, sl, sflv1, sflv2, pyvertical, fedsl"
)
@click.option("--clients", type=int, default=2, show_default=True)
@rounds_option
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("runs/simulate"),
    show_default=True,
)
@jobs_option
@evaluation_options
@defence_options
@data_options
@user_errors
def simulate(
    algo: str,
    clients: int,
    rounds: int | None,
    out_dir: Path,
    folds: int | None,
    shift: bool,
    parallel: int,
    **kw: Any,
) -> None:
    """Run one algorithm in-process on the same code the MQTT deployment runs."""
    from splitfed.simulate import SimSpec, algorithm_names

    rounds, kw = with_recipe(rounds, kw)
    setup_logging(kw["verbose"])
    quiet_simulation(kw["verbose"])
    set_threads(kw["threads"])
    if algo not in algorithm_names():
        raise UserError(f"unknown algorithm {algo!r}: choose from {', '.join(algorithm_names())}")
    ds = load_data(kw["data"], kw["data_format"], kw["synth_identities"], kw["views"])
    model, train = make_configs(kw, ds)
    spec = SimSpec(
        algo, clients, rounds, kw["seed"], kw["partition"], kw["split"], model, train, out_dir,
        aggregation=make_aggregation(kw), report_shift=shift, init_from=kw["init_from"],
        defence=get_defence(kw["defence"] or default_defence(algo)),
        frames=kw["frames"], segments=kw["segments"],
    )  # fmt: skip
    label = f"{algo} x{clients}"
    [metrics] = run_tasks(ds, [(spec, label)], folds, parallel, kw["threads"], kw["verbose"])
    print_table([metrics])
    print_shift([metrics])
    where = "fold-*/" if folds else ""
    console.print(f"wrote {out_dir}/metrics.json, curves.png, confusion.png, {where}checkpoint/")


@main.command()
@click.option(
    "--algos", default="centralized,fedavg,sl,sflv1,sflv2,pyvertical,fedsl", show_default=True
)
@click.option("--clients", "clients_list", default="2,5,10", show_default=True)
@rounds_option
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("runs/compare"),
    show_default=True,
)
@jobs_option
@evaluation_options
@compare_defence_options
@data_options
@user_errors
def compare(
    algos: str,
    clients_list: str,
    rounds: int | None,
    out_dir: Path,
    folds: int | None,
    shift: bool,
    parallel: int,
    **kw: Any,
) -> None:
    """Run several algorithms and client counts on one split; write a table and a plot."""
    from splitfed.metrics import plot_comparison
    from splitfed.simulate import SimSpec, algorithm_names, preflight

    rounds, kw = with_recipe(rounds, kw)
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
    ds = load_data(kw["data"], kw["data_format"], kw["synth_identities"], kw["views"])
    model, train = make_configs(kw, ds)
    aggregation = make_aggregation(kw)
    defence = get_defence(kw["defence"] or "none")
    # The defence and the U-shape act on smashed data: the algorithms that send none run as
    # they are, next to the ones that do, and the output says so.
    plain = [a for a in names if a not in SMASHED_ALGORITHMS]
    if plain and (kw["defence"] not in (None, "none") or kw["shape"] == "u"):
        what = " and ".join(
            f"--{k} {kw[k]}" for k in ("shape", "defence") if kw[k] not in (None, "none")
        )
        console.print(f"{what}: for {', '.join(n for n in names if n not in plain)} only; "
                      f"{', '.join(plain)} send no smashed data and run without it")  # fmt: skip
    tasks = []
    runs = [(a, n) for n in counts for a in names if not (a == "centralized" and n != counts[0])]
    # With --init-from, each run goes from scratch and pretrained, side by side.
    starts = [None, kw["init_from"]] if kw["init_from"] is not None else [None]
    for a, n in runs:
        for init in starts:
            sub = out_dir / (f"{a}-{n}" if a != "centralized" else "centralized")
            label = f"{a} x{n}" if a != "centralized" else a
            if init is not None:
                sub, label = sub.with_name(sub.name + "-pretrained"), label + " pretrained"
            smashed = a in SMASHED_ALGORITHMS
            job_model = model if smashed else model.model_copy(update={"shape": "standard"})
            spec = SimSpec(a, n, rounds, kw["seed"], kw["partition"], kw["split"], job_model,
                           train, sub, aggregation=aggregation, report_shift=shift,
                           init_from=init, frames=kw["frames"], segments=kw["segments"],
                           defence=defence if smashed else None)  # fmt: skip
            tasks.append((spec, label))
    for spec, label in tasks:  # every refusal before the first run trains
        try:
            preflight(ds, spec)
        except UserError as e:
            raise UserError(f"{label}: {e} (or leave {spec.algo} out of --algos)") from None
    results = run_tasks(ds, tasks, folds, parallel, kw["threads"], kw["verbose"])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_results(results, out_dir)
    plot_comparison(results, out_dir / "comparison.png")
    print_table(results)
    print_shift(results)
    for line in verdict(results):
        console.print(line.replace("**", ""))
    console.print(f"wrote {out_dir}/results.md, results.csv, comparison.png")


def print_shift(results: list[dict[str, Any]]) -> None:
    """In-domain against domain-shift accuracy, for the runs that measured it."""
    for m in results:
        f = m["final"]
        if "shift_accuracy" in f:
            console.print(
                f"{m['algo']} x{m['clients']}: domain-shift proxy {f['shift_accuracy']:.1%} "
                f"against {f['in_domain_accuracy']:.1%} in domain (gap {f['shift_gap']:+.1%})"
            )
        if "tta_shift_accuracy" in f:
            console.print(
                f"  with test-time averaging (evaluate/predict --tta): "
                f"{f['tta_shift_accuracy']:.1%} shifted, "
                f"{f['tta_in_domain_accuracy']:.1%} in domain"
            )


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
    lines += ["", *verdict(results)]
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
                "test_accuracy_std",
                "shift_accuracy",
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
                    m["cv"]["test_accuracy_std"] if "cv" in m else "",
                    m["final"].get("shift_accuracy", ""),
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
        from aggregator.fed_server import fed_server

        main.add_command(fed_server)


_register_optional()
main.add_command(evaluate_commands.evaluate)
main.add_command(evaluate_commands.predict)
main.add_command(privacy_commands.privacy_report)

if __name__ == "__main__":
    main()
