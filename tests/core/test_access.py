"""The access decisions (pure): who may read a record, and to whom it may be passed."""

from __future__ import annotations

import pytest

from citynode.core.access import (
    PARTNERS,
    PUBLIC,
    RESTRICTED,
    FeedPolicy,
    for_record,
    may_read,
    may_relay,
)

ORIGIN, PARTNER, READER, STRANGER = (bytes([i]) * 32 for i in range(1, 5))
POLICIES = {
    PUBLIC: FeedPolicy(PUBLIC, frozenset({PARTNER})),
    PARTNERS: FeedPolicy(PARTNERS, frozenset({PARTNER})),
    RESTRICTED: FeedPolicy(RESTRICTED, frozenset({PARTNER}), frozenset({READER})),
}
CALLERS = {"origin": ORIGIN, "partner": PARTNER, "reader": READER, "stranger": STRANGER,
           "anonymous": None}
# level -> the callers that may read (a restricted record sealed to READER).
READS = {PUBLIC: set(CALLERS), PARTNERS: {"origin", "partner"},
         RESTRICTED: {"origin", "reader"}}
# level -> the nodes it may be passed to.
RELAYS = {PUBLIC: {"origin", "partner", "reader", "stranger"},
          PARTNERS: {"origin", "partner"},
          RESTRICTED: {"origin", "partner", "reader", "stranger"}}


@pytest.mark.parametrize("level", sorted(POLICIES))
@pytest.mark.parametrize("who", sorted(CALLERS))
def test_read_and_relay_matrix(level: str, who: str) -> None:
    pol = for_record(POLICIES[level], frozenset({READER}) if level == RESTRICTED else None)
    assert may_read(pol, ORIGIN, CALLERS[who]) is (who in READS[level])
    if CALLERS[who] is not None:
        assert may_relay(pol, ORIGIN, CALLERS[who]) is (who in RELAYS[level])


@pytest.mark.parametrize("who", sorted(CALLERS))
def test_a_record_in_clear_on_a_restricted_feed_is_held_to_the_partners_rule(who: str
                                                                             ) -> None:
    """Signed before the feed was restricted: its plaintext goes where a partners
    record goes, not where ciphertext may."""
    pol = for_record(POLICIES[RESTRICTED], None)
    assert pol.access == PARTNERS
    assert may_read(pol, ORIGIN, CALLERS[who]) is (who in READS[PARTNERS])
    if CALLERS[who] is not None:
        assert may_relay(pol, ORIGIN, CALLERS[who]) is (who in RELAYS[PARTNERS])


def test_a_sealed_record_is_read_by_its_own_recipients() -> None:
    """Not by the feed's current readers: one added later cannot open older records,
    one removed still can (and may read them)."""
    pol = for_record(POLICIES[RESTRICTED], frozenset({STRANGER}))
    assert may_read(pol, ORIGIN, STRANGER) and not may_read(pol, ORIGIN, READER)


def test_other_levels_are_untouched_by_sealing() -> None:
    for level in (PUBLIC, PARTNERS):
        assert for_record(POLICIES[level], None) is POLICIES[level]
        assert for_record(POLICIES[level], frozenset({READER})) is POLICIES[level]
