"""NGSI in: the notifications of a context broker become records, each entity state once.

A ``[[bridges.ngsi]]`` is an endpoint, ``POST /v1/bridges/ngsi/<name>`` (operator
token), that the broker's subscription notifies (NGSI-LD: ``notification.endpoint.uri``
with ``receiverInfo`` carrying the ``Authorization`` header; NGSI-v2:
``notification.httpCustom`` with ``headers``). The notification is checked and its
terms resolved by :mod:`citynode.bridges.ngsi`; each entity then goes through the
exactly-once path every bridge shares (:mod:`citynode.bridges.pipeline`): the same entity
state notified again (a broker retrying after a timeout) is a duplicate, an entity that
cannot be a record is a dead letter. The broker gets a 2xx once every entity is a record
or a dead letter, durably; a 503 if that cannot be done now (it retries); a 4xx for a
notification refused whole (also kept as a dead letter).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from citynode.bridges.config import NgsiBridgeConfig
from citynode.bridges.mapping import Mapped, message_key
from citynode.bridges.ngsi import (
    NotificationRefused,
    entity_message,
    entity_payload,
    read_notification,
)
from citynode.bridges.pipeline import Incoming, Pipeline, Publish, Retry
from citynode.config import Config
from citynode.errors import CitynodeError, UnmappableMessage
from citynode.logs import fields
from citynode.metrics import Metrics
from citynode.storage import Storage

__all__ = ["NgsiBridge", "NotificationRefused", "Retry"]

log = logging.getLogger("citynode.bridges")

_EXCERPT = 1024


@dataclass(frozen=True, slots=True)
class _Entity:
    topic: str
    payload: bytes
    error: UnmappableMessage | None = None


class NgsiBridge(Pipeline):
    """One ``[[bridges.ngsi]]``: :meth:`notify` for each notification POSTed."""

    kind = "ngsi"

    def __init__(self, cfg: NgsiBridgeConfig, *, config: Config, origin: bytes,
                 publish: Publish, own_seq: Callable[[str], int], storage: Storage,
                 metrics: Metrics, now_ms: Callable[[], int]) -> None:
        super().__init__(cfg, config=config, origin=origin, publish=publish,
                         own_seq=own_seq, storage=storage, metrics=metrics, now_ms=now_ms)
        self.cfg = cfg
        self.notifications = 0
        self.refused = 0
        self.last_error: str | None = None

    def status(self) -> dict[str, Any]:
        """What ``citynode bridges`` shows of this bridge while the node runs."""
        return {"name": self.cfg.name, "kind": "ngsi", "running": True,
                "endpoint": f"/v1/bridges/ngsi/{self.cfg.name}",
                "notifications": self.notifications, "refused": self.refused,
                "last_error": self.last_error, **self.counts}

    def map_incoming(self, message: Incoming, topic: str, payload: bytes) -> Mapped:
        if isinstance(message, _Entity) and message.error is not None:
            raise message.error
        return entity_payload(json.loads(payload), self.cfg)

    async def notify(self, body: bytes, content_type: str, link: str | None,
                     attrs_format: str | None = None) -> dict[str, Any]:
        """Make records of one notification's entities; say what became of each.

        Raises :class:`NotificationRefused` (kept as a dead letter) or :class:`Retry`."""
        self.notifications += 1
        try:
            note = read_notification(body, content_type, link, self.cfg,
                                     attrs_format=attrs_format)
        except NotificationRefused as exc:
            self.refused += 1
            self.last_error = f"{exc.reason}: {exc}"
            await self._refused(body, exc)
            raise
        msgs: list[_Entity] = []
        raw = _raw_entities(body) if any(isinstance(e, UnmappableMessage)
                                         for e in note.entities) else []
        for n, e in enumerate(note.entities):
            if isinstance(e, UnmappableMessage):
                excerpt = raw[n] if n < len(raw) else b""
                msgs.append(_Entity(f"ngsi/refused/{n}", excerpt, e))
            else:
                topic, payload = entity_message(e)
                msgs.append(_Entity(topic, payload))
        outcomes = await self.handle(msgs) if msgs else []
        out: dict[str, Any] = {"kind": note.kind, "subscriptionId": note.subscription,
                               "entities": len(msgs), "published": 0, "duplicates": 0,
                               "dead_lettered": []}
        for n, (outcome, reason) in enumerate(outcomes):
            if outcome == "published":
                out["published"] += 1
            elif outcome == "duplicate":
                out["duplicates"] += 1
            else:
                e = note.entities[n]
                out["dead_lettered"].append({
                    "index": n, "id": None if isinstance(e, UnmappableMessage) else e["id"],
                    "reason": reason})
        return out

    async def _refused(self, body: bytes, exc: NotificationRefused) -> None:
        """Keep a refused notification as a dead letter (its first KiB)."""
        try:
            await asyncio.wrap_future(self.storage.bridge_dead_letter(
                self.cfg.name, message_key(self.cfg.name, "notification", body), "",
                "notification", exc.reason, str(exc), body[:_EXCERPT], len(body),
                self.now_ms(), self.cfg.dead_letter_rows))
        except CitynodeError as err:
            raise Retry(f"cannot keep a dead letter: {err}") from err
        self._count("dead_lettered")
        self.metrics.bridge_dead_lettered.labels(self.cfg.name, exc.reason).inc()
        log.warning("bridge notification refused", extra=fields(
            bridge=self.cfg.name, reason=exc.reason, size=len(body)))


def _raw_entities(body: bytes) -> list[bytes]:
    """Each entity of an (already parsed once) notification as compact JSON: the bytes a
    refused entity is keyed and kept by."""
    doc = json.loads(body)
    return [json.dumps(e, sort_keys=True, separators=(",", ":")).encode()
            for e in doc["data"]]
