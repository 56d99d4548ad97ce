"""The PostgreSQL the tests start (tests/pg.py) is a real server, one database a test."""

from __future__ import annotations

import psycopg


def test_each_test_gets_an_empty_database_on_a_real_server(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        version = conn.execute("SHOW server_version_num").fetchone()
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
                              ).fetchone()
        collate = conn.execute("SELECT datcollate FROM pg_database"
                               " WHERE datname = current_database()").fetchone()
    assert version is not None and int(version[0]) >= 150000
    assert tables == (0,)
    assert collate == ("C",)
