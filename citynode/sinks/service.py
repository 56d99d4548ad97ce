"""The node's sinks as one role: built from node.toml, started by the coordinator
(a task each), woken when records are committed, asked for their status."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from citynode.config import Config
from citynode.node._base import Spawn, in_thread
from citynode.sinks.cloudevents import CloudEventsSink
from citynode.sinks.ngsild import NgsiLdSink
from citynode.sinks.outbox import Sink
from citynode.storage import Storage

__all__ = ["Sinks"]


class Sinks:
    """Every ``[[sinks.*]]`` of node.toml."""

    def __init__(self, *, config: Config, data_dir: Path, storage: Storage,
                 now_ms: Callable[[], int]) -> None:
        self.config = config
        self.storage = storage
        self.sinks: list[Sink] = [
            CloudEventsSink(c, data_dir=data_dir, storage=storage, now_ms=now_ms)
            for c in config.sinks.cloudevents]
        self.sinks += [NgsiLdSink(c, data_dir=data_dir, storage=storage, now_ms=now_ms)
                       for c in config.sinks.ngsi_ld]

    async def start(self, spawn: Spawn) -> None:
        """Start one task per sink. A sink that never ran starts from now (or from the
        first record held, with ``from_start``): its cursor is placed before this
        returns, so records published after the node started are its."""
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
