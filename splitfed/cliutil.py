"""What every command line of the project shares: one-line user errors, logging set-up, and the
flags of a broker login."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from splitfed.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """A user's mistake ends in one line on stderr and exit code 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


def plain_logging(verbose: bool) -> None:
    """Plain lines on stderr (journald adds the time on a device)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


# Each broker flag and its field of `splitfed.mqtt.MqttSettings` (a dotted path).
BROKER_FLAGS = {
    "prefix": "prefix",
    "run_id": "run_id",
    "protocol": "protocol",
    "username": "username",
    "password_file": "password_file",
    "tls_ca": "tls.ca_file",
    "tls_cert": "tls.cert_file",
    "tls_key": "tls.key_file",
}


def broker_options(holder: str, username_help: str = "") -> Callable[[F], F]:
    """--prefix, --run-id, --protocol, --username, --password-file and the TLS files, as every
    command that logs in to a broker takes them. Unset, each is None, so the config's value (or
    MqttSettings' default) stands. `holder` names whose certificate --tls-cert is."""
    options = [
        click.option("--prefix", help="MQTT topic prefix [default: splitfed]"),
        click.option("--run-id", help="run id in the topics [default: default]"),
        click.option(
            "--protocol",
            type=click.Choice(["auto", "5", "3.1.1"]),
            help="MQTT version [default: auto]",
        ),
        click.option(
            "--username",
            help=f"MQTT user name{username_help} [default: none, or the one in the broker URL]",
        ),
        click.option(
            "--password-file",
            help="file with the MQTT password (relative: in $CREDENTIALS_DIRECTORY)",
        ),
        click.option("--tls-ca", help="CA certificate (PEM) of the broker, for mqtts://"),
        click.option("--tls-cert", help=f"{holder} certificate (PEM), for mutual TLS"),
        click.option("--tls-key", help="the private key (PEM) of --tls-cert"),
    ]

    def apply(fn: F) -> F:
        for option in reversed(options):  # listed in --help in the order above
            fn = option(fn)
        return fn

    return apply


def broker_overrides(kw: dict[str, Any], under: str = "broker.") -> dict[str, Any]:
    """The broker flags as dotted config paths below `under` (None: not given)."""
    return {under + path: kw.get(flag) for flag, path in BROKER_FLAGS.items()}
