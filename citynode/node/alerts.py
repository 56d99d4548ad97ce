"""The alerts role: watch the node, and tell the operator's webhooks what is wrong
(docs/ALERTS.md).

One task (:meth:`Alerts.run`, spawned by the node) does both halves, so an alert
can never block the node: every ``check_interval_seconds`` it takes a snapshot of the
roles' state (partners' health, own feeds' liveness, fork proofs held, free disk, the
count of refused input) and lets the pure core (core/alerts.py) decide what fires or
resolves; in between it delivers what is due from a bounded queue, each body signed
with the node key, through the one HTTP client stack (transport/http.py), retried
with exponential back-off up to ``retry_attempts``. Failures are logged and counted
(``citynode_alert_deliveries{outcome}``), never raised.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from citynode.config import Config
from citynode.core import alerts as ca
from citynode.core.keybook import CN1_NAMES, Names
from citynode.core.keys import SigningKey
from citynode.core.replica import Replica
from citynode.errors import PeerError, PeerRejected
from citynode.logs import fields
from citynode.metrics import Metrics
from citynode.node._base import in_thread
from citynode.node.checkpoints import Checkpoints
from citynode.node.partners import Partners
from citynode.storage import Storage
from citynode.transport.http import JSON, HttpClient

__all__ = ["Alerts"]

log = logging.getLogger("citynode.alerts")

#: Longest wait between two attempts of one delivery.
MAX_BACKOFF_MS = 600_000
#: An error answer that will not change on retry: the receiver refuses the alert.
_NO_RETRY = frozenset(range(400, 500)) - {408, 425, 429}


@dataclass(slots=True)
class _Delivery:
    url: int  # index in webhook_urls
    body: bytes
    code: str
    attempts: int = 0
    due_ms: int = 0


class _Signed:
    """The :class:`~citynode.transport.http.Auth` hook of an alert: the signature header
    over the exact body (core/alerts.py)."""

    def __init__(self, key: SigningKey) -> None:
        self.key = key

    def headers(self, method: str, path_qs: str, body: bytes) -> dict[str, str]:
        out = {ca.SIGNATURE_HEADER: ca.signature_header(self.key, body)}
        log = getattr(self.key, "log", None)
        if log is not None:
            out[ca.KEYLOG_HEADER] = base64.b64encode(log).decode("ascii")
        return out


class Alerts:
    """Raise, dedup and deliver alerts. Inert (no task) without webhook URLs."""

    def __init__(self, *, config: Config, key: SigningKey, data_dir: Path,
                 partners: Partners, checkpoints: Checkpoints, replica: Replica,
                 storage: Storage, metrics: Metrics, now_ms: Callable[[], int],
                 names: Names = CN1_NAMES) -> None:
        self.cfg = config.alerts
        self.names = names  # how origins print (the node's key logs: cn2 ids)
        self.key = key
        self.node = key.node_id
        self.data_dir = data_dir
        self.partners = partners
        self.checkpoints = checkpoints
        self.replica = replica
        self.storage = storage
        self.metrics = metrics
        self.now_ms = now_ms
        self.thresholds = ca.Thresholds(
            partner_down_ms=int(self.cfg.partner_down_minutes * 60_000),
            disk_free_percent=self.cfg.disk_free_percent,
            invalid_per_minute=self.cfg.invalid_rate_per_minute)
        self.tracker = ca.Tracker(clear_ms=int(self.cfg.resolve_after_seconds * 1000))
        self.queue: deque[_Delivery] = deque()
        self._rate = ca.RateWindow()
        self._forks: list[tuple[str, str, int, str]] = []
        self._forks_seen = 0
        self._started_ms = now_ms()
        self._auth = _Signed(key)
        self._clients: list[tuple[HttpClient, str]] = []
        for url in self.cfg.webhook_urls:
            parts = urlsplit(url)
            self._clients.append((HttpClient(f"{parts.scheme}://{parts.netloc}",
                                             timeout=self.cfg.timeout_seconds, where=url),
                                  parts.path or "/"))

    @property
    def enabled(self) -> bool:
        return bool(self._clients)

    async def run(self) -> None:
        """Check and deliver until cancelled (the node's one alerts task)."""
        interval = int(self.cfg.check_interval_seconds * 1000)
        self._started_ms = self.now_ms()
        next_check = self._started_ms
        try:
            while True:
                if self.now_ms() >= next_check:
                    try:
                        await self.check()
                    except Exception:  # a bug here must not end alerting
                        log.exception("alert check failed")
                    next_check = self.now_ms() + interval
                await self.deliver_due()
                due = min([next_check, *(d.due_ms for d in self.queue)])
                await asyncio.sleep(max(10, due - self.now_ms()) / 1000)
        finally:
            for client, _path in self._clients:
                await client.close()

    # ------------------------------------------------------------------ raising

    async def snapshot(self) -> ca.Snapshot:
        """What the roles show now (storage and the file system read in a thread)."""
        now = self.now_ms()
        if len(self.replica.forked) != self._forks_seen:
            # Proofs are only added: re-read their kinds when the set grew.
            self._forks_seen = len(self.replica.forked)
            rows = await in_thread(self.storage.fork_proofs)
            self._forks = [(self.names.name(r.origin), r.feed, r.seq, r.kind) for r in rows]
        me = getattr(self.key, "identity", self.key.public_key)
        own = [ca.OwnFeed(str(s["feed"]), s["cadence_s"],  # type: ignore[arg-type]
                          str(s["state"]), s["signed_time"])  # type: ignore[arg-type]
               for s in self.checkpoints.states() if s["origin"] == me]
        partners = [ca.PartnerSeen(link.row.node_id, link.row.name, link.up,
                                   link.last_ok_ms)
                    for link in list(self.partners.links.values())]
        forged = [(feed, seq, self._sender(peer)) for feed, (seq, peer, _rid)
                  in sorted(self.replica.own_forgeries.items())]
        free = await in_thread(_free_percent, self.data_dir)
        return ca.Snapshot(
            now_ms=now, started_ms=self._started_ms, partners=partners, own_feeds=own,
            forks=self._forks, free_percent=free, disk_full=self.storage.disk_full,
            invalid_last_minute=self._rate.add(now, self.metrics.rejected_total()),
            own_forgeries=forged)

    def _sender(self, peer: bytes | None) -> str:
        if peer is None:
            return "local"
        link = self.partners.get(peer)
        return link.row.name if link is not None else self.names.name(peer)

    async def check(self) -> list[ca.Event]:
        """Take a snapshot, and queue an alert to every URL for each condition that
        fired or resolved since the last check."""
        snap = await self.snapshot()
        events = self.tracker.update(ca.conditions(snap, self.thresholds), snap.now_ms,
                                     snap)
        for ev in events:
            code = ev.condition.code
            self.metrics.alerts.labels(code, ev.status).inc()
            (log.warning if ev.status == "firing" else log.info)(
                "alert", extra=fields(alert=code, status=ev.status, id=ev.condition.id,
                                      message=ev.message))
            body = ca.alert_body(self.node, ev)
            for i in range(len(self._clients)):
                self._enqueue(_Delivery(i, body, code, due_ms=snap.now_ms))
        return events

    def _enqueue(self, d: _Delivery) -> None:
        if len(self.queue) >= self.cfg.queue_max:
            old = self.queue.popleft()
            self.metrics.alert_deliveries.labels("dropped").inc()
            log.warning("alert queue full: oldest alert dropped",
                        extra=fields(alert=old.code, url=self.cfg.webhook_urls[old.url]))
        self.queue.append(d)

    # ------------------------------------------------------------------ delivery

    async def deliver_due(self) -> None:
        """Attempt every delivery that is due; reschedule or give up the failed ones."""
        now = self.now_ms()
        due = [d for d in self.queue if d.due_ms <= now]
        for d in due:
            self.queue.remove(d)
            client, path = self._clients[d.url]
            d.attempts += 1
            try:
                await client.request("POST", path, d.body, accept=JSON, content_type=JSON,
                                     auth=self._auth, max_bytes=64 * 1024)
            except PeerError as exc:
                url = self.cfg.webhook_urls[d.url]
                final = (d.attempts >= self.cfg.retry_attempts
                         or (isinstance(exc, PeerRejected) and exc.status in _NO_RETRY))
                if final:
                    self.metrics.alert_deliveries.labels("failed").inc()
                    log.warning("alert not delivered: giving up",
                                extra=fields(alert=d.code, url=url, attempts=d.attempts,
                                             error=str(exc)))
                    continue
                self.metrics.alert_deliveries.labels("retry").inc()
                wait = min(MAX_BACKOFF_MS,
                           int(self.cfg.retry_base_seconds * 1000) * 2 ** (d.attempts - 1))
                d.due_ms = self.now_ms() + wait
                log.info("alert delivery failed: will retry",
                         extra=fields(alert=d.code, url=url, attempts=d.attempts,
                                      retry_in_ms=wait, error=str(exc)))
                self._enqueue(d)
            else:
                self.metrics.alert_deliveries.labels("ok").inc()


def _free_percent(path: Path) -> float:
    """Percent of the file system holding ``path`` free for this process (100.0 if it
    cannot be read: no alert from a failed probe; a full disk is also seen by storage)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 100.0
    return 100.0 * st.f_bavail / st.f_blocks if st.f_blocks else 100.0
