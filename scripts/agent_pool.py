"""Many edge agents as threads of one process, for the benchmarks (bench_mqtt, bench_scale).

Each agent is a real `edge_agent.agent.Agent` with its own MQTT connection and its own shard
of the synthetic set (`client_shards`, subject-wise), exactly as `edge-agent --shard I/N`
would hold it; only the process is shared. Threads of one process share its GIL, so with few
cores the agents themselves can be what limits a run: the benchmarks say how many cores ran.

    pool = AgentPool.synth(url, run_id, agents=50, identities=64)
    pool.start()
    ...                      # run the aggregator until it exits
    pool.finish()            # wait for the agents' loops, then LEAVE and disconnect
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any


class AgentPool:
    """`n` agents, each with its loop in a daemon thread; `finish` stops and closes them."""

    def __init__(
        self, url: str, run_id: str, shards: Sequence[tuple[Any, Any]], id_width: int = 2,
        prefix: str = "splitfed",
    ) -> None:  # fmt: skip
        from edge_agent.agent import Agent
        from splitfed.client import ClientRuntime
        from splitfed.mqtt import LinkSettings

        settings = LinkSettings.from_url(url)
        self.agents = [
            Agent(
                ClientRuntime(f"client-{i:0{id_width}d}", run_id, tr, te),
                settings,
                prefix,
                run_id,
                exit_when_done=True,
            )  # fmt: skip
            for i, (tr, te) in enumerate(shards)
        ]
        self.threads: list[threading.Thread] = []

    @classmethod
    def synth(
        cls, url: str, run_id: str, agents: int, identities: int, id_width: int = 2,
        per_emotion: int = 6,
    ) -> AgentPool:  # fmt: skip
        """`agents` agents on subject-wise shards of a synthetic set of `identities` people
        (`per_emotion` pictures of each person per emotion)."""
        from splitfed.data.partition import client_shards
        from splitfed.data.synth import SynthConfig, generate_synth

        ds = generate_synth(SynthConfig(identities=identities, per_emotion=per_emotion))
        _, _, shards = client_shards(ds, agents, None, None, 0)
        return cls(url, run_id, shards, id_width)

    def start(self) -> None:
        """Connect every agent and start its message loop."""
        for a in self.agents:
            a.start()
            t = threading.Thread(target=a.run, name=f"agent-{a.client_id}", daemon=True)
            t.start()
            self.threads.append(t)

    def finish(self, timeout: float = 30.0) -> None:
        """Wait (up to `timeout` s each) for the loops to end on the aggregator's `stopped`,
        then close every agent (LEAVE, `stopped`, clean disconnect)."""
        for t in self.threads:
            t.join(timeout)
        for a in self.agents:
            a.stop.set()
            a.close()

    def __len__(self) -> int:
        return len(self.agents)
