"""The aggregator's side of a live federation: `ServerIO` over MQTT with enrolment, and rounds
that wait for agents to come back after an outage."""

from __future__ import annotations

import logging
import time
from typing import Any

from splitfed.algorithm_io import AlgorithmIO
from splitfed.server import Presence, ServerIO
from splitfed.transport import Incoming
from splitfed.wire import Message

log = logging.getLogger("aggregator.serve")

NOT_ENROLLED = "client not enrolled"  # the counted reason for ids outside --allow-clients


class ServeIO(ServerIO):
    """ServerIO for a live federation.

    Only agents that hold training data train (camera-only agents just ask for predictions).
    With an allow list (`allowed`), a message from any other id is dropped before it is
    parsed and counted as "client not enrolled"; with the shipped Mosquitto ACL the topic a
    message arrives on is the sender's authenticated identity, so this is enrolment.
    After an outage (a broker restart fires every agent's last will) the next round waits for
    the agents to reconnect: up to `grace` seconds while fewer than `min_clients` are back, up
    to `outage_timeout` while none is.
    """

    def __init__(
        self,
        *args: Any,
        data_info: dict[str, Any] | None = None,
        min_clients: int = 1,
        grace: float = 5.0,
        outage_timeout: float = 600.0,
        allowed: frozenset[str] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(*args, **kw)
        self.allowed = allowed
        self._warned: set[str] = set()  # un-enrolled ids already logged (bounded)
        self.data_info = data_info if data_info is not None else {}
        self.min_clients = min_clients
        self.grace = grace
        self.outage_timeout = outage_timeout
        self.last_poll = time.monotonic()  # the systemd watchdog checks that rounds progress

    def next(self, deadline: float) -> Any:
        self.last_poll = time.monotonic()
        return super().next(deadline)

    def _accept(self, ev: Incoming) -> Message | Presence | None:
        if self.allowed is not None and ev.client_id not in self.allowed:
            if ev.data is None:
                return None  # a stranger's presence is no event of this run
            self.rejected[NOT_ENROLLED] += 1
            if ev.client_id not in self._warned and len(self._warned) < 1000:
                self._warned.add(ev.client_id)
                log.warning("dropped messages from %s: %s (logged once)", ev.client_id,
                            NOT_ENROLLED)  # fmt: skip
            return None
        return super()._accept(ev)

    def trainers(self) -> list[str]:
        return sorted(c for c, i in self.clients.items() if i.online and i.n_train > 0)

    def online(self) -> list[str]:
        now = self.trainers()
        if len(now) >= self.min_clients or not self.clients:
            return now
        wait = self.grace if now else self.outage_timeout
        log.info("%d of %d agents online; waiting up to %.0f s for the others", len(now),
                 self.min_clients, wait)  # fmt: skip
        deadline = time.monotonic() + wait
        while len(now) < self.min_clients and time.monotonic() < deadline:
            self.next(min(deadline, time.monotonic() + 0.5))
            now = self.trainers()
        return now

    def wait_for_clients(self, n: int, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.trainers()) < n and time.monotonic() < deadline:
            self.next(min(deadline, time.monotonic() + 1.0))
        online = self.trainers()
        info = [self.clients[c] for c in online]
        self.data_info.update({
            "name": "agents",
            "n_train": sum(i.n_train for i in info),
            "n_test": sum(i.n_test for i in info),
            "clients_samples": [i.n_train for i in info],
        })  # fmt: skip
        return online


class ServeAlgorithmIO(ServeIO, AlgorithmIO):
    """ServeIO's live-federation behaviour with AlgorithmIO's checks for owners and segments.

    Build it as AlgorithmIO: (transport, run_id, train_cfg, specs, ...ServeIO's keywords)."""
