"""`aggregator privacy-report`: play the honest-but-curious aggregator and measure the leakage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from aggregator.options import console, load_data, set_threads, setup_logging
from splitfed.cliutil import user_errors
from splitfed.defences import DEFENCES, get_defence


def _table(report: dict[str, Any]) -> Table:
    title = "leakage to the aggregator (victims: people nobody trained on)"
    if report.get("synthetic"):
        title += "; synthetic eye regions"
    table = Table(title=title)
    columns = ["setting", "test acc", "SSIM", "base", "PSNR", "re-id", "orig", "chance", "B/smp"]
    for c in columns:
        table.add_column(c, justify="left" if c == "setting" else "right")
    for s in report["settings"]:
        acc = s["test_accuracy"]
        table.add_row(
            s["name"],
            "-" if acc is None else f"{acc:.1%}",
            f"{s['ssim']:.3f}",
            f"{s['ssim_baseline']:.3f}",
            f"{s['psnr']:.1f}",
            f"{s['reid']:.0%}",
            f"{s['reid_originals']:.0%}",
            f"{s['reid_chance']:.0%}",
            f"{s['bytes_per_sample']:.0f}",
        )
    return table


@click.command("privacy-report")
@click.option(
    "--checkpoint",
    "checkpoint",
    required=True,
    type=click.Path(path_type=Path),
    help="a run's --out directory, its checkpoint/ or its model.safetensors (simulate or serve)",
)
@click.option(
    "--data", default="synth", show_default=True, help="the data set the run was trained on"
)
@click.option("--data-format", type=click.Choice(["synth", "kdef", "folder", "fer2013"]))
@click.option(
    "--synth-identities", type=int, default=80, show_default=True, help="people in the synth set"
)
@click.option(
    "--defence",
    "defences",
    multiple=True,
    help=f"settings to compare besides none (repeatable): {', '.join(DEFENCES)}",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("runs/privacy"),
    show_default=True,
    help="privacy.json, reconstructions.png, and settings/ for runs trained here",
)
@click.option(
    "--attack-epochs", type=int, default=60, show_default=True, help="most decoder epochs"
)
@click.option(
    "--attack-width", type=int, default=32, show_default=True, help="decoder's last-stage width"
)
@click.option(
    "--inversion-steps",
    type=int,
    default=100,
    show_default=True,
    help="steps of the optimisation attack (0: decoder only)",
)
@click.option(
    "--no-train",
    is_flag=True,
    help="only measure settings the checkpoint was trained with; never train one",
)
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads")
@click.option("-v", "--verbose", is_flag=True)
@user_errors
def privacy_report(
    checkpoint: Path,
    data: str,
    data_format: str | None,
    synth_identities: int,
    defences: tuple[str, ...],
    out_dir: Path,
    attack_epochs: int,
    attack_width: int,
    inversion_steps: int,
    no_train: bool,
    threads: int,
    verbose: bool,
) -> None:
    """Reconstruct held-out people's eye regions from what the devices send, and score it."""
    from pydantic import ValidationError

    from splitfed.errors import UserError
    from splitfed.privacy.attack import AttackConfig
    from splitfed.privacy.report import privacy_report as run_report
    from splitfed.privacy.report import read_checkpoint

    setup_logging(verbose)
    set_threads(threads)
    names = list(defences) or ["recommended"]
    for name in names:
        get_defence(name)  # unknown names fail before any work
    run = read_checkpoint(checkpoint)
    try:
        attack = AttackConfig(
            epochs=attack_epochs,
            width=attack_width,
            inversion_steps=inversion_steps,
            seed=run.setup.seed,
        )
    except ValidationError as e:
        first = e.errors()[0]
        raise UserError(f"bad attack setting {first['loc'][0]}: {first['msg']}") from None
    ds = load_data(data, data_format, synth_identities)
    report = run_report(ds, run, names, out_dir, attack, allow_training=not no_train)
    Console(width=max(Console().width, 100)).print(_table(report))
    seen = report["without_attack"]
    Console().print(
        f"without any attack the aggregator sees: labels on the wire "
        f"{'yes' if seen['labels_on_wire'] else 'no'}; "
        f"{seen['bytes_per_sample']:.0f} bytes per sample; "
        f"holds the client weights {'yes' if seen['holds_client_weights'] else 'no'}"
    )
    console.print(f"wrote {out_dir}/privacy.json, reconstructions.png")
