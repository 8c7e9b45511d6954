"""Checkpoints: the trained halves as safetensors (what `sfl-export` reads) plus resumable state.

`model.safetensors` holds `client.*` and `server.*` tensors with the model configuration in its
metadata. `state.pt` (optimizer states, per-client server copies) is written and read only by
this aggregator on its own disk, never received over the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from splitfed.errors import UserError
from splitfed.model import ClientNet, ModelConfig, ServerNet, build_split_model
from splitfed.training import load_numpy_state

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
STATE_KEY, INFO_KEY = "algorithm_state", "checkpoint_info"  # the two parts of state.pt
INFO_FILE = "checkpoint.json"


def save_checkpoint(directory: Path, algo: Any, info: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact.

    Each file is replaced atomically, but three files cannot be replaced together, so the one a
    resume reads, state.pt, carries its own copy of the info: a crash between two replacements
    resumes from a state and info of the same round (checkpoint.json is for people and tools).
    """
    directory.mkdir(parents=True, exist_ok=True)
    tensors = algo.checkpoint_tensors()  # client.* and server.* for the split CNN
    meta = {
        "model": algo.model_cfg.model_dump_json(),
        "algo": algo.name,
        "round": str(info.get("round", -1)),
    }
    tmp = directory / (MODEL_FILE + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(directory / MODEL_FILE)
    tmp = directory / (STATE_FILE + ".tmp")
    torch.save({STATE_KEY: algo.state(), INFO_KEY: json.dumps(info)}, tmp)
    tmp.replace(directory / STATE_FILE)
    tmp = directory / (INFO_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(directory / INFO_FILE)


def read_model_config(path: Path) -> ModelConfig:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    if "model" not in meta:
        raise UserError(f"{path}: no model configuration in the checkpoint metadata")
    try:
        saved = json.loads(meta["model"])
        if isinstance(saved, dict):
            # Written before ModelConfig had an input norm, when every network used the global
            # one: the default has since become per-crop, which these weights never saw.
            saved.setdefault("input_norm", "global")
            # Written before the anti-aliased downsampling existed: these weights never had it.
            saved.setdefault("antialias", False)
        return ModelConfig.model_validate(saved)
    except ValueError:  # bad JSON or a ValidationError (a ValueError too)
        algo = meta.get("algo", "?")
        raise UserError(
            f"{path}: a {algo} checkpoint, not a split-CNN one; sfl-export reads checkpoints of "
            "sl, sflv1, sflv2, fedavg and centralized runs"
        ) from None


def checkpoint_file(path: Path) -> Path:
    """model.safetensors of a checkpoint directory (or the file itself), which must exist."""
    path = Path(path)
    if path.is_dir():
        inner = path / "checkpoint" / MODEL_FILE  # the --out directory of simulate
        path = inner if inner.exists() and not (path / MODEL_FILE).exists() else path / MODEL_FILE
    if not path.exists():
        raise UserError(
            f"no checkpoint at {path}: pass the --out directory of a training run "
            "or its model.safetensors"
        )
    return path


def load_model(path: Path) -> tuple[ModelConfig, ClientNet, ServerNet]:
    """Load the halves from a checkpoint directory or its model.safetensors."""
    path = checkpoint_file(path)
    try:
        cfg = read_model_config(path)
        tensors = load_file(str(path))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: not a readable checkpoint ({e})") from None
    client, server = build_split_model(cfg, 0)
    try:
        load_numpy_state(client, {k[7:]: v for k, v in tensors.items() if k.startswith("client.")})
        load_numpy_state(server, {k[7:]: v for k, v in tensors.items() if k.startswith("server.")})
    except (ValueError, RuntimeError) as e:
        raise UserError(f"{path}: weights do not fit the model in its metadata ({e})") from None
    return cfg, client, server


# Fields that may differ between a pretrained model and its fine-tuning: they shape training,
# not the weights' layout.
_TRAINING_ONLY = {"dropout"}


def load_init(path: Path, cfg: ModelConfig) -> tuple[ClientNet, ServerNet]:
    """The halves of checkpoint `path`, checked to fit the network `cfg` describes.

    For `--init-from`: a model pretrained elsewhere (e.g. centrally on a public set) is the
    starting point of a federated run. Input shape, cut, classes and every other part of the
    architecture must match; the error names the first field that does not.
    """
    saved, client, server = load_model(path)
    want = cfg.model_dump(mode="json", exclude=_TRAINING_ONLY)
    have = saved.model_dump(mode="json", exclude=_TRAINING_ONLY)
    for key in ("input_shape", "cut", "num_classes", *want):
        if want[key] != have[key]:
            raise UserError(
                f"--init-from {path}: its {key} is {have[key]}, this run's is {want[key]}; "
                f"train with the checkpoint's {key} or pretrain again"
            )
    return client, server


def planned_rounds(directory: Path, algo: str) -> int | None:
    """The rounds the `algo` run checkpointed in `directory` was started for (its learning-rate
    schedule's length), or None: no checkpoint, another algorithm's (which a run does not
    resume), or one written before the plan was recorded."""
    try:
        info = json.loads((directory / INFO_FILE).read_text())
        planned = info.get("planned_rounds") if info.get("algo") == algo else None
    except (OSError, ValueError, AttributeError):
        return None
    return planned if isinstance(planned, int) and planned >= 1 else None


def load_state(directory: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(algorithm state, info) of the last checkpoint in `directory`, or None."""
    info_path = directory / INFO_FILE
    if not info_path.exists() or not (directory / STATE_FILE).exists():
        return None
    saved = torch.load(directory / STATE_FILE, weights_only=True)
    if isinstance(saved, dict) and STATE_KEY in saved and INFO_KEY in saved:
        return saved[STATE_KEY], json.loads(saved[INFO_KEY])
    return saved, json.loads(info_path.read_text())  # written before state.pt carried its info
