"""The small parts: topics, presence, broker URLs, passwords, configs, and an honest link."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from aggregator.serve import serve
from edge_agent.cli import main as agent_main
from edge_agent.config import load_config
from splitfed.errors import UserError
from splitfed.mqtt import LinkSettings, MqttLink, parse_presence, parse_topic, read_password, topic

from .fed import Mosquitto, free_port

REPO = Path(__file__).resolve().parents[2]


def test_topics_are_checked_and_parsed() -> None:
    assert topic("splitfed", "run1", "pi-01", "up") == "splitfed/run1/pi-01/up"
    assert parse_topic("splitfed", "run1", "splitfed/run1/pi-01/status") == ("pi-01", "status")
    for bad in ("splitfed/run2/pi-01/up", "splitfed/run1/pi 01/up", "splitfed/run1/pi-01/x",
                "splitfed/run1/a/b/up", "other/run1/pi-01/up"):  # fmt: skip
        assert parse_topic("splitfed", "run1", bad) is None, bad
    with pytest.raises(ValueError):
        topic("splitfed", "run1", "a/b", "up")
    with pytest.raises(ValueError):
        topic("splitfed", "run#", "a", "up")


def test_presence_payloads() -> None:
    assert parse_presence(b"online") == ("online", "")
    assert parse_presence(b"online 3f2a") == ("online", "3f2a")
    assert parse_presence(b"offline") == ("offline", "")
    assert parse_presence(b"stopped") == ("stopped", "")
    for bad in (b"maybe", b"online a b", b"\xff\xfe", b"online " + b"x" * 65):
        assert parse_presence(bad) is None


def test_broker_urls_and_passwords(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = LinkSettings.from_url("mqtts://broker.local")
    assert (s.host, s.port, s.tls) == ("broker.local", 8883, True)
    s = LinkSettings.from_url("mqtt://agg@10.0.0.2:1884")
    assert (s.host, s.port, s.tls, s.username) == ("10.0.0.2", 1884, False, "agg")
    for bad in ("http://x:1", "mqtt://:1883", "mqtt://h:notaport"):
        with pytest.raises(UserError):
            LinkSettings.from_url(bad)
    with pytest.raises(UserError, match="password"):
        LinkSettings.from_url("mqtt://u:secret@h:1883")
    (tmp_path / "mqtt-password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_password("mqtt-password") == "s3cret"
    assert read_password(tmp_path / "mqtt-password") == "s3cret"
    with pytest.raises(UserError, match="password file"):
        read_password("missing")


def test_bad_agent_config_names_field_and_line(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("client_id: pi-01\ncamera:\n  source: '0'\n  fps: 500\n")
    res = CliRunner().invoke(agent_main, ["--config", str(cfg), "--validate-config"])
    assert res.exit_code == 2
    assert "line 4" in res.output and "camera.fps" in res.output
    cfg.write_text("client_id: pi-01\nbroker:\n  url: mqtt://h:1883\n  colour: blue\n")
    with pytest.raises(UserError, match=r"line 4: broker\.colour"):
        load_config(cfg)
    cfg.write_text("client_id: pi-01\nbroker:\n  password: hunter2\n")
    with pytest.raises(UserError, match="password_file"):
        load_config(cfg)
    cfg.write_text("camera: {fps: 10}\n")
    with pytest.raises(UserError, match="client_id"):
        load_config(cfg)
    # Flags override the file.
    ok = load_config(cfg, {"client_id": "pi-02", "camera.fps": 30, "broker.url": None})
    assert (ok.client_id, ok.camera.fps, ok.broker.url) == ("pi-02", 30, "mqtt://127.0.0.1:1883")


@pytest.mark.parametrize(
    "path", sorted((REPO / "firmware_configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_firmware_configs_validate(path: Path) -> None:
    res = CliRunner().invoke(agent_main, ["--config", str(path), "--validate-config"])
    assert res.exit_code == 0, res.output


def test_serve_user_errors_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "serve.yaml"
    bad.write_text("rounds: 0\n")
    res = CliRunner().invoke(serve, ["--config", str(bad), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "rounds" in res.output
    res = CliRunner().invoke(serve, ["--broker", "http://x", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "broker URL" in res.output


def test_link_is_never_connected_without_a_broker_and_reconnects(tmp_path: Path) -> None:
    port = free_port()
    got: list[bytes] = []
    settings = LinkSettings(port=port, reconnect_min=1, reconnect_max=2)
    link = MqttLink(settings, "probe", "t/run/probe/status", ["t/run/probe/down"],
                    lambda _t, p: got.append(p))  # fmt: skip
    link.start()
    try:
        time.sleep(1.5)
        assert not link.online()  # nothing listens: not connected, whatever paho queued
        broker = Mosquitto(tmp_path / "mq", port)
        broker.start()
        try:
            assert link.wait_connected(15), "no reconnect after the broker came up"
            assert link.publish("t/run/probe/down", b"hello")
            deadline = time.monotonic() + 5
            while not got and time.monotonic() < deadline:
                time.sleep(0.05)
            assert got == [b"hello"]  # subscribed in on_connect
        finally:
            link.close()
            broker.stop()
    finally:
        link.close()
