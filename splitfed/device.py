"""What every device-side runtime shares: validated input, answers as encoded messages.

`ClientRuntime` (split CNN), the FedSL segment and the PyVertical owner differ in what they
compute, not in how a message is checked, answered, or refused. `handle_bytes` is the device's
edge: whatever a received message makes go wrong becomes a counted rejection with a reason.
"""

from __future__ import annotations

import abc
import logging
from collections import Counter

from pydantic import ValidationError

from splitfed.wire import (
    Envelope,
    Message,
    MsgType,
    RejectLog,
    Sequencer,
    Validator,
    WireError,
    encode,
)

log = logging.getLogger(__name__)


class DeviceRuntime(abc.ABC):
    """A reactive device: `handle_bytes` turns one message into the messages to send back."""

    client_id: str
    seq: Sequencer
    _validator: Validator
    rejected: int
    _max_round: int = 0

    def _round_ok(self, env: Envelope) -> bool:
        """Not older than the newest round of an accepted message (the validator's round check).

        It only looks: the newest round moves on in `handle_bytes`, once a message has passed
        every check. The round is checked before the body, tensors and values are, so a forged
        message of a far round that fails those must not make the real rounds look stale.
        """
        return env.round >= self._max_round

    def new_aggregator(self) -> None:
        """A new aggregator instance: take its rounds from wherever it starts.

        One resumed from its checkpoint starts again at the round after it, below a round the
        dead instance may have begun before it died: without this the device refused every
        message of the resumed round as stale and the round trained no one. Replays of the
        dead instance's messages are still refused by their sequence numbers and message ids.
        """
        self._max_round = 0

    @abc.abstractmethod
    def join(self) -> bytes:
        """The JOIN message that announces this device."""

    @abc.abstractmethod
    def handle(self, msg: Message) -> list[Message]:
        """Act on one validated message; raise ValueError/KeyError on a semantic problem."""

    def leave(self, reason: str = "stopped") -> bytes:
        return encode(self.seq.make(MsgType.LEAVE, 0, {"reason": reason}))

    @property
    def rejects(self) -> RejectLog:
        """This device's rejections by reason (created on first use: the subclasses' own
        `__init__` set up everything else and need not call ours)."""
        rl = self.__dict__.get("_rejects")
        if rl is None:
            rl = self.__dict__["_rejects"] = RejectLog(log, self.client_id)
        return rl

    @property
    def rejected_by_reason(self) -> Counter[str]:
        return self.rejects.counts

    def _reject(self, reason: str, detail: str) -> list[bytes]:
        self.rejected += 1
        self.rejects.reject(reason, detail, "aggregator")
        return []

    def handle_bytes(self, data: bytes) -> list[bytes]:
        """Validate one message from the aggregator and answer it; bad input is logged.

        A message that passed every check makes its round the newest (`_round_ok` refuses
        older ones from then on): only then, as the validator commits its own sequence and
        replay state, and before `handle`, whose semantic refusal of it does not unsay a round
        the aggregator has moved on to.
        """
        try:
            msg = self._validator.check(data)
        except WireError as e:
            return self._reject(e.reason, str(e))
        except Exception as e:  # noqa: BLE001 - the device's edge: nothing received may escape
            return self._reject("malformed", f"{type(e).__name__}: {e}")
        self._max_round = max(self._max_round, msg.env.round)  # it passed every check
        try:
            return [encode(m) for m in self.handle(msg)]
        except (ValueError, KeyError, ValidationError) as e:
            return self._reject("semantic", f"could not act on {msg.type.value}: {e}")
        except Exception as e:  # noqa: BLE001 - e.g. OverflowError, MemoryError, torch errors
            return self._reject(
                "handler_error", f"could not act on {msg.type.value}: {type(e).__name__}: {e}"
            )
