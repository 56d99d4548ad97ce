"""The bridges' storage: message identities (claimed, published, dead) and their age
bound, on a real SQLite file and on a real PostgreSQL server (tests/pg.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from citynode.storage import BRIDGE_CLAIMED, BRIDGE_DEAD, BRIDGE_PUBLISHED, Storage

HOUR = 3_600_000


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "sqlite":
        yield Storage.open(tmp_path / "db")
    else:
        from citynode.storage_pg import PgStorage

        yield PgStorage.open_url(request.getfixturevalue("pg_url"))


def test_identities_move_from_claimed_to_published_or_dead_and_age_out(
        engine: Storage) -> None:
    with engine as st:
        a, b, c, old = (bytes([n]) * 32 for n in range(4))
        st.bridge_claim("air", [(old, "f", 0)], 1000, HOUR).result(5)
        st.bridge_claim("air", [(a, "f", 3), (b, "f", 3)], 2000, HOUR).result(5)
        # A claim held is renewed with the head now; a published one stays published.
        st.bridge_published([(b, b"r" * 32)], 2100).result(5)
        st.bridge_claim("air", [(a, "f", 5), (b, "f", 9)], 2200, HOUR).result(5)
        st.bridge_dead_letter("air", c, "f", "t", "not_json", "x", b"x", 1, 2300, 10).result(5)
        rows = st.bridge_lookup([a, b, c, old, b"\x09" * 32])
        assert (rows[a].state, rows[a].after_seq) == (BRIDGE_CLAIMED, 5)
        assert (rows[b].state, rows[b].after_seq, rows[b].record_id) == (
            BRIDGE_PUBLISHED, 3, b"r" * 32)
        assert rows[c].state == BRIDGE_DEAD and old in rows and len(rows) == 4
        assert st.bridge_accounted([b"r" * 32, b"s" * 32]) == {b"r" * 32}
        # Older than the bridge's dedupe_hours: forgotten at the next claim (this
        # bridge's only).
        st.bridge_claim("other", [(b"\x07" * 32, "f", 0)], 10 * HOUR, HOUR).result(5)
        assert old in st.bridge_lookup([old])
        st.bridge_claim("air", [(b"\x08" * 32, "f", 0)], 1000 + HOUR + 1, HOUR).result(5)
        assert old not in st.bridge_lookup([old]) and a in st.bridge_lookup([a])
