"""`sfl-export`: a checkpoint's client half to ONNX fp32 and calibrated int8, with a manifest."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

from splitfed.data.dataset import EmotionDataset
from splitfed.errors import UserError
from splitfed.model import ModelConfig

log = logging.getLogger("export")


def _data(
    source: str, data_format: str | None, identities: int, cfg: ModelConfig
) -> EmotionDataset:
    """The data set that calibrates int8 and measures parity, cropped as the model expects."""
    c, h, w = cfg.input_shape
    if source == "synth" or data_format == "synth":
        from splitfed.data.synth import SynthConfig, generate_synth

        if c != 1:
            raise UserError(
                f"the checkpoint takes {c}-channel crops and the synthetic set is grayscale: "
                "pass --calibration PATH with data cropped in colour"
            )
        log.info("calibrating on the synthetic set (%d people); real crops calibrate better",
                 identities)  # fmt: skip
        return generate_synth(SynthConfig(identities=identities, height=h, width=w))
    from splitfed.data.crop import CropConfig
    from splitfed.data.loaders import load_dataset

    crop = CropConfig(height=h, width=w, grayscale=c == 1)
    ds = load_dataset(source, data_format=data_format, crop=crop, progress=True)
    if ds.input_shape != tuple(cfg.input_shape):
        raise UserError(
            f"{source}: crops are {ds.input_shape}, the checkpoint takes {tuple(cfg.input_shape)}; "
            "prepare the data with the crop size the model was trained on"
        )
    return ds


def _checkpoint_meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    from splitfed.checkpoint import MODEL_FILE

    path = path / MODEL_FILE if path.is_dir() else path
    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata() or {})


def _training_data(checkpoint: Path) -> dict[str, Any] | None:
    """What the checkpoint says it was trained on (checkpoint.json's `data`), if it says."""
    import json

    from splitfed.checkpoint import INFO_FILE

    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    try:
        info = json.loads((folder / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None
    data = info.get("data") if isinstance(info, dict) else None
    return data if isinstance(data, dict) else None


def held_out_people(
    checkpoint: Path, ds: EmotionDataset, split: str, n_train: int, n_test: int
) -> str | None:
    """Who the parity crops are, when they are provably people the model never trained on.

    Only a subject split can say so: either of the data set the checkpoint was trained on,
    reproduced exactly (same split, same counts, so the same held-out people), or of another
    data set. Without subject ids, or when the training split cannot be matched, None: the
    manifest then reports int8 agreement only, never an accuracy that includes training people.
    """
    if split != "subject" or not ds.has_subjects:
        log.info("%s has no subject ids: parity reports int8 agreement only, no accuracy", ds.name)
        return None
    trained_on = _training_data(checkpoint)
    if trained_on is None or not trained_on.get("name"):
        log.info("%s does not say which data it was trained on: agreement only", checkpoint)
        return None
    if trained_on["name"] != ds.name:
        return f"people of {ds.name}, not the data set the model was trained on"
    same = (
        trained_on.get("split") == "subject"
        and trained_on.get("n_train") == n_train
        and trained_on.get("n_test") == n_test
    )
    if not same:
        log.warning(
            "the split of %s (%d/%d) is not the one the model was trained with (%s/%s); pass "
            "--seed and the data of the training run: parity reports agreement only",
            ds.name, n_train, n_test, trained_on.get("n_train"), trained_on.get("n_test"),
        )  # fmt: skip
        return None
    return "people never seen in training (held-out side of the training run's subject split)"


def _check_cut(cfg: ModelConfig, checkpoint: Path, cut: int | None, out: Path) -> None:
    """A checkpoint from another cut layer makes smashed data the aggregator cannot use."""
    from export.onnx import read_manifest

    if cut is not None and cut != cfg.cut:
        raise UserError(
            f"{checkpoint}: trained with cut layer {cfg.cut}, not --cut {cut}; export a "
            f"checkpoint of a --cut {cut} run, or drop --cut to export cut {cfg.cut}"
        )
    try:
        existing = read_manifest(out)
    except (OSError, ValueError):
        existing = None
    if cut is None and existing is not None and existing.get("cut") not in (None, cfg.cut):
        raise UserError(
            f"{out / 'manifest.json'} holds a cut-{existing['cut']} export and {checkpoint} has "
            f"cut {cfg.cut}; devices set up for cut {existing['cut']} would reject it: choose "
            f"another --out, or pass --cut {cfg.cut} to replace it deliberately"
        )


def _summary(manifest: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    table = Table(title=f"sfl-export {manifest['model_version']} (cut {manifest['cut']})")
    table.add_column("file")
    table.add_column("bytes", justify="right")
    table.add_column("sha256")
    for entry in manifest["files"].values():
        table.add_row(entry["path"], f"{entry['bytes']:,}", entry["sha256"][:16])
    console.print(table)
    p = manifest["parity"]
    console.print(
        f"fp32 vs torch: max |diff| {p['fp32_max_abs_diff']:.2e} (tolerance "
        f"{p['fp32_tolerance_applied']:.0e}, {p['fp32_samples']} crops)"
    )
    if "int8_top1_agreement" in p:
        line = f"int8 vs fp32: top-1 agreement {p['int8_top1_agreement']:.1%}"
        if "int8_accuracy_drop_points" in p:
            line += (
                f", accuracy {p['fp32_accuracy']:.1%} -> {p['int8_accuracy']:.1%} "
                f"(drop {p['int8_accuracy_drop_points']:.2f} points, target <= "
                f"{p['int8_accuracy_drop_target_points']:.0f}) on {p['int8_samples']} crops of "
                f"{p['accuracy_on']}"
            )
        else:
            line += (
                f" on {p['int8_samples']} held-out crops (no accuracy: these may be people "
                "the model trained on)"
            )
        console.print(line)
    console.print(f"wrote {out / 'manifest.json'}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--checkpoint",
    required=True,
    type=click.Path(path_type=Path),
    help="checkpoint directory of a training run, or its model.safetensors",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="directory for the .onnx files and manifest.json",
)
@click.option("--int8", "int8", is_flag=True, help="also write a calibrated int8 client model")
@click.option(
    "--calibration",
    default="synth",
    show_default=True,
    help="synth, or a data set path (KDEF, folder per class, FER2013 CSV): calibration "
    "crops come from its training side, parity from its held-out side",
)
@click.option(
    "--data-format",
    type=click.Choice(["synth", "kdef", "folder", "fer2013"]),
    help="force the calibration data format instead of detecting it",
)
@click.option(
    "--calibration-samples",
    type=click.IntRange(8, 100_000),
    default=256,
    show_default=True,
    help="crops used to calibrate int8",
)
@click.option(
    "--opset",
    type=click.IntRange(13, 23),
    default=18,
    show_default=True,
    help="ONNX opset (the dynamo exporter converts below 18)",
)
@click.option(
    "--full-model",
    is_flag=True,
    help="also export client+server as one model, for fully offline inference",
)
@click.option(
    "--cut",
    type=click.IntRange(1, 16),
    default=None,
    help="the cut layer the devices expect; a checkpoint with another one is refused",
)
@click.option(
    "--version",
    "model_version",
    default=None,
    help="model version for the manifest (default: ALGO-rROUND-WEIGHTSHASH)",
)
@click.option(
    "--exporter",
    type=click.Choice(["dynamo", "torchscript"]),
    default="dynamo",
    show_default=True,
    help="torch.onnx exporter",
)
@click.option(
    "--quant-format",
    type=click.Choice(["qdq", "qoperator"]),
    default="qdq",
    show_default=True,
    help="QDQ runs on every provider (TensorRT needs it)",
)
@click.option(
    "--activation",
    type=click.Choice(["uint8", "int8"]),
    default="uint8",
    show_default=True,
    help="int8 activations: symmetric, as TensorRT wants",
)
@click.option("--per-tensor", is_flag=True, help="one weight scale per tensor, not per channel")
@click.option(
    "--synth-identities",
    type=int,
    default=80,
    show_default=True,
    help="people in the synthetic set (as in training)",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="split seed (as in training, so parity uses held-out people)",
)
@click.option("-v", "--verbose", is_flag=True)
def main(
    checkpoint: Path,
    out_dir: Path,
    int8: bool,
    calibration: str,
    data_format: str | None,
    calibration_samples: int,
    opset: int,
    full_model: bool,
    cut: int | None,
    model_version: str | None,
    exporter: str,
    quant_format: str,
    activation: str,
    per_tensor: bool,
    synth_identities: int,
    seed: int,
    verbose: bool,
) -> None:
    """Export the client half of CHECKPOINT to ONNX (fp32, and int8 with --int8)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(message)s", force=True)  # fmt: skip
    try:
        _main(checkpoint, out_dir, int8, calibration, data_format, calibration_samples, opset,
              full_model, cut, model_version, exporter, quant_format, activation, per_tensor,
              synth_identities, seed)  # fmt: skip
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


def _main(
    checkpoint: Path,
    out_dir: Path,
    int8: bool,
    calibration: str,
    data_format: str | None,
    calibration_samples: int,
    opset: int,
    full_model: bool,
    cut: int | None,
    model_version: str | None,
    exporter: str,
    quant_format: str,
    activation: str,
    per_tensor: bool,
    synth_identities: int,
    seed: int,
) -> None:
    from export.onnx import ParityError, QuantConfig, export_client, weights_digest
    from splitfed.checkpoint import load_model
    from splitfed.data.dataset import default_split, train_test_split

    cfg, client, server = load_model(checkpoint)
    _check_cut(cfg, checkpoint, cut, out_dir)
    meta = _checkpoint_meta(checkpoint)
    algo, rnd = meta.get("algo", "model"), meta.get("round", "?")
    version = model_version or f"{algo}-r{rnd}-{weights_digest(client)}"
    ds = _data(calibration, data_format, synth_identities, cfg)
    split = default_split(ds)
    train, test = train_test_split(ds, split, seed=seed)
    accuracy_on = held_out_people(checkpoint, ds, split, len(train), len(test))
    calib = None
    if int8:
        rng = np.random.default_rng([seed, 0xCA1])
        n = min(calibration_samples, len(train))
        calib = train.images[np.sort(rng.choice(len(train), n, replace=False))]
    quant = QuantConfig(
        format=quant_format,  # type: ignore[arg-type]
        activation=activation,  # type: ignore[arg-type]
        symmetric_activations=activation == "int8",
        per_channel=not per_tensor,
    )
    try:
        manifest = export_client(
            client, cfg, out_dir, calibration=calib, opset=opset, server_net=server,
            full_model=full_model, eval_data=test, version=version, quant=quant,
            exporter=exporter,  # type: ignore[arg-type]
            source={"checkpoint": str(checkpoint), "algo": algo, "round": rnd,
                    "data": calibration if calibration == "synth" else str(Path(calibration)),
                    "split_seed": seed, "split": split},
            accuracy_on=accuracy_on,
        )  # fmt: skip
    except ParityError as e:
        click.echo(f"error: export failed its parity check: {e}", err=True)
        sys.exit(1)
    except OSError as e:
        raise UserError(f"cannot write to {out_dir}: {e.strerror or e}") from None
    _summary(manifest, out_dir)


if __name__ == "__main__":
    main()
