"""transport/limits.py without an event loop: token buckets and per-address counts, time
given as a parameter."""

from __future__ import annotations

import pytest

from citynode.transport.limits import AddressCounts, PartnerRates, TokenBucket, WorkBudget


def test_a_bucket_gives_its_burst_then_its_rate_and_says_how_long_to_wait() -> None:
    b = TokenBucket(rate=2.0, burst=3, now=100.0)
    assert [b.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(100.0) == pytest.approx(0.5)  # one token in 1/rate seconds
    assert b.wait(100.25) == pytest.approx(0.25)  # half way there; looking takes nothing
    assert b.take(100.5) == 0.0
    assert b.take(100.5) > 0.0
    # idle a long time: at most the burst is saved up
    assert [b.take(1000.0) for _ in range(4)] == [0.0, 0.0, 0.0, pytest.approx(0.5)]


def test_a_bucket_ignores_a_clock_stepping_back_and_refuses_bad_limits() -> None:
    b = TokenBucket(rate=1.0, burst=1, now=50.0)
    assert b.take(50.0) == 0.0
    assert b.take(10.0) > 0.0  # earlier than the last look: nothing refilled
    assert b.take(51.0) == 0.0
    for rate, burst in ((0.0, 1), (-1.0, 1), (1.0, 0)):
        with pytest.raises(ValueError):
            TokenBucket(rate, burst, 0.0)


def test_partner_rates_are_per_key_forget_removed_keys_and_follow_new_limits() -> None:
    r = PartnerRates(rate=1.0, burst=2)
    a, b = b"a" * 32, b"b" * 32
    assert r.take(a, 0.0) == 0.0 and r.take(a, 0.0) == 0.0
    assert r.take(a, 0.0) > 0.0
    assert r.wait(b, 0.0) == 0.0 and r.take(b, 0.0) == 0.0  # b's bucket is its own
    assert len(r) == 2
    r.forget({b})
    assert len(r) == 1
    r.configure(1.0, 2)  # unchanged: b keeps what it spent
    assert r.take(b, 0.0) == 0.0 and r.take(b, 0.0) > 0.0
    r.configure(1.0, 5)  # new limits: buckets start again under them
    assert [r.take(b, 0.0) for _ in range(6)][-2:] == [0.0, pytest.approx(1.0)]
    with pytest.raises(ValueError):
        r.configure(0.0, 5)
    with pytest.raises(ValueError):
        PartnerRates(1.0, 0)


def test_address_counts_cap_each_address_and_exempt_the_proxy() -> None:
    c = AddressCounts(2, exempt=frozenset({"10.0.0.1"}))
    assert c.admit("192.0.2.7") and c.admit("192.0.2.7")
    assert not c.admit("192.0.2.7")  # a third from the same address
    assert c.admit("192.0.2.8")  # another address is not affected
    assert all(c.admit("10.0.0.1") for _ in range(10))  # the trusted proxy
    assert c.admit(None)  # not an IP socket
    assert c.open_from("192.0.2.7") == 2
    c.release("192.0.2.7")
    assert c.admit("192.0.2.7")
    for addr in ("192.0.2.7", "192.0.2.7", "192.0.2.8", "10.0.0.1", None):
        c.release(addr)
    assert len(c) == 0  # nothing kept for addresses with no connection
    with pytest.raises(ValueError):
        AddressCounts(0)


def test_requests_in_flight_are_counted_per_key_and_kind() -> None:
    r = PartnerRates(rate=1.0, burst=1, in_flight=2)
    a, b = b"a" * 32, b"b" * 32
    assert r.enter(a) and r.enter(a) and not r.enter(a)  # in_flight, for any request
    assert r.enter(b)  # another partner's are its own
    assert r.enter(a, "push", 1) and not r.enter(a, "push", 1)  # a kind has its own cap
    r.leave(a)
    assert r.enter(a)
    r.leave(a, "push")
    assert r.enter(a, "push", 1)
    with pytest.raises(ValueError):
        PartnerRates(1.0, 1, in_flight=0)


def test_a_work_budget_is_charged_after_the_fact_and_paid_back_at_its_share() -> None:
    w = WorkBudget(share=0.1, burst=1.0, now=0.0)
    assert w.wait(0.0) == 0.0
    w.spend(0.6, 0.0)
    assert w.wait(0.0) == 0.0  # 0.4 s left of the burst
    w.spend(0.9, 0.0)  # done before it was known: the balance goes below zero
    assert w.wait(0.0) == pytest.approx(5.0)  # 0.5 s of debt at 0.1 s a second
    assert w.wait(5.0) == 0.0
    assert w.wait(1000.0) == 0.0
    w.spend(1.0, 1000.0)
    assert w.wait(1000.0) == 0.0  # at most the burst saved up: back at zero, not above
    w.spend(0.1, 1000.0)
    assert w.wait(1000.0) == pytest.approx(1.0)
    for share, burst in ((0.0, 1.0), (0.1, 0.0)):
        with pytest.raises(ValueError):
            WorkBudget(share, burst, 0.0)
