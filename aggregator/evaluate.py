"""`aggregator evaluate` and `aggregator predict`: measure a trained checkpoint on your own photos.

Training reports accuracy on its own test split; a user wants the same model scored on another
data set (photographed elsewhere, other people) and wants to see what it says about one picture.
Both commands run the two halves in one process on this machine: nothing is sent anywhere.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from splitfed.checkpoint import MODEL_FILE, load_model
from splitfed.cliutil import plain_logging, user_errors
from splitfed.data.crop import CropConfig, EyeRegionCropper, FaceDetection, crop_transform
from splitfed.data.dataset import EmotionDataset
from splitfed.data.shift import predict_probabilities
from splitfed.data.tta import average_probabilities
from splitfed.emotions import EMOTIONS, NUM_CLASSES
from splitfed.errors import UserError
from splitfed.model import ClientNet, ModelConfig, ServerNet

log = logging.getLogger("aggregator.evaluate")


@dataclass
class Model:
    """Both halves of a checkpoint, in eval mode, with the crop their input expects."""

    cfg: ModelConfig
    client: ClientNet
    server: ServerNet
    source: Path
    tta: bool = False  # average over re-placed eye bands (splitfed.data.tta)

    @property
    def crop(self) -> CropConfig:
        c, h, w = self.cfg.input_shape
        return CropConfig(height=h, width=w, grayscale=c == 1)

    def probabilities(self, crops: np.ndarray) -> np.ndarray:
        """Softmax over the emotions for uint8 (N, C, H, W) crops, as the simulator scores them
        (`splitfed.data.shift.predict_probabilities`); with `tta`, the mean over the crops'
        re-placed views."""
        if self.tta:
            return average_probabilities(self._softmax, crops)
        return self._softmax(crops)

    def _softmax(self, crops: np.ndarray) -> np.ndarray:
        return predict_probabilities(self.client, self.server, crops)


def resolve_checkpoint(path: Path) -> Path:
    """The model.safetensors of a checkpoint folder, of the run folder holding one, or itself."""
    path = path.expanduser()
    if path.is_dir():
        for candidate in (path / MODEL_FILE, path / "checkpoint" / MODEL_FILE):
            if candidate.is_file():
                return candidate
    return path


def trained_on(model: Model) -> str | None:
    """Name of the data set the checkpoint says it was trained on (checkpoint.json), if any."""
    from splitfed.checkpoint import INFO_FILE

    try:
        info = json.loads((model.source.parent / INFO_FILE).read_text())
        name = info["data"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) else None


def open_model(path: Path, tta: bool = False) -> Model:
    source = resolve_checkpoint(path)
    cfg, client, server = load_model(source)
    if cfg.num_classes != NUM_CLASSES:
        raise UserError(
            f"{source}: the model has {cfg.num_classes} classes, this project knows {NUM_CLASSES}"
        )
    client.eval()
    server.eval()
    return Model(cfg, client, server, source, tta)


# -- evaluate ------------------------------------------------------------------------------------


def confusion_of(model: Model, ds: EmotionDataset, batch_size: int = 256) -> np.ndarray:
    """Counts of (true, predicted) over every picture of `ds`, in eval mode, no augmentation."""
    if ds.input_shape != tuple(model.cfg.input_shape):
        raise UserError(
            f"{ds.name}: crops are {ds.input_shape} (C, H, W) but the model takes "
            f"{tuple(model.cfg.input_shape)}"
        )
    conf = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for s in range(0, len(ds), batch_size):
        batch = slice(s, s + batch_size)
        np.add.at(conf, (ds.labels[batch], model.probabilities(ds.images[batch]).argmax(1)), 1)
    return conf


def slug(text: str) -> str:
    """A folder name for a data set: its last path part, made safe."""
    base = Path(text.rstrip("/")).name or text
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("._") or "data"


def evaluate_sets(
    model: Model,
    sources: list[str],
    out_dir: Path,
    data_format: str | None = None,
    progress: bool = False,
    test_only: bool = False,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Score `model` on each data set; write evaluation.json and confusion.png for each.

    One data set writes into `out_dir`; several write one subfolder each, plus summary.json.
    `test_only` scores the test side of each set's default split (its own split, else by
    person with `seed` as in training), the pictures a run on that set held out.
    """
    from splitfed.data.dataset import default_split, train_test_split
    from splitfed.data.loaders import load_dataset
    from splitfed.metrics import evaluation_report, plot_confusion, write_json

    reports: list[dict[str, Any]] = []
    names: set[str] = set()
    training_set = trained_on(model)
    for source in sources:
        ds = load_dataset(source, data_format, crop=model.crop, progress=progress)
        seen = training_set == ds.name
        part = "all"
        if test_only:
            split = default_split(ds)
            ds = train_test_split(ds, split, seed=seed)[1]
            part = f"test side of the {split} split, seed {seed}"
        report = evaluation_report(confusion_of(model, ds))
        if seen and not test_only:
            log.warning(
                "%s is the data set this checkpoint was trained on: the score includes its "
                "training pictures (the run's metrics.json has the held-out score)",
                source,
            )
        name = slug(source)
        while len(sources) > 1 and name in names:
            name += "_"
        names.add(name)
        where = out_dir if len(sources) == 1 else out_dir / name
        report = {
            **report,
            "data": {
                "source": source,
                "name": ds.name,
                "format": ds.meta.get("format"),
                "synthetic": bool(ds.meta.get("synthetic", False)),
                "subjects": len(ds.subject_counts()) if ds.has_subjects else None,
                "trained_on": seen,
                "part": part,
            },
            "checkpoint": str(model.source),
            "tta": model.tta,
        }
        write_json(where / "evaluation.json", report)
        acc = report["accuracy"]
        plot_confusion(
            np.asarray(report["confusion"]),
            where / "confusion.png",
            f"{ds.name}: accuracy {acc:.1%}" if acc is not None else ds.name,
            mark_absent=True,
        )
        if report["absent_classes"]:
            log.warning(
                "%s has no pictures of %s: no recall reported for them",
                source,
                ", ".join(report["absent_classes"]),
            )
        reports.append({**report, "out": str(where)})
    if len(sources) > 1:
        write_json(
            out_dir / "summary.json",
            {
                "checkpoint": str(model.source),
                "sets": [
                    {k: r[k] for k in ("out", "n", "accuracy", "macro_f1")} | {"source": s}
                    for r, s in zip(reports, sources)
                ],
            },
        )
    return reports


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def evaluation_table(reports: list[dict[str, Any]]) -> Any:
    """One column per data set, so the seven recalls fit a terminal."""
    from rich.table import Table

    table = Table(title="evaluation (— = no pictures of that class in the data set)")
    table.add_column("")
    for r in reports:
        table.add_column(slug(r["data"]["source"]), justify="right")
    table.add_row("pictures", *(str(r["n"]) for r in reports))
    table.add_row("accuracy", *(_pct(r["accuracy"]) for r in reports))
    table.add_row(
        "macro-F1",
        *("—" if r["macro_f1"] is None else f"{r['macro_f1']:.3f}" for r in reports),
    )
    for e in EMOTIONS:
        table.add_row(f"recall {e}", *(_pct(r["per_class"][e]["recall"]) for r in reports))
    return table


TTA_OPTION = click.option(
    "--tta",
    is_flag=True,
    help="average each crop's emotion over nine placements of its eye band (test-time "
    "averaging: steadier across cameras and detectors, nine times the compute)",
)


@click.command()
@click.option(
    "--checkpoint",
    "checkpoint",
    type=click.Path(path_type=Path),
    required=True,
    help="checkpoint folder (or its model.safetensors, or the run folder holding checkpoint/)",
)
@click.option(
    "--data",
    "data",
    multiple=True,
    required=True,
    help="data set to score: synth, a KDEF folder, a folder per class or a FER2013 CSV; repeatable",
)
@click.option(
    "--data-format",
    type=click.Choice(["synth", "kdef", "folder", "fer2013"]),
    help="force the format of every --data instead of detecting it",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("runs/evaluate"),
    show_default=True,
    help="evaluation.json and confusion.png here (one subfolder per data set when several)",
)
@click.option(
    "--test-only",
    is_flag=True,
    help="score only the test side of each set's split (its own, else by person), as training",
)
@click.option("--seed", type=int, default=0, show_default=True, help="split seed, as in training")
@TTA_OPTION
@click.option("-v", "--verbose", is_flag=True)
@user_errors
def evaluate(
    checkpoint: Path,
    data: tuple[str, ...],
    data_format: str | None,
    out_dir: Path,
    test_only: bool,
    seed: int,
    tta: bool,
    verbose: bool,
) -> None:
    """Score a trained checkpoint on whole data sets: accuracy, macro-F1, recall per class.

    Every picture of each data set is scored, so use a set the model was not trained on, or
    --test-only to score the part a training run on that set held out.
    """
    from rich.console import Console

    plain_logging(verbose)
    model = open_model(checkpoint, tta)
    reports = evaluate_sets(
        model, list(data), out_dir, data_format, progress=True, test_only=test_only, seed=seed
    )
    Console().print(evaluation_table(reports))
    for r in reports:
        click.echo(f"wrote {r['out']}/evaluation.json, confusion.png", err=True)


# -- predict -------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """What the model says about one picture; `emotion` is None when no face was found."""

    file: str
    face: bool
    readable: bool = True
    emotion: str | None = None
    probabilities: dict[str, float] | None = None
    detection: FaceDetection | None = None
    band: np.ndarray | None = None  # (4, 2) corners of the eye band in image pixels

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "readable": self.readable, "face": self.face}
        if self.detection is not None:
            d = self.detection
            out.update(
                emotion=self.emotion,
                probabilities=self.probabilities,
                box=[int(v) for v in d.box],
                eyes=np.round(d.eyes, 1).tolist(),
                band=np.round(self.band, 1).tolist() if self.band is not None else None,
                detector=d.backend,
                score=round(float(d.score), 4),
            )
        return out


def band_corners(detection: FaceDetection, crop: CropConfig) -> np.ndarray:
    """The crop's four corners mapped back into the image: the band the model looked at."""
    import cv2

    inverse = cv2.invertAffineTransform(crop_transform(detection.eyes, crop))
    w, h = crop.width, crop.height
    corners = np.array([[0, 0, 1], [w, 0, 1], [w, h, 1], [0, h, 1]], dtype=np.float64)
    return corners @ inverse.T


def image_files(path: Path) -> list[Path]:
    """`path` itself, or the image files under a folder (sorted, hidden ones skipped)."""
    from splitfed.data.loaders import IMAGE_EXTENSIONS, visible_files

    if path.is_file():
        return [path]
    if path.is_dir():
        return [f for f in visible_files(path) if f.suffix.lower() in IMAGE_EXTENSIONS]
    raise UserError(f"no such file or folder: {path}")


def predict_image(
    model: Model, cropper: EyeRegionCropper, image: np.ndarray | None, name: str
) -> Prediction:
    if image is None:
        return Prediction(name, face=False, readable=False)
    crop, detection = cropper.crop_with_detection(image)
    if crop is None or detection is None:
        return Prediction(name, face=False)
    probs = model.probabilities(crop[None])[0]
    return Prediction(
        name,
        face=True,
        emotion=EMOTIONS[int(probs.argmax())],
        probabilities={e: round(float(p), 4) for e, p in zip(EMOTIONS, probs)},
        detection=detection,
        band=band_corners(detection, cropper.config),
    )


def annotate(image: np.ndarray, pred: Prediction) -> np.ndarray:
    """The frame with the face box (green), the eye band (yellow) and the label drawn on it."""
    import cv2

    out = image.copy() if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    scale = max(out.shape[:2]) / 640
    thick = max(1, round(2 * scale))
    if pred.detection is None:
        text, origin = "no face", (10, max(20, round(30 * scale)))
    else:
        x, y, w, h = pred.detection.box
        cv2.rectangle(out, (x, y), (x + w, y + h), (0, 200, 0), thick, cv2.LINE_AA)
        if pred.band is not None:
            cv2.polylines(out, [np.int32(np.round(pred.band))], True, (0, 220, 255), thick)
        p = (pred.probabilities or {}).get(pred.emotion or "", 0.0)
        top = min(y, int(pred.band[:, 1].min())) if pred.band is not None else y
        text, origin = f"{pred.emotion} {p:.0%}", (x, max(15, top - round(8 * scale)))
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(out, text, origin, font, 0.8 * scale, (0, 0, 0), thick + 2, cv2.LINE_AA)
    cv2.putText(out, text, origin, font, 0.8 * scale, (255, 255, 255), thick, cv2.LINE_AA)
    return out


def predict_paths(
    model: Model, paths: list[Path], annotate_dir: Path | None = None
) -> list[Prediction]:
    """Detect, crop and classify every image; with `annotate_dir`, save the drawn frames."""
    import cv2

    from splitfed.data.loaders import read_image

    preds: list[Prediction] = []
    with EyeRegionCropper(model.crop) as cropper:
        for path in paths:
            image = read_image(path)
            pred = predict_image(model, cropper, image, str(path))
            preds.append(pred)
            if annotate_dir is not None and image is not None:
                annotate_dir.mkdir(parents=True, exist_ok=True)
                target = annotate_dir / f"{path.stem}.jpg"
                if not cv2.imwrite(str(target), annotate(image, pred)):
                    raise UserError(f"cannot write {target}")
    return preds


def prediction_line(pred: Prediction, top: int = 3) -> str:
    if not pred.readable:
        return f"{pred.file}: not a readable image"
    if not pred.face:
        return f"{pred.file}: no face found"
    probs = sorted((pred.probabilities or {}).items(), key=lambda kv: -kv[1])[:top]
    rest = ", ".join(f"{e} {p:.0%}" for e, p in probs)
    return f"{pred.file}: {pred.emotion}  ({rest})"


@click.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.option(
    "--checkpoint",
    "checkpoint",
    type=click.Path(path_type=Path),
    required=True,
    help="checkpoint folder (or its model.safetensors, or the run folder holding checkpoint/)",
)
@click.option("--json", "as_json", is_flag=True, help="one JSON object per image on stdout")
@click.option(
    "--annotate",
    "annotate_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="save each frame with the face box, eye band and label drawn, as DIR/<name>.jpg",
)
@TTA_OPTION
@click.option("-v", "--verbose", is_flag=True)
@user_errors
def predict(
    target: Path,
    checkpoint: Path,
    as_json: bool,
    annotate_dir: Path | None,
    tta: bool,
    verbose: bool,
) -> None:
    """Classify the emotion in one photo or every photo of a folder (TARGET).

    Finds the face, crops the eye region as training did and prints the emotion with its
    probability; a photo without a face is reported as such.
    """
    plain_logging(verbose)
    model = open_model(checkpoint, tta)
    files = image_files(target.expanduser())
    if not files:
        raise UserError(f"no image files in {target}")
    preds = predict_paths(model, files, annotate_dir)
    for pred in preds:
        click.echo(json.dumps(pred.to_json()) if as_json else prediction_line(pred))
    faces = sum(p.face for p in preds)
    log.info("%d image(s), %d with a face", len(preds), faces)
    if annotate_dir is not None:
        click.echo(f"annotated frames in {annotate_dir}", err=True)
