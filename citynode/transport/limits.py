"""Admission control of the HTTPS server: what one caller may cost before any work is
done for it.

* :class:`TokenBucket` / :class:`PartnerRates`: each partner's signed requests, at most
  ``[limits] partner_requests_per_second`` on average with bursts of
  ``partner_request_burst``. A partner with no token left is answered 429 with
  ``Retry-After`` before its body is read or its signature checked; a token is *taken*
  only by a request whose signature verified, so nobody can spend an honest partner's
  tokens by claiming its key.
* :class:`WorkBudget`: each partner's share of the event loop, ``partner_loop_share``
  seconds a second: the time its requests kept the loop busy (decoding a batch,
  answering a reconciliation message) is charged after the fact, and a partner in
  debt is answered 429 until it is paid back. Counting requests alone let one
  partner's costly requests (a reconciliation message of 4096 ranges) take the loop
  from everyone else; so does the cap on its requests under way at once
  (``partner_max_in_flight``), which also bounds the bodies held for it in memory.
* :class:`AddressCounts`: connections open per IP address, at most
  ``max_connections_per_address`` (the trusted reverse proxy's address excepted: every
  client comes through it).

No I/O and no clock of its own: time is a parameter (monotonic seconds), so the tests
run without an event loop.
"""

from __future__ import annotations

__all__ = ["WORK_BURST_S", "AddressCounts", "PartnerRates", "TokenBucket", "WorkBudget"]

#: Seconds of event-loop time a partner may save up and spend at once (its burst).
#: Work is charged after it is done, so this is also how long a partner's requests may
#: hold the event loop back to back before it is refused: at 1 s, a hostile partner
#: opened with a second of costly requests (reconciliation messages of 4,096 ranges)
#: while every honest request waited (scripts/chaos --scenario hostile: the attack's
#: first seconds had its worst latencies). An honest partner's request costs a few
#: milliseconds.
WORK_BURST_S = 0.25

#: Ranges of reconciliation messages one partner may send a second, on average
#: ([limits] partner_reconcile_ranges_per_second), and saved up at most (four messages
#: of the most ranges one may hold, MAX_RANGES): each range costs the answering node
#: about 2 us of its event loop in one piece, so a message of 4,096 held it about 8 ms,
#: and a hostile partner sending them back to back (scripts/chaos --scenario hostile)
#: stalled every honest request that came meanwhile. Two nodes in sync exchange one
#: range a session; a cold sync of thousands of chains a few thousand.
RECONCILE_RANGES_PER_S = 1024.0
RECONCILE_RANGE_BURST = 4 * 4096


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full."""

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        """Raises ValueError unless ``rate`` > 0 and ``burst`` >= 1."""
        if not rate > 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, not {rate}, "
                             f"{burst}")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:  # a clock that steps back refills nothing
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
            self._at = now

    def wait(self, now: float) -> float:
        """Seconds until one token is there (0.0: one is there now). Takes nothing."""
        self._refill(now)
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self.rate

    def take_n(self, n: int, now: float) -> float:
        """Take ``n`` tokens (at most ``burst``: more are counted as ``burst``) and
        return 0.0, or return the seconds until that many are there (taking nothing)."""
        self._refill(now)
        need = float(min(max(n, 1), self.burst))
        if self._tokens >= need:
            self._tokens -= need
            return 0.0
        return (need - self._tokens) / self.rate

    def take(self, now: float) -> float:
        """Take one token and return 0.0, or return the seconds until one is there
        (taking nothing)."""
        wait = self.wait(now)
        if wait == 0.0:
            self._tokens -= 1.0
        return wait


class WorkBudget:
    """Seconds of work (event-loop time) earned at ``share`` seconds a second, at most
    ``burst`` saved up; starts full. Work is charged after it is done, so the balance
    may go below zero: then nothing more is admitted until it is back at zero."""

    __slots__ = ("_at", "_balance", "burst", "share")

    def __init__(self, share: float, burst: float, now: float) -> None:
        """Raises ValueError unless ``share`` > 0 and ``burst`` > 0."""
        if not share > 0 or not burst > 0:
            raise ValueError(f"a work budget needs share > 0 and burst > 0, not {share}, "
                             f"{burst}")
        self.share = share
        self.burst = burst
        self._balance = burst
        self._at = now

    def spend(self, seconds: float, now: float) -> None:
        self.wait(now)
        self._balance -= max(0.0, seconds)

    def wait(self, now: float) -> float:
        """Seconds until the balance is back at zero (0.0: it is). Spends nothing."""
        if now > self._at:
            self._balance = min(self.burst, self._balance + (now - self._at) * self.share)
            self._at = now
        return 0.0 if self._balance >= 0.0 else -self._balance / self.share


class PartnerRates:
    """One :class:`TokenBucket` per partner key. Only keys of listed partners are ever
    given a bucket (callers check first), and :meth:`forget` drops a removed one, so
    memory is bounded by the partner list."""

    def __init__(self, rate: float, burst: int, share: float = 1.0,
                 in_flight: int = 1_000_000) -> None:
        """``share``: each partner's :class:`WorkBudget` (seconds a second, with
        :data:`WORK_BURST_S` saved up at most); ``in_flight``: its requests under way
        at once, at most. Raises ValueError for limits out of range."""
        self.rate, self.burst, self.share, self.in_flight = 0.0, 0, 0.0, 0  # (configure)
        self.ranges_rate, self.ranges_burst = RECONCILE_RANGES_PER_S, RECONCILE_RANGE_BURST
        self._buckets: dict[bytes, TokenBucket] = {}
        self._ranges: dict[bytes, TokenBucket] = {}
        self._work: dict[bytes, WorkBudget] = {}
        self._busy: dict[tuple[bytes, str], int] = {}
        self.configure(rate, burst, share, in_flight)

    def configure(self, rate: float, burst: int, share: float = 1.0,
                  in_flight: int = 1_000_000) -> None:
        """Take new limits (a reloaded config): buckets and budgets start again, full,
        under them. Raises ValueError for limits out of range."""
        if (rate, burst, share, in_flight) == (self.rate, self.burst, self.share,
                                                self.in_flight):
            return
        TokenBucket(rate, burst, 0.0)
        WorkBudget(share, WORK_BURST_S, 0.0)
        if in_flight < 1:
            raise ValueError(f"requests in flight must be at least 1, not {in_flight}")
        self.rate, self.burst, self.share, self.in_flight = rate, burst, share, in_flight
        self._buckets.clear()
        self._work.clear()

    def busy_wait(self, key: bytes, now: float) -> float:
        """Seconds until ``key``'s work budget is back at zero (0.0: now)."""
        w = self._work.get(key)
        return 0.0 if w is None else w.wait(now)

    def charge(self, key: bytes, seconds: float, now: float) -> None:
        """``key``'s request took ``seconds`` of the event loop."""
        w = self._work.get(key)
        if w is None:
            w = self._work[key] = WorkBudget(self.share, WORK_BURST_S, now)
        w.spend(seconds, now)

    def enter(self, key: bytes, kind: str = "", cap: int | None = None) -> bool:
        """One more request of ``key`` (of ``kind``: counted apart, at most ``cap``;
        default: any request, at most ``in_flight``) under way (True), or False
        (counting nothing) when that many are already; :meth:`leave` it when done."""
        n = self._busy.get((key, kind), 0)
        if n >= (self.in_flight if cap is None else cap):
            return False
        self._busy[(key, kind)] = n + 1
        return True

    def leave(self, key: bytes, kind: str = "") -> None:
        n = self._busy.get((key, kind), 0) - 1
        if n > 0:
            self._busy[(key, kind)] = n
        else:
            self._busy.pop((key, kind), None)

    def _bucket(self, key: bytes, now: float) -> TokenBucket:
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        return b

    def wait(self, key: bytes, now: float) -> float:
        """Seconds before ``key`` may make a request (0.0: now). Takes nothing."""
        return self._bucket(key, now).wait(now)

    def take(self, key: bytes, now: float) -> float:
        """Spend one of ``key``'s tokens (0.0), or the seconds until it has one."""
        return self._bucket(key, now).take(now)

    def configure_ranges(self, rate: float, burst: int) -> None:
        """Take new reconciliation-range limits (a reloaded config): the buckets start
        again, full. Raises ValueError for limits out of range."""
        if (rate, burst) == (self.ranges_rate, self.ranges_burst):
            return
        TokenBucket(rate, burst, 0.0)
        self.ranges_rate, self.ranges_burst = rate, burst
        self._ranges.clear()

    def take_ranges(self, key: bytes, n: int, now: float) -> float:
        """Spend ``n`` of ``key``'s reconciliation-range tokens (0.0), or return the
        seconds until it has them (spending nothing)."""
        b = self._ranges.get(key)
        if b is None:
            b = self._ranges[key] = TokenBucket(self.ranges_rate, self.ranges_burst, now)
        return b.take_n(n, now)

    def forget(self, keep: set[bytes]) -> None:
        """Drop the buckets and budgets of keys not in ``keep`` (partners removed)."""
        for key in [k for k in self._buckets if k not in keep]:
            del self._buckets[key]
        for key in [k for k in self._work if k not in keep]:
            del self._work[key]
        for key in [k for k in self._ranges if k not in keep]:
            del self._ranges[key]

    def __len__(self) -> int:
        return len(self._buckets)


class AddressCounts:
    """Connections open per address, each at most ``cap`` (``exempt``: none)."""

    def __init__(self, cap: int, exempt: frozenset[str] = frozenset()) -> None:
        if cap < 1:
            raise ValueError(f"a per-address cap must be at least 1, not {cap}")
        self.cap = cap
        self.exempt = exempt
        self._open: dict[str, int] = {}

    def admit(self, addr: str | None) -> bool:
        """Count one more connection from ``addr`` and return True, or return False
        (counting nothing) when ``cap`` are open from it already. An unknown address
        (None: not an IP socket) and an exempt one are always admitted."""
        if addr is None or addr in self.exempt:
            return True
        n = self._open.get(addr, 0)
        if n >= self.cap:
            return False
        self._open[addr] = n + 1
        return True

    def release(self, addr: str | None) -> None:
        """One connection admitted from ``addr`` has closed."""
        if addr is None or addr in self.exempt:
            return
        n = self._open.get(addr, 0) - 1
        if n > 0:
            self._open[addr] = n
        else:
            self._open.pop(addr, None)

    def open_from(self, addr: str) -> int:
        return self._open.get(addr, 0)

    def __len__(self) -> int:
        """Addresses with a connection open (memory: one entry each)."""
        return len(self._open)
