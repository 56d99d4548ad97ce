"""The durable outbox every sink delivers from (asyncio; storage does the SQL).

Rules:

* **Taken on once.** The sink's cursor is a records rowid. New committed records its
  filter selects are put in its outbox and the cursor moved past them in one
  transaction (``Storage.sink_enqueue``): a record is taken on once, and a record
  committed is taken on even if the node stops right after (the cursor is behind it).
* **Forgotten only once acknowledged.** A delivery's outbox entry is removed after the
  receiver answered 2xx. A crash between the two delivers that record again, with the
  same event id: receivers drop it by id (at least once, idempotent by id).
* **Ordered per feed.** Records of one (origin, feed) -- a lane -- are delivered in
  their order; a record is sent only once every earlier one of its lane was
  acknowledged (or refused for good). Lanes are delivered to at once (``lanes``).
* **Retries.** 5xx, 408, 429 and connection failures are retried after a backoff that
  doubles from ``retry_min_seconds`` up to ``retry_max_seconds``, times a random
  factor in [0.5, 1) (jitter: many nodes do not retry in step); a ``Retry-After`` in
  seconds is honoured up to ``retry_max_seconds``. So are 401, 403, 404, 405 and 407:
  they refuse the sink itself (its token, its URL), not the event, and would refuse
  every record alike; they wait for the operator to fix node.toml or the receiver.
  Any other 4xx is a refusal for good: the record is kept as refused
  (``citynode sinks``) and its lane goes on.
* **Bounded.** At most ``_MAX_PENDING`` records wait in a sink's outbox; beyond that the
  cursor stops (the records stay in the database) until the receiver catches up.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from citynode.errors import CitynodeError, ConfigError
from citynode.logs import fields
from citynode.node._base import in_thread
from citynode.sinks.config import SinkConfig
from citynode.storage import OutboxRow, Storage

__all__ = ["Outcome", "Sink"]

log = logging.getLogger("citynode.sinks")

_SCAN = 1000  # records read per enqueue step
_MAX_PENDING = 100_000


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one delivery: ``ok``; else ``retry`` (later) or refused for good,
    and why; ``after`` (seconds): the receiver's Retry-After, if any."""

    ok: bool
    retry: bool = False
    error: str = ""
    after: float | None = None


# Answers about the endpoint or the credentials, not the event (see the docstring).
_SINK_REFUSED = frozenset({401, 403, 404, 405, 407})


def outcome_of_status(status: int, text: str, retry_after: str | None) -> Outcome:
    """The outcome of an HTTP answer (see the module docstring)."""
    if 200 <= status < 300:
        return Outcome(True)
    after = float(retry_after) if retry_after and retry_after.strip().isdigit() else None
    error = f"HTTP {status}: {text[:300]}"
    if status in _SINK_REFUSED:
        error += " (the receiver refuses the sink itself: check its url and token_file)"
    retry = status >= 500 or status in (408, 429) or status in _SINK_REFUSED
    return Outcome(False, retry, error, after)


class Sink(abc.ABC):
    """One ``[[sinks.*]]``: :meth:`run` until cancelled; :meth:`wake` on new records.
    A subclass gives :meth:`send` (the delivery of one lane's records)."""

    def __init__(self, cfg: SinkConfig, *, data_dir: Path, storage: Storage,
                 now_ms: Callable[[], int]) -> None:
        self.cfg = cfg
        self.data_dir = data_dir
        self.storage = storage
        self.now_ms = now_ms
        self._wake = asyncio.Event()
        self.counts = {"delivered": 0, "retries": 0, "refused": 0}
        #: Prometheus children for the same counts (set by the Sinks role)
        self.counters: dict[str, Any] = {}
        self.last_error: str | None = None
        self.running = False

    # ------------------------------------------------------------------ the subclass's

    @abc.abstractmethod
    async def send(self, session: aiohttp.ClientSession, rows: list[OutboxRow]
                   ) -> list[Outcome]:
        """Deliver ``rows`` (one lane's, in order); the outcomes of a prefix of them (the
        rest is tried later)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ running

    def wake(self) -> None:
        """New records were committed: look for those the filter selects."""
        self._wake.set()

    def _file(self, name: str) -> Path:
        p = Path(name)
        return p if p.is_absolute() else self.data_dir / p

    def headers(self) -> dict[str, str]:
        """The headers of every request (the bearer token). Raises ConfigError."""
        if not self.cfg.token_file:
            return {}
        try:
            token = self._file(self.cfg.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"sink {self.cfg.name}: token_file: {exc}") from exc
        return {"Authorization": f"Bearer {token}"}

    def _ssl(self) -> ssl.SSLContext:
        """The TLS trust for the receiver. Raises ConfigError."""
        try:
            return ssl.create_default_context(
                cafile=str(self._file(self.cfg.ca_file)) if self.cfg.ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"sink {self.cfg.name}: ca_file: {exc}") from exc

    def check_files(self) -> None:
        """Raise ConfigError if the token or CA file cannot be read now: at start, a
        missing file is a mistake in node.toml to report, not an outage to wait out
        (while running, a file gone is retried: it may be being replaced)."""
        self.headers()
        self._ssl()

    def _session(self) -> aiohttp.ClientSession:
        ctx = self._ssl()
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ctx, limit=self.cfg.lanes),
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_seconds),
            headers=self.headers())

    async def run(self) -> None:
        """Take on and deliver records until cancelled. A failure of the sink itself (its
        token file gone, the database) is logged and retried after a backoff."""
        delay = self.cfg.retry_min_seconds
        while True:
            try:
                async with self._session() as session:
                    self.running = True
                    await self._loop(session)
            except asyncio.CancelledError:
                self.running = False
                raise
            except (CitynodeError, OSError, aiohttp.ClientError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                log.warning("sink failed; retrying", extra=fields(
                    sink=self.cfg.name, error=str(exc), retry_in=round(delay, 2)))
            except Exception as exc:  # a bug must not stop the sink for good
                self.last_error = f"internal error: {exc!r}"
                log.exception("sink failed; retrying", extra=fields(sink=self.cfg.name))
            self.running = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.cfg.retry_max_seconds)

    async def place_cursor(self) -> int:
        """The sink's cursor; on its first run placed now (before the last record held,
        or before the first with ``from_start``)."""
        cursor = await in_thread(self.storage.sink_cursor, self.cfg.name)
        if cursor is None:
            cursor = 0 if self.cfg.from_start else await in_thread(self.storage.max_rowid)
            await asyncio.wrap_future(self.storage.sink_enqueue(self.cfg.name, [], cursor))
        return cursor

    async def _loop(self, session: aiohttp.ClientSession) -> None:
        name = self.cfg.name
        cursor = await self.place_cursor()
        while True:
            self._wake.clear()
            cursor = await self._enqueue(cursor)
            lanes = await in_thread(self.storage.sink_due, name, self.now_ms(),
                                    self.cfg.lanes, self.cfg.batch)
            if lanes:
                await self._deliver(session, lanes)
                continue
            nxt = await in_thread(self.storage.sink_next_due, name)
            wait = None if nxt is None else max(0.0, (nxt - self.now_ms()) / 1000)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _enqueue(self, cursor: int) -> int:
        """Take on the records committed after ``cursor`` that the filter selects."""
        checked = False
        while True:
            rows = await in_thread(lambda c=cursor: self.storage.query(
                self.cfg.filter, after_rowid=c, limit=_SCAN))
            if not rows:
                return cursor
            if not checked:  # counted only when there is something to take on
                checked = True
                if await in_thread(self.storage.sink_pending, self.cfg.name) >= _MAX_PENDING:
                    return cursor
            # The rows come in rowid order, but for a one-feed filter in seq order (the
            # same order within a feed): the cursor is the greatest rowid seen.
            cursor = max(cursor, max(r.rowid for r in rows))
            await asyncio.wrap_future(self.storage.sink_enqueue(
                self.cfg.name, [(r.id, r.rowid, f"{r.origin.hex()}:{r.feed}") for r in rows],
                cursor))
            if len(rows) < _SCAN:
                return cursor

    async def _deliver(self, session: aiohttp.ClientSession,
                       lanes: list[list[OutboxRow]]) -> None:
        results = await asyncio.gather(*(self._lane(session, rows) for rows in lanes))
        delivered: list[int] = []
        retry: list[tuple[int, str, int, int, str]] = []
        dead: list[tuple[int, str]] = []
        for d, r, x in results:
            delivered += d
            retry += r
            dead += x
        await asyncio.wrap_future(self.storage.sink_settle(
            self.cfg.name, delivered, retry, dead, [rows[0].lane for rows in lanes]))
        for key, n in (("delivered", len(delivered)), ("retries", len(retry)),
                       ("refused", len(dead))):
            self.counts[key] += n
            if n and key in self.counters:
                self.counters[key].inc(n)

    async def _lane(self, session: aiohttp.ClientSession, rows: list[OutboxRow]
                    ) -> tuple[list[int], list[tuple[int, str, int, int, str]],
                               list[tuple[int, str]]]:
        delivered: list[int] = []
        retry: list[tuple[int, str, int, int, str]] = []
        dead: list[tuple[int, str]] = []
        try:
            outcomes = await self.send(session, rows)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            outcomes = [Outcome(False, True, f"{type(exc).__name__}: {exc}"[:300])]
        for row, out in zip(rows, outcomes, strict=False):
            if out.ok:
                delivered.append(row.id)
                continue
            self.last_error = out.error
            if not out.retry:
                dead.append((row.id, out.error))
                log.warning("sink: the receiver refused a record for good", extra=fields(
                    sink=self.cfg.name, record=row.record_id.hex(), error=out.error))
                continue
            wait = min(self.cfg.retry_max_seconds,
                       self.cfg.retry_min_seconds * 2 ** min(row.attempts, 30))
            wait *= 0.5 + random.random() / 2
            if out.after is not None:
                wait = max(wait, min(out.after, self.cfg.retry_max_seconds))
            retry.append((row.id, row.lane, row.attempts + 1,
                          self.now_ms() + int(wait * 1000), out.error))
            break  # the rest of the lane waits for this one
        return delivered, retry, dead

    async def status(self) -> dict[str, Any]:
        """What ``citynode sinks`` shows of this sink."""
        pending, refused = (await in_thread(self.storage.sink_counts)).get(
            self.cfg.name, (0, 0))
        return {"name": self.cfg.name, "kind": self.cfg.kind, "url": self.cfg.url,
                "filter": self.cfg.filter_text, "running": self.running,
                "pending": pending, "refused_held": refused,
                "last_error": self.last_error, **self.counts}
