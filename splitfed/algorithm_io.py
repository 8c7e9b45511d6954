"""The aggregator's checked messaging for algorithms whose devices hold other data than crops.

PyVertical's owners hold parts of crops, FedSL's devices segments of clips: the same checks
and counts as `ServerIO`, with the algorithm's own tensor specs.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from splitfed.config import TrainConfig
from splitfed.model import ModelConfig
from splitfed.server import ClientInfo, ServerIO
from splitfed.transport import Transport
from splitfed.wire import (
    MAX_MESSAGE_BYTES,
    Envelope,
    JoinBody,
    Message,
    MsgType,
    ShapeSpec,
    Validator,
)

log = logging.getLogger(__name__)


U8 = frozenset({"U8"})


class AlgorithmIO(ServerIO):
    """`ServerIO` for algorithms whose clients hold other data than whole crops.

    The same checked, counted messaging, with the algorithm's own tensor specs; JOINs of any
    input shape are admitted and their bodies kept, for the algorithm to check its layout.
    """

    def __init__(
        self,
        transport: Transport,
        run_id: str,
        train_cfg: TrainConfig,
        specs: dict[MsgType, Any],
        max_batch: int = 1024,
    ) -> None:
        super().__init__(transport, run_id, ModelConfig(), train_cfg, max_batch)
        self.join_info: dict[str, dict[str, Any]] = {}
        # JOINs per device: one that joins again restarted and lost its state (PyVertical
        # aligns its records again).
        self.joins: Counter[str] = Counter()
        self.validator = Validator(
            run_id,
            {MsgType.JOIN: {}, MsgType.LEAVE: {}, **specs},
            known_sender=self._known,
            round_ok=self._round_ok,
            max_batch=max_batch,
        )

    def _register(self, body: JoinBody) -> None:
        if body.client_id in self.clients:
            log.debug("client %s re-joined", body.client_id)
        else:
            log.debug("client %s joined with %d records", body.client_id, body.n_train)
        self.clients[body.client_id] = ClientInfo(
            body.client_id, body.n_train, body.n_test, body.class_counts
        )

    def _accept(self, ev: Any) -> Any:
        out = super()._accept(ev)
        if isinstance(out, Message) and out.type is MsgType.JOIN and out.src in self.clients:
            self.join_info[out.src] = dict(out.env.body)
            self.joins[out.src] += 1
        return out


def byte_spec(env: Envelope, *names: str) -> ShapeSpec:
    """uint8 tensors whose lengths the body declares as `<name>_bytes`."""
    out: ShapeSpec = {}
    for n in names:
        size = env.body[f"{n}_bytes"]
        if not isinstance(size, int) or not 0 <= size <= MAX_MESSAGE_BYTES:
            raise ValueError(f"bad length of {n}")
        out[n] = (U8, (size,))
    return out
