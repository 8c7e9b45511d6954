"""Helpers of the MQTT tests: Mosquitto on a free loopback port, subprocesses, a tap on `#`.

Mosquitto must be installed (CI: `scripts/setup.sh` installs it with apt). A missing binary is
a test failure that says so, never a skip: these tests are the federation's only network check.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from splitfed.client import CLIENT_PREFIX
from splitfed.config import TrainConfig
from splitfed.data.batches import num_batches
from splitfed.model import ModelConfig, build_split_model, smashed_shape
from splitfed.mqtt import DOWN, GLOBAL, PREDICTION, STATUS, UP, parse_presence, parse_topic
from splitfed.simulate import strategy_class
from splitfed.training import state_to_numpy
from splitfed.wire import WireError, decode, weights_spec

from .hostile import Target

REPO = Path(__file__).resolve().parents[2]
THREADS = 1  # every process (and the reference simulation) uses one torch thread: same numbers
IDENTITIES = 12
AGGREGATOR_CMD = [sys.executable, "-c", "from aggregator.cli import main; main()", "serve"]
AGENT_CMD = [sys.executable, "-m", "edge_agent"]


def mosquitto_binary() -> str:
    path = os.environ.get("MOSQUITTO") or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(path).is_file():
        pytest.fail(
            "Mosquitto is not installed (no /usr/sbin/mosquitto): run scripts/setup.sh, which "
            "installs it with apt (apt-get install mosquitto)"
        )
    return path


# Under pytest-xdist each worker hands out ports from its own slice below the kernel's ephemeral
# range, so a broker of one worker can never answer on a port another worker just probed.
_PORT_BASE, _PORT_SLICE = 20000, 400


def free_port() -> int:
    """A port free on 127.0.0.1 now."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ...
    if not worker.startswith("gw"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    low = _PORT_BASE + int(worker[2:]) * _PORT_SLICE
    for port in np.random.default_rng().permutation(np.arange(low, low + _PORT_SLICE)):
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", int(port)))
            return int(port)
    raise RuntimeError(f"no free port in {low}..{low + _PORT_SLICE - 1}")


def wait_port(port: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        time.sleep(0.05)
    return False


class Mosquitto:
    """Mosquitto with a generated config: loopback only, persistence on, no size limit."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.binary = mosquitto_binary()
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = directory / "mosquitto.conf"
        user = ""
        with contextlib.suppress(Exception):
            import pwd

            user = pwd.getpwuid(os.getuid()).pw_name
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            + (f"user {user}\n" if user else "")
            + "allow_anonymous true\nset_tcp_nodelay true\n"
            f"persistence true\npersistence_location {directory}/\n"
            "max_queued_messages 100000\nmax_inflight_messages 100\n"
            f"log_dest file {directory}/mosquitto.log\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
        if not wait_port(self.port):
            self.stop()
            log = (
                (self.dir / "mosquitto.log").read_text()
                if (self.dir / "mosquitto.log").exists()
                else ""
            )
            pytest.fail(f"mosquitto did not listen on 127.0.0.1:{self.port}: {log[-500:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self, down_seconds: float = 1.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()


# ---- processes ---------------------------------------------------------------------------------


@dataclass
class Procs:
    """Subprocesses of one test, with their logs; all stopped at the end of the test."""

    dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": str(THREADS),
            "COLUMNS": "200",
        }
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        log.close()
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {n} ---\n{self.log(n)[-3000:]}" for n in self.procs)

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not finish within {timeout:.0f} s\n{self.logs()}")

    def check_alive(self, *names: str) -> None:
        """Fail at once (with the logs) when a process that should be running has exited."""
        for n in names:
            rc = self.procs[n].poll()
            if rc is not None:
                pytest.fail(f"{n} exited with {rc}\n{self.logs()}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs[name]
        if p.poll() is None:
            p.send_signal(sig)
            p.wait(15)

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def serve_cmd(
    out: Path,
    broker: str | None,
    algo: str,
    clients: int,
    rounds: int,
    run_id: str,
    *extra: str,
    default_defence: bool = False,
) -> list[str]:
    """`aggregator serve` as the suite runs it: `--defence none` unless `extra` names one.

    The suite's equalities compare against simulator runs without a defence (`reference`);
    `default_defence` leaves the flag out, so serve applies its own default (test_e2e)."""
    cmd = [*AGGREGATOR_CMD, "--algo", algo, "--min-clients", str(clients), "--rounds", str(rounds),
           "--seed", "0", "--threads", str(THREADS), "--run-id", run_id, "--out", str(out),
           "--join-timeout", "120", *extra]  # fmt: skip
    if "--defence" not in extra and not default_defence:
        cmd += ["--defence", "none"]
    if broker is not None:
        cmd += ["--broker", broker]
    return cmd


def agent_cmd(broker: str, i: int, n: int, run_id: str, *extra: str) -> list[str]:
    return [*AGENT_CMD, "--broker", broker, "--client-id", f"client-{i:02d}", "--dataset", "synth",
            "--synth-identities", str(IDENTITIES), "--shard", f"{i}/{n}", "--seed", "0",
            "--threads", str(THREADS), "--run-id", run_id, "--exit-when-done", *extra]  # fmt: skip


# ---- a tap on every topic ----------------------------------------------------------------------


class Tap:
    """A subscriber on `#` that keeps every message (topic, payload, retained flag, time)."""

    def __init__(self, url: str, name: str = "tap") -> None:
        host, port = url.rsplit("/", 1)[-1].split(":")
        self.messages: list[tuple[str, bytes, bool, float]] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{time.time_ns()}",
                                  protocol=mqtt.MQTTv311)  # fmt: skip
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect_async(host, int(port))
        self.client.loop_start()
        assert self.connected.wait(10), "tap could not connect"

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe("#", qos=1)
        self.connected.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(
                (msg.topic, bytes(msg.payload), bool(msg.retain), time.monotonic())
            )

    def wait_for(
        self,
        pred: Callable[[str, bytes], bool],
        timeout: float,
        alive: Callable[[], None] | None = None,
    ) -> bool:
        """True once a message matching `pred` arrived; `alive()` may fail the test early."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            if alive is not None:
                alive()
            with self.lock:
                new = self.messages[seen:]
                seen = len(self.messages)
            if any(pred(t, p) for t, p, _, _ in new):
                return True
            time.sleep(0.05)
        return False

    def snapshot(self) -> list[tuple[str, bytes, bool, float]]:
        with self.lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained_topics(
    url: str, wait: float = 1.5, want: Iterable[str] = (), timeout: float = 30.0
) -> dict[str, bytes]:
    """What a newcomer gets on `#` right after subscribing: only the retained messages.

    With `want`, looks again (a new subscriber each time, up to `timeout` s) until every topic
    named is there: on a loaded machine a retained message published just before may reach the
    broker after a look has subscribed, and then arrives as a live message, not a retained one.
    """
    deadline = time.monotonic() + timeout
    while True:
        tap = Tap(url, "retained")
        time.sleep(wait)
        msgs = tap.snapshot()
        tap.close()
        got = {t: p for t, p, retained, _ in msgs if retained}
        if all(t in got for t in want) or time.monotonic() > deadline:
            return got


def read_metrics(out: Path) -> dict[str, Any]:
    return json.loads((out / "metrics.json").read_text())


def hostile_target(run_id: str, prefix: str = "splitfed") -> Target:
    """What tests/mqtt/hostile/ needs to attack run `run_id` (the default model's shapes)."""
    model = ModelConfig()
    client, _ = build_split_model(model, 0)
    spec = weights_spec(state_to_numpy(client), CLIENT_PREFIX)
    weights = {k: (next(iter(dtypes)), shape) for k, (dtypes, shape) in spec.items()}
    return Target(run_id, prefix, smashed_shape(model), tuple(model.input_shape), weights)


# ---- what may cross the wire -------------------------------------------------------------------

UP_TYPES = {"join", "smashed", "client_update", "eval_smashed", "eval_result", "predict", "leave"}
DOWN_TYPES = {"round_start", "gradients", "eval_request", "eval_predictions", "prediction"}
ST = {np.float32: "F32", np.float16: "F16", np.uint8: "U8", np.int64: "I64"}


def _dt(a: np.ndarray) -> str:
    return ST.get(a.dtype.type, str(a.dtype))


def check_payloads(
    messages: list[tuple[str, bytes, bool, float]],
    prefix: str,
    run_id: str,
    compression: str = "fp32",
    grad_compression: str = "fp32",
    full: bool = False,
) -> tuple[list[str], Counter[str]]:
    """Every payload a tap saw, checked: (problems, count per message type).

    Only wire messages of the declared shapes, presence words and prediction JSON; no tensor
    shaped like an image; nothing but presence and global weights retained. With `full`
    (FedAvg), round and evaluation messages and updates carry both halves.
    """
    model = ModelConfig()
    smashed = smashed_shape(model)
    client, server = build_split_model(model, 0)
    weights = {f"w.{k}": tuple(v.shape) or (1,) for k, v in state_to_numpy(client).items()}
    both = {
        **weights,
        **{f"s.{k}": tuple(v.shape) or (1,) for k, v in state_to_numpy(server).items()},
    }
    act_dtype = {"fp32": "F32", "fp16": "F16", "int8": "U8"}[compression]
    grad_dtype = {"fp32": "F32", "fp16": "F16"}[grad_compression]
    problems: list[str] = []
    seen: Counter[str] = Counter()
    image = tuple(model.input_shape)

    def act_ok(t: dict[str, np.ndarray], extra: set[str]) -> bool:
        names = {"activations", *extra} | (
            {"act_scale", "act_min"} if compression == "int8" else set()
        )
        a = t.get("activations")
        if set(t) != names or a is None or _dt(a) != act_dtype or tuple(a.shape[1:]) != smashed:
            return False
        if compression == "int8":
            return all(
                t[k].shape == a.shape[:2] and _dt(t[k]) == "F16" for k in ("act_scale", "act_min")
            )
        return True

    for name, payload, retained, _ in messages:
        parsed = parse_topic(prefix, run_id, name)
        if parsed is None:
            problems.append(f"topic outside the run: {name}")
            continue
        cid, kind = parsed
        if retained and kind not in (STATUS, GLOBAL):
            problems.append(f"retained {kind} message on {name}")
        if kind == STATUS:
            if payload and parse_presence(payload) is None:
                problems.append(f"bad status {payload[:40]!r} on {name}")
            seen["status"] += 1
            continue
        if kind == PREDICTION:
            body = json.loads(payload)
            if not isinstance(body, dict) or "emotion" not in body:
                problems.append(f"bad prediction JSON on {name}")
            seen["prediction_json"] += 1
            continue
        try:
            msg = decode(payload)
        except WireError as e:
            problems.append(f"undecodable payload on {name}: {e}")
            continue
        t, typ = msg.tensors, msg.type.value
        seen[typ] += 1
        allowed = UP_TYPES if kind == UP else DOWN_TYPES if kind == DOWN else {"global_weights"}
        if typ not in allowed:
            problems.append(f"{typ} on a {kind} topic ({name})")
        if len(json.dumps(msg.env.body)) > 20_000:
            problems.append(f"{typ}: oversized JSON body")
        for k, a in t.items():
            if tuple(a.shape[-3:]) == image or tuple(a.shape[-2:]) == image[1:]:
                problems.append(f"{typ}: tensor {k} {a.shape} is shaped like an image")
        if typ in ("join", "eval_result", "leave"):
            ok = not t
        elif typ == "smashed":
            ok = act_ok(t, {"labels"}) and t["labels"].shape == t["activations"].shape[:1]
        elif typ in ("eval_smashed", "predict"):
            ok = act_ok(t, set())
        elif typ == "gradients":
            ok = (
                set(t) == {"grad"}
                and _dt(t["grad"]) == grad_dtype
                and t["grad"].shape[1:] == smashed
            )
        elif typ in ("round_start", "eval_request", "global_weights", "client_update"):
            want = both if full and typ != "global_weights" else weights
            ok = {k: tuple(a.shape) for k, a in t.items()} == want
        elif typ == "eval_predictions":
            ok = set(t) == {"pred"} and _dt(t["pred"]) == "I64" and t["pred"].ndim == 1
        elif typ == "prediction":
            ok = set(t) == {"probs"} and t["probs"].shape[1:] == (7,)
        else:
            ok = False
        if not ok:
            shapes = {k: (_dt(a), a.shape) for k, a in t.items()}
            problems.append(f"{typ} on {name}: unexpected tensors {shapes}")
    return problems, seen


def parts_trained(metrics: dict[str, Any]) -> list[int]:
    """Parts of each round that each device of a run trains in: one per batch of its round, at
    most every part (a device sits out the parts that hold none of its batches). Devices that
    train side by side share the batch (`TrainConfig.split_batch`)."""
    t = TrainConfig.model_validate(metrics["train"])
    sizes = metrics["data"]["clients_samples"]
    side_by_side = strategy_class(metrics["algo"]).side_by_side
    batch = t.device_batch(len(sizes)) if side_by_side else t.batch_size
    return [min(num_batches(n, batch) * t.local_epochs, t.syncs_per_round) for n in sizes]
