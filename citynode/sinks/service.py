"""The node's sinks as one role: built from node.toml, started by the coordinator
(a task each), woken when records are committed, asked for their status."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from citynode.config import Config
from citynode.metrics import Metrics
from citynode.node._base import Spawn, in_thread
from citynode.sinks.cloudevents import CloudEventsSink
from citynode.sinks.ngsild import NgsiLdSink
from citynode.sinks.outbox import Sink
from citynode.storage import Storage

__all__ = ["Sinks"]


class Sinks:
    """Every ``[[sinks.*]]`` of node.toml."""

    def __init__(self, *, config: Config, data_dir: Path, storage: Storage,
                 metrics: Metrics, now_ms: Callable[[], int]) -> None:
        self.config = config
        self.storage = storage
        # In the node's own registry (so /metrics shows them), by sink name.
        r = metrics.registry
        counters = {
            "delivered": Counter("citynode_sink_delivered", "Records a sink's receiver "
                                 "acknowledged", ["sink"], registry=r),
            "retries": Counter("citynode_sink_retries", "Deliveries a sink will try again "
                               "(5xx, 408, 429, the receiver unreachable)", ["sink"],
                               registry=r),
            "refused": Counter("citynode_sink_refused", "Records a sink's receiver refused "
                               "for good (another 4xx)", ["sink"], registry=r),
        }
        self.sinks: list[Sink] = [
            CloudEventsSink(c, data_dir=data_dir, storage=storage, now_ms=now_ms)
            for c in config.sinks.cloudevents]
        self.sinks += [NgsiLdSink(c, data_dir=data_dir, storage=storage, now_ms=now_ms)
                       for c in config.sinks.ngsi_ld]
        for sink in self.sinks:
            sink.counters = {k: c.labels(sink.cfg.name) for k, c in counters.items()}

    async def start(self, spawn: Spawn) -> None:
        """Start one task per sink. A sink that never ran starts from now (or from the
        first record held, with ``from_start``): its cursor is placed before this
        returns, so records published after the node started are its. Raises
        ConfigError, before any starts, if a sink's token or CA file cannot be read."""
        for s in self.sinks:
            s.check_files()
        for s in self.sinks:
            await s.place_cursor()
            spawn(s.run(), f"sink-{s.cfg.name}")

    def committed(self, _records: Sequence[Any]) -> None:
        """Records were committed (the node's listener): wake every sink."""
        for s in self.sinks:
            s.wake()

    async def status(self, refused: int = 20) -> dict[str, Any]:
        """Each sink's state, and the newest ``refused`` deliveries it gave up."""
        out = []
        for s in self.sinks:
            st = await s.status()
            st["refused_recent"] = [{"record": rid.hex(), "attempts": n, "error": err}
                             for rid, n, err in await in_thread(
                                 self.storage.sink_dead, s.cfg.name, refused)]
            out.append(st)
        return {"sinks": out}
