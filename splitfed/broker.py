"""An embedded MQTT broker (amqtt) so that `aggregator serve` needs no setup on one machine.

amqtt is an asyncio broker; it runs here on its own event loop in a background thread, so the
aggregator's round logic stays plain blocking code. It speaks MQTT 3.1.1 (the clients fall
back to it automatically). For deployments with many devices use Mosquitto and
`--broker mqtts://HOST:PORT` (TLS, per-device ACL; see systemd/mosquitto/).

Two rules keep it from being an open relay:
- Beyond loopback it needs a users file (`user:<argon2 hash>` lines, made with
  `python -m splitfed.broker add-user FILE USER`) or an explicit `insecure=True`; the check
  runs before anything binds.
- A PUBLISH whose payload is over `max_message_bytes` (the wire's MAX_MESSAGE_BYTES) ends
  that client's connection before the payload is read, as Mosquitto's `max_packet_size` does,
  so one client cannot make the broker buffer gigabytes.
"""

from __future__ import annotations

import asyncio
import getpass
import ipaddress
import logging
import re
import sys
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker

from splitfed.errors import UserError
from splitfed.wire import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

USER_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
HASH_PREFIXES = ("$argon2", "$2b$", "$2a$", "$2y$")  # what amqtt's FileAuthPlugin verifies


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; 0.0.0.0, :: and names are not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_users(path: str | Path) -> dict[str, str]:
    """user -> password hash from a users file; a bad line is a UserError naming it."""
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as e:
        raise UserError(f"cannot read the broker users file {p}: {e.strerror}") from None
    users: dict[str, str] = {}
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not USER_RE.match(user) or not hashed.startswith(HASH_PREFIXES):
            raise UserError(
                f"{p} line {n}: expected USER:HASH (argon2 or bcrypt); "
                f"add users with: python -m splitfed.broker add-user {p} USER"
            )
        users[user] = hashed
    if not users:
        raise UserError(f"the broker users file {p} lists no users")
    return users


def hash_password(password: str) -> str:
    """An argon2id hash in the format amqtt's FileAuthPlugin checks."""
    from pwdlib.hashers.argon2 import Argon2Hasher

    return Argon2Hasher().hash(password)


class _LimitedReader(ReaderAdapter):
    """A stream that turns into end-of-file when a packet asks for more than `limit` bytes.

    amqtt reads a PUBLISH payload with one read of its full length right after the fixed
    header, so the size is known before any of it is buffered. End-of-file makes amqtt close
    the connection the way it does for a peer that went away; nothing of the packet is kept.
    """

    def __init__(self, inner: ReaderAdapter, limit: int, peer: str) -> None:
        self.inner = inner
        self.limit = limit
        self.peer = peer
        self.tripped = False

    async def read(self, n: int = -1) -> bytes:
        if self.tripped:
            return b""
        if n > self.limit:
            self.tripped = True
            log.warning(
                "embedded broker: %s sent a packet of %d bytes, over the limit of %d; "
                "connection closed",
                self.peer,
                n,
                self.limit,
            )
            return b""
        return await self.inner.read(n)

    def feed_eof(self) -> None:
        self.inner.feed_eof()


class _SizeLimitedBroker(Broker):  # type: ignore[misc]
    """amqtt's Broker with every TCP connection read through a `_LimitedReader`."""

    max_message_bytes = MAX_MESSAGE_BYTES

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        peer = writer.get_extra_info("peername")
        name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        limited = _LimitedReader(StreamReaderAdapter(reader), self.max_message_bytes, name)
        await self._client_connected(listener_name, limited, StreamWriterAdapter(writer))


class EmbeddedBroker:
    """amqtt's Broker on 127.0.0.1:1883 (or the given address) in a daemon thread."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        users_file: str | Path | None = None,
        insecure: bool = False,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self.host = host
        self.port = port
        self.users_file = Path(users_file) if users_file is not None else None
        self.insecure = insecure
        self.max_message_bytes = max_message_bytes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def check(self) -> None:
        """Refuse to listen beyond loopback without logins unless told `insecure` (UserError)."""
        if self.users_file is not None:
            read_users(self.users_file)
        elif not is_loopback(self.host) and not self.insecure:
            raise UserError(
                f"the embedded broker would listen on {self.host}, beyond loopback, with no "
                "logins: give it a users file (--broker-users) or say --insecure"
            )

    def _config(self) -> dict[str, Any]:
        if self.users_file is not None:
            auth: dict[str, Any] = {
                "amqtt.plugins.authentication.FileAuthPlugin": {
                    "password_file": str(self.users_file)
                }
            }
        else:
            auth = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            # No $SYS publisher and no per-packet logger: both cost time on every message.
            "plugins": auth,
        }

    def start(self, timeout: float = 15.0) -> None:
        """Start listening; a port in use or a bad address is the user's to fix (UserError)."""
        self.check()
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.ERROR)
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="mqtt-broker", daemon=True)
        self._thread.start()
        limit = self.max_message_bytes

        async def boot() -> Any:
            broker = _SizeLimitedBroker(self._config(), loop=loop)
            broker.max_message_bytes = limit
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
        log.info(
            "embedded MQTT broker (amqtt) listening on %s:%d (%s, messages up to %d bytes)",
            self.host,
            self.port,
            "logins required" if self.users_file else "anonymous",
            limit,
        )

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


def add_user(path: str | Path, user: str, password: str) -> None:
    """Add or replace `user` in the users file (created 0600 when missing)."""
    if not USER_RE.match(user):
        raise UserError(f"bad user name {user!r}: use 1-64 of A-Z a-z 0-9 _ -")
    if not password:
        raise UserError("empty password")
    p = Path(path)
    users = read_users(p) if p.exists() and p.read_text().strip() else {}
    users[user] = hash_password(password)
    p.touch(mode=0o600, exist_ok=True)
    p.write_text("".join(f"{u}:{h}\n" for u, h in users.items()))


def main(argv: list[str] | None = None) -> int:
    """`python -m splitfed.broker add-user FILE USER`: the password comes from stdin or a prompt."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "add-user":
        print("usage: python -m splitfed.broker add-user FILE USER", file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args[2]}: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    try:
        add_user(args[1], args[2], password)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args[2]} added to {args[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
