"""The systemd units and the Mosquitto configuration: verified, parsed, and run."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.mqtt.fed import free_port

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"
UNITS = [SYSTEMD / "edge-agent.service", SYSTEMD / "aggregator.service"]
DROP_INS = sorted((SYSTEMD / "edge-agent.service.d").glob("*.conf"))
VENV_BIN = "/opt/splitfed/venv/bin/"

# Settings that widen what the service may do; each needs a comment saying why.
RELAXATION_KEYS = {
    "DeviceAllow", "SupplementaryGroups", "RestrictAddressFamilies", "ReadWritePaths",
    "BindPaths", "AmbientCapabilities", "PrivateDevices", "MemoryDenyWriteExecute", "ProcSubset",
    "DevicePolicy", "ProtectSystem", "ProtectHome", "NoNewPrivileges", "PrivateTmp",
    "RestrictNamespaces", "CapabilityBoundingSet", "SystemCallFilter", "PrivateNetwork",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups", "LockPersonality",
    "RestrictRealtime", "RestrictSUIDSGID", "ProtectProc", "ProtectClock", "ProtectHostname",
    "ProtectKernelLogs",
}  # fmt: skip
STRICT_VALUES = {
    "DevicePolicy": {"closed", "strict"},
    "ProtectSystem": {"strict"},
    "ProtectHome": {"yes"},
    "ProtectProc": {"invisible", "noaccess"},
    "CapabilityBoundingSet": {""},
    "AmbientCapabilities": {""},
    "SystemCallFilter": {"@system-service"},
}


@dataclass
class Entry:
    section: str
    key: str
    value: str
    line: int
    comment_above: bool


@dataclass
class Unit:
    path: Path
    entries: list[Entry] = field(default_factory=list)

    def values(self, section: str, key: str) -> list[str]:
        return [e.value for e in self.entries if e.section == section and e.key == key]

    def value(self, section: str, key: str) -> str:
        found = self.values(section, key)
        assert found, f"{self.path.name}: [{section}] {key}= missing"
        return found[-1]


def parse_unit(path: Path) -> Unit:
    """systemd's INI dialect: repeated keys, comments with # or ;, no continuation lines."""
    unit = Unit(path)
    section = ""
    previous = ""
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line and not line.startswith(("#", ";")):
            assert "=" in line, f"{path.name}:{n}: not KEY=VALUE"
            assert not line.endswith("\\"), f"{path.name}:{n}: keep one setting per line"
            key, value = (s.strip() for s in line.split("=", 1))
            unit.entries.append(Entry(section, key, value, n, previous.startswith(("#", ";"))))
        previous = line
    return unit


def is_relaxation(e: Entry) -> bool:
    if e.key not in RELAXATION_KEYS:
        return False
    if e.key in STRICT_VALUES:
        return e.value not in STRICT_VALUES[e.key]
    if e.key in {"DeviceAllow", "SupplementaryGroups", "RestrictAddressFamilies",
                 "ReadWritePaths", "BindPaths"}:  # fmt: skip
        return True
    return e.value.lower() in {"no", "false", "0", "off", "all"}


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_unit_follows_the_conventions(path: Path) -> None:
    unit = parse_unit(path)
    assert unit.value("Service", "Type") == "notify"
    assert unit.value("Service", "NotifyAccess") == "main"
    exec_start = unit.value("Service", "ExecStart")
    assert exec_start.startswith(VENV_BIN), exec_start
    assert unit.value("Service", "Restart") == "on-failure"
    assert unit.value("Service", "RestartSec")
    assert unit.value("Service", "WatchdogSec")
    assert unit.value("Service", "StateDirectory") == "splitfed"
    assert unit.value("Service", "LoadCredential").startswith("mqtt-password:/etc/splitfed/")
    assert unit.value("Service", "StandardOutput") == "journal"
    assert unit.value("Service", "ProtectSystem") == "strict"
    assert unit.value("Service", "ProtectHome") == "yes"
    assert unit.value("Service", "NoNewPrivileges") == "yes"
    assert unit.value("Service", "PrivateTmp") == "yes"
    assert unit.value("Service", "CapabilityBoundingSet") == ""
    assert set(unit.value("Service", "RestrictAddressFamilies").split()) == {
        "AF_UNIX", "AF_INET", "AF_INET6"
    }  # fmt: skip
    assert "network-online.target" in unit.value("Unit", "After")
    assert unit.value("Install", "WantedBy") == "multi-user.target"


def test_agent_may_use_the_camera_and_nothing_else() -> None:
    unit = parse_unit(SYSTEMD / "edge-agent.service")
    assert unit.values("Service", "PrivateDevices") == []  # it would hide /dev/video*
    assert unit.value("Service", "DevicePolicy") == "closed"
    assert "char-video4linux rw" in unit.values("Service", "DeviceAllow")
    assert "video" in unit.value("Service", "SupplementaryGroups").split()
    assert unit.value("Service", "ExecStart") == (
        VENV_BIN + "edge-agent --config /etc/splitfed/agent.yaml"
    )


def test_aggregator_needs_no_devices_and_follows_the_broker() -> None:
    unit = parse_unit(SYSTEMD / "aggregator.service")
    assert unit.value("Service", "PrivateDevices") == "yes"
    assert "mosquitto.service" in unit.value("Unit", "After")
    exec_start = unit.value("Service", "ExecStart").split()
    assert exec_start[:2] == [VENV_BIN + "aggregator", "serve"]
    credential = unit.value("Service", "LoadCredential").split(":", 1)[0]
    assert exec_start[exec_start.index("--password-file") + 1] == credential
    assert exec_start[exec_start.index("--out") + 1].startswith("/var/lib/splitfed/")
    assert exec_start[exec_start.index("--broker") + 1] == "mqtt://127.0.0.1:1883"
    conf = (SYSTEMD / "mosquitto" / "splitfed.conf").read_text()
    assert "listener 1883 127.0.0.1" in conf  # the listener the aggregator uses


@pytest.mark.parametrize("path", UNITS + DROP_INS, ids=lambda p: p.name)
def test_every_relaxation_says_why(path: Path) -> None:
    relaxed = [e for e in parse_unit(path).entries if is_relaxation(e)]
    missing = [f"{path.name}:{e.line} {e.key}={e.value}" for e in relaxed if not e.comment_above]
    assert not missing, f"relaxations without a comment right above: {missing}"
    if path.suffix == ".service":
        assert relaxed, "the units relax a few settings; the parser must see them"


def test_jetson_drop_in_only_relaxes_devices_and_start_time() -> None:
    assert [p.name for p in DROP_INS] == ["jetson.conf"]
    unit = parse_unit(DROP_INS[0])
    assert {(e.section, e.key) for e in unit.entries} == {
        ("Service", "DevicePolicy"), ("Service", "TimeoutStartSec")
    }  # fmt: skip


# Keys these units may use: a typo check where systemd-analyze is not installed.
KNOWN_KEYS = {
    "Unit": {"Description", "Documentation", "Wants", "After", "Requires", "StartLimitIntervalSec",
             "StartLimitBurst"},
    "Install": {"WantedBy"},
    "Service": {
        "Type", "NotifyAccess", "ExecStart", "Restart", "RestartSec", "TimeoutStartSec",
        "TimeoutStopSec", "WatchdogSec", "Environment", "EnvironmentFile", "StandardOutput",
        "StandardError", "SyslogIdentifier", "DynamicUser", "StateDirectory",
        "StateDirectoryMode", "CacheDirectory", "ConfigurationDirectory", "WorkingDirectory",
        "UMask", "LoadCredential",
    } | RELAXATION_KEYS | {"RemoveIPC", "SystemCallArchitectures", "SystemCallErrorNumber"},
}  # fmt: skip


def _verify_offline(paths: list[Path]) -> None:
    for path in paths:
        for e in parse_unit(path).entries:
            assert e.key in KNOWN_KEYS.get(e.section, set()), f"{path.name}:{e.line}: {e.key}"


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` on copies whose ExecStart runs /usr/bin/true.

    verify insists that the ExecStart binary exists (outside /tmp and /home, which the units
    hide); the copies differ from the shipped units only in that program (whose path is checked
    above). Drop-ins are verified with their unit.
    """
    analyze = shutil.which("systemd-analyze")
    _verify_offline(UNITS + DROP_INS)  # the typo check runs everywhere
    if analyze is None:
        return
    true = shutil.which("true", path="/usr/bin:/bin")
    assert true is not None
    units = tmp_path / "units"
    (units / "edge-agent.service.d").mkdir(parents=True)
    for path in UNITS:
        text = path.read_text()
        exec_start = parse_unit(path).value("Service", "ExecStart")
        exe = exec_start.split()[0]
        text = text.replace(f"ExecStart={exec_start}", f"ExecStart={exec_start.replace(exe, true)}")
        assert exe not in text.split("[Unit]", 1)[1], "the program appears outside ExecStart"
        (units / path.name).write_text(text)
    for path in DROP_INS:
        shutil.copy(path, units / "edge-agent.service.d" / path.name)
    res = subprocess.run(
        [analyze, "verify", "--man=no", *(str(units / p.name) for p in UNITS)],
        capture_output=True, text=True, timeout=60,
        env={"SYSTEMD_UNIT_PATH": f"{units}:", "PATH": "/usr/bin:/bin", "SYSTEMD_LOG_COLOR": "0"},
    )  # fmt: skip
    output = res.stdout + res.stderr
    ours = [line for line in output.splitlines()
            if str(units) in line or "edge-agent" in line or "aggregator" in line]  # fmt: skip
    assert res.returncode == 0 and not ours, output


# ---- Mosquitto -------------------------------------------------------------------------------


def _make_tls(directory: Path) -> None:
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
         "subjectAltName=IP:127.0.0.1", "-keyout", str(directory / "server.key"),
         "-out", str(directory / "server.crt")],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    shutil.copy(directory / "server.crt", directory / "ca.crt")


@pytest.fixture
def broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Mosquitto with systemd/mosquitto/splitfed.conf, included the way Debian includes it."""
    path = "/usr/bin:/bin:/usr/sbin:/sbin"
    mosquitto = shutil.which("mosquitto", path=path)
    passwd = shutil.which("mosquitto_passwd", path=path)
    if mosquitto is None or passwd is None or shutil.which("openssl", path=path) is None:
        pytest.fail("mosquitto, mosquitto_passwd and openssl are needed: apt-get install mosquitto")
    certs = tmp_path / "certs"
    certs.mkdir()
    _make_tls(certs)
    plain, tls = free_port(), free_port()
    conf = (SYSTEMD / "mosquitto" / "splitfed.conf").read_text()
    replacements = {
        "listener 1883 127.0.0.1": f"listener {plain} 127.0.0.1",
        "listener 8883\n": f"listener {tls} 127.0.0.1\n",
        "/etc/mosquitto/certs/": f"{certs}/",
        "/etc/mosquitto/splitfed.passwd": str(tmp_path / "passwd"),
        "/etc/mosquitto/splitfed.acl": str(tmp_path / "acl"),
    }
    for old, new in replacements.items():
        assert old in conf, old
        conf = conf.replace(old, new)
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "splitfed.conf").write_text(conf)
    shutil.copy(SYSTEMD / "mosquitto" / "splitfed.acl.example", tmp_path / "acl")
    for i, (user, password) in enumerate([("aggregator", "agg-pw"), ("pi-01", "pi-pw")]):
        flags = ["-c"] if i == 0 else []
        cmd = [passwd, *flags, "-b", str(tmp_path / "passwd"), user, password]
        subprocess.run(cmd, check=True, capture_output=True, timeout=30)
    main = tmp_path / "mosquitto.conf"  # what Debian's /etc/mosquitto/mosquitto.conf holds
    main.write_text(
        f"user {getpass.getuser()}\npersistence true\npersistence_location {tmp_path}/\n"
        f"include_dir {tmp_path / 'conf.d'}\n"
    )
    log = open(tmp_path / "mosquitto.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([mosquitto, "-c", str(main)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                text = (tmp_path / "mosquitto.log").read_text()
                pytest.fail("mosquitto refused the config: " + text)
            try:
                socket.create_connection(("127.0.0.1", tls), timeout=0.2).close()
                socket.create_connection(("127.0.0.1", plain), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield plain, tls, certs
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def _client(port: int, user: str, password: str, ca: Path | None = None):  # type: ignore[no-untyped-def]
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{user}-test")
    c.username_pw_set(user, password)
    if ca is not None:
        c.tls_set(ca_certs=str(ca))
    connected = threading.Event()
    result: list[object] = []

    def on_connect(_c, _u, _f, reason, _p) -> None:  # type: ignore[no-untyped-def]
        result.append(reason)
        connected.set()

    c.on_connect = on_connect
    c.connect("127.0.0.1", port, keepalive=10)
    c.loop_start()
    assert connected.wait(5), "no CONNACK"
    c.result = result[0]  # type: ignore[attr-defined]
    return c


@pytest.mark.mqtt
def test_mosquitto_config_runs_with_auth_acl_tls_and_size_limit(broker) -> None:  # type: ignore[no-untyped-def]
    plain, tls, certs = broker
    bad = _client(plain, "pi-01", "wrong")
    assert bad.result.is_failure  # type: ignore[attr-defined]
    bad.loop_stop()

    agg = _client(plain, "aggregator", "agg-pw")
    got: list[tuple[str, int]] = []
    arrived = threading.Event()

    def on_message(_c, _u, msg) -> None:  # type: ignore[no-untyped-def]
        got.append((msg.topic, len(msg.payload)))
        arrived.set()

    subscribed = threading.Event()
    agg.on_message = on_message
    agg.on_subscribe = lambda *_args: subscribed.set()
    agg.subscribe("splitfed/run/+/up", qos=1)
    assert subscribed.wait(5)
    device = _client(tls, "pi-01", "pi-pw", ca=certs / "ca.crt")  # over TLS
    assert not device.result.is_failure  # type: ignore[attr-defined]
    device.publish("splitfed/run/pi-02/up", b"x", qos=1)  # another device's topic: ACL drops it
    device.publish("splitfed/run/pi-01/up", b"x" * (9 << 20), qos=0)  # over the size limit
    time.sleep(0.5)
    device.loop_stop()
    device = _client(tls, "pi-01", "pi-pw", ca=certs / "ca.crt")  # the broker may drop us
    device.publish("splitfed/run/pi-01/up", b"x" * (2 << 20), qos=1)  # a big SMASHED batch
    assert arrived.wait(5)
    time.sleep(0.3)
    for c in (agg, device):
        c.disconnect()
        c.loop_stop()
    assert got == [("splitfed/run/pi-01/up", 2 << 20)]
