"""The node's bridges as one role: built from node.toml, started by the coordinator,
asked for their status (live counters, and the dead letters kept in storage)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

from citynode.bridges.mqtt import MqttBridge, Publish
from citynode.bridges.ngsi_in import NgsiBridge
from citynode.config import Config
from citynode.metrics import Metrics
from citynode.node._base import Spawn, in_thread
from citynode.storage import Storage

__all__ = ["Bridges"]


class Bridges:
    """Every ``[[bridges.*]]`` of node.toml. :meth:`start` runs them (a task each)."""

    def __init__(self, *, config: Config, data_dir: Path, origin: bytes, publish: Publish,
                 own_seq: Callable[[str], int], storage: Storage, metrics: Metrics,
                 now_ms: Callable[[], int]) -> None:
        self.config = config
        self.storage = storage
        self.running = False
        self.mqtt = [MqttBridge(cfg, config=config, data_dir=data_dir, origin=origin,
                                publish=publish, own_seq=own_seq, storage=storage,
                                metrics=metrics, now_ms=now_ms)
                     for cfg in config.bridges.mqtt]
        self.ngsi = {cfg.name: NgsiBridge(cfg, config=config, origin=origin, publish=publish,
                                          own_seq=own_seq, storage=storage, metrics=metrics,
                                          now_ms=now_ms)
                     for cfg in config.bridges.ngsi}

    def start(self, spawn: Spawn) -> None:
        """Start one task per bridge (they reconnect by themselves until cancelled).
        Raises ConfigError, before any starts, if a bridge's password, certificate or
        CA file cannot be read."""
        for b in self.mqtt:
            b.check_files()
        for b in self.mqtt:
            spawn(b.run(), f"bridge-{b.cfg.name}")
        self.running = True

    async def status(self, dead_letters: int = 20) -> dict[str, Any]:
        """Each bridge's state (live counters only while the node runs its bridges),
        its dead letters held and dropped, and the newest ``dead_letters`` of them."""
        counts = await in_thread(self.storage.bridge_dead_counts)
        rows = await in_thread(self.storage.bridge_dead_letters, None, dead_letters)
        out = []
        for b in self.mqtt:
            c = b.cfg
            entry: dict[str, Any] = (b.status() if self.running else {
                "name": c.name, "kind": "mqtt", "broker": f"{c.host}:{c.port}",
                "tls": c.tls, "client_id": c.client_id, "running": False})
            held, dropped = counts.get(c.name, (0, 0))
            entry["dead_letters_held"] = held
            entry["dead_letters_dropped"] = dropped
            out.append(entry)
        for n in self.ngsi.values():
            entry = (n.status() if self.running else {
                "name": n.cfg.name, "kind": "ngsi", "running": False,
                "endpoint": f"/v1/bridges/ngsi/{n.cfg.name}"})
            held, dropped = counts.get(n.cfg.name, (0, 0))
            entry["dead_letters_held"] = held
            entry["dead_letters_dropped"] = dropped
            out.append(entry)
        letters = [{"id": r.id, "bridge": r.bridge, "at_ms": r.at, "topic": r.topic,
                    "reason": r.reason, "detail": r.detail, "size": r.size,
                    "excerpt": r.excerpt.decode("utf-8", "replace"),
                    "excerpt_b64": base64.b64encode(r.excerpt).decode()} for r in rows]
        return {"bridges": out, "dead_letters": letters}
