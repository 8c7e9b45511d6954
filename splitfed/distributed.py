"""Several aggregator workers as one aggregator, joined by a torch.distributed process group.

Each agent has one home worker, `owner(client_id)`: a stable hash of its id, so every worker,
a restarted one included, computes the same assignment without asking anybody. A worker trains
only its own agents' batches (SFLV1: their server copies) and the round ends with one
collective merge: every worker gathers every other's client updates, per-client counts and
(SFLV1) server copies with their optimizer state, in the participants' order, and runs the very
same `aggregate` as one worker would. So averages (weighted mean, median, trimmed mean, server
optimizer) are bit for bit those of one worker, and every worker ends the round holding the
whole state: rank 0's checkpoint is complete and any worker can resume from it.

SL and SFLV2 keep one server half that every batch steps in order: nothing to shard, so they
refuse several workers (`SHARDED_ALGOS`). gloo on CPU, NCCL where CUDA exists; no RPC of our own.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from splitfed.algorithms.base import ClientUpdate, RoundState, RoundTrain, Strategy
from splitfed.server import ServerIO
from splitfed.training import load_numpy_state, state_to_numpy
from splitfed.wire import Message, Sequencer

log = logging.getLogger(__name__)

# The algorithms whose server-side work splits by client. SL and SFLV2 step one server half.
SHARDED_ALGOS = ("sflv1", "fedavg")
REJOIN_WAIT_S = 15.0  # how long the workers wait for the agents' JOINs after a re-announce


def owner(client_id: str, world_size: int) -> int:
    """The rank that hosts `client_id`: the same on every worker and after every restart."""
    digest = hashlib.sha256(client_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % world_size


def check_algo(algo: str, workers: int) -> None:
    """A one-line refusal for algorithms that cannot be sharded across workers."""
    if workers > 1 and algo not in SHARDED_ALGOS:
        from splitfed.errors import UserError

        raise UserError(
            f"--workers {workers}: {algo} trains one server half on every batch in turn, so it "
            f"cannot be split across workers; use one worker (sharded: {', '.join(SHARDED_ALGOS)})"
        )


class Group:
    """This process's place among the workers, and the few collectives the rounds need."""

    def __init__(self, rank: int, world_size: int, master: str, timeout_s: float = 1800.0) -> None:
        self.rank = rank
        self.world_size = world_size
        self.backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.device = torch.device("cpu")
        if self.backend == "nccl":
            self.device = torch.device("cuda", rank % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
        # Called once the join phase is over (the MQTT transport then pins its subscriptions).
        self.on_joined: Callable[[list[str]], None] | None = None
        dist.init_process_group(
            self.backend,
            init_method=f"tcp://{master}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        log.info("worker %d of %d joined %s (%s)", rank, world_size, master, self.backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, client_id: str) -> bool:
        return owner(client_id, self.world_size) == self.rank

    # ---- collectives --------------------------------------------------------------------------

    def gather(self, obj: Any) -> list[Any]:
        """`obj` of every rank, in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum_ints(self, values: Any) -> np.ndarray:
        """Element-wise integer sum over ranks (confusion counts, byte counters)."""
        t = torch.as_tensor(np.asarray(values, dtype=np.int64)).to(self.device)
        dist.all_reduce(t)
        return t.cpu().numpy()

    def sum_counts(self, counts: Mapping[str, int]) -> dict[str, int]:
        total: dict[str, int] = {}
        for part in self.gather(dict(counts)):
            for k, v in part.items():
                total[k] = total.get(k, 0) + int(v)
        return total

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # ---- membership ---------------------------------------------------------------------------

    def online(self, io: ServerIO) -> list[str]:
        """Every worker's trainers, sorted: the participants one worker would have.

        Agents that said `online` but whose JOIN reached no worker (`MqttTransport.orphans`:
        a late agent's JOIN can beat its home worker's subscription) are asked to join again
        here, between rounds, so that they train from this round on."""
        transport = getattr(io, "transport", None)
        find = getattr(transport, "orphans", None)
        lost = find(set(io.clients)) if callable(find) else []
        parts = self.gather((_trainers(io), lost))
        lost = sorted({c for _, part in parts for c in part})
        if lost:
            self._rejoin(io, transport, lost)
            parts = self.gather((_trainers(io), []))
        return sorted({c for part, _ in parts for c in part})

    def _rejoin(self, io: ServerIO, transport: Any, lost: list[str]) -> None:
        """Rank 0 announces a new aggregator instance; every worker then waits (bounded) for
        its agents' new JOINs, so that none lands mid-round (which drops its sender)."""
        if self.is_main:
            log.warning("%s online but never joined: asking every agent to join again",
                        ", ".join(lost))  # fmt: skip
        transport.nudged.update(lost)  # once each: an agent refused at JOIN stays refused
        since = time.time()
        if self.is_main:
            transport.reannounce()
        mine = [c for c in lost if self.owns(c)]
        deadline = time.monotonic() + REJOIN_WAIT_S

        def pending() -> bool:
            return any(c not in io.clients for c in mine) or any(
                info.online and info.joined_at < since for info in io.clients.values()
            )

        while pending() and time.monotonic() < deadline:
            io.next(min(deadline, time.monotonic() + 0.5))
        missing = [c for c in mine if c not in io.clients]
        if missing:
            log.warning("worker %d: %s did not join within %.0f s", self.rank,
                        ", ".join(missing), REJOIN_WAIT_S)  # fmt: skip

    def wait_for_clients(
        self, io: ServerIO, n: int, timeout: float, poll: float = 0.5
    ) -> list[str]:
        """Poll each worker's agents until `n` are online over all workers (or rank 0's
        deadline passes); every rank leaves at the same iteration, with the same list."""
        deadline = time.monotonic() + timeout
        while True:
            end = min(deadline, time.monotonic() + poll)
            while time.monotonic() < end:
                io.next(end)
            local = _trainers(io)
            info = {c: (io.clients[c].n_train, io.clients[c].n_test) for c in local}
            parts = self.gather((info, time.monotonic() >= deadline))
            everyone = {c: v for part, _ in parts for c, v in part.items()}
            if len(everyone) >= n or parts[0][1]:
                break
        online = sorted(everyone)
        log.info("worker %d of %d hosts %s", self.rank, self.world_size, ", ".join(local) or "-")
        data_info = getattr(io, "data_info", None)
        if isinstance(data_info, dict):  # what ServeIO.wait_for_clients reports, over all workers
            data_info.update({
                "name": "agents",
                "n_train": sum(everyone[c][0] for c in online),
                "n_test": sum(everyone[c][1] for c in online),
                "clients_samples": [everyone[c][0] for c in online],
            })  # fmt: skip
        if self.on_joined is not None:
            self.on_joined(local)
        return online

    # ---- the round ----------------------------------------------------------------------------

    def merge_round(self, algo: Strategy, state: RoundState) -> None:
        """Give `state` every worker's share of the round, as if one worker had run it all."""
        copies: dict[str, Any] = getattr(state, "copies", {})
        per_client: dict[str, RoundTrain] | None = getattr(state, "per_client", None)
        mine = {
            "participants": list(state.participants),
            "dropped": list(state.result.dropped),
            "updates": {c: (u.halves, u.n_samples, u.body) for c, u in state.updates.items()},
            "counts": {c: (r.loss_sum, r.correct, r.seen) for c, r in (per_client or {}).items()},
            "copies": {
                c: (state_to_numpy(net), opt.state_dict()) for c, (net, opt) in copies.items()
            },
        }
        parts = self.gather(mine)
        participants = sorted({c for p in parts for c in p["participants"]})
        local = set(state.participants)
        state.participants = participants
        state.result.dropped = [c for p in parts for c in p["dropped"]]
        for p in parts:
            for c, (halves, n, body) in p["updates"].items():
                state.updates[c] = ClientUpdate(halves, n, body)
            for c, (weights, opt_state) in p["copies"].items():
                if c in local:
                    continue
                # The remote copy, here too: its weights for the average, its optimizer state
                # so that any worker (and rank 0's checkpoint) holds every copy in full.
                net, opt = algo._copy_for(c)  # type: ignore[attr-defined]
                load_numpy_state(net, weights)
                opt.load_state_dict(opt_state)
                copies[c] = (net, opt)
        if per_client is not None:
            counts = {c: v for p in parts for c, v in p["counts"].items()}
            per_client.clear()  # participants' order: float sums depend on it
            for c in participants:
                if c in counts:
                    loss, correct, seen = counts[c]
                    per_client[c] = RoundTrain(loss, correct, seen)
        elif all("loss_sum" in u.body for u in state.updates.values()):
            # FedAvg: the devices' own counts, summed in participants' order.
            result = state.result
            result.loss_sum, result.correct, result.seen = 0.0, 0, 0
            for c in state.done():
                body = state.updates[c].body
                result.loss_sum += float(body["loss_sum"])
                result.correct += int(body["correct"])
                result.seen += int(body["seen"])


class ClockSequencer(Sequencer):
    """Sequence numbers from the clock (microseconds), never less than the last one + 1.

    Every worker speaks as `aggregator`, and an agent hears two of them (its home worker on its
    `down` topic, rank 0's retained global weights), whose messages are ordered by the rounds'
    collectives. Clock-based numbers keep that order for the agent's replay check, where two
    counters would not. Across hosts this needs their clocks in step (NTP) to well under the
    gap between a round's last message and the next round's first.
    """

    def make(self, *args: Any, **kwargs: Any) -> Message:
        self.seq = max(self.seq, time.time_ns() // 1000)
        return super().make(*args, **kwargs)


def _trainers(io: ServerIO) -> list[str]:
    """This worker's agents that train (ServeIO leaves out camera-only ones)."""
    trainers = getattr(io, "trainers", None)
    return list(trainers()) if callable(trainers) else io.online()


def free_master() -> str:
    """A loopback ADDR:PORT for the workers of one host to meet at."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def torch_threads_per_worker(workers: int) -> int:
    """Share this host's cores among its workers (each worker is one process)."""
    return max(1, (os.cpu_count() or 1) // max(workers, 1))
