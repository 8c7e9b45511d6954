"""What every device-side runtime shares: validated input, answers as encoded messages.

`ClientRuntime` (split CNN), the FedSL segment and the PyVertical owner differ in what they
compute, not in how a message is checked, answered, or refused.
"""

from __future__ import annotations

import abc
import logging

from pydantic import ValidationError

from splitfed.wire import Message, MsgType, Sequencer, Validator, WireError, encode

log = logging.getLogger(__name__)


class DeviceRuntime(abc.ABC):
    """A reactive device: `handle_bytes` turns one message into the messages to send back."""

    client_id: str
    seq: Sequencer
    _validator: Validator
    rejected: int

    @abc.abstractmethod
    def join(self) -> bytes:
        """The JOIN message that announces this device."""

    @abc.abstractmethod
    def handle(self, msg: Message) -> list[Message]:
        """Act on one validated message; raise ValueError/KeyError on a semantic problem."""

    def leave(self, reason: str = "stopped") -> bytes:
        return encode(self.seq.make(MsgType.LEAVE, 0, {"reason": reason}))

    def handle_bytes(self, data: bytes) -> list[bytes]:
        """Validate one message from the aggregator and answer it; bad input is logged."""
        try:
            msg = self._validator.check(data)
        except WireError as e:
            self.rejected += 1
            log.warning("%s dropped a message: %s", self.client_id, e)
            return []
        try:
            return [encode(m) for m in self.handle(msg)]
        except (ValueError, KeyError, RuntimeError, ValidationError) as e:
            self.rejected += 1
            log.warning("%s could not act on %s: %s", self.client_id, msg.type.value, e)
            return []
