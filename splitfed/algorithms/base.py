"""The shape every algorithm has: a strategy with three hooks, run by one receive loop.

As in Flower's strategies, an algorithm says how to *configure* a round (which messages start
it), how to *handle* one message, and how to *aggregate* what came back; the arithmetic lives
in pure functions (`aggregate.py`). This base owns what is the same everywhere: the loop that
takes checked messages from `ServerIO`, the round deadline, a per-step deadline for algorithms
that wait on one device at a time, devices that drop out or re-join mid-round, and the
bookkeeping of client updates (sample counts capped by what the aggregator saw).
"""

from __future__ import annotations

import abc
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
import torch
from pydantic import BaseModel

from splitfed.algorithms.aggregate import aggregate_states, max_samples
from splitfed.algorithms.server_opt import ServerOptState, server_step
from splitfed.client import CLIENT_PREFIX
from splitfed.config import AggregationConfig, TrainConfig, round_lr
from splitfed.data.batches import num_batches, part_bounds
from splitfed.server import Presence, ServerIO
from splitfed.training import load_numpy_state, set_lr, state_to_numpy, unprefixed
from splitfed.wire import Message, MsgType

log = logging.getLogger(__name__)


@dataclass
class RoundTrain:
    """What one round of training produced, as counts the runner turns into metrics."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    completed: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def add(self, loss: float, correct: int, n: int) -> None:
        self.loss_sum += loss * n
        self.correct += correct
        self.seen += n

    def merge(self, other: RoundTrain) -> None:
        self.loss_sum += other.loss_sum
        self.correct += other.correct
        self.seen += other.seen

    def merge_part(self, part: RoundTrain) -> None:
        """Add one part of a cut round (`TrainConfig.syncs_per_round`): its counts and drops."""
        self.merge(part)
        self.dropped.extend(c for c in part.dropped if c not in self.dropped)


@dataclass
class ClientUpdate:
    """One device's CLIENT_UPDATE: its weights per model half and the sample count it earned."""

    halves: dict[str, dict[str, np.ndarray]]
    n_samples: int
    body: dict[str, Any]


@dataclass
class RoundState:
    """One round in flight: who is still expected, what arrived, what the base must watch."""

    rnd: int
    participants: list[str]
    active: set[str]
    result: RoundTrain = field(default_factory=RoundTrain)
    updates: dict[str, ClientUpdate] = field(default_factory=dict)
    # Samples of each device's smashed batches this round: the most it may claim to have trained.
    trained: Counter[str] = field(default_factory=Counter)
    # The one device the round cannot go on without right now (SL, SFLV2); the step timeout
    # applies to it. None when the round waits on everybody at once.
    waiting_on: str | None = None

    def done(self) -> list[str]:
        """Devices whose update arrived, in participant order (float sums depend on order)."""
        return [c for c in self.participants if c in self.updates]


class FedPeer(Protocol):
    """A separate fed server as the main server sees it (aggregator/fed_server.py)."""

    def sync(self, algo: Strategy) -> None:
        """Before a round: wait until the fed server has published the version `algo` is at."""

    def round_done(self, algo: Strategy, rnd: int, clients: list[str], weights: list[int]) -> None:
        """Hand it the round's clients and weights; wait until it published their average."""


class Strategy(abc.ABC):
    """Base of all algorithms: membership, learning rate, the receive loop, client updates."""

    name: ClassVar[str]
    mode: ClassVar[Literal["split", "local"]] = "split"
    uses_clients: ClassVar[bool] = True
    # Whether the round can be cut into parts with an average after each
    # (`TrainConfig.syncs_per_round`): the one-crop split algorithms and FedAvg.
    partable: ClassVar[bool] = False
    # Whether devices train copies of a half side by side, to be averaged (SFLV1, SFLV2's
    # client half, FedAvg): with `TrainConfig.split_batch` they share the batch of a step.
    side_by_side: ClassVar[bool] = False
    model_cfg: BaseModel

    def __init__(
        self, train_cfg: TrainConfig, seed: int, aggregation: AggregationConfig | None = None
    ) -> None:
        self.train_cfg = train_cfg
        self.seed = seed
        self.aggregation = aggregation or AggregationConfig()
        self.version = 0
        self.indices: dict[str, int] = {}
        self.total_rounds = 1
        self.lr = train_cfg.lr
        # Seconds the round waits on the one device it cannot go on without; None = no limit
        # but the round's own deadline.
        self.step_timeout: float | None = None
        # Momentum (and Adam's second moments) of the server optimizer, per half.
        self.server_opt_state: ServerOptState = {}
        # Several aggregator workers (splitfed.distributed.Group.merge_round): gives the round
        # every worker's updates before `aggregate`, which then runs as on one worker.
        self.merge_round: Callable[[Strategy, RoundState], None] | None = None
        # A separate fed server (SplitFed's): it alone receives and averages the client halves
        # (CLIENT_UPDATEs here carry counts only); this process never holds a trained one.
        self.fed: FedPeer | None = None
        # The part of the round in flight (0 unless the round is cut, see `parts`).
        self.part = 0
        # Devices training this round, over every aggregator worker (`device_train_cfg`).
        self.devices = 1

    @property
    def parts(self) -> int:
        """Averages per round: each device trains 1/parts of its round between two of them.

        The wire's round number counts parts (`wire_round`), so a device derives its part from
        it; the seeds of every step stay the round's, so the cut changes no step's arithmetic.
        """
        return self.train_cfg.syncs_per_round if self.partable else 1

    @property
    def device_train_cfg(self) -> TrainConfig:
        """The training settings this round's devices get: with `TrainConfig.split_batch`, the
        devices that train side by side share the batch (`TrainConfig.device_batch`). The
        round's device count fixes it for all of its parts, so a device that drops out of one
        changes no other device's batches. One device trains the whole batch, so SL or SFLV2
        with one client is still centralized training, and SFLV1 and FedAvg split alike."""
        batch = self.train_cfg.device_batch(self.devices) if self.side_by_side else None
        if batch is None or batch == self.train_cfg.batch_size:
            return self.train_cfg
        return self.train_cfg.model_copy(update={"batch_size": batch, "split_batch": False})

    def wire_round(self, rnd: int, part: int = 0) -> int:
        """The round number that part `part` of round `rnd` carries on the wire."""
        return rnd * self.parts + part

    # ---- the three hooks --------------------------------------------------------------------

    @abc.abstractmethod
    def configure_round(self, io: ServerIO, rnd: int, participants: list[str]) -> RoundState:
        """Send what starts the round; return its state with the devices it expects."""

    @abc.abstractmethod
    def handle(self, io: ServerIO, state: RoundState, msg: Message) -> None:
        """Act on one checked message of an active device; discard it from `state.active`
        when it is done. Raise ValueError/KeyError for a message that makes no sense."""

    @abc.abstractmethod
    def aggregate(self, io: ServerIO, state: RoundState) -> RoundTrain:
        """Fold what the round produced into the global model; return its counts."""

    def on_drop(self, io: ServerIO, state: RoundState, client_id: str) -> None:  # noqa: B027
        """A device left the round (offline, re-joined, silent); the round goes on."""

    # ---- the round --------------------------------------------------------------------------

    def run_round(
        self, io: ServerIO, rnd: int, participants: list[str], timeout: float
    ) -> RoundTrain:
        """Train one round with these devices: configure, feed messages to `handle`, aggregate;
        once per part of the round (`parts`), each part with the devices not dropped in an
        earlier one. The timeout applies to each part."""
        total = RoundTrain()
        completed: list[str] = []
        for part in range(self.parts):
            self.part = part
            io.round = self.wire_round(rnd, part)
            if part and self.fed is not None:
                self.fed.sync(self)
            state = self.configure_round(io, rnd, self.part_participants(io, participants))
            what = f"round {rnd}" if self.parts == 1 else f"round {rnd} part {part + 1}"
            dropped = self.collect(
                io,
                state.active,
                time.monotonic() + timeout,
                lambda msg: self.handle(io, state, msg),  # noqa: B023 - called in this part
                what,
                lambda cid: self.on_drop(io, state, cid),  # noqa: B023
                waiting_on=lambda: state.waiting_on,  # noqa: B023
            )
            state.result.dropped.extend(dropped)
            if self.merge_round is not None:
                self.merge_round(self, state)
            result = self.aggregate(io, state)
            if self.parts == 1:
                return result
            total.merge_part(result)
            # Every part runs even with nobody left here: other workers' parts still merge.
            participants = [c for c in participants if c not in result.dropped]
            # (after merge_round: every worker's devices)
            completed = [c for c in state.participants if c not in total.dropped]
        self.part = 0
        total.completed = completed
        return total

    def part_participants(self, io: ServerIO, participants: list[str]) -> list[str]:
        """The devices with batches in this part of a cut round (`self.part`).

        A device with fewer batches a round than parts has empty parts (`part_bounds`, which
        the device cuts alike). There it would take the global half and hand it back unchanged,
        weighing nothing in the part's average: a round trip of the half both ways for nothing.
        So it sits those parts out; its round's stream and optimizer wait, as they did. Every
        device with a batch is in the last part, so a round still completes with all of them.
        """
        if self.parts == 1:
            return participants
        return [c for c in participants if self.part_batches(io, c) > 0]

    def part_batches(self, io: ServerIO, client_id: str) -> int:
        """How many of a device's batches this part of its round holds, cut by `part_bounds`
        from the training set it declared, as the device cuts them."""
        cfg = self.device_train_cfg
        info = io.clients.get(client_id)
        total = num_batches(info.n_train if info else 0, cfg.batch_size) * cfg.local_epochs
        lo, hi = part_bounds(total, self.part, self.parts)
        return hi - lo

    def start_round(self, rnd: int, total_rounds: int, devices: int = 1) -> None:
        """Set this round's learning rate on every optimizer the aggregator holds, and the
        number of devices that train in it (all workers' together)."""
        self.total_rounds = total_rounds
        self.devices = devices
        self.lr = round_lr(self.train_cfg, rnd, total_rounds)
        for opt in self.optimizers():
            set_lr(opt, self.lr)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return []

    # ---- membership -------------------------------------------------------------------------

    def client_index(self, client_id: str) -> int:
        """A stable index per client (sorted ids at the first round, then in order of joining)."""
        if client_id not in self.indices:
            self.indices[client_id] = len(self.indices)
        return self.indices[client_id]

    def enrol(self, client_ids: list[str]) -> None:
        for cid in sorted(client_ids):
            self.client_index(cid)

    # ---- the receive loop -------------------------------------------------------------------

    def collect(
        self,
        io: ServerIO,
        active: set[str],
        deadline: float,
        on_message: Callable[[Message], None],
        what: str,
        on_drop: Callable[[str], None] | None = None,
        waiting_on: Callable[[], str | None] | None = None,
    ) -> list[str]:
        """Feed messages from `active` clients to `on_message` until none is left active.

        `on_message` removes a client from `active` when it is done. A client that goes offline
        or re-joins (it lost its state) is dropped; at the deadline the rest are dropped. With a
        `step_timeout`, the client `waiting_on()` names is dropped once it has sent nothing for
        that long, and the others go on. Returns the dropped clients, so the round can finish
        with those that did.
        """
        dropped: list[str] = []

        def drop(cid: str) -> None:
            active.discard(cid)
            dropped.append(cid)
            if on_drop is not None:
                on_drop(cid)

        watched: str | None = None
        step_deadline = deadline
        while active:
            now = time.monotonic()
            current = waiting_on() if waiting_on is not None else None
            if current not in active:
                current = None
            if self.step_timeout is None or current is None:
                watched, step_deadline = None, deadline
            elif current != watched:
                watched, step_deadline = current, min(deadline, now + self.step_timeout)
            ev = io.next(step_deadline)
            if ev is None:
                if watched is not None and time.monotonic() < deadline:
                    # The transport had nothing from it for a whole step: skip it.
                    log.warning(
                        "%s: %s sent nothing for %.0f s; going on without it",
                        what,
                        watched,
                        self.step_timeout,
                    )
                    io.rejected["step timeout"] += 1
                    drop(watched)
                    watched = None
                    continue
                log.warning("%s: timed out waiting for %s", what, ", ".join(sorted(active)))
                dropped.extend(sorted(active))
                active.clear()
                break
            if isinstance(ev, Presence):
                if ev.state != "online" and ev.client_id in active:
                    log.warning(
                        "%s: %s went %s; finishing without it", what, ev.client_id, ev.state
                    )
                    drop(ev.client_id)
                continue
            if ev.type in (MsgType.JOIN, MsgType.LEAVE):
                if ev.src in active:
                    log.warning(
                        "%s: %s %s mid-round; finishing without it", what, ev.src, ev.type.value
                    )
                    drop(ev.src)
                continue
            if ev.type is MsgType.PREDICT:
                self.on_predict(io, ev)
                continue
            if ev.src not in active:
                continue
            if ev.src == watched and self.step_timeout is not None:
                step_deadline = min(deadline, time.monotonic() + self.step_timeout)
            try:
                on_message(ev)
            except Exception as e:  # noqa: BLE001 - nothing a peer sends may end the round
                log.warning("%s: bad %s from %s dropped: %s", what, ev.type.value, ev.src, e)
                io.rejected["semantic"] += 1
        return dropped

    def on_predict(self, io: ServerIO, msg: Message) -> None:  # noqa: B027
        """Live mode's PREDICT during training; algorithms without a server half ignore it."""

    # ---- client updates, written once -------------------------------------------------------

    def accept_update(
        self, io: ServerIO, state: RoundState, msg: Message, prefixes: Sequence[str]
    ) -> ClientUpdate:
        """Keep a device's CLIENT_UPDATE (its halves under `prefixes`) and mark it done.

        The sample count weighs its update in the average, so it is capped at what this device
        can have trained: for split algorithms what its smashed batches showed this round, for
        local training the training set it declared when it joined.
        """
        claimed = int(msg.env.body["n_samples"])
        if claimed < 0:
            raise ValueError(f"negative sample count {claimed}")
        cap = self.sample_cap(io, state, msg.src)
        n = claimed
        if self.parts > 1:
            # A part averages what the devices trained in it: a device whose share of the round
            # is short (or empty: fewer batches than parts) weighs that much less (or nothing).
            # Its claim weighs nothing, but a claim above the set it declared is still a lie.
            n = min(self.part_samples(io, state, msg), cap)
            declared = self.declared_samples(io, msg.src)
            if claimed > declared:
                log.warning("%s claims %d samples, it declared %d", msg.src, claimed, declared)
                io.rejected["n_samples above what was trained"] += 1
        elif claimed > cap:
            log.warning(
                "%s claims %d samples, the aggregator saw it train %d; capped",
                msg.src,
                claimed,
                cap,
            )
            io.rejected["n_samples above what was trained"] += 1
            n = cap
        update = ClientUpdate(
            {p: unprefixed(msg.tensors, p) for p in prefixes}, n, dict(msg.env.body)
        )
        state.updates[msg.src] = update
        state.active.discard(msg.src)
        return update

    def sample_cap(self, io: ServerIO, state: RoundState, client_id: str) -> int:
        """The most samples `client_id` can have trained this round (split: smashed rows)."""
        cfg = self.device_train_cfg
        return max_samples(state.trained[client_id], cfg.local_epochs, cfg.batch_size)

    @staticmethod
    def declared_samples(io: ServerIO, client_id: str) -> int:
        """The training set a device declared when it joined (0 for one that never did)."""
        info = io.clients.get(client_id)
        return info.n_train if info is not None else 0

    def part_samples(self, io: ServerIO, state: RoundState, msg: Message) -> int:
        """What a device trained in this part of a cut round (split: the smashed rows the
        aggregator itself trained on), which weighs its copy in the part's average."""
        return state.trained[msg.src]

    def combine(
        self,
        states: Sequence[Mapping[str, np.ndarray]],
        weights: Sequence[float],
        reference: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """The aggregate of several copies of one half, with the configured rule."""
        agg = self.aggregation
        return aggregate_states(
            states,
            weights,
            method=agg.method,
            trim=agg.trim_ratio,
            reference=reference,
            clip_norm=agg.clip_update_norm,
        )

    def average_into(
        self,
        net: torch.nn.Module,
        states: Sequence[Mapping[str, np.ndarray]],
        weights: Sequence[float],
        half: str = "model",
    ) -> None:
        """Load the aggregate of `states` into `net` (its current weights are the reference),
        stepped by the server optimizer when one is configured (its state kept under `half`).

        The server learning rate is this round's (`AggregationConfig.server_lr_for`): with
        `auto` the number of copies combined, so the step is the sum of the devices' updates;
        FedAvg and SFLV1 combine as many copies of each half, so they stay equal."""
        agg = self.aggregation
        stepped = agg.server_opt != "none"
        reference = state_to_numpy(net) if agg.clip_update_norm or stepped else None
        combined = self.combine(states, weights, reference)
        if stepped:
            assert reference is not None
            params = {name for name, _ in net.named_parameters()}
            combined = server_step(
                reference, combined, params, self.server_opt_state, half,
                agg.server_opt, agg.server_lr_for(len(states)), agg.server_momentum,
            )  # fmt: skip
        load_numpy_state(net, combined)

    def average_updates(self, state: RoundState, nets: Mapping[str, torch.nn.Module]) -> list[str]:
        """Average the round's updates into `nets` (prefix -> half), weighted by samples.

        In a part of a cut round, a device that trained nothing in it is left out: its copy is
        the global half unchanged, and robust rules (median) ignore the weights."""
        done = state.done()
        if self.parts > 1:
            done = [c for c in done if state.updates[c].n_samples > 0]
        if done:
            weights = [state.updates[c].n_samples for c in done]
            for prefix, net in nets.items():
                if prefix == CLIENT_PREFIX and self.fed is not None:
                    # it averages them; its rounds are the wire's, one per part
                    self.fed.round_done(self, self.wire_round(state.rnd, self.part), done, weights)
                    continue
                halves = [state.updates[c].halves[prefix] for c in done]
                self.average_into(net, halves, weights, prefix)
        return done

    # ---- evaluation and checkpoints ---------------------------------------------------------

    @abc.abstractmethod
    def evaluate(
        self, io: ServerIO, participants: list[str], split: str, timeout: float
    ) -> np.ndarray:
        """Confusion counts of the global model on the devices' `split` data."""

    def round_body(self, client_id: str, **extra: Any) -> dict[str, Any]:
        """The configuration every round message carries (what the runner publishes)."""
        return {"algo": self.name, "seed": self.seed, **extra}

    def global_tensors(self, full: bool = False) -> dict[str, np.ndarray]:
        """Weights the runner publishes after a round (split algorithms only)."""
        return {}

    @abc.abstractmethod
    def checkpoint_tensors(self) -> dict[str, np.ndarray]:
        """The trained model as named arrays, for model.safetensors."""

    @abc.abstractmethod
    def state(self) -> dict[str, Any]:
        """Everything a resumed aggregator needs (written to its own disk only)."""

    @abc.abstractmethod
    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what `state` returned."""
