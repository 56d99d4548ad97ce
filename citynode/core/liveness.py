"""Liveness: telling a quiet feed from a withheld or dead one (docs/PROTOCOL.md,
"Liveness").

An origin whose card gives a feed a cadence (``cadence_s``) signs a checkpoint of that
feed at least that often, even when nothing was published: the checkpoint is its
signed statement "feed F had N records at time T". Every node keeps, per (origin,
feed), the newest statement it holds (:class:`FeedLiveness`) and derives a state from
it, its own head and the clock (:func:`feed_state`):

* ``unknown``   no statement held yet;
* ``dead``      the newest statement is older than ``DEAD_AFTER_CADENCES`` cadences;
* ``lagging``   the origin signed more records than we hold, and we first learnt so
                less than the sync bound ago (they are on their way);
* ``withheld``  the origin signed more records than we hold, and we first learnt so
                more than the sync bound ago: no path delivered them in time;
* ``silent``    we hold everything the origin signed, and it signed nothing new for
                more than a cadence (the sync bound for a feed without a cadence);
* ``live``      we hold everything the origin signed, and the feed grew recently (or
                we hold records newer than its last statement).

A statement signed before the newest held and of no more records is **stale**: what an
honest origin signed earlier, arriving late (a heartbeat queued while a partner was
down, or over a slower path). It changes nothing and is not misbehaviour. A statement
inconsistent with the newest held is refused and changes nothing: fewer records signed
later (``checkpoint_smaller``: a feed never shrinks), or more records signed earlier
(``checkpoint_older``: the origin's statements cannot go back in time and forward in
size). One from the future is refused before it gets here (``future_time``,
core/checkpoints.py).
Everything here is pure: times are parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from citynode.errors import InvalidRecord

__all__ = [
    "DEAD_AFTER_CADENCES",
    "STATES",
    "FeedLiveness",
    "Statement",
    "feed_state",
]

#: A feed with a cadence is dead when its newest statement is older than this many
#: cadences: one missed heartbeat is a hiccup, three are an outage.
DEAD_AFTER_CADENCES = 3
#: Every state, in the order ``citynode feeds`` and the metrics list them.
STATES = ("live", "silent", "lagging", "withheld", "dead", "unknown")
#: Sizes remembered with the moment we first learnt of them (to date "behind since").
_SEEN_MAX = 64


@dataclass(frozen=True, slots=True)
class Statement:
    """A verified checkpoint seen as a liveness statement."""

    size: int
    time: int  # ms, as signed by the origin
    root: bytes
    envelope: bytes = field(repr=False)


def feed_state(
    *,
    cadence_s: int | None,
    newest_size: int | None,
    newest_time: int,
    grew_at: int,
    head: int,
    behind_since: int | None,
    now_ms: int,
    sync_bound_ms: int,
) -> str:
    """The state of one (origin, feed) (see the module docstring).

    ``newest_size``/``newest_time``: the newest statement held (None: none);
    ``grew_at``: the signed time of the first statement of that size; ``head``: the
    records held here; ``behind_since``: when this node first learnt of a signed size
    above ``head`` (None: not known, taken as now). Never raises."""
    if newest_size is None:
        return "unknown"
    if cadence_s is not None and now_ms - newest_time > DEAD_AFTER_CADENCES * cadence_s * 1000:
        return "dead"
    if head < newest_size:
        since = now_ms if behind_since is None else behind_since
        return "withheld" if now_ms - since > sync_bound_ms else "lagging"
    quiet_ms = cadence_s * 1000 if cadence_s is not None else sync_bound_ms
    if head > newest_size or now_ms - grew_at <= quiet_ms:
        return "live"
    return "silent"


class FeedLiveness:
    """The newest statement held of one (origin, feed), and when each size was first
    learnt here. Small and bounded (at most 64 remembered sizes)."""

    __slots__ = ("_seen", "grew_at", "newest")

    def __init__(self) -> None:
        self.newest: Statement | None = None
        self.grew_at = 0
        self._seen: list[tuple[int, int]] = []  # (size, first learnt at), sizes ascending

    def verdict(self, st: Statement) -> str:
        """What a verified statement is to the newest held: ``"new"`` (signed no earlier
        and of no fewer records: it replaces it), ``"known"`` (the one held, or one of
        its size and time; also one of its size with another root, a split view, which
        is not this function's business: the caller holds the proof) or ``"stale"``
        (signed earlier, of no more records: an honest statement arriving late).

        Raises :class:`InvalidRecord` for a statement no honest origin signs beside the
        one held: ``checkpoint_smaller`` (fewer records, signed no earlier),
        ``checkpoint_older`` (more records, signed earlier)."""
        held = self.newest
        if held is None:
            return "new"
        if st.size == held.size and (st.time == held.time or st.root != held.root):
            return "known"
        if st.time < held.time:
            if st.size > held.size:
                raise InvalidRecord(
                    f"checkpoint of {st.size} records signed at {st.time}, before one "
                    f"of {held.size} records ({held.time}): the origin's statements "
                    "never go back in time and forward in size", "checkpoint_older")
            return "stale"
        if st.size < held.size:
            raise InvalidRecord(
                f"checkpoint of {st.size} records, signed after one of {held.size}: a "
                "feed never shrinks", "checkpoint_smaller")
        return "new"

    def observe(self, st: Statement, now_ms: int) -> bool:
        """Take a verified statement received at ``now_ms``. Returns True if it is newer
        than the one held (:meth:`verdict` ``"new"``: then held), False if it is known
        or stale (nothing changes). Raises as :meth:`verdict`, and then changes
        nothing."""
        if self.verdict(st) != "new":
            return False
        held = self.newest
        if held is None or st.size > held.size:
            self.grew_at = st.time
            self._seen.append((st.size, now_ms))
            del self._seen[:-_SEEN_MAX]
        self.newest = st
        return True

    @classmethod
    def restored(cls, st: Statement, grew_at: int, now_ms: int) -> FeedLiveness:
        """The liveness of a feed as a node kept it across a restart: the newest
        statement and ``grew_at`` as held before; its size learnt at ``now_ms`` (the
        restart: while the node was down no path could deliver anything, so the sync
        bound starts again)."""
        fl = cls()
        fl.newest = st
        fl.grew_at = grew_at
        fl._seen = [(st.size, now_ms)]
        return fl

    def behind_since(self, head: int) -> int | None:
        """When this node first learnt of a signed size above ``head`` (None: it holds
        every size it learnt of)."""
        return next((t for size, t in self._seen if size > head), None)

    def state(self, *, cadence_s: int | None, head: int, now_ms: int,
              sync_bound_ms: int) -> str:
        """:func:`feed_state` of this feed."""
        n = self.newest
        return feed_state(cadence_s=cadence_s, newest_size=n.size if n else None,
                          newest_time=n.time if n else 0, grew_at=self.grew_at, head=head,
                          behind_since=self.behind_since(head), now_ms=now_ms,
                          sync_bound_ms=sync_bound_ms)
