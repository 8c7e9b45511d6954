"""An embedded MQTT broker (amqtt) so that `aggregator serve` needs no setup on one machine.

amqtt is an asyncio broker; it runs here on its own event loop in a background thread, so the
aggregator's round logic stays plain blocking code. It speaks MQTT 3.1.1 (the clients fall
back to it automatically) and sets no message-size limit, so multi-megabyte batches pass.
For deployments with many devices use Mosquitto and `--broker mqtt://HOST:PORT`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from splitfed.errors import UserError

log = logging.getLogger(__name__)


class EmbeddedBroker:
    """amqtt's Broker on 127.0.0.1:1883 (or the given address) in a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            # No $SYS publisher and no per-packet logger: both cost time on every message.
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }

    def start(self, timeout: float = 15.0) -> None:
        """Start listening; a port in use or a bad address is the user's to fix (UserError)."""
        from amqtt.broker import Broker

        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.ERROR)
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="mqtt-broker", daemon=True)
        self._thread.start()

        async def boot() -> Any:
            broker = Broker(self._config(), loop=loop)
            await broker.start()
            return broker

        fut = asyncio.run_coroutine_threadsafe(boot(), loop)
        try:
            self._broker = fut.result(timeout)
        except FutureTimeout:
            self.stop()
            raise UserError(
                f"embedded MQTT broker did not start on {self.host}:{self.port}"
            ) from None
        except Exception as e:
            self.stop()
            raise UserError(
                f"cannot start the embedded MQTT broker on {self.host}:{self.port} ({e}); "
                "is the port in use? pick another with --listen or use --broker"
            ) from None
        log.info("embedded MQTT broker (amqtt) listening on %s:%d", self.host, self.port)

    def stop(self, timeout: float = 10.0) -> None:
        loop, broker = self._loop, self._broker
        if loop is None:
            return
        if broker is not None:
            try:
                asyncio.run_coroutine_threadsafe(broker.shutdown(), loop).result(timeout)
            except Exception as e:  # shutting down anyway
                log.debug("embedded broker shutdown: %s", e)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
        self._loop = self._broker = self._thread = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
