"""Issue 13, terms bound to the data: a node signs a new card only when what it states
changes (not at every start), and its card history never loses the card in force for a
record it holds."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from citynode.core import cards
from citynode.core.keys import SigningKey, Verifier, node_id
from citynode.core.records import decode_envelope, encode_envelope
from citynode.node import Node
from citynode.storage import CARD_HISTORY_MAX, Storage
from tests.conftest import InProc, eventually, make_node_dir

FAST = {("federation", "pull_interval_seconds"): 1.0, ("federation", "backoff_max_seconds"): 2.0}


def _write(d: Path, extra: str) -> None:
    text = (d / "node.toml").read_text()
    (d / "node.toml").write_text(text + extra)


async def _card_after_start(d: Path) -> tuple[bytes, int]:
    """Start the node in ``d``, and return its card envelope and how many cards of its
    own its card history holds."""
    node = Node.load(d)
    await node.start(partners=False)
    try:
        env = node.policy.card().envelope
        node.policy.partners_changed()  # a partner round-trip that changes nothing
        assert node.policy.card().envelope == env
        # One writer, in order: once this is written, the card history write is too.
        node.storage.set_meta("test:barrier", b"").result(10)
        return env, len(node.storage.card_history(node.policy.public_key))
    finally:
        await node.stop()


async def test_a_restart_reuses_the_card_and_a_change_signs_a_new_one(tmp_path: Path
                                                                      ) -> None:
    d = make_node_dir(tmp_path, "Jakarta")
    _write(d, '\n[feeds.air]\naccess = "public"\nlicense = "CC-BY-4.0"\n')
    first, n = await _card_after_start(d)
    assert n == 1
    for _ in range(3):
        assert await _card_after_start(d) == (first, 1)
    text = (d / "node.toml").read_text()
    (d / "node.toml").write_text(text.replace("CC-BY-4.0", "ODbL-1.0"))
    second, n = await _card_after_start(d)
    assert second != first and n == 2
    assert await _card_after_start(d) == (second, 2)


def _card(key: SigningKey, t: int, license: str, partner: int = 1) -> bytes:
    return cards.make_card(
        key, name="Jakarta", url="https://127.0.0.1:1", tls_fingerprint=None,
        feeds=[cards.CardFeed("air", "public", license=license)],
        partners=[bytes([partner]) * 32], software="citynode/test", now_ms=t).envelope


def _history(s: Storage, key: SigningKey) -> list[cards.NodeCard]:
    return [cards.open_card(e, expected_node_id=node_id(key.public_key),
                            verifier=Verifier()) for e in s.card_history(key.public_key)]


def test_the_card_history_keeps_the_card_in_force_for_old_records(tmp_path: Path) -> None:
    key = SigningKey.generate()
    with Storage.open(tmp_path / "citynode.db") as s:
        # One card under CC0, then many that change only the partners (a restart of a
        # node before it stopped re-signing, a partner added and removed ...).
        s.add_card_history(key.public_key, 1000, _card(key, 1000, "CC0-1.0")).result(5)
        for i in range(1, CARD_HISTORY_MAX + 20):
            s.add_card_history(key.public_key, 1000 + i,
                               _card(key, 1000 + i, "CC-BY-4.0", partner=1 + i % 2)
                               ).result(5)
        hist = _history(s, key)
        assert len(hist) == CARD_HISTORY_MAX
        terms = [cards.terms_in_force(hist, "air", t) for t in range(999, 1000 + 90)]
        assert terms[0] is None  # before the first card: unknown, as before
        assert [t.license if t else None for t in terms[1:]] == (
            ["CC0-1.0"] + ["CC-BY-4.0"] * 89)
        # What went are the copies the first CC-BY-4.0 card already stated.
        assert [c.time for c in hist[:2]] == [1000, 1001]
        assert hist[-1].time == 1000 + CARD_HISTORY_MAX + 19


def test_the_card_history_of_distinct_terms_keeps_the_newest(tmp_path: Path) -> None:
    key = SigningKey.generate()
    with Storage.open(tmp_path / "citynode.db") as s:
        for i in range(CARD_HISTORY_MAX + 5):
            s.add_card_history(key.public_key, 1000 + i,
                               _card(key, 1000 + i, f"LicenseRef-{i}")).result(5)
        hist = _history(s, key)
        assert [c.time for c in hist] == list(range(1005, 1005 + CARD_HISTORY_MAX))


async def _licence(a: InProc, licence: str) -> None:
    """Set A's air feed licence in node.toml and reload it: a new signed card."""
    text = (Path(a.node.data_dir) / "node.toml").read_text()
    head, _sep, _old = text.partition("\n# air terms\n")
    (Path(a.node.data_dir) / "node.toml").write_text(
        head + f'\n# air terms\n[feeds.air]\naccess = "public"\nlicense = "{licence}"\n')
    await asyncio.sleep(0.02)  # the card is signed after the records before it
    assert await a.node.reload() is not None
    (air,) = [f for f in a.node.policy.card().feeds if f.name == "air"]
    assert air.license == licence
    await asyncio.sleep(0.02)


async def test_a_node_that_joins_later_shows_the_terms_in_force_for_old_records(
        inproc: Callable[..., Awaitable[InProc]]) -> None:
    """A publishes under CC0, changes to CC-BY (a new card), then B partners with A and
    syncs: B holds only A's newest card, fetches A's card history from A, and shows
    each record with the licence it was signed under."""
    a = await inproc("Jakarta", settings=FAST)
    await _licence(a, "CC0-1.0")
    await a.node.publish("air", "org.example.Test", [{"n": 1}, {"n": 2}, {"n": 3}])
    await _licence(a, "CC-BY-4.0")
    await a.node.publish("air", "org.example.Test", [{"n": 4}, {"n": 5}])

    b = await inproc("Singapore", settings=FAST)
    await a.node.add_partner(b.url, b.node.node_id)
    await b.node.add_partner(a.url, a.node.node_id)

    async def licences() -> list[tuple[int, str | None]]:
        async with b.session.get(f"{b.url}/v1/records?feed=air",
                                 headers={"Accept": "application/json"}) as resp:
            assert resp.status == 200, await resp.text()
            got = (await resp.json())["records"]
        return sorted((r["seq"], r["terms"]["license"] if r["terms"] else None)
                      for r in got)

    async def terms_shown() -> bool:
        return len(await licences()) == 5 and all(lic for _s, lic in await licences())

    await eventually(terms_shown, timeout=30)
    assert await licences() == [(1, "CC0-1.0"), (2, "CC0-1.0"), (3, "CC0-1.0"),
                                (4, "CC-BY-4.0"), (5, "CC-BY-4.0")]
    # Each card kept was verified as A's: B now holds A's history, and serves it.
    hist = await b.node.policy.card_history(a.node.public_key)
    assert [c.node for c in hist] == [a.node.public_key] * len(hist)
    assert {f.license for c in hist for f in c.feeds if f.name == "air"} >= {
        "CC0-1.0", "CC-BY-4.0"}


async def test_a_card_history_from_a_partner_keeps_only_the_origins_valid_cards(
        tmp_path: Path) -> None:
    origin, other = SigningKey.generate(), SigningKey.generate()
    good = _card(origin, 1000, "CC0-1.0")
    forged = _card(other, 1001, "CC-BY-4.0")  # another node's card, served as origin's
    body, sig = decode_envelope(_card(origin, 1002, "CC-BY-4.0"), cards.CARD_LIMITS)
    tampered = encode_envelope(body, sig[:-1] + bytes([sig[-1] ^ 1]))
    node = Node.load(make_node_dir(tmp_path, "Lima"))
    await node.start(partners=False)
    try:
        n = await node.policy.learn_history(origin.public_key,
                                            [forged, tampered, b"\x92junk", good])
        assert n == 1
        node.storage.set_meta("test:barrier", b"").result(10)
        assert node.storage.card_history(origin.public_key) == [good]
        assert node.storage.card_history(other.public_key) == []
        assert await node.policy.lacks_history(origin.public_key, 999)
        assert not await node.policy.lacks_history(origin.public_key, 1000)
    finally:
        await node.stop()
