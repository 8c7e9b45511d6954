"""What `aggregator serve` runs with: `ServeConfig` (a YAML file of its keys, overridden by the
flags), the broker settings, and the allow list of enrolled client ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from splitfed.config import DEFAULT_ROUNDS, AggregationConfig, TrainConfig
from splitfed.errors import UserError
from splitfed.model import ModelConfig
from splitfed.mqtt import ID_RE, MqttSettings
from splitfed.server import AGGREGATOR_ID
from splitfed.simulate import REGISTRY, served_names
from splitfed.yaml_config import load_yaml_config

# What `serve` deploys: the registry's served algorithms. Those without a simulator of their own
# train one split CNN on whole crops (--init-from, --live); the others' devices hold other data
# (owners' parts, clip segments).
SERVE_ALGOS = tuple(served_names())
SERVE_SPLIT_ALGOS = tuple(n for n in SERVE_ALGOS if REGISTRY[n].simulate is None)
OWN_DATA_ALGOS = tuple(n for n in SERVE_ALGOS if n not in SERVE_SPLIT_ALGOS)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServeBroker(MqttSettings):
    """The aggregator's broker: the shared MQTT settings, or the embedded broker's own."""

    url: str | None = Field(
        None,
        description="mqtt[s]://HOST:PORT of Mosquitto (or any MQTT broker); "
        "None = start the embedded broker",
    )
    listen: str = Field("127.0.0.1:1883", description="HOST:PORT of the embedded broker")
    users_file: Path | None = Field(
        None,
        description="embedded broker: USER:HASH lines it accepts logins from "
        "(python -m splitfed.broker add-user); required beyond loopback unless insecure",
    )
    insecure: bool = Field(
        False, description="embedded broker: allow listening beyond loopback without logins"
    )
    shared_group: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="subscribe as MQTT 5 shared subscriptions $share/GROUP/... (a broker "
        "cluster may then serve them from any node); None = plain subscriptions",
    )


class ServeConfig(_Strict):
    """Everything `serve` needs; a YAML file with these keys, overridden by the flags."""

    algo: Literal[SERVE_ALGOS] = Field("sflv1", description="algorithm")
    min_clients: int = Field(2, ge=1, description="agents to wait for before the first round")
    rounds: int | None = Field(
        None,
        ge=1,
        description="rounds to train; unset: a resumed run's own plan, else "
        f"{DEFAULT_ROUNDS} (simulate's default)",
    )
    round_timeout: float = Field(
        600.0, gt=0, description="seconds before a round finishes without stragglers"
    )
    join_timeout: float = Field(3600.0, gt=0, description="seconds to wait for min_clients agents")
    seed: int = Field(0, description="run seed (reaches the agents in every round configuration)")
    broker: ServeBroker = Field(default_factory=ServeBroker, description="MQTT")
    model: ModelConfig = Field(default_factory=ModelConfig, description="split network")
    train: TrainConfig = Field(default_factory=TrainConfig, description="training settings")
    out: Path = Field(Path("runs/serve"), description="metrics.json, plots")
    checkpoint_dir: Path | None = Field(None, description="checkpoints (default OUT/checkpoint)")
    resume: bool = Field(True, description="resume from the checkpoint when there is one")
    eval_data: str | None = Field(
        None, description="evaluation set held by the aggregator (path or synth)"
    )
    presence_grace: float = Field(
        5.0,
        ge=0,
        description="seconds an agent's last will waits for it to reconnect before it counts",
    )
    rejoin_grace: float = Field(
        5.0, ge=0, description="seconds a round waits for agents that dropped out to reconnect"
    )
    serve_forever: bool = Field(False, description="keep answering live predictions after training")
    init_from: Path | None = Field(
        None,
        description="start both halves from this checkpoint (e.g. pretrained centrally on a "
        "public set); its architecture is used, and the cut must match",
    )
    live_model: Path | None = Field(
        None,
        description="serve this trained checkpoint live, without training: publish its client "
        "weights and answer the agents' predictions (agents need no training data)",
    )
    allow_clients: Path | None = Field(
        None,
        description="file of client ids (one a line, # comments) allowed to join; None = any",
    )
    threads: int | None = Field(None, ge=1, description="torch threads")
    aggregation: AggregationConfig = Field(
        default_factory=AggregationConfig, description="how the devices' copies are combined"
    )
    defence: str | None = Field(
        None,
        description="defence the agents apply to their smashed data (splitfed/defences.py); "
        "its cut, bottleneck and compression override model and train. None: `recommended` "
        "for sl, sflv1 and sflv2, `none` for the algorithms that send no smashed data",
    )
    step_timeout: float | None = Field(
        None,
        gt=0,
        description="SL, SFLV2: seconds the round waits on one agent that stays connected but "
        "stops answering before it goes on without it (None: only the round timeout)",
    )
    data: str = Field(
        "synth",
        description="pyvertical: the data set whose labels the aggregator holds (the label "
        "holder's table of simulate's vertical partition, --min-clients owners); fedsl: the "
        "data set whose sequences' frame shape the network takes",
    )
    data_format: Literal["synth", "kdef", "folder", "fer2013"] | None = Field(
        None, description="format of `data` (None: detected)"
    )
    split: Literal["subject", "random"] | None = Field(
        None, description="pyvertical: held-out split of `data` (as simulate)"
    )
    frames: int = Field(4, ge=2, le=64, description="fedsl: time steps per sequence")
    views: str | None = Field(
        None,
        description="pyvertical: KDEF camera angles, one data owner (camera) each, e.g. S,HL,HR "
        "(agents `--role owner --views` the same list); `data` is the KDEF tree of the labels",
    )
    record_salt: str = Field(
        "splitfed-views",
        min_length=1,
        max_length=256,
        description="pyvertical views: the federation's shared salt of the record ids",
    )
    segments: int = Field(2, ge=1, le=64, description="fedsl: devices per client group")
    fed_server: bool = Field(
        False,
        description="sflv1, sflv2: a separate fed server (`aggregator fed-server`) averages the "
        "client halves; this main server trains the server half and never holds a client half",
    )


def load_allow_list(path: Path) -> frozenset[str]:
    """Client ids from a file: one a line, `#` starts a comment; a bad id names its line."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise UserError(f"cannot read the allow list {path}: {e.strerror}") from None
    ids: set[str] = set()
    for n, raw in enumerate(lines, 1):
        cid = raw.split("#", 1)[0].strip()
        if not cid:
            continue
        if not ID_RE.match(cid) or cid == AGGREGATOR_ID:
            raise UserError(f"{path} line {n}: bad client id {cid!r} (1-64 of A-Z a-z 0-9 _ -)")
        ids.add(cid)
    if not ids:
        raise UserError(f"the allow list {path} names no client: nobody could train")
    return frozenset(ids)


def load_serve_config(path: Path | None, overrides: dict[str, Any]) -> ServeConfig:
    """The YAML at `path` (optional) with the flags' overrides laid over it, validated; a bad
    field is named with its file and line (a UserError)."""
    return load_yaml_config(ServeConfig, path, overrides)
