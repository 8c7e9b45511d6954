"""Fixtures for the MQTT tests (helpers in fed.py): Mosquitto, subprocesses, reference runs."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from .fed import IDENTITIES, REPO, THREADS, Mosquitto, Procs, free_port

TLS_USERS = ("aggregator", "c0", "c1", "c2")  # a certificate (CN) and a password for each


class TlsMosquitto(Mosquitto):
    """Mosquitto as a deployment runs it: TLS only, client certificates, passwords, the ACL.

    Test certificates come from scripts/make_test_certs.sh, the ACL is the shipped
    systemd/mosquitto/splitfed.acl.example. Two loopback listeners, both requiring a client
    certificate signed by the test CA: on `port` a client also logs in with its password; on
    `identity_port` the certificate's CN is the user name (use_identity_as_username).
    """

    def __init__(self, directory: Path, users: Sequence[str] = TLS_USERS) -> None:
        super().__init__(directory)
        self.identity_port = free_port()
        self.certs = directory / "certs"
        subprocess.run(
            [str(REPO / "scripts" / "make_test_certs.sh"), str(self.certs), *users],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        passwd_bin = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
        self.passwd = directory / "passwd"
        self.password_files: dict[str, Path] = {}
        (directory / "pw").mkdir()
        for i, user in enumerate(users):
            password = f"{user}-secret-{i}"
            pw = directory / "pw" / user
            pw.write_text(password + "\n")
            self.password_files[user] = pw
            flags = ["-c"] if i == 0 else []
            cmd = [passwd_bin, *flags, "-b", str(self.passwd), user, password]
            subprocess.run(cmd, check=True, capture_output=True, timeout=30)
        self.acl = directory / "splitfed.acl"
        shutil.copy(REPO / "systemd" / "mosquitto" / "splitfed.acl.example", self.acl)
        tls = (
            f"cafile {self.certs}/ca.crt\ncertfile {self.certs}/server.crt\n"
            f"keyfile {self.certs}/server.key\ntls_version tlsv1.2\nrequire_certificate true\n"
        )
        head = self.conf.read_text().split("\n", 1)[1]  # the plain listener's line goes
        head = head.replace("allow_anonymous true\n", "")
        self.conf.write_text(
            "per_listener_settings false\n"
            f"listener {self.port} 127.0.0.1\n{tls}"
            f"listener {self.identity_port} 127.0.0.1\n{tls}use_identity_as_username true\n"
            f"allow_anonymous false\npassword_file {self.passwd}\nacl_file {self.acl}\n"
            "connection_messages true\n" + head
        )

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    def tls_flags(self, user: str) -> list[str]:
        """The command-line flags of `user` (aggregator or a device) for this broker."""
        c = self.certs
        return ["--tls-ca", str(c / "ca.crt"), "--tls-cert", str(c / f"{user}.crt"),
                "--tls-key", str(c / f"{user}.key"), "--username", user,
                "--password-file", str(self.password_files[user])]  # fmt: skip


@pytest.fixture
def tls_mosquitto(tmp_path: Path) -> Iterator[TlsMosquitto]:
    """Mosquitto with mutual TLS, passwords and the shipped ACL on free loopback ports."""
    broker = TlsMosquitto(tmp_path / "mosquitto-tls")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Subprocesses of the test; whatever still runs at the end gets SIGTERM, then SIGKILL."""
    d = tmp_path / "logs"
    d.mkdir()
    p = Procs(d)
    yield p
    p.stop_all()


@pytest.fixture(scope="session")
def reference() -> Callable[..., dict[str, Any]]:
    """`aggregator simulate`'s metrics for the runs the MQTT tests repeat (computed once each)."""
    cache: dict[tuple[Any, ...], dict[str, Any]] = {}

    def get(
        algo: str, compression: str = "fp32", clients: int = 3, rounds: int = 2
    ) -> dict[str, Any]:
        key = (algo, compression, clients, rounds)
        if key not in cache:
            import torch

            from splitfed.config import TrainConfig
            from splitfed.data.synth import SynthConfig, generate_synth
            from splitfed.simulate import SimSpec, simulate

            old = torch.get_num_threads()
            torch.set_num_threads(THREADS)  # as every process of the MQTT run
            try:
                ds = generate_synth(SynthConfig(identities=IDENTITIES))
                spec = SimSpec(
                    algo, clients, rounds, seed=0, train=TrainConfig(compression=compression)
                )
                cache[key] = simulate(ds, spec)
            finally:
                torch.set_num_threads(old)
        return cache[key]

    return get
