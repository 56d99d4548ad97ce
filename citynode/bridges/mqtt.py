"""MQTT in: messages from a broker become records of this node's feeds, each once.

Delivery from the broker is at least once (QoS 1, a persistent session: a stable client
id, clean session off); records are exactly once. The rules that make it so:

* A message is acknowledged (PUBACK) only after what it became is durably committed: its
  record, or its dead letter. aiomqtt (2.5) has no manual acknowledgement of its own, so
  the paho client under it is switched to paho's ``manual_ack`` and acknowledged with
  ``ack(mid, qos)``: the one place this module reaches under aiomqtt (``_paho``).
  Messages are handled in the order received and acknowledged in that order.
* A message's identity is SHA-256 over bridge name, topic and bytes
  (:func:`~citynode.bridges.mapping.message_key`). Before its record is published the
  identity is durably *claimed* with the own feed's head seq then; after, it is marked
  published with the record id. A copy of a published (or dead-lettered) message is a
  duplicate: acknowledged, nothing published.
* A copy of a message still *claimed* (the node died between claiming and marking) is
  reconciled: the records of the feed after the claimed head that no message accounts
  for are compared with what the message maps to (type, subject, payload after the
  feed's egress policy; a sealed record of a restricted feed is taken in order). Found:
  it is marked and acknowledged; not found: it is published now.
* A message that cannot become a record (too large, not JSON, wrong shape, refused by
  its type's validation or the feed's egress policy) goes to the dead-letter table with
  its reason code and an excerpt, then is acknowledged. It never stops the bridge.
* Anything else (the feed paused by own-feed safety, the disk full, the broker gone)
  leaves the messages unacknowledged: the bridge disconnects and reconnects with
  back-off, and the broker delivers them again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from citynode.bridges.config import MqttBridgeConfig
from citynode.bridges.mapping import Mapped, map_message, message_key
from citynode.config import Config
from citynode.core import egress
from citynode.core.records import (
    SEALED_TYPE,
    Record,
    decode_record,
    record_id,
    stored_record,
)
from citynode.errors import (
    ChainError,
    CitynodeError,
    ConfigError,
    InvalidRecord,
    UnmappableMessage,
)
from citynode.logs import fields
from citynode.metrics import Metrics
from citynode.storage import BRIDGE_CLAIMED, BridgeMessageRow, Storage

__all__ = ["MqttBridge", "Publish"]

log = logging.getLogger("citynode.bridges")

#: ``publish(feed, type, items, subjects=...)``: the node's publishing role.
Publish = Callable[..., Awaitable[list[Record]]]

_BATCH = 256  # messages handled (and committed) together when they queue up
_EXCERPT = 1024  # bytes of a dead message kept
_RECONCILE_SCAN = 10_000  # records after a claim looked at, at most
_BACKOFF_MIN = 0.5
_MAX_QUEUED = 10_000  # messages received and not yet handled, at most


class _Retry(Exception):
    """The batch could not be handled now (not the messages' fault): reconnect later
    and let the broker deliver them again."""


@dataclass(slots=True)
class _Item:
    message: aiomqtt.Message
    topic: str
    payload: bytes
    key: bytes
    mapped: Mapped | None = None
    row: BridgeMessageRow | None = None


async def _done(fut: Future[Any]) -> Any:
    return await asyncio.wrap_future(fut)


def _in_thread(fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
    return asyncio.get_running_loop().run_in_executor(None, fn, *args)


class MqttBridge:
    """One ``[[bridges.mqtt]]``: :meth:`run` until cancelled; :meth:`status` any time."""

    def __init__(self, cfg: MqttBridgeConfig, *, config: Config, data_dir: Path,
                 origin: bytes, publish: Publish, own_seq: Callable[[str], int],
                 storage: Storage, metrics: Metrics, now_ms: Callable[[], int]) -> None:
        self.cfg = cfg
        self.config = config
        self.data_dir = data_dir
        self.origin = origin
        self.publish = publish
        self.own_seq = own_seq
        self.storage = storage
        self.metrics = metrics
        self.now_ms = now_ms
        self.connected = False
        self.since_ms: int | None = None
        self.last_error: str | None = None
        self.connects = 0
        self.counts = {"received": 0, "published": 0, "duplicates": 0, "dead_lettered": 0}
        metrics.bridge_connected.labels(cfg.name).set(0)

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """What ``citynode bridges`` shows of this bridge while the node runs."""
        c = self.cfg
        return {"name": c.name, "kind": "mqtt", "broker": f"{c.host}:{c.port}",
                "tls": c.tls, "client_id": c.client_id, "running": True,
                "connected": self.connected, "since_ms": self.since_ms,
                "connects": self.connects, "last_error": self.last_error, **self.counts}

    # ------------------------------------------------------------------ connection

    def _file(self, name: str) -> str:
        p = Path(name)
        return str(p if p.is_absolute() else self.data_dir / p)

    def _client(self) -> aiomqtt.Client:
        """A client for one connection. Raises :class:`ConfigError` for a certificate or
        password file that cannot be read."""
        c = self.cfg
        ctx = None
        try:
            if c.tls:
                ctx = ssl.create_default_context(cafile=self._file(c.ca_file) if c.ca_file
                                                 else None)
                if c.cert_file:
                    ctx.load_cert_chain(self._file(c.cert_file), self._file(c.key_file))
            password = None
            if c.password_file:
                with open(self._file(c.password_file), encoding="utf-8") as f:
                    password = f.read().rstrip("\r\n")
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"bridge {c.name}: {exc}") from exc
        client = aiomqtt.Client(
            c.host, c.port, identifier=c.client_id, clean_session=False,
            username=c.username or None, password=password, keepalive=c.keepalive_seconds,
            tls_context=ctx, timeout=30, logger=log,
            # Memory bound: QoS 1 messages are bounded by the broker's in-flight window
            # (unacknowledged ones); this bounds a flood of QoS 0 ones too.
            max_queued_incoming_messages=_MAX_QUEUED)
        # Acknowledge only after commit (see the module docstring): aiomqtt has no option
        # for it, the paho client under it has.
        _paho(client).manual_ack_set(True)
        return client

    async def run(self) -> None:
        """Connect, subscribe and bridge messages until cancelled; reconnect with
        exponential back-off (with jitter) whenever the broker goes away or a batch
        cannot be committed now."""
        c = self.cfg
        delay = _BACKOFF_MIN
        topics = list(dict.fromkeys(r.topic for r in c.routes))
        while True:
            try:
                client = self._client()
                async with client:
                    self.connects += 1
                    for t in topics:
                        granted = await client.subscribe(t, qos=1)
                        _check_granted(t, granted)
                    self._set_connected(True)
                    delay = _BACKOFF_MIN
                    log.info("bridge connected", extra=fields(
                        bridge=c.name, broker=f"{c.host}:{c.port}", topics=len(topics)))
                    await self._consume(client)
            except asyncio.CancelledError:
                self._set_connected(False)
                raise
            except (aiomqtt.MqttError, _Retry, CitynodeError, OSError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                was = self.connected
                self._set_connected(False)
                log.warning("bridge disconnected" if was else "bridge cannot connect",
                            extra=fields(bridge=c.name, error=self.last_error,
                                         retry_in=round(delay, 2)))
            except Exception as exc:  # a bug must not stop the bridge for good
                self.last_error = f"internal error: {exc!r}"
                self._set_connected(False)
                log.exception("bridge failed; reconnecting", extra=fields(bridge=c.name))
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, c.backoff_max_seconds)

    def _set_connected(self, up: bool) -> None:
        self.connected = up
        self.since_ms = self.now_ms() if up else self.since_ms
        self.metrics.bridge_connected.labels(self.cfg.name).set(1 if up else 0)

    async def _consume(self, client: aiomqtt.Client) -> None:
        messages = client.messages
        while True:
            batch = [await anext(messages)]
            while len(messages) and len(batch) < _BATCH:
                batch.append(await anext(messages))
            await self.handle(batch)
            paho = _paho(client)
            for m in batch:  # in the order received, as MQTT asks
                if m.qos > 0:
                    paho.ack(m.mid, m.qos)

    # ------------------------------------------------------------------ messages

    async def handle(self, messages: Sequence[aiomqtt.Message]) -> None:
        """Make records (or dead letters) of ``messages``, durably; raise
        :class:`_Retry` if that cannot be done now (nothing is then acknowledged)."""
        name = self.cfg.name
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
            if (item.row is not None and item.row.state != BRIDGE_CLAIMED) or \
                    item.key in batch_keys:
                self._count("duplicates")
                continue
            batch_keys.add(item.key)
            try:
                item.mapped = map_message(self.cfg.routes, item.topic, item.payload,
                                          self.cfg.max_message_bytes)
            except UnmappableMessage as exc:
                await self._dead(item, exc)
                continue
            (claimed if item.row is not None else fresh).append(item)
        if claimed:
            order = {id(item): n for n, item in enumerate(items)}
            fresh = sorted(await self._reconcile(claimed) + fresh,
                           key=lambda i: order[id(i)])
        await self._publish_all(fresh)

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
        keep_ms = int(self.cfg.dedupe_hours * 3_600_000)
        try:
            head = self.own_seq(feed)
            await _done(self.storage.bridge_claim(
                self.cfg.name, [(i.key, feed, head) for i in run], self.now_ms(), keep_ms))
            recs = await self.publish(feed, type_name, [_mapped(i).data for i in run],
                                      subjects=[_mapped(i).subject for i in run])
        except ChainError as exc:  # not the message's fault: the feed's chain moved
            raise _Retry(f"cannot publish on feed {feed} now: {exc}") from exc
        except InvalidRecord as exc:
            if len(run) == 1:
                await self._dead(run[0], exc)
                return
            # Which one: nothing of the run was signed; publish them one by one.
            for item in run:
                await self._publish_run([item])
            return
        except CitynodeError as exc:
            raise _Retry(f"cannot publish on feed {feed} now: {exc}") from exc
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
                        "reconciled)", extra=fields(bridge=self.cfg.name,
                                                    error=str(fut.exception())))

    async def _dead(self, item: _Item, exc: InvalidRecord | UnmappableMessage) -> None:
        """Keep ``item`` as a dead letter (durably), with its reason code."""
        feed = item.mapped.feed if item.mapped is not None else ""
        try:
            await _done(self.storage.bridge_dead_letter(
                self.cfg.name, item.key, feed, item.topic, exc.reason, str(exc),
                item.payload[:_EXCERPT], len(item.payload), self.now_ms(),
                self.cfg.dead_letter_rows))
        except CitynodeError as err:
            raise _Retry(f"cannot keep a dead letter: {err}") from err
        self._count("dead_lettered")
        self.metrics.bridge_dead_lettered.labels(self.cfg.name, exc.reason).inc()
        log.warning("bridge message dead-lettered", extra=fields(
            bridge=self.cfg.name, topic=item.topic[:200], reason=exc.reason,
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
                    found.append((item.key, hit))
        if found:
            await _done(self.storage.bridge_published(found, self.now_ms()))
            self._count("duplicates", len(found))
            log.info("bridge found the records of messages claimed before a restart",
                     extra=fields(bridge=self.cfg.name, found=len(found)))
        return left

    def _expected(self, m: Mapped) -> tuple[str, str | None, Any]:
        """What a record of ``m`` holds: its payload after the feed's egress policy (as
        the publishing role applies it)."""
        rules = self.config.feed(m.feed).egress
        if rules.is_open:
            return (m.type, m.subject, m.data)
        out = egress.apply(rules, m.type, m.data, m.subject)
        return (m.type, out.subject, out.data)

    def _count(self, what: str, n: int = 1) -> None:
        self.counts[what] += n
        metric = {"received": self.metrics.bridge_received,
                  "published": self.metrics.bridge_published,
                  "duplicates": self.metrics.bridge_duplicates}.get(what)
        if metric is not None and n:
            metric.labels(self.cfg.name).inc(n)


def _paho(client: aiomqtt.Client) -> Any:
    """The paho client under an aiomqtt client (see the module docstring)."""
    return client._client


def _check_granted(topic: str, granted: Any) -> None:
    """Raise :class:`_Retry` if the broker refused the subscription (not authorised,
    say); log if it granted QoS 0 (at most once: a crash may then lose messages)."""
    for code in granted:
        value = getattr(code, "value", code)
        if value >= 0x80:
            raise _Retry(f"the broker refused the subscription to {topic!r} "
                         f"({code}): check the broker's access rules for this user")
        if value == 0:
            log.warning("broker granted QoS 0 only: messages may be lost in a crash",
                        extra=fields(topic=topic))


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
