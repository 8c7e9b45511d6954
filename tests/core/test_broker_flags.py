"""The agent, `serve` and `fed-server` take one set of broker flags, and each reaches its field."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from aggregator.cli import main as aggregator
from edge_agent.cli import main as edge_agent
from splitfed.cliutil import BROKER_FLAGS, broker_overrides
from splitfed.mqtt import MqttSettings
from splitfed.yaml_config import load_yaml_config

COMMANDS = {
    "edge-agent": edge_agent,
    "serve": aggregator.commands["serve"],  # type: ignore[attr-defined]
    "fed-server": aggregator.commands["fed-server"],  # type: ignore[attr-defined]
}


def _flags(command: click.Command) -> set[str]:
    return {p.name for p in command.params if isinstance(p, click.Option)}


@pytest.mark.parametrize("name", COMMANDS)
def test_every_broker_flag_is_on_every_command(name: str) -> None:
    assert set(BROKER_FLAGS) <= _flags(COMMANDS[name])


def test_each_flag_lands_on_its_own_field() -> None:
    given = {
        "prefix": "site-a", "run_id": "r7", "protocol": "3.1.1", "username": "cam-07",
        "password_file": "mqtt.pass", "tls_ca": "ca.pem", "tls_cert": "cam.pem",
        "tls_key": "cam.key",
    }  # fmt: skip
    assert set(given) == set(BROKER_FLAGS)
    s = load_yaml_config(MqttSettings, None, broker_overrides(given, under=""))
    dumped = s.model_dump()
    for flag, path in BROKER_FLAGS.items():
        value = dumped
        for key in path.split("."):
            value = value[key]
        assert str(value) == given[flag], (flag, path)
    # unset flags are None, so the defaults stand
    assert load_yaml_config(MqttSettings, None, broker_overrides({}, under="")) == MqttSettings()


@pytest.mark.parametrize(
    ("name", "args"), [("edge-agent", ["--validate-config"]), ("fed-server", [])]
)
def test_a_bad_flag_is_refused_naming_its_field(name: str, args: list[str]) -> None:
    result = CliRunner().invoke(COMMANDS[name], [*args, "--prefix", "a/b"])
    assert result.exit_code == 2
    assert "prefix: String should match pattern" in result.output
