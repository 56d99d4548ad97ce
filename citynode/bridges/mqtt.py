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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt

from citynode.bridges.config import MqttBridgeConfig
from citynode.bridges.mapping import Mapped, map_message
from citynode.bridges.pipeline import Pipeline, Publish, Retry
from citynode.config import Config
from citynode.errors import CitynodeError, ConfigError
from citynode.logs import fields
from citynode.metrics import Metrics
from citynode.storage import Storage

__all__ = ["MqttBridge", "Publish"]

log = logging.getLogger("citynode.bridges")

_BATCH = 256  # messages handled (and committed) together when they queue up
_BACKOFF_MIN = 0.5
_MAX_QUEUED = 10_000  # messages received and not yet handled, at most
_Retry = Retry  # the name tests and older code use


class MqttBridge(Pipeline):
    """One ``[[bridges.mqtt]]``: :meth:`run` until cancelled; :meth:`status` any time."""

    kind = "mqtt"

    def __init__(self, cfg: MqttBridgeConfig, *, config: Config, data_dir: Path,
                 origin: bytes, publish: Publish, own_seq: Callable[[str], int],
                 storage: Storage, metrics: Metrics, now_ms: Callable[[], int]) -> None:
        super().__init__(cfg, config=config, origin=origin, publish=publish,
                         own_seq=own_seq, storage=storage, metrics=metrics, now_ms=now_ms)
        self.cfg = cfg
        self.data_dir = data_dir
        self.connected = False
        self.since_ms: int | None = None
        self.last_error: str | None = None
        self.connects = 0
        metrics.bridge_connected.labels(cfg.name).set(0)

    def map_item(self, topic: str, payload: bytes) -> Mapped:
        """By the first route whose topic filter matches (mapping.py)."""
        return map_message(self.cfg.routes, topic, payload, self.cfg.max_message_bytes)

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

    def check_files(self) -> None:
        """Raise :class:`ConfigError` if a certificate or password file cannot be read
        now: at start, a missing file is a mistake in node.toml to report, not an outage
        to wait out."""
        self._secrets()

    def _secrets(self) -> tuple[ssl.SSLContext | None, str | None]:
        """The TLS context and password of a connection. Raises ConfigError."""
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
        return ctx, password

    def _client(self) -> aiomqtt.Client:
        """A client for one connection. Raises :class:`ConfigError` for a certificate or
        password file that cannot be read."""
        c = self.cfg
        ctx, password = self._secrets()
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


