"""What every bridge in shares: a message becomes a record exactly once, or a dead letter.

A bridge hands :meth:`Pipeline.handle` the messages it received (anything with a
``topic`` and ``payload`` bytes); the pipeline maps each (:meth:`Pipeline.map_item`,
the bridge's own), and makes it a record or a dead letter, durably, once:

* A message's identity is SHA-256 over bridge name, topic and bytes
  (:func:`~citynode.bridges.mapping.message_key`). Before its record is published the
  identity is durably *claimed* with the own feed's head seq then; after, it is marked
  published with the record id. A copy of a published message is a duplicate: nothing
  published.
* A copy of a dead-lettered message is mapped and checked again (its type, the feed's
  egress policy): node.toml may have been fixed since (a route, ``fields``,
  ``local_time_offset``), and the message must not stay lost for good. Still refused,
  it is a duplicate (no second dead letter); accepted, it is claimed and published.
* A copy of a message still *claimed* (the node died between claiming and marking) is
  reconciled: the records of the feed after the claimed head that no message accounts
  for are compared with what the message maps to (type, subject, payload after the
  feed's egress policy; a sealed record of a restricted feed is taken in order). Found:
  it is marked; not found: it is published now.
* A message that cannot become a record (its mapping fails, or its type's validation or
  the feed's egress policy refuses it) goes to the dead-letter table with its reason code
  and an excerpt. It never stops the bridge.
* Anything else (the feed paused by own-feed safety, the disk full) raises
  :class:`Retry`: nothing of the batch may be acknowledged; the sender delivers it again.

MQTT in (mqtt.py) and NGSI in (ngsi_in.py) are such bridges.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from citynode.bridges.mapping import Mapped, message_key
from citynode.config import Config
from citynode.core import egress
from citynode.core.records import (
    SEALED_TYPE,
    Record,
    decode_record,
    record_id,
    stored_record,
)
from citynode.core.types import validate_payload
from citynode.errors import (
    ChainError,
    CitynodeError,
    InvalidRecord,
    UnmappableMessage,
)
from citynode.logs import fields
from citynode.metrics import Metrics
from citynode.storage import BRIDGE_CLAIMED, BRIDGE_DEAD, BridgeMessageRow, Storage

__all__ = ["Incoming", "Outcome", "Pipeline", "Publish", "Retry"]

log = logging.getLogger("citynode.bridges")

#: ``publish(feed, type, items, subjects=...)``: the node's publishing role.
Publish = Callable[..., Awaitable[list[Record]]]

_EXCERPT = 1024  # bytes of a dead message kept
_RECONCILE_SCAN = 10_000  # records after a claim looked at, at most


class Retry(Exception):
    """The batch could not be handled now (not the messages' fault): acknowledge
    nothing, and let the sender deliver it again."""


class Incoming(Protocol):
    """A message as a bridge received it."""

    @property
    def topic(self) -> Any: ...

    @property
    def payload(self) -> Any: ...


class BridgeSettings(Protocol):
    """What the pipeline reads of a bridge's config."""

    @property
    def name(self) -> str: ...

    @property
    def dedupe_hours(self) -> float: ...

    @property
    def dead_letter_rows(self) -> int: ...


#: What became of one message: ``("published" | "duplicate" | "dead_lettered", reason)``.
Outcome = tuple[str, str | None]


@dataclass(slots=True)
class _Item:
    message: Incoming
    topic: str
    payload: bytes
    key: bytes
    mapped: Mapped | None = None
    row: BridgeMessageRow | None = None
    outcome: str = "published"
    reason: str | None = None
    detail: str | None = None


async def _done(fut: Future[Any]) -> Any:
    return await asyncio.wrap_future(fut)


def _in_thread(fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
    return asyncio.get_running_loop().run_in_executor(None, fn, *args)


class Pipeline:
    """The exactly-once path of one bridge (see the module docstring). A bridge
    subclasses it and gives :meth:`map_item`."""

    kind = "bridge"

    def __init__(self, cfg: BridgeSettings, *, config: Config, origin: bytes,
                 publish: Publish, own_seq: Callable[[str], int], storage: Storage,
                 metrics: Metrics, now_ms: Callable[[], int]) -> None:
        self.settings = cfg
        self.config = config
        self.origin = origin
        self.publish = publish
        self.own_seq = own_seq
        self.storage = storage
        self.metrics = metrics
        self.now_ms = now_ms
        self.counts = {"received": 0, "published": 0, "duplicates": 0, "dead_lettered": 0}

    def map_item(self, topic: str, payload: bytes) -> Mapped:
        """What one message becomes. Raises :class:`UnmappableMessage`."""
        raise NotImplementedError

    def map_incoming(self, message: Incoming, topic: str, payload: bytes) -> Mapped:
        """What ``message`` becomes (by default :meth:`map_item` of its topic and
        bytes). Raises :class:`UnmappableMessage`."""
        return self.map_item(topic, payload)

    async def handle(self, messages: Sequence[Incoming]) -> list[Outcome]:
        """Make records (or dead letters) of ``messages``, durably; say what became of
        each, in order. Raises :class:`Retry` if that cannot be done now (nothing may
        then be acknowledged)."""
        name = self.settings.name
        self._count("received", len(messages))
        items = []
        for m in messages:
            payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
            topic = str(m.topic)
            items.append(_Item(m, topic, payload, message_key(name, topic, payload)))
        seen = await _in_thread(self.storage.bridge_lookup, [i.key for i in items])
        fresh: list[_Item] = []
        claimed: list[_Item] = []
        batch_keys: set[bytes] = set()
        for item in items:
            item.row = seen.get(item.key)
            was_dead = item.row is not None and item.row.state == BRIDGE_DEAD
            if (item.row is not None and item.row.state not in (BRIDGE_CLAIMED, BRIDGE_DEAD)
                    ) or item.key in batch_keys:
                self._count("duplicates")
                item.outcome = "duplicate"
                continue
            batch_keys.add(item.key)
            try:
                item.mapped = self.map_incoming(item.message, item.topic, item.payload)
                if was_dead:
                    self._check(item.mapped)
            except (UnmappableMessage, InvalidRecord) as exc:
                if was_dead:  # refused again: it is a dead letter already
                    self._count("duplicates")
                    item.outcome = "duplicate"
                else:
                    await self._dead(item, exc)
                continue
            (claimed if item.row is not None and not was_dead else fresh).append(item)
        if claimed:
            order = {id(item): n for n, item in enumerate(items)}
            fresh = sorted(await self._reconcile(claimed) + fresh,
                           key=lambda i: order[id(i)])
        await self._publish_all(fresh)
        return [(i.outcome, i.reason) for i in items]

    async def _publish_all(self, items: list[_Item]) -> None:
        """Publish ``items`` in runs of one feed and type (in order)."""
        run: list[_Item] = []
        for item in [*items, None]:
            if run and (item is None or _group(item) != _group(run[0])):
                await self._publish_run(run)
                run = []
            if item is not None:
                run.append(item)

    async def _publish_run(self, run: list[_Item]) -> None:
        first = run[0].mapped
        assert first is not None
        feed, type_name = first.feed, first.type
        keep_ms = int(self.settings.dedupe_hours * 3_600_000)
        try:
            head = self.own_seq(feed)
            await _done(self.storage.bridge_claim(
                self.settings.name, [(i.key, feed, head) for i in run], self.now_ms(), keep_ms))
            recs = await self.publish(feed, type_name, [_mapped(i).data for i in run],
                                      subjects=[_mapped(i).subject for i in run])
        except ChainError as exc:  # not the message's fault: the feed's chain moved
            raise Retry(f"cannot publish on feed {feed} now: {exc}") from exc
        except InvalidRecord as exc:
            if len(run) == 1:
                await self._dead(run[0], exc)
                return
            # Which one: nothing of the run was signed; publish them one by one.
            for item in run:
                await self._publish_run([item])
            return
        except CitynodeError as exc:
            raise Retry(f"cannot publish on feed {feed} now: {exc}") from exc
        # Not waited for: the claim and the durable record are enough to acknowledge
        # (a copy of a message whose mark was lost is reconciled), and the mark shares
        # the writer's next transaction.
        mark = self.storage.bridge_published(
            [(i.key, r.id) for i, r in zip(run, recs, strict=True)], self.now_ms())
        mark.add_done_callback(self._mark_failed)
        self._count("published", len(recs))

    def _mark_failed(self, fut: Future[None]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            log.warning("bridge could not mark messages published (their copies will be "
                        "reconciled)", extra=fields(bridge=self.settings.name,
                                                    error=str(fut.exception())))

    async def _dead(self, item: _Item, exc: InvalidRecord | UnmappableMessage) -> None:
        """Keep ``item`` as a dead letter (durably), with its reason code."""
        feed = item.mapped.feed if item.mapped is not None else ""
        try:
            await _done(self.storage.bridge_dead_letter(
                self.settings.name, item.key, feed, item.topic, exc.reason, str(exc),
                item.payload[:_EXCERPT], len(item.payload), self.now_ms(),
                self.settings.dead_letter_rows))
        except CitynodeError as err:
            raise Retry(f"cannot keep a dead letter: {err}") from err
        item.outcome, item.reason, item.detail = "dead_lettered", exc.reason, str(exc)
        self._count("dead_lettered")
        self.metrics.bridge_dead_lettered.labels(self.settings.name, exc.reason).inc()
        log.warning("bridge message dead-lettered", extra=fields(
            bridge=self.settings.name, topic=item.topic[:200], reason=exc.reason,
            size=len(item.payload)))

    async def _reconcile(self, claimed: list[_Item]) -> list[_Item]:
        """Mark the claimed messages whose record is held (a duplicate now); return the
        others, to be published."""
        found: list[tuple[bytes, bytes]] = []
        left: list[_Item] = []
        by_feed: dict[str, list[_Item]] = {}
        for item in claimed:
            by_feed.setdefault(_mapped(item).feed, []).append(item)
        for feed, group in by_feed.items():
            after = min(i.row.after_seq for i in group if i.row is not None)
            envs = await _in_thread(self.storage.bridge_records_after, self.origin, feed,
                                    after, _RECONCILE_SCAN)
            cands = [_held(e) for e in envs]
            taken = await _in_thread(self.storage.bridge_accounted, [c[0] for c in cands])
            for item in group:
                want = self._expected(_mapped(item))
                hit = next((rid for rid, f in cands if rid not in taken
                            and (f is _SEALED or want == f)), None)
                if hit is None:
                    left.append(item)
                else:
                    taken.add(hit)
                    item.outcome = "duplicate"
                    found.append((item.key, hit))
        if found:
            await _done(self.storage.bridge_published(found, self.now_ms()))
            self._count("duplicates", len(found))
            log.info("bridge found the records of messages claimed before a restart",
                     extra=fields(bridge=self.settings.name, found=len(found)))
        return left

    def _expected(self, m: Mapped) -> tuple[str, str | None, Any]:
        """What a record of ``m`` holds: its payload after the feed's egress policy (as
        the publishing role applies it)."""
        rules = self.config.feed(m.feed).egress
        if rules.is_open:
            return (m.type, m.subject, m.data)
        out = egress.apply(rules, m.type, m.data, m.subject)
        return (m.type, out.subject, out.data)

    def _check(self, m: Mapped) -> None:
        """Raise InvalidRecord if ``m`` would be refused when published (its type's
        validation after the feed's egress policy), before anything is claimed."""
        type_name, _subject, data = self._expected(m)
        validate_payload(type_name, data)

    def _count(self, what: str, n: int = 1) -> None:
        self.counts[what] += n
        metric = {"received": self.metrics.bridge_received,
                  "published": self.metrics.bridge_published,
                  "duplicates": self.metrics.bridge_duplicates}.get(what)
        if metric is not None and n:
            metric.labels(self.settings.name).inc(n)



def _mapped(item: _Item) -> Mapped:
    assert item.mapped is not None
    return item.mapped


def _group(item: _Item) -> tuple[str, str]:
    m = _mapped(item)
    return (m.feed, m.type)


_SEALED = ("sealed", None, None)


def _held(envelope: bytes) -> tuple[bytes, tuple[Any, Any, Any]]:
    """``(record id, (type, subject, payload))`` of one of our own records held, or
    ``_SEALED`` for its view when it is sealed for a restricted feed's readers. The one
    place the bridge reads a record's fields (the record format is core/records.py's)."""
    body = decode_record(envelope)[0]
    try:
        rec = stored_record(envelope)
    except InvalidRecord:  # our own record: cannot happen, and then matches nothing
        return record_id(body), (None, None, None)
    if rec.type == SEALED_TYPE:
        return rec.id, _SEALED
    # a tombstone (payload erased or pruned) has no data nor subject (both were in the
    # payload): it matches no message
    return rec.id, (rec.type, rec.subject, None if rec.payload is None else rec.data)
