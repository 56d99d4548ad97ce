"""Live streams: every newly committed row is read once and handed to each live stream
whose filter and reader match it, so the cost per commit does not grow with the number
of subscribers. How a row becomes an event (SSE text) is the HTTP layer's: each
subscriber brings its ``render``.

When an erasure request drops payloads already stored, each live stream whose filter
(its payload conditions aside: a tombstone has no location) and reader match an erased
row is handed that row as :class:`Erased`: the stream tells its subscriber, who may
have been sent the payload already (docs/API.md, ``event: erased``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

from citynode.metrics import Metrics
from citynode.node._base import Spawn, in_thread
from citynode.storage import Storage

__all__ = ["MAX_SUBSCRIBERS", "STREAM_QUEUE_BATCHES", "Erased", "StreamBatch", "Streams",
           "Subscriber"]

log = logging.getLogger("citynode.node")

# Live streams served at once.
MAX_SUBSCRIBERS = 1000
#: Tail batches a live stream may have waiting; past that it re-reads from the database.
STREAM_QUEUE_BATCHES = 1000
#: Rows read by the tail at a time.
TAIL_PAGE = 1000

Render = Callable[[Any], str]


class StreamBatch(NamedTuple):
    """Consecutive tail rows for one live stream: their cursors, their events, and the
    events as one chunk ready to write (shared by every stream of the same group)."""

    rowids: list[int]
    texts: list[str]
    chunk: bytes
    #: (origin, feed, time) of each row: what decides the terms in force for it.
    keys: list[tuple[bytes, str, int]]

    def after(self, cursor: int) -> bytes:
        """The events of rows after ``cursor`` (a stream that caught up from storage
        must not send what it already sent)."""
        if self.rowids[0] > cursor:
            return self.chunk
        return "".join(t for r, t in zip(self.rowids, self.texts, strict=True)
                       if r > cursor).encode()


class Erased(NamedTuple):
    """Stored rows (tombstones now) whose payload an erasure request just removed, for
    one live stream: it announces those it already sent (cursor at most its own)."""

    rows: list[Any]


class Subscriber:
    """One live stream's view of the tail: batches of new stored rows matching its
    filter, rendered by ``render``.

    Streams with the same ``group`` (same filter, reader and rendering) see the same
    rows: the tail matches and renders them once per group, not once per stream, and a
    ``render`` shared by several groups renders each row once (in the tail's worker
    thread). A stream with no group is a group of its own, rendered on the event loop
    (the operator's, decrypting, with its own key).
    """

    def __init__(self, match: Callable[[Any], bool], render: Render,
                 group: Hashable | None = None,
                 on_lag: Callable[[], None] | None = None,
                 match_erased: Callable[[Any], bool] | None = None) -> None:
        self.match = match
        #: Which erased rows (tombstones) concern this stream: by default ``match``.
        self.match_erased = match_erased if match_erased is not None else match
        self.render = render
        self.group: Hashable = group if group is not None else self
        # None in the queue: wake up, the stream is to end (see close()).
        self.queue: asyncio.Queue[StreamBatch | Erased | None] = asyncio.Queue(
            STREAM_QUEUE_BATCHES)
        self.lagging = False  # the queue overflowed: re-read from storage by cursor
        self.closed = False  # asked to end: the stream's handler ends its response
        self._on_lag = on_lag

    @property
    def shared(self) -> bool:
        return self.group is not self

    def offer(self, batch: StreamBatch | Erased) -> None:
        if self.closed:
            return
        try:
            self.queue.put_nowait(batch)
        except asyncio.QueueFull:
            self.lagging = True
            if self._on_lag is not None:
                self._on_lag()

    def close(self) -> None:
        """Ask the stream to end: its handler stops waiting for batches, ends its response
        and unregisters (the subscriber resumes by cursor, losing nothing). Idempotent."""
        if self.closed:
            return
        self.closed = True
        # A full queue: the handler is not waiting; it writes those, then sees ``closed``.
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)  # wakes a handler waiting for the next batch


class Streams:
    """The live streams and the tail that feeds them."""

    def __init__(self, *, storage: Storage, metrics: Metrics, spawn: Spawn) -> None:
        self.storage = storage
        self.metrics = metrics
        self.spawn = spawn
        self.subscribers: set[Subscriber] = set()
        self.closed = False  # close() was called: no new streams
        self._tail_rowid = 0
        # Rows were committed while no stream listened: the tail was not read (nobody
        # to hand rows to); the cursor is read again when a stream asks for "now".
        self._stale = False
        self._wake = asyncio.Event()

    async def start(self) -> None:
        self._tail_rowid = await in_thread(self.storage.max_rowid)
        self.spawn(self._tail_loop(), "tail")

    def wake(self) -> None:
        """New rows were committed. With no stream open there is nothing to hand them
        to: no read at all (a commit costs no tail read on a node nobody follows)."""
        if not self.subscribers:
            self._stale = True
            return
        self._wake.set()

    async def cursor(self) -> int:
        """The cursor of the newest committed row: where a stream that starts "now"
        starts."""
        if self._stale:
            self._stale = False
            latest = await in_thread(self.storage.max_rowid)
            self._tail_rowid = max(self._tail_rowid, latest)
        return self._tail_rowid

    def refusal(self) -> str | None:
        """Why a new live stream cannot open now (the subscriber retries later), or
        None."""
        if self.closed:
            return "the node is shutting down: retry later"
        if len(self.subscribers) >= MAX_SUBSCRIBERS:
            return "too many live streams on this node: retry later"
        return None

    async def open(self, sub: Subscriber) -> None:
        """Register a live stream (see :meth:`refusal` first). The tail is brought up to
        date first if nobody listened lately, so it hands the stream rows from now on
        rather than re-reading what was committed meanwhile (the stream's own catch-up,
        which starts after this, reads those)."""
        await self.cursor()
        self.subscribers.add(sub)
        self.metrics.streams.set(len(self.subscribers))

    def drop(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)
        self.metrics.streams.set(len(self.subscribers))

    def close(self) -> None:
        """End every live stream promptly and refuse new ones (graceful shutdown: a live
        stream would otherwise hold the server open until its shutdown timeout).
        Subscribers lose nothing: they resume with ``Last-Event-ID``."""
        self.closed = True
        for sub in list(self.subscribers):
            sub.close()

    async def erased(self, by: bytes, ids: list[bytes]) -> None:
        """Erasure request ``by``, naming ``ids``, was committed: hand the rows whose
        payload it removed to every live stream they concern (nothing is read when no
        stream is open)."""
        if not self.subscribers:
            return
        rows = await in_thread(self.storage.erased_rows, by, ids)
        for sub in list(self.subscribers):
            mine = [row for row in rows if sub.match_erased(row)]
            if mine:
                sub.offer(Erased(mine))

    async def _tail_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._tail_once()
            except Exception:  # keep streams alive; the next commit retries
                log.exception("live stream tail failed")
                await asyncio.sleep(1.0)
                self._wake.set()

    async def _tail_once(self) -> None:
        while True:
            renders = {sub.render for sub in self.subscribers if sub.shared}
            rows, texts = await in_thread(self._tail_read, self._tail_rowid, renders)
            if not rows:
                return
            if self.subscribers:
                # Before the tail moves on: if this raises, the rows are handed out again
                # (streams drop by cursor what they already got).
                self.fan_out(rows, texts)
            self._tail_rowid = rows[-1].rowid
            if len(rows) < TAIL_PAGE:
                return

    def _tail_read(self, after: int, renders: set[Render]
                   ) -> tuple[list[Any], dict[Render, list[str]]]:
        """In a worker thread: the next committed rows, and their events by each shared
        rendering (rendering is the costly part: once per row, off the event loop)."""
        rows = self.storage.query(after_rowid=after, limit=TAIL_PAGE)
        return rows, {r: [r(row) for row in rows] for r in renders} if rows else {}

    def fan_out(self, rows: list[Any], texts: dict[Render, list[str]]) -> None:
        """Hand new tail rows to every live stream whose filter and reader match them;
        ``texts``: the rows' events by shared rendering, as far as rendered already."""
        groups: dict[Hashable, list[Subscriber]] = {}
        for sub in self.subscribers:
            if not sub.lagging:
                groups.setdefault(sub.group, []).append(sub)
        for members in groups.values():
            first = members[0]
            picked = [n for n, row in enumerate(rows) if first.match(row)]
            if not picked:
                continue
            done = texts.get(first.render)
            if done is not None:
                chosen = [done[n] for n in picked]
            else:  # its own rendering, or the stream arrived while the rows were read
                chosen = [first.render(rows[n]) for n in picked]
            batch = StreamBatch([rows[n].rowid for n in picked], chosen,
                                "".join(chosen).encode(),
                                [(rows[n].origin, rows[n].feed, rows[n].time)
                                 for n in picked])
            for sub in members:
                sub.offer(batch)
