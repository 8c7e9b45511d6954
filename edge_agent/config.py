"""The edge agent's configuration: one pydantic model per concern, YAML file + CLI overrides.

(Initial schema; the MQTT work extends it.)
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from splitfed.data.crop import CropConfig
from splitfed.onnx_client import InferenceConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSConfig(_Strict):
    ca_file: Path | None = Field(None, description="CA certificate (PEM) of the broker")
    cert_file: Path | None = Field(None, description="client certificate (PEM)")
    key_file: Path | None = Field(None, description="client private key (PEM)")


class BrokerConfig(_Strict):
    url: str = Field("mqtt://127.0.0.1:1883", description="mqtt://HOST:PORT or mqtts://HOST:PORT")
    prefix: str = Field("splitfed", pattern=r"^[A-Za-z0-9_-]+$", description="topic prefix")
    run_id: str = Field("default", pattern=r"^[A-Za-z0-9_-]+$", description="training run")
    username: str | None = Field(None, description="MQTT user name")
    password_file: str | None = Field(
        None, description="file with the MQTT password; relative names resolve in $CREDENTIALS_DIRECTORY"
    )
    tls: TLSConfig = Field(default_factory=TLSConfig, description="TLS files")


class CameraConfig(_Strict):
    source: str = Field("0", description="camera index, video file, or stream URL (OpenCV)")
    backend: str = Field("any", description="OpenCV capture backend: any, v4l2, gstreamer")
    width: int = Field(640, ge=64, description="capture width")
    height: int = Field(480, ge=48, description="capture height")
    fps: int = Field(15, ge=1, le=120, description="requested frame rate")
    watchdog_seconds: float = Field(5.0, gt=0, description="reopen the camera after this long without frames")


class AgentConfig(_Strict):
    client_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="this device's id")
    broker: BrokerConfig = Field(default_factory=BrokerConfig, description="MQTT connection")
    camera: CameraConfig = Field(default_factory=CameraConfig, description="camera capture")
    crop: CropConfig = Field(default_factory=CropConfig, description="face detection and eye crop")
    inference: InferenceConfig = Field(default_factory=InferenceConfig, description="live inference")
    state_dir: Path = Field(Path("/var/lib/splitfed"), description="weights, models and collected crops")
