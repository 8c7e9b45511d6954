"""The edge agent's configuration: one pydantic model per concern, YAML file + CLI overrides.

`load_config` reads the YAML, lays the command-line overrides over it and validates the
result (`splitfed.yaml_config`, as the aggregator's); a bad field is reported with its dotted
path and, when it came from the file, its line. Passwords never live in the YAML:
`broker.password_file` names a file, and a relative name resolves in `$CREDENTIALS_DIRECTORY`
(systemd's `LoadCredential=`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from splitfed.data.crop import CropConfig
from splitfed.errors import UserError
from splitfed.mqtt import MqttSettings
from splitfed.onnx_client import InferenceConfig
from splitfed.yaml_config import load_yaml_config

ID = r"^[A-Za-z0-9_-]{1,64}$"


def default_client_id(hostname: str | None = None) -> str:
    """This host's name made safe for MQTT topics ([A-Za-z0-9_-], at most 64 characters).

    `edge-agent --camera 0` must work as typed on a fresh device; the host name is the id a
    person recognises in the broker's topics. Dots and other characters become '-'.
    """
    import re
    import socket

    name = socket.gethostname() if hostname is None else hostname
    safe = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:64].strip("-")
    return safe or "edge-agent"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BrokerConfig(MqttSettings):
    """The agent's broker: the shared MQTT settings (user, password file, `tls`) and its own."""

    url: str = Field("mqtt://127.0.0.1:1883", description="mqtt://HOST:PORT or mqtts://HOST:PORT")
    keepalive: int = Field(
        10, ge=2, le=600, description="seconds between pings; the last will fires after 1.5x"
    )
    session_expiry: int = Field(
        3600,
        ge=0,
        description="seconds the broker keeps this device's session (and queued messages) offline",
    )


class CameraConfig(_Strict):
    source: str = Field("0", description="camera index, video file, or stream URL (OpenCV)")
    backend: str = Field("any", description="OpenCV capture backend: any, v4l2, gstreamer")
    width: int = Field(640, ge=64, description="capture width")
    height: int = Field(480, ge=48, description="capture height")
    fps: int = Field(15, ge=1, le=120, description="requested frame rate")
    watchdog_seconds: float = Field(
        5.0, gt=0, description="reopen the camera after this long without frames"
    )


class DataConfig(_Strict):
    """The labelled data this device trains on; mirrors `aggregator simulate`'s data flags."""

    dataset: str | None = Field(
        None,
        description="synth, a data-set path (KDEF, folder per class, FER2013 CSV), or "
        "'crops' for the "
        "crops collected on this device; None = the collected crops if there are any",
    )
    data_format: Literal["synth", "kdef", "folder", "fer2013"] | None = Field(
        None, description="force the data-set format instead of detecting it"
    )
    shard: str = Field(
        "0/1", pattern=r"^\d+/\d+$", description="I/N: this device holds shard I of N (0-based)"
    )
    partition: str | None = Field(
        None, description="subject, iid or dirichlet:ALPHA (as the simulator)"
    )
    split: Literal["subject", "random"] | None = Field(
        None, description="held-out split (as the simulator)"
    )
    seed: int = Field(0, description="seed of the split and partition; the aggregator's --seed")
    synth_identities: int = Field(80, ge=2, description="people in the synthetic set")

    def shard_index(self) -> tuple[int, int]:
        i, n = (int(v) for v in self.shard.split("/"))
        if n < 1 or not 0 <= i < n:
            raise UserError(f"--shard {self.shard}: needs 0 <= I < N")
        return i, n


class OwnerConfig(_Strict):
    """`role: owner` (PyVertical): which part of every record this device holds.

    Either a part of each crop of the local data set (the simulator's vertical partition), or,
    with `views`, one camera of a multi-camera rig: this device holds the KDEF pictures of view
    `index` of `views` (and may hold nothing else)."""

    index: int = Field(0, ge=0, le=31, description="this owner's part, 0-based (--owner-index)")
    owners: int = Field(
        2, ge=1, le=32, description="data owners in the run (--owners; with views: their count)"
    )
    views: str | None = Field(
        None,
        description="KDEF camera angles of the run, e.g. S,HL,HR, the same list and order as "
        "`aggregator serve --views`; this owner holds the pictures of view `index` (--views)",
    )
    record_salt: str = Field(
        "splitfed-views",
        min_length=1,
        max_length=256,
        description="views: the federation's shared salt of the record ids (session + subject + "
        "emotion); the same on every owner and the aggregator (--record-salt)",
    )

    @model_validator(mode="after")
    def _index_in_range(self) -> OwnerConfig:
        if self.views is not None:
            from splitfed.data.views import parse_views

            try:
                views = parse_views(self.views)
            except UserError as e:
                raise ValueError(str(e)) from None
            if "owners" in self.model_fields_set and self.owners != len(views):
                raise ValueError(f"{self.owners} owners, but {len(views)} views {self.views}")
            self.views = ",".join(views)
            self.owners = len(views)
        if self.index >= self.owners:
            raise ValueError(f"owner index {self.index} needs more than {self.owners} owners")
        return self


class SegmentConfig(_Strict):
    """`role: segment` (FedSL): which group's clips, and which stretch of them in time."""

    group: int = Field(0, ge=0, description="this device's client group, 0-based (--group)")
    groups: int = Field(1, ge=1, description="client groups in the run (--groups)")
    segment: int = Field(0, ge=0, description="this device's segment in time, 0-based")
    segments: int = Field(2, ge=1, le=64, description="devices per group (--segments)")
    frames: int = Field(4, ge=2, le=64, description="frames (or row bands) per sequence")

    @model_validator(mode="after")
    def _in_range(self) -> SegmentConfig:
        if self.group >= self.groups:
            raise ValueError(f"group {self.group} needs more than {self.groups} groups")
        if self.segment >= self.segments:
            raise ValueError(f"segment {self.segment} needs more than {self.segments} segments")
        if self.segments > self.frames:
            raise ValueError(f"{self.segments} segments need at least as many frames")
        return self


class LiveConfig(_Strict):
    """Live classification of camera frames (detect -> crop -> client half -> aggregator)."""

    enabled: bool = Field(False, description="run the camera pipeline (--camera turns it on)")
    queue_size: int = Field(
        2, ge=1, le=64, description="frames each pipeline queue holds before dropping"
    )
    ttl_seconds: float = Field(
        5.0, gt=0, description="a frame's smashed data expires after this long"
    )
    drain_seconds: float = Field(
        5.0, ge=0, description="at the end of a video file, wait this long for answers"
    )
    stats_seconds: float = Field(
        10.0, gt=0, description="log frames/s, drops and latency this often"
    )
    loop_file: bool = Field(
        False, description="play a video file in a loop instead of stopping at its end"
    )
    pace_files: bool = Field(
        True, description="play video files at camera.fps instead of as fast as possible"
    )


class CollectConfig(_Strict):
    per_emotion: int = Field(20, ge=1, le=10_000, description="crops stored for each emotion")
    every: int = Field(3, ge=1, description="keep one crop every this many frames with a face")
    max_frames: int = Field(3000, ge=1, description="give up on an emotion after this many frames")


class AgentConfig(_Strict):
    role: Literal["client", "owner", "segment"] = Field(
        "client",
        description="client: split CNN / FedAvg on whole crops (sl, sflv1, sflv2, fedavg); "
        "owner: PyVertical data owner of one part of each crop; segment: FedSL device of one "
        "stretch in time of each sequence",
    )
    client_id: str = Field(
        default_factory=default_client_id,
        pattern=ID,
        description="this device's id (default: the host name, made safe for topics)",
    )
    broker: BrokerConfig = Field(default_factory=BrokerConfig, description="MQTT connection")
    camera: CameraConfig = Field(default_factory=CameraConfig, description="camera capture")
    crop: CropConfig = Field(default_factory=CropConfig, description="face detection and eye crop")
    inference: InferenceConfig = Field(
        default_factory=InferenceConfig, description="live inference"
    )
    state_dir: Path = Field(
        Path("/var/lib/splitfed"), description="weights, models and collected crops"
    )
    data: DataConfig = Field(default_factory=DataConfig, description="local training data")
    owner: OwnerConfig = Field(default_factory=OwnerConfig, description="role owner")
    segment: SegmentConfig = Field(default_factory=SegmentConfig, description="role segment")
    live: LiveConfig = Field(default_factory=LiveConfig, description="live camera classification")
    collect: CollectConfig = Field(
        default_factory=CollectConfig, description="guided crop collection"
    )
    threads: int | None = Field(
        None, ge=1, le=256, description="torch threads (None = torch's default)"
    )
    exit_when_done: bool = Field(
        False,
        description="exit when the aggregator says it stopped (default: wait for the next run)",
    )

    @property
    def crops_dir(self) -> Path:
        return self.state_dir / "crops"


# ---- loading -----------------------------------------------------------------------------------


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> AgentConfig:
    """YAML file (optional) + dotted-path overrides -> validated config, or a UserError."""
    return load_yaml_config(AgentConfig, path, overrides)
