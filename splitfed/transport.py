"""The small interface between an algorithm's round logic and the network.

An algorithm on the aggregator only sends bytes to a client, receives bytes (or a presence
change) from any client, and publishes the global client weights. `InProcessTransport` delivers
them by calling each `ClientRuntime` directly; the MQTT transport (`splitfed.mqtt`) publishes them
through a broker. The bytes are the same encoded wire messages in both, so compression, sizes
and validation are identical, and so are the numbers.
"""

from __future__ import annotations

import abc
from collections import deque
from dataclasses import dataclass
from typing import Literal

from splitfed.client import ClientRuntime

Presence = Literal["online", "offline", "stopped"]


@dataclass
class Incoming:
    """One event for the aggregator: a message from a client, or a change of its presence."""

    client_id: str
    data: bytes | None = None
    presence: Presence | None = None


class Transport(abc.ABC):
    """What the aggregator's algorithms need from the network, and nothing more."""

    bytes_up: int = 0  # client -> aggregator
    bytes_down: int = 0  # aggregator -> clients

    @abc.abstractmethod
    def send(self, client_id: str, data: bytes) -> None:
        """Deliver one encoded message to one client (QoS 1, not retained)."""

    @abc.abstractmethod
    def recv(self, timeout: float) -> Incoming | None:
        """Next event from any client, or None when nothing arrived within `timeout` seconds."""

    @abc.abstractmethod
    def publish_global(self, data: bytes) -> None:
        """Publish the current global client weights (retained, for agents that join later)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release network resources."""


class InProcessTransport(Transport):
    """Delivers messages by calling the clients' runtimes in this process, in a fixed order.

    Nothing runs concurrently, so a run is deterministic; a `recv` that finds nothing queued
    means the algorithm waits for a message no client will send, which is a bug, not a timeout.
    """

    def __init__(self, clients: list[ClientRuntime]) -> None:
        self.clients = {c.client_id: c for c in clients}
        self.inbox: deque[Incoming] = deque()
        self.bytes_up = 0
        self.bytes_down = 0
        self.messages_up = 0
        self.messages_down = 0
        for c in clients:
            self._from_client(c.client_id, c.join())

    def _from_client(self, client_id: str, data: bytes) -> None:
        self.bytes_up += len(data)
        self.messages_up += 1
        self.inbox.append(Incoming(client_id, data=data))

    def send(self, client_id: str, data: bytes) -> None:
        self.bytes_down += len(data)
        self.messages_down += 1
        client = self.clients.get(client_id)
        if client is None:
            return
        for reply in client.handle_bytes(data):
            self._from_client(client_id, reply)

    def recv(self, timeout: float) -> Incoming | None:
        return self.inbox.popleft() if self.inbox else None

    def publish_global(self, data: bytes) -> None:
        # Counted once, as the aggregator publishes it once; every simulated client receives it.
        self.bytes_down += len(data)
        self.messages_down += 1
        for client_id, client in self.clients.items():
            for reply in client.handle_bytes(data):
                self._from_client(client_id, reply)
