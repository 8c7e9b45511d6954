"""The privacy report: how much of a face the aggregator can rebuild from what it receives.

For each defence setting the report takes the trained client half (the checkpoint's when the
setting is the one it was trained with, otherwise trained again with the defence on the same
data and split), plays the honest-but-curious aggregator against the run's held-out people and
scores the reconstructions against the no-information baseline and by re-identification.

People: the victims are the run's test people (never trained on, by the model or by the
attacker); the attacker's auxiliary set is the run's training people, split by person into its
own training and validation people.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splitfed.checkpoint import INFO_FILE, MODEL_FILE, load_model
from splitfed.config import TrainConfig
from splitfed.data.dataset import EmotionDataset, train_test_split
from splitfed.defences import DefenceConfig, get_defence
from splitfed.errors import UserError
from splitfed.model import ClientNet, ModelConfig
from splitfed.privacy.attack import (
    AttackConfig,
    invert,
    pixels,
    train_decoder,
    wire_activations,
)
from splitfed.privacy.metrics import baseline_ssim, gallery_split, psnr, reidentify, ssim
from splitfed.privacy.train import SPLIT_ALGORITHMS, RunSetup, train_setting
from splitfed.wire import Compression

log = logging.getLogger(__name__)

AUX_KEY = 0xA11  # noise keys of the attacker's own pictures
VICTIM_SECRET = 0xD1CE  # stands for the device secret the attacker does not know
SHOWN = 8  # victims in reconstructions.png


@dataclass
class People:
    """Who is who: the attacker's training and validation people, and the victims."""

    aux_train: EmotionDataset
    aux_val: EmotionDataset
    victims: EmotionDataset


def attack_people(data: EmotionDataset, seed: int, val_fraction: float = 0.2) -> People:
    """The run's subject split; its training people become the attacker's auxiliary set."""
    if data.subjects is None:
        raise UserError(
            f"privacy-report needs subject ids to keep victims out of the attacker's data, "
            f"and {data.name!r} has none"
        )
    n_people = len(np.unique(data.subjects))
    if n_people < 4:
        raise UserError(
            f"too few people for a disjoint split: {data.name!r} has {n_people}, the report "
            "needs at least 4 (2 victims, 2 auxiliary: one to train, one to validate)"
        )
    train, victims = train_test_split(data, "subject", 0.2, seed)
    assert train.subjects is not None and victims.subjects is not None
    aux_people = np.unique(train.subjects)
    if len(aux_people) < 2 or len(np.unique(victims.subjects)) < 2:
        raise UserError(
            f"too few people for a disjoint split: {len(aux_people)} auxiliary and "
            f"{len(np.unique(victims.subjects))} victims, need at least 2 of each"
        )
    rng = np.random.default_rng([seed, 0xA77])
    aux_people = aux_people[rng.permutation(len(aux_people))]
    n_val = min(len(aux_people) - 1, max(1, round(val_fraction * len(aux_people))))
    is_val = np.isin(train.subjects, aux_people[:n_val])
    return People(
        train.subset(np.flatnonzero(~is_val), f"{data.name}:aux"),
        train.subset(np.flatnonzero(is_val), f"{data.name}:aux-val"),
        victims,
    )


@dataclass
class Leakage:
    """Scores of the stronger attack on the victims' crops."""

    ssim: float
    ssim_baseline: float
    psnr: float
    reid: float
    reid_originals: float
    reid_chance: float
    bytes_per_sample: float
    attack: str
    ssim_decoder: float
    ssim_inversion: float | None
    decoder_epochs: int
    victims: int
    queries: int
    originals: np.ndarray = field(repr=False)  # (SHOWN, H, W) in [0, 1]
    reconstructions: np.ndarray = field(repr=False)


def measure_leakage(
    client_net: torch.nn.Module,
    defence: DefenceConfig,
    compression: Compression,
    people: People,
    cfg: AttackConfig,
    max_queries: int = 512,
) -> Leakage:
    """Train the attacker on the auxiliary people, attack the victims, score the result."""
    wire = defence.wire_compression(compression)
    aux, val, victims = people.aux_train, people.aux_val, people.victims
    assert victims.subjects is not None
    z_aux, _ = wire_activations(client_net, aux.images, defence, wire, (AUX_KEY, 1))
    z_val, _ = wire_activations(client_net, val.images, defence, wire, (AUX_KEY, 2))
    x_aux, x_val = pixels(aux.images), pixels(val.images)
    decoder = train_decoder(z_aux, x_aux, z_val, x_val, cfg)

    gallery, queries = gallery_split(victims.subjects, cfg.seed)
    if len(queries) > max_queries:
        rng = np.random.default_rng([cfg.seed, 0x0E5])
        queries = np.sort(rng.choice(queries, max_queries, replace=False))
    x_q = pixels(victims.images[queries])
    z_q, bytes_per_sample = wire_activations(
        client_net, victims.images[queries], defence, wire, (VICTIM_SECRET,)
    )
    candidates = {"decoder": decoder.reconstruct(z_q)}
    if cfg.inversion_steps > 0:
        start = torch.cat([x_aux, x_val]).mean(0, keepdim=True)
        candidates["inversion"] = invert(client_net, z_q, start, cfg)
    scores = {name: ssim(rec, x_q) for name, rec in candidates.items()}
    best = max(scores, key=lambda k: float(scores[k].mean()))
    rec = candidates[best]

    q_people = victims.subjects[queries]
    g_people = victims.subjects[gallery]
    x_g = pixels(victims.images[gallery])
    shown = _first_per_person(q_people, SHOWN)
    return Leakage(
        ssim=float(scores[best].mean()),
        ssim_baseline=float(baseline_ssim(torch.cat([x_aux, x_val]), x_q).mean()),
        psnr=float(psnr(rec, x_q).mean()),
        reid=reidentify(rec, q_people, x_g, g_people),
        reid_originals=reidentify(x_q, q_people, x_g, g_people),
        reid_chance=1.0 / len(gallery),
        bytes_per_sample=bytes_per_sample,
        attack=best,
        ssim_decoder=float(scores["decoder"].mean()),
        ssim_inversion=float(scores["inversion"].mean()) if "inversion" in scores else None,
        decoder_epochs=decoder.epochs,
        victims=len(gallery),
        queries=len(queries),
        originals=x_q[shown, 0].numpy(),
        reconstructions=rec[shown, 0].numpy(),
    )


def _first_per_person(people: np.ndarray, n: int) -> np.ndarray:
    _, first = np.unique(people, return_index=True)
    return np.sort(first)[:n]


# ---- checkpoints ------------------------------------------------------------------------------


@dataclass
class CheckpointRun:
    """A trained run as the report needs it: weights, how it was trained, what it scored."""

    path: Path
    model: ModelConfig
    client_net: ClientNet
    setup: RunSetup
    defence: DefenceConfig
    test_accuracy: float | None
    data_info: dict[str, Any]


def _checkpoint_dir(path: Path) -> Path:
    path = Path(path)
    if path.is_file():
        return path.parent
    if not (path / MODEL_FILE).exists() and (path / "checkpoint" / MODEL_FILE).exists():
        return path / "checkpoint"
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text())) if path.exists() else {}
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None


def read_checkpoint(path: Path) -> CheckpointRun:
    """Load a checkpoint of `simulate` or `serve` with the metrics written beside it."""
    ckpt = _checkpoint_dir(path)
    cfg, client_net, _ = load_model(ckpt)
    info = _read_json(ckpt / INFO_FILE)
    metrics = _read_json(ckpt.parent / "metrics.json") or _read_json(ckpt / "metrics.json")
    algo = str(info.get("algo") or metrics.get("algo") or "")
    if algo not in SPLIT_ALGORITHMS:
        raise UserError(
            f"{ckpt}: a {algo or 'unknown'} checkpoint; privacy-report measures smashed data, "
            f"which only {', '.join(SPLIT_ALGORITHMS)} send"
        )
    rounds = info.get("rounds") or metrics.get("rounds") or []
    accuracy = metrics.get("final", {}).get("test_accuracy")
    if accuracy is None and rounds:
        accuracy = rounds[-1].get("test_accuracy")
    data_info = dict(metrics.get("data") or info.get("data") or {})
    train = TrainConfig.model_validate(metrics["train"]) if "train" in metrics else TrainConfig()
    setup = RunSetup(
        algo=algo,
        clients=int(metrics.get("clients", len(data_info.get("clients_samples", [])) or 2)),
        rounds=max(len(rounds), 1),
        seed=int(metrics.get("seed", 0)),
        partition=data_info.get("partition"),
        model=cfg,
        train=train,
    )
    defence = DefenceConfig.model_validate(metrics.get("defence") or {})
    return CheckpointRun(ckpt, cfg, client_net, setup, defence, accuracy, data_info)


def _effective(
    defence: DefenceConfig, model: ModelConfig, compression: Compression
) -> tuple[float, float, int, int | None, str]:
    m = defence.model(model)
    wire = defence.wire_compression(compression)
    return (defence.noise, defence.nopeek, m.cut, m.bottleneck, wire)


def matches(run: CheckpointRun, defence: DefenceConfig) -> bool:
    """Whether `defence` is exactly what the checkpoint was trained with."""
    compression = run.setup.train.compression if run.setup.train else "fp32"
    return _effective(defence, run.model, compression) == _effective(
        run.defence, run.model, compression
    )


def check_data(run: CheckpointRun, data: EmotionDataset) -> None:
    """The report must attack the data and split the checkpoint was trained on."""
    if run.data_info.get("split", "subject") != "subject":
        raise UserError(
            f"{run.path}: trained on a {run.data_info['split']} split; the report needs the "
            "subject split so that victims are people nobody trained on"
        )
    train, test = train_test_split(data, "subject", 0.2, run.setup.seed)
    want = (run.data_info.get("n_train"), run.data_info.get("n_test"))
    if None not in want and want != (len(train), len(test)):
        raise UserError(
            f"{run.path}: trained on {want[0]} train / {want[1]} test pictures, but --data "
            f"gives {len(train)} / {len(test)}: pass the data set the run was trained on"
        )


# ---- the report -------------------------------------------------------------------------------


def measure_setting(
    data: EmotionDataset,
    run: CheckpointRun,
    name: str,
    defence: DefenceConfig,
    people: People,
    attack: AttackConfig,
    out_dir: Path,
) -> tuple[dict[str, Any], Leakage]:
    """One row of the report: the client half trained with `defence`, attacked and scored.

    The checkpoint's own weights and accuracy when it was trained with `defence`; otherwise a
    run trained here with it, left in `out_dir/settings/<name>`.
    """
    if matches(run, defence):
        client_net, accuracy, source = run.client_net, run.test_accuracy, "checkpoint"
    else:
        log.info("training %s with defence %s", run.setup.algo, name)
        metrics, client_net = train_setting(data, run.setup, defence, out_dir / "settings" / name)
        accuracy, source = metrics["final"]["test_accuracy"], "trained"
    log.info("attacking %s", name)
    compression = run.setup.train.compression if run.setup.train else "fp32"
    leak = measure_leakage(client_net, defence, compression, people, attack)
    row = {
        "name": name,
        "defence": defence.model_dump(mode="json"),
        "test_accuracy": accuracy,
        "accuracy_from": source,
        **{k: v for k, v in asdict(leak).items() if k not in ("originals", "reconstructions")},
    }
    return row, leak


def privacy_report(
    data: EmotionDataset,
    run: CheckpointRun,
    names: list[str],
    out_dir: Path,
    attack: AttackConfig | None = None,
    allow_training: bool = True,
) -> dict[str, Any]:
    """Measure every named setting; write privacy.json and reconstructions.png to `out_dir`."""
    attack = attack or AttackConfig(seed=run.setup.seed)
    names = list(dict.fromkeys(["none", *names]))
    defences = {n: get_defence(n) for n in names}
    check_data(run, data)
    people = attack_people(data, run.setup.seed, attack.val_fraction)
    if not allow_training:
        for name, defence in defences.items():
            if not matches(run, defence):
                raise UserError(
                    f"defence {name!r} is not what {run.path} was trained with; "
                    "allow training or pass a checkpoint trained with it"
                )
    settings: list[dict[str, Any]] = []
    shown: list[tuple[str, Leakage]] = []
    for name, defence in defences.items():
        row, leak = measure_setting(data, run, name, defence, people, attack, out_dir)
        settings.append(row)
        shown.append((name, leak))
    report = {
        "checkpoint": str(run.path),
        "algo": run.setup.algo,
        "data": data.name,
        "synthetic": bool(data.meta.get("synthetic", False)),
        "attacker": attack.model_dump(mode="json"),
        "people": {
            "auxiliary_train": len(np.unique(people.aux_train.subjects)),  # type: ignore[arg-type]
            "auxiliary_val": len(np.unique(people.aux_val.subjects)),  # type: ignore[arg-type]
            "victims": len(np.unique(people.victims.subjects)),  # type: ignore[arg-type]
        },
        "without_attack": {
            # Standard split: SMASHED carries the batch's labels for the server's loss. U-shaped:
            # the device keeps head, labels and loss; the aggregator sees features and gradients.
            "labels_on_wire": run.model.shape != "u",
            "logits_on_wire": run.model.shape != "u",
            "shape": run.model.shape,
            "bytes_per_sample": settings[0]["bytes_per_sample"],
            # sl relays, sflv1 and sflv2 average the client half at the aggregator.
            "holds_client_weights": True,
        },
        "settings": settings,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "privacy.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_reconstructions(shown, out_dir / "reconstructions.png")
    return report


def plot_reconstructions(shown: list[tuple[str, Leakage]], path: Path) -> None:
    """Originals on top, one row of reconstructions per setting, victims only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    originals = shown[0][1].originals
    cols = len(originals)
    fig, axes = plt.subplots(
        len(shown) + 1, cols, figsize=(1.6 * cols, 1.0 * (len(shown) + 1)), squeeze=False
    )
    rows = [("originals", originals)] + [
        (f"{n}\nSSIM {leak.ssim:.2f}", leak.reconstructions) for n, leak in shown
    ]
    for r, (label, images) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(images[c], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.suptitle("people the attacker never trained on", fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
