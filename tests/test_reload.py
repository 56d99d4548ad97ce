"""Reloading node.toml (SIGHUP): the diff of two configs, what applies live, what needs a
restart, and ``Node.reload`` on a real data dir (an invalid file changes nothing; the
partner links follow the stored partners)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from citynode.config import parse_config
from citynode.identity import load_identity
from citynode.node import Node
from citynode.reload import Change, diff_config, live_config, shown
from citynode.storage import PartnerRow
from tests.conftest import make_node_dir

MIN = '[node]\nname = "Jakarta"\n'
AIR = '[feeds.air]\naccess = "public"\nlicense = "CC-BY-4.0"\n'


def test_identical_configs_differ_in_nothing() -> None:
    assert diff_config(parse_config(MIN + AIR), parse_config(MIN + AIR)).changes == ()


def test_feed_settings_apply_live_and_are_named_one_by_one() -> None:
    old = parse_config(MIN + AIR)
    new = parse_config(MIN + '[feeds.air]\naccess = "partners"\nlicense = "ODbL-1.0"\n'
                       'cadence_seconds = 600\n[log]\nlevel = "debug"\n')
    d = diff_config(old, new)
    assert d.changes == (
        Change("feeds.air.access", "public", "partners", True),
        Change("feeds.air.cadence_seconds", None, 600, True),
        Change("feeds.air.license", "CC-BY-4.0", "ODbL-1.0", True),
        Change("log.level", "info", "debug", True),
    )
    assert d.restart == ()


def test_a_feed_added_or_removed_is_one_change() -> None:
    old = parse_config(MIN + AIR)
    new = parse_config(MIN + '[feeds.traffic]\naccess = "partners"\n')
    removed, added = diff_config(old, new).changes
    assert (removed.key, removed.new, removed.live) == ("feeds.air", None, True)
    assert (added.key, added.old, added.live) == ("feeds.traffic", None, True)
    # The settings that now apply (or applied) are named, not just "added".
    assert isinstance(removed.old, dict) and isinstance(added.new, dict)
    assert removed.old["access"] == "public" and removed.old["license"] == "CC-BY-4.0"
    assert added.new["access"] == "partners" and added.new["license"] is None
    assert "name" not in added.new
    logged = shown(added.new)
    assert isinstance(logged, dict) and logged["access"] == "partners"
    assert json.loads(json.dumps(logged)) == logged  # a plain JSON log field


def test_settings_that_size_the_process_need_a_restart() -> None:
    old = parse_config(MIN)
    new = parse_config(MIN.replace('"Jakarta"', '"Jakarta"\nlisten = "127.0.0.1:9443"')
                       + '[limits]\nmax_body_bytes = 1000\n[tls]\nenabled = false\n'
                       + '[log]\nformat = "json"\n')
    d = diff_config(old, new)
    assert d.live == ()
    assert [c.key for c in d.restart] == ["limits.max_body_bytes", "log.format",
                                          "node.listen", "node.public_url",
                                          "tls.enabled"]


def test_the_running_config_takes_the_live_settings_and_nothing_else() -> None:
    old = parse_config(MIN + AIR)
    new = parse_config(MIN + '[feeds.air]\naccess = "partners"\n'
                       '[feeds.air.egress]\nlocation_decimals = 2\n'
                       '[federation]\naccept = "partners"\npush_batch = 5\n'
                       '[checkpoints]\ninterval_seconds = 5\n[limits]\nmax_connections = 9\n')
    d = diff_config(old, new)
    running = live_config(old, new)
    # What was applied is exactly the live part of the diff ...
    assert diff_config(old, running).changes == d.live
    assert {c.key for c in d.live} >= {"feeds.air.access", "federation.accept",
                                       "feeds.air.egress.location_decimals",
                                       "checkpoints.interval_seconds"}
    # ... and what is left is exactly what needs a restart.
    assert diff_config(running, new).changes == d.restart
    assert [c.key for c in d.restart] == ["federation.push_batch", "limits.max_connections"]


# ---------------------------------------------------------------------------------------
# Node.reload on a data dir


def _write(d: Path, extra: str) -> None:
    text = (d / "node.toml").read_text()
    (d / "node.toml").write_text(text + extra)


async def test_reload_applies_feeds_and_resigns_the_card(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    d = make_node_dir(tmp_path, "Jakarta")
    _write(d, '\n[feeds.air]\naccess = "public"\nlicense = "CC-BY-4.0"\n')
    node = Node.load(d)
    await node.start(partners=False)
    try:
        first = node.policy.card()
        assert node.policy.feed_access("air") == "public"
        text = (d / "node.toml").read_text()
        listen = node.config.node.listen
        (d / "node.toml").write_text(
            text.replace('access = "public"', 'access = "partners"')
            .replace("CC-BY-4.0", "ODbL-1.0")
            .replace(f'listen = "{listen}"', 'listen = "127.0.0.1:1"'))
        with caplog.at_level(logging.INFO, logger="citynode.node"):
            diff = await node.reload()
        assert diff is not None
        assert [c.key for c in diff.live] == ["feeds.air.access", "feeds.air.license"]
        assert [c.key for c in diff.restart] == ["node.listen"]
        # Applied: the access level, and a new card that says so; not the listen address.
        assert node.policy.feed_access("air") == "partners"
        assert node.config.node.listen == listen
        card = node.policy.card()
        assert card.envelope != first.envelope
        (air,) = [f for f in card.feeds if f.name == "air"]
        assert air.access == "partners" and air.license == "ODbL-1.0"
        msgs = [(r.levelname, r.getMessage(), getattr(r, "fields", {})) for r in caplog.records]
        assert ("INFO", "config changed: feeds.air.access",
                {"key": "feeds.air.access", "old": "public", "new": "partners"}) in msgs
        assert any(lv == "WARNING" and "needs a restart" in m and f["key"] == "node.listen"
                   for lv, m, f in msgs)
    finally:
        await node.stop()


async def test_an_invalid_node_toml_keeps_the_running_config(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = make_node_dir(tmp_path, "Seoul")
    _write(d, '\n[feeds.air]\naccess = "partners"\n')
    node = Node.load(d)
    await node.start(partners=False)
    try:
        before = node.config
        card = node.policy.card()
        # A valid change and an invalid one in the same file: neither is applied.
        text = (d / "node.toml").read_text().replace('"partners"', '"public"')
        (d / "node.toml").write_text(text + '\n[feeds.traffic]\nacess = "public"\n')
        with caplog.at_level(logging.INFO, logger="citynode.node"):
            assert await node.reload() is None
        assert node.config is before and node.policy.feed_access("air") == "partners"
        assert node.policy.card() is card
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "node.toml is invalid" in errors[0].getMessage()
        assert "acess: unknown key" in errors[0].fields["error"]  # type: ignore[attr-defined]
    finally:
        await node.stop()


async def test_reload_makes_partner_links_follow_the_stored_partners(tmp_path: Path) -> None:
    d = make_node_dir(tmp_path, "Lima")
    other = load_identity(make_node_dir(tmp_path, "Quito"), None)
    node = Node.load(d)
    await node.start(partners=False)
    try:
        assert node.partners.keys() == frozenset()
        row = PartnerRow(node_id=other.node_id, public_key=other.key.public_key,
                         url="https://127.0.0.1:1", name="Quito",
                         tls_fingerprint=other.cert_fingerprint, card=None, added_at=1)
        # Stored behind the node's back (another process, a restored table).
        node.storage.put_partner(row).result(timeout=10)
        assert node.partners.keys() == frozenset()
        card = node.policy.card()
        await node.reload()
        assert node.partners.keys() == {other.key.public_key}
        assert other.key.public_key in node.policy.card().partners
        assert node.policy.card().envelope != card.envelope
        node.storage.remove_partner(other.node_id).result(timeout=10)
        await node.reload()
        assert node.partners.keys() == frozenset()
        assert node.policy.card().partners == ()
    finally:
        await node.stop()
