"""Export bundles and the offline audit: format, one test per kind of tampering, export
from storage, and the `export` / `audit` commands. No network, no event loop."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import msgpack
import pytest
from click.testing import CliRunner

from citynode import audit as audit_mod
from citynode.audit import MAX_FINDINGS_PER_KIND, AuditReport, audit_bundle
from citynode.bundle import (
    MAGIC,
    BundleCounts,
    BundleHeader,
    export_from_storage,
    iter_bundle,
    read_item_at,
    write_bundle,
)
from citynode.cli_audit import audit_cmd, export_cmd
from citynode.core import encoding
from citynode.core.cards import make_card
from citynode.core.chain import ForkProof
from citynode.core.checkpoints import EMPTY_ROOT, MerkleLog, SplitViewProof, sign_checkpoint
from citynode.core.keys import SigningKey
from citynode.core.records import (
    Record,
    decode_envelope,
    decode_record,
    encode_envelope,
    encode_record,
    sign_record,
)
from citynode.errors import CitynodeError, InvalidNodeId, InvalidProof, InvalidRecord
from citynode.storage import Storage

KEY = SigningKey(bytes([7]) * 32)
OTHER = SigningKey(bytes([8]) * 32)
T0 = 1_790_000_000_000
NOW = T0 + 3_600_000  # the audit's "now": an hour after the first record
MIN = 60_000


# --------------------------------------------------------------------------- helpers


def mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 §2.1.1 Merkle tree hash, straight from the definition (independent of
    MerkleLog, which the audit uses)."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


def test_merkle_log_agrees_with_the_rfc_definition() -> None:
    ids = [hashlib.sha256(bytes([i])).digest() for i in range(37)]
    log = MerkleLog(ids)
    for n in range(38):
        assert log.root(n) == mth(ids[:n])


def _sign(key: SigningKey, feed: str, seq: int, prev: bytes | None, time_ms: int,
          tag: str = "") -> Record:
    if feed == "air-quality":
        return sign_record(
            key, feed=feed, seq=seq, prev=prev, time_ms=time_ms, type="AirQualityObserved",
            subject="DKI1 Bundaran HI",
            data={"dateObserved": "2026-11-28T07:00:00+07:00",
                  "location": {"type": "Point", "coordinates": [106.8229, -6.1944]},
                  "pm25": 35.0 + seq, "no2": {"value": 22.4, "unitCode": "GQ"},
                  "name": f"reading-{seq:04d}{tag}"},
        )
    return sign_record(key, feed=feed, seq=seq, prev=prev, time_ms=time_ms,
                       type="org.example.Test", data={"n": seq, "note": f"reading-{seq:04d}{tag}"})


@functools.cache
def chain(k: int, feed: str, n: int) -> tuple[Record, ...]:
    """Records 1..n of one feed of KEY (k=0) or OTHER (k=1), a minute apart."""
    key = (KEY, OTHER)[k]
    out: list[Record] = []
    prev = None
    for seq in range(1, n + 1):
        r = _sign(key, feed, seq, prev, T0 + seq * MIN)
        out.append(r)
        prev = r.id
    return tuple(out)


def card_env(key: SigningKey = KEY,
             feeds: tuple[tuple[str, str], ...] = (("noise", "public"),)) -> bytes:
    return make_card(key, name="Testville", url="https://testville.example:8443",
                     tls_fingerprint=b"\x11" * 32, feeds=list(feeds), partners=[],
                     software="citynode/test", now_ms=T0).envelope


def cp_env(recs: tuple[Record, ...] | list[Record], size: int, key: SigningKey = KEY,
           root: bytes | None = None, feed: str | None = None) -> bytes:
    """A checkpoint over the first ``size`` records, its root from the RFC definition."""
    f = feed or (recs[0].feed if recs else "noise")
    r = mth([x.id for x in recs[:size]]) if root is None else root
    return sign_checkpoint(key, f, size, r, T0 + size * MIN).envelope


def write(path: Path, feeds: dict[str, list[bytes]], *, origin: bytes = KEY.public_key,
          card: bytes | None = None, checkpoints: list[bytes] | None = None,
          forks: list[Any] | None = None, split_views: list[Any] | None = None) -> Path:
    write_bundle(path, origin=origin, card=card, feeds=feeds, checkpoints=checkpoints or [],
                 forks=forks or [], split_views=split_views or [], now_ms=NOW)
    return path


def standard(tmp_path: Path, **kw: Any) -> Path:
    """8 noise records (custom type) and 4 air-quality records (AirQualityObserved),
    card, checkpoints at sizes 0, 3, 8 (noise) and 4 (air-quality)."""
    noise, air = chain(0, "noise", 8), chain(0, "air-quality", 4)
    cps = [sign_checkpoint(KEY, "noise", 0, EMPTY_ROOT, T0).envelope,
           cp_env(noise, 3), cp_env(noise, 8), cp_env(air, 4)]
    args: dict[str, Any] = {"card": card_env(), "checkpoints": cps}
    args.update(kw)
    return write(tmp_path / "b.bundle",
                 {"noise": [r.envelope for r in noise], "air-quality": [r.envelope for r in air]},
                 **args)


def audit(path: Path, key: SigningKey = KEY, **kw: Any) -> AuditReport:
    return audit_bundle(path, key.node_id, now_ms=NOW, **kw)


def errors(rep: AuditReport) -> set[str]:
    return {f.kind for f in rep.findings if f.severity == "error"}


def warnings(rep: AuditReport) -> set[str]:
    return {f.kind for f in rep.findings if f.severity == "warning"}


def raw_items(path: Path) -> list[bytes]:
    """The items of a bundle, split by hand (independently of the reader)."""
    data = path.read_bytes()
    assert data.startswith(MAGIC)
    pos, out = len(MAGIC), []
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        out.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


def put_items(path: Path, items: list[bytes]) -> None:
    path.write_bytes(MAGIC + b"".join(len(i).to_bytes(4, "big") + i for i in items))


def kind_of(item: bytes) -> str:
    return msgpack.unpackb(item)["kind"]


def record_item(env: bytes) -> bytes:
    return msgpack.packb({"env": env, "kind": "record"})


def fix_end(items: list[bytes]) -> list[bytes]:
    """Rewrite the end item to match the items (what a careful forger would do)."""
    counts = {"cards": 0, "checkpoints": 0, "forks": 0, "records": 0, "split_views": 0}
    names = {"card": "cards", "checkpoint": "checkpoints", "fork": "forks",
             "record": "records", "split-view": "split_views"}
    for it in items:
        k = kind_of(it)
        if k in names:
            counts[names[k]] += 1
    assert kind_of(items[-1]) == "end"
    return [*items[:-1], msgpack.packb(dict(sorted({"kind": "end", **counts}.items())))]


def seq_of(item: bytes) -> tuple[str, int]:
    body, _sig, _payload = decode_record(msgpack.unpackb(item)["env"])
    f = msgpack.unpackb(body)
    return f["feed"], f["seq"]


def index_of(items: list[bytes], feed: str, seq: int) -> int:
    for i, it in enumerate(items):
        if kind_of(it) == "record" and seq_of(it) == (feed, seq):
            return i
    raise AssertionError(f"no record {feed} {seq}")


# --------------------------------------------------------------------------- format


def test_clean_bundle_passes(tmp_path: Path) -> None:
    rep = audit(standard(tmp_path))
    assert rep.ok, rep.render_text()
    assert rep.findings == []
    assert rep.complete and rep.record_items == 12
    assert rep.card is not None and rep.card.name == "Testville"
    noise, air = rep.feeds["noise"], rep.feeds["air-quality"]
    assert (noise.records, noise.contiguous, noise.max_seq, noise.missing) == (8, 8, 8, 0)
    assert (noise.checkpoints, noise.checkpoints_matched) == (3, 3)
    assert (air.records, air.checkpoints_matched) == (4, 1)
    # each record, checkpoint and the card verified exactly once
    assert rep.signatures == 12 + 4 + 1
    out = rep.to_json()
    assert out["ok"] is True and out["errors"] == 0 and out["records"] == 12
    json.dumps(out)
    text = rep.render_text().splitlines()
    assert text[-1].startswith("OK")
    # the rate, in the plain report too (what a script or a log keeps)
    assert re.search(r"17 signature\(s\) verified in [0-9.]+ s \([0-9,]+ records/s\)",
                     "\n".join(text)), text


def test_reader_yields_items_in_order_with_header_and_counts(tmp_path: Path) -> None:
    path = standard(tmp_path)
    items = list(iter_bundle(path))
    kinds = [i.kind for i in items]
    assert kinds == (["header", "card"] + ["record"] * 12 + ["checkpoint"] * 4 + ["end"])
    header = items[0].info
    assert isinstance(header, BundleHeader)
    assert header.origin == KEY.public_key and header.feeds == ("air-quality", "noise")
    assert header.created == NOW and header.version == 1
    assert items[-1].info == BundleCounts(records=12, checkpoints=4, cards=1)
    # feeds in name order, each in seq order
    recs = [i.data for i in items if i.kind == "record"]
    assert recs == [r.envelope for r in chain(0, "air-quality", 4) + chain(0, "noise", 8)]
    assert read_item_at(path, items[5].offset).data == items[5].data
    # every item is canonical msgpack (keys sorted, shortest forms), byte for byte
    for raw in raw_items(path):
        assert encoding.encode(msgpack.unpackb(raw)) == raw


def test_reader_refuses_malformed_streams(tmp_path: Path) -> None:
    path = standard(tmp_path)
    good = path.read_bytes()
    items = raw_items(path)
    bad = tmp_path / "bad.bundle"
    cases: list[tuple[bytes, str]] = [
        (b"citynode-bundle-v2\n" + good[len(MAGIC):], "bad_bundle"),
        (good + b"\x00", "bad_bundle"),  # data after the end item
        (MAGIC + (2 * 1024 * 1024).to_bytes(4, "big") + b"x", "too_large"),
        (MAGIC + (0).to_bytes(4, "big"), "bad_bundle"),
        (good[:-3], "truncated"),
        (good[: len(MAGIC) + 2], "truncated"),
    ]
    for raw, reason in cases:
        bad.write_bytes(raw)
        with pytest.raises(InvalidRecord) as ei:
            list(iter_bundle(bad))
        assert ei.value.reason == reason, (raw[:40], ei.value)
    # items out of place or not canonical
    # keys in the wrong order: valid msgpack, not canonical
    non_canonical = msgpack.packb({"kind": "record", "env": chain(0, "noise", 1)[0].envelope})
    for its, reason in [
        (items[1:], "bad_bundle"),  # no header first
        ([items[0], *items], "bad_bundle"),  # two headers
        # more card items than a card history (64) and the current card
        ([items[0], *[items[1]] * 66, *items[2:]], "bad_bundle"),
        ([items[0], items[1], *items[1:]], "bad_counts"),  # two cards, end says one
        ([*items[:2], non_canonical, *items[2:]], "non_canonical"),
        ([*items[:2], msgpack.packb({"env": b"x", "kind": "photo"}), *items[2:]], "bad_bundle"),
        ([items[0], *items[2:]], "bad_counts"),  # card removed, end not fixed
    ]:
        put_items(bad, its)
        with pytest.raises(InvalidRecord) as ei:
            list(iter_bundle(bad))
        assert ei.value.reason == reason, ei.value


def test_unknown_bundle_version_is_named(tmp_path: Path) -> None:
    path = standard(tmp_path)
    items = raw_items(path)
    h = msgpack.unpackb(items[0])
    h["version"] = 2
    put_items(path, [msgpack.packb(dict(sorted(h.items()))), *items[1:]])
    with pytest.raises(InvalidRecord) as ei:
        list(iter_bundle(path))
    assert ei.value.reason == "unknown_version"


def test_writer_never_writes_what_the_reader_refuses(tmp_path: Path) -> None:
    env = chain(0, "noise", 1)[0].envelope
    with pytest.raises(InvalidRecord):
        write(tmp_path / "x", {"Bad Feed": [env]})
    with pytest.raises(InvalidRecord):
        write(tmp_path / "x", {"noise": [env[:-1]]})  # not an envelope
    with pytest.raises(InvalidProof):
        write(tmp_path / "x", {"noise": [env]}, forks=[b"\x80"])
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / "x.part").exists()


# --------------------------------------------------------------------------- tampering


def test_flipped_byte_in_a_payload(tmp_path: Path) -> None:
    """The payload travels beside the signed body: a changed byte no longer matches the
    digest the body carries."""
    path = standard(tmp_path)
    data = path.read_bytes()
    assert data.count(b"reading-0003") == 2  # air-quality seq 3 (first), noise seq 3
    i = data.index(b"reading-0003", data.index(b"reading-0003") + 1)
    path.write_bytes(data[:i] + b"rXading-0003" + data[i + 12:])  # same length: still msgpack
    rep = audit(path)
    assert not rep.ok
    assert errors(rep) == {"payload_mismatch"}
    [f] = [f for f in rep.findings if f.kind == "payload_mismatch"]
    assert (f.feed, f.seq) == ("noise", 3)
    assert rep.feeds["noise"].invalid == 1 and rep.feeds["noise"].contiguous == 2
    assert "gap" not in rep.kinds()  # the bad record is reported once, not also as a gap
    # checkpoints above seq 2 can no longer be checked
    assert warnings(rep) == {"checkpoint_beyond"}


def test_flipped_byte_in_a_signature(tmp_path: Path) -> None:
    path = standard(tmp_path)
    items = raw_items(path)
    i = index_of(items, "air-quality", 2)
    env = msgpack.unpackb(items[i])["env"]
    body, sig, payload = decode_record(env)
    items[i] = record_item(encode_record(body, sig[:10] + bytes([sig[10] ^ 1]) + sig[11:],
                                         payload))
    put_items(path, items)
    rep = audit(path)
    assert errors(rep) == {"bad_signature"}
    [f] = rep.errors()
    assert (f.feed, f.seq) == ("air-quality", 2)


def test_removed_record(tmp_path: Path) -> None:
    path = standard(tmp_path)
    items = raw_items(path)
    del items[index_of(items, "noise", 5)]
    put_items(path, fix_end(items))
    rep = audit(path)
    assert errors(rep) == {"gap"}
    [f] = rep.errors()
    assert (f.feed, f.seq) == ("noise", 5) and "seq 5 missing" in f.message
    assert rep.feeds["noise"].missing == 1 and rep.feeds["noise"].contiguous == 4
    # the checkpoint at 8 spans the hole: it cannot be checked, and says so
    assert warnings(rep) == {"checkpoint_beyond"}
    # without fixing the end item the reader notices too
    put_items(path, items)
    assert {"gap", "bad_counts"} <= errors(audit(path))


def test_removed_first_records_and_tail_are_gaps(tmp_path: Path) -> None:
    recs = chain(0, "noise", 8)
    path = write(tmp_path / "b", {"noise": [r.envelope for r in recs[2:5]] +
                                  [recs[7].envelope]})
    rep = audit(path)
    assert [(f.kind, f.seq) for f in rep.errors()] == [("gap", 1), ("gap", 6)]
    assert rep.feeds["noise"].missing == 4


def test_removed_last_record_with_its_checkpoint_kept(tmp_path: Path) -> None:
    # The origin's checkpoint of size 8 proves seq 1..8 exist: a bundle stopping at 7
    # lacks a record the origin signed for, whatever the (fixed) end counts say.
    path = standard(tmp_path)
    items = raw_items(path)
    del items[index_of(items, "noise", 8)]
    put_items(path, fix_end(items))
    rep = audit(path)
    assert not rep.ok
    assert errors(rep) == {"missing_records"} and warnings(rep) == set()
    [f] = rep.errors()
    assert (f.feed, f.seq) == ("noise", 8)
    assert "seq 8 missing" in f.message and "checkpoint of size 8" in f.message
    noise = rep.feeds["noise"]
    assert (noise.records, noise.contiguous, noise.max_seq, noise.missing) == (7, 7, 7, 1)
    assert noise.checkpoints_matched == 2  # sizes 0 and 3 still match
    assert rep.render_text().splitlines()[-1].startswith("FAILED: 1 error(s)")
    # the whole tail, several records
    path = standard(tmp_path)
    items = raw_items(path)
    items = [it for it in items if kind_of(it) != "record" or seq_of(it)[0] != "noise"
             or seq_of(it)[1] < 4]
    put_items(path, fix_end(items))
    rep = audit(path)
    assert [(f.kind, f.seq) for f in rep.errors()] == [("missing_records", 4)]
    assert "seqs 4..8 missing" in rep.errors()[0].message
    assert rep.feeds["noise"].missing == 5


def test_removed_records_of_a_feed_with_its_checkpoint_kept(tmp_path: Path) -> None:
    path = standard(tmp_path)
    items = [it for it in raw_items(path)
             if kind_of(it) != "record" or seq_of(it)[0] != "air-quality"]
    put_items(path, fix_end(items))
    rep = audit(path)
    assert [(f.kind, f.feed, f.seq) for f in rep.errors()] == \
        [("missing_records", "air-quality", 1)]
    assert "holds no record of this feed" in rep.errors()[0].message
    assert rep.feeds["air-quality"].missing == 4


def test_checkpoint_beyond_a_hole_is_a_warning_beside_the_hole_error(tmp_path: Path) -> None:
    # Seq 5 removed and seq 8 (the checkpoint's size) removed: the hole is a gap, the
    # tail is missing_records; nothing is reported twice.
    path = standard(tmp_path)
    items = raw_items(path)
    del items[index_of(items, "noise", 8)]
    del items[index_of(items, "noise", 5)]
    put_items(path, fix_end(items))
    rep = audit(path)
    assert [(f.kind, f.seq) for f in rep.errors()] == [("gap", 5), ("missing_records", 8)]
    assert warnings(rep) == set()


def test_reordered_records(tmp_path: Path) -> None:
    path = standard(tmp_path)
    items = raw_items(path)
    i, j = index_of(items, "noise", 4), index_of(items, "noise", 5)
    items[i], items[j] = items[j], items[i]
    put_items(path, items)
    rep = audit(path)
    assert errors(rep) == {"out_of_order"}
    assert rep.feeds["noise"].contiguous == 8
    assert rep.feeds["noise"].checkpoints_matched == 3  # the records themselves are intact


def test_header_origin_changed(tmp_path: Path) -> None:
    path = standard(tmp_path)
    items = raw_items(path)
    h = msgpack.unpackb(items[0])
    h["origin"] = OTHER.public_key
    put_items(path, [msgpack.packb(h), *items[1:]])
    rep = audit(path)
    assert errors(rep) == {"header_origin"}
    # audited as the other node's bundle: nothing in it is that node's
    rep = audit(path, OTHER)
    assert {"foreign_record", "foreign_checkpoint", "bad_card"} <= errors(rep)
    assert "header_origin" not in errors(rep)


def test_records_of_another_key(tmp_path: Path) -> None:
    path = standard(tmp_path)
    items = raw_items(path)
    i = index_of(items, "noise", 3)
    items[i] = record_item(chain(1, "noise", 3)[2].envelope)  # OTHER's seq 3
    put_items(path, items)
    rep = audit(path)
    assert errors(rep) == {"foreign_record", "gap"}
    assert [f.seq for f in rep.errors() if f.kind == "gap"] == [3]
    assert OTHER.node_id in next(f.message for f in rep.findings if f.kind == "foreign_record")


def test_checkpoint_signed_by_another_key(tmp_path: Path) -> None:
    noise = chain(0, "noise", 8)
    path = standard(tmp_path, checkpoints=[cp_env(noise, 8, key=OTHER)])
    rep = audit(path)
    assert errors(rep) == {"foreign_checkpoint"}
    assert rep.feeds["noise"].checkpoints == 0


def test_checkpoint_with_our_origin_but_another_signature(tmp_path: Path) -> None:
    noise = chain(0, "noise", 8)
    body, _sig = decode_envelope(cp_env(noise, 8))
    forged = encode_envelope(body, decode_envelope(cp_env(noise, 8, key=OTHER))[1])
    rep = audit(standard(tmp_path, checkpoints=[forged]))
    assert errors(rep) == {"bad_checkpoint"}
    assert "bad_signature" in rep.errors()[0].message


def test_checkpoint_with_a_wrong_root(tmp_path: Path) -> None:
    noise = chain(0, "noise", 8)
    wrong = mth([r.id for r in noise[:7]])  # the root of size 7, claimed for size 8
    path = standard(tmp_path, checkpoints=[cp_env(noise, 3), cp_env(noise, 8, root=wrong)])
    rep = audit(path)
    assert errors(rep) == {"checkpoint_mismatch"}
    [f] = rep.errors()
    assert (f.feed, f.seq) == ("noise", 8)
    assert rep.feeds["noise"].checkpoints_matched == 1


def test_altered_record_contradicts_a_signed_checkpoint(tmp_path: Path) -> None:
    # A last record replaced by another one the origin signed (a different, valid
    # history that links fine) changes the Merkle root: its own checkpoint exposes it.
    noise = list(chain(0, "noise", 8))
    alt = _sign(KEY, "noise", 8, noise[6].id, T0 + 8 * MIN, tag="-alt")
    path = write(tmp_path / "b", {"noise": [r.envelope for r in noise[:7]] + [alt.envelope]},
                 checkpoints=[cp_env(noise, 8)])
    rep = audit(path)
    assert errors(rep) == {"checkpoint_mismatch"}


def test_split_view_between_checkpoints_in_the_bundle(tmp_path: Path) -> None:
    noise = chain(0, "noise", 8)
    other_root = mth([r.id for r in chain(1, "noise", 8)])
    path = standard(tmp_path, checkpoints=[cp_env(noise, 8), cp_env(noise, 8, root=other_root)])
    rep = audit(path)
    assert errors(rep) == {"split_view", "checkpoint_mismatch"}


def test_truncated_bundle_without_end_item(tmp_path: Path) -> None:
    path = standard(tmp_path)
    items = raw_items(path)
    put_items(path, items[:-1])
    rep = audit(path)
    assert errors(rep) == {"truncated"}
    assert not rep.complete
    assert rep.feeds["noise"].records == 8  # everything read before is still audited
    # cut in the middle of a record: the records before it are still checked
    data = standard(tmp_path).read_bytes()
    cut = data.index(b"reading-0006")
    path.write_bytes(data[:cut])
    rep = audit(path)
    assert "truncated" in errors(rep)
    assert rep.feeds["noise"].contiguous == 5


def test_future_dated_record(tmp_path: Path) -> None:
    recs = list(chain(0, "noise", 3))
    late = _sign(KEY, "noise", 4, recs[2].id, NOW + 16 * MIN)
    ok_ = _sign(KEY, "noise", 5, late.id, NOW + 14 * MIN)  # within the 15-minute tolerance
    path = write(tmp_path / "b", {"noise": [r.envelope for r in [*recs, late, ok_]]})
    rep = audit(path)
    assert errors(rep) == {"future_time"}
    [f] = rep.errors()
    assert (f.feed, f.seq) == ("noise", 4)
    assert rep.feeds["noise"].contiguous == 5  # validly signed: still part of the chain


def test_equivocation_inside_the_bundle(tmp_path: Path) -> None:
    recs = list(chain(0, "noise", 5))
    twin = _sign(KEY, "noise", 3, recs[1].id, T0 + 3 * MIN, tag="-twin")
    path = write(tmp_path / "b", {"noise": [r.envelope for r in recs] + [twin.envelope]})
    rep = audit(path)
    assert errors(rep) == {"equivocation"}
    [f] = rep.errors()
    assert (f.feed, f.seq) == ("noise", 3) and "fork proof verified" in f.message


def test_broken_link_is_a_proven_fork(tmp_path: Path) -> None:
    recs = list(chain(0, "noise", 4))
    stray = _sign(KEY, "noise", 5, hashlib.sha256(b"elsewhere").digest(), T0 + 5 * MIN)
    path = write(tmp_path / "b", {"noise": [r.envelope for r in recs] + [stray.envelope]})
    rep = audit(path)
    assert errors(rep) == {"broken_link"}
    [f] = rep.errors()
    assert f.seq == 5 and "fork proof verified" in f.message


def test_duplicate_record_is_verified_once(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    recs = list(chain(0, "noise", 3))
    bad = encode_record(recs[2].body, bytes(64), recs[2].payload)
    path = write(tmp_path / "b", {"noise": [r.envelope for r in recs] + [recs[1].envelope]
                                  + [recs[1].envelope]})
    for workers in (0, 2):
        rep = audit(path, workers=workers)
        assert rep.ok and warnings(rep) == {"duplicate"}
        assert rep.kind_counts["duplicate"] == 2
        assert rep.signatures == 3
    # copies in one verification batch or in batches still in flight; an invalid first
    # copy does not make a valid second copy a "duplicate"
    monkeypatch.setattr(audit_mod, "_BATCH", 2)
    path = write(tmp_path / "c", {"noise": [recs[0].envelope, recs[1].envelope, bad,
                                            recs[1].envelope, recs[0].envelope,
                                            recs[2].envelope]})
    for workers in (0, 1, 2):
        rep = audit(path, workers=workers)
        assert errors(rep) == {"bad_signature"}, workers
        assert warnings(rep) == {"duplicate"} and rep.kind_counts["duplicate"] == 2
        assert rep.feeds["noise"].contiguous == 3
        assert rep.signatures == 4  # 1, 2, the bad 3, the good 3: each once


def test_sealed_records_are_verified_without_reading_them(tmp_path: Path) -> None:
    reader = SigningKey(bytes([9]) * 32).public_key
    recs: list[Record] = []
    prev = None
    for seq in (1, 2, 3):
        r = sign_record(KEY, feed="permits", seq=seq, prev=prev, time_ms=T0 + seq,
                        type="org.example.Test", data={"n": seq}, readers=[reader])
        assert r.sealed is not None
        recs.append(r)
        prev = r.id
    path = write(tmp_path / "s", {"permits": [r.envelope for r in recs]},
                 checkpoints=[cp_env(recs, 3)])
    rep = audit(path)
    assert rep.ok and rep.findings == [], rep.render_text()
    assert rep.feeds["permits"].checkpoints_matched == 1
    # the signature still covers the sealed blob
    items = raw_items(path)
    i = index_of(items, "permits", 2)
    body, sig, payload = decode_record(msgpack.unpackb(items[i])["env"])
    items[i] = record_item(encode_record(body, sig[:-1] + bytes([sig[-1] ^ 0x80]), payload))
    put_items(path, items)
    assert errors(audit(path)) == {"bad_signature"}


def test_card_of_another_node_is_refused(tmp_path: Path) -> None:
    rep = audit(standard(tmp_path, card=card_env(OTHER)))
    assert errors(rep) == {"bad_card"}
    assert rep.card is None


def test_wrong_origin_id_is_named_without_a_url(tmp_path: Path) -> None:
    # Offline there is no URL: the message says whose card it is and what to check.
    rep = audit(standard(tmp_path), OTHER)
    [f] = [f for f in rep.findings if f.kind == "bad_card"]
    assert "URL" not in f.message
    assert KEY.node_id in f.message and OTHER.node_id in f.message
    assert "id given for the origin is wrong" in f.message
    [h] = [f for f in rep.findings if f.kind == "header_origin"]
    assert "id given is wrong" in h.message
    assert rep.card is None


def test_feed_left_out_is_reported_against_the_signed_card(tmp_path: Path) -> None:
    card = card_env(feeds=(("air-quality", "public"), ("noise", "public")))
    clean = audit(standard(tmp_path, card=card))
    assert clean.ok and clean.findings == [] and clean.feeds_not_covered == []
    assert "coverage: the bundle holds every feed the origin's card lists" in \
        clean.render_text()
    # A whole feed dropped: its records, its checkpoint, its name in the header.
    path = standard(tmp_path, card=card)
    items = [it for it in raw_items(path)
             if kind_of(it) not in ("record", "checkpoint") or
             (kind_of(it) == "record" and seq_of(it)[0] == "noise") or
             (kind_of(it) == "checkpoint" and b"air-quality" not in it)]
    h = msgpack.unpackb(items[0])
    h["feeds"] = ["noise"]
    put_items(path, fix_end([msgpack.packb(dict(sorted(h.items()))), *items[1:]]))
    rep = audit(path)
    assert rep.ok  # a bundle may cover only some feeds: visible, not a failure
    assert warnings(rep) == {"missing_feed"} and rep.feeds_not_covered == ["air-quality"]
    [f] = rep.findings
    assert f.feed == "air-quality" and "card lists this feed" in f.message
    assert set(rep.feeds) == {"noise"}
    text = rep.render_text()
    assert ("coverage: the audit covers only the feeds the bundle holds (noise); the "
            "origin's card also lists air-quality, NOT in this bundle") in text
    assert "OK: 0 error(s), 1 warning(s)" in text
    assert rep.to_json()["feeds_not_covered"] == ["air-quality"]
    # records dropped but the name kept in the header: missing_feed, not empty_feed
    path = standard(tmp_path, card=card, checkpoints=[])
    items = [it for it in raw_items(path)
             if kind_of(it) != "record" or seq_of(it)[0] == "noise"]
    put_items(path, fix_end(items))
    rep = audit(path)
    assert rep.kinds() == {"missing_feed"} and "its header lists it" in rep.findings[0].message
    # without a card the audit cannot know, and says so
    rep = audit(standard(tmp_path, card=None))
    assert rep.ok and rep.findings == []
    assert "carries no valid card of the origin" in rep.render_text()


def test_feed_text_for_no_records_and_no_contiguous_run(tmp_path: Path) -> None:
    recs = chain(0, "noise", 5)
    path = write(tmp_path / "b", {"empty": [], "noise": [r.envelope for r in recs[2:]]})
    rep = audit(path)
    text = rep.render_text()
    assert "1..0" not in text
    assert "feed empty: no records," in text
    assert "feed noise: 3 record(s), none contiguous from seq 1 (max 5)" in text
    full = audit(standard(tmp_path)).render_text()
    assert "feed noise: 8 record(s), seq 1..8 contiguous (max 8)" in full


def test_rich_report_shows_coverage_and_no_empty_range(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from citynode.cli_audit import _rich_report

    path = write(tmp_path / "b", {"empty": [], "noise": [r.envelope for r in chain(0, "noise", 2)]},
                 card=card_env(feeds=(("noise", "public"), ("permits", "partners"))))
    _rich_report(audit(path))
    out = capsys.readouterr().out
    assert "1..0" not in out and "none" in out
    assert "[missing_feed]" in out and "permits" in out and "coverage:" in out


def test_proofs_carried_in_the_bundle(tmp_path: Path) -> None:
    recs = chain(0, "noise", 3)
    twin = _sign(KEY, "noise", 3, recs[1].id, T0, tag="-twin")
    fork = ForkProof(recs[2].envelope, twin.envelope)
    split = SplitViewProof(cp_env(recs, 3), cp_env(recs, 3, root=b"\x05" * 32))
    rep = audit(standard(tmp_path, forks=[fork], split_views=[split]))
    assert errors(rep) == {"equivocation", "split_view"}
    # a proof that does not hold is itself an error (a false accusation)
    other_twin = _sign(OTHER, "noise", 3, recs[1].id, T0)
    rep = audit(standard(tmp_path, forks=[ForkProof(recs[2].envelope, other_twin.envelope)]))
    assert errors(rep) == {"bad_proof"}
    # a valid proof against someone else is noted, not held against this origin
    o = chain(1, "noise", 3)
    o_twin = _sign(OTHER, "noise", 3, o[1].id, T0, tag="-twin")
    rep = audit(standard(tmp_path, forks=[ForkProof(o[2].envelope, o_twin.envelope)]))
    assert rep.ok and warnings(rep) == {"foreign_proof"}


def test_not_a_bundle_and_bad_ids(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_bytes(b"hello")
    rep = audit(p)
    assert errors(rep) == {"bad_bundle"} and not rep.complete
    with pytest.raises(InvalidNodeId):
        audit_bundle(p, "cn1nope", now_ms=NOW)


def test_worker_threads_give_the_same_report(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_mod, "_BATCH", 3)  # many batches, several in flight
    path = standard(tmp_path)
    items = raw_items(path)
    i = index_of(items, "noise", 6)
    env = msgpack.unpackb(items[i])["env"]
    body, _sig, payload = decode_record(env)
    items[i] = record_item(encode_record(body, bytes(64), payload))
    del items[index_of(items, "noise", 2)]
    put_items(path, fix_end(items))
    reps = [audit(path, workers=w) for w in (0, 1, 3)]
    first = reps[0].to_json()
    for r in reps[1:]:
        other = r.to_json()
        for k in ("seconds", "records_per_s"):
            first.pop(k, None)
            other.pop(k, None)
        assert other == first
    assert errors(reps[0]) == {"bad_signature", "gap"}


def test_findings_are_bounded_per_kind(tmp_path: Path) -> None:
    env = chain(0, "noise", 1)[0].envelope
    body, _sig, payload = decode_record(env)
    bad = encode_record(body, bytes(64), payload)
    path = write(tmp_path / "b", {"noise": [bad] * (MAX_FINDINGS_PER_KIND + 20)})
    rep = audit(path)
    assert rep.kind_counts["bad_signature"] == MAX_FINDINGS_PER_KIND + 20
    assert len(rep.findings) == MAX_FINDINGS_PER_KIND
    assert rep.suppressed == 20 and "20 more" in rep.render_text()


def test_huge_seq_gap_does_not_hang(tmp_path: Path) -> None:
    # A seq near 2**62 must be reported as one range, never walked seq by seq.
    recs = list(chain(0, "noise", 2))
    far = sign_record(KEY, feed="noise", seq=2**62, prev=recs[1].id, time_ms=T0,
                      type="org.example.Test", data={})
    rep = audit(write(tmp_path / "b", {"noise": [r.envelope for r in recs] + [far.envelope]}))
    gaps = [f for f in rep.errors() if f.kind == "gap"]
    assert len(gaps) == 1 and gaps[0].seq == 3
    assert rep.feeds["noise"].missing == 2**62 - 3


# --------------------------------------------------------------------------- export


def _storage_with_chain(db: Path) -> Storage:
    st = Storage.open(db)
    st.append(list(chain(0, "noise", 8)) + list(chain(0, "air-quality", 4)) +
              list(chain(1, "noise", 3))).result(10)
    noise = chain(0, "noise", 8)
    for size in (3, 8):
        body_env = cp_env(noise, size)
        st.put_checkpoint(KEY.public_key, "noise", size, mth([r.id for r in noise[:size]]),
                          body_env).result(10)
    return st


def test_export_from_storage_round_trips(tmp_path: Path) -> None:
    st = _storage_with_chain(tmp_path / "citynode.db")
    try:
        s = export_from_storage(st, KEY.public_key, None, tmp_path / "out.bundle",
                                card=card_env(), now_ms=NOW)
        assert s.feeds == {"air-quality": 4, "noise": 8}
        assert (s.counts.records, s.counts.checkpoints, s.has_card) == (12, 2, True)
        rep = audit(tmp_path / "out.bundle")
        assert rep.ok, rep.render_text()
        assert rep.feeds["noise"].checkpoints_matched == 2
        # one feed only; OTHER's records never leak into KEY's bundle
        s = export_from_storage(st, KEY.public_key, ["noise"], tmp_path / "n.bundle",
                                card=None, now_ms=NOW)
        assert s.feeds == {"noise": 8} and not s.has_card
        assert set(audit(tmp_path / "n.bundle").feeds) == {"noise"}
        with pytest.raises(InvalidRecord):  # a card of another node is not exported
            export_from_storage(st, KEY.public_key, None, tmp_path / "c.bundle",
                                card=card_env(OTHER), now_ms=NOW)
        with pytest.raises(CitynodeError, match="no records of feed"):
            export_from_storage(st, KEY.public_key, ["nothing"], tmp_path / "e.bundle",
                                card=None, now_ms=NOW)
    finally:
        st.close()


def test_export_carries_stored_fork_proofs(tmp_path: Path) -> None:
    st = _storage_with_chain(tmp_path / "citynode.db")
    recs = chain(0, "noise", 8)
    twin = _sign(KEY, "noise", 3, recs[1].id, T0, tag="-twin")
    proof = ForkProof(recs[2].envelope, twin.envelope).encode()
    try:
        st.add_fork_proof(KEY.public_key, "noise", 3, "fork", proof, None, NOW).result(10)
        split = SplitViewProof(cp_env(recs, 3), cp_env(recs, 3, root=b"\x05" * 32)).encode()
        st.add_fork_proof(KEY.public_key, "noise", 3, "split-view", split, None,
                          NOW).result(10)
        s = export_from_storage(st, KEY.public_key, None, tmp_path / "f.bundle", card=None,
                                now_ms=NOW)
    finally:
        st.close()
    assert (s.counts.forks, s.counts.split_views) == (1, 1)
    rep = audit(tmp_path / "f.bundle")
    assert errors(rep) == {"equivocation", "split_view"}


def test_export_leaves_out_checkpoints_beyond_its_records(tmp_path: Path) -> None:
    # A replica still catching up holds the origin's checkpoint of size 10 but records
    # 1..8 only: its bundle must audit clean, so that checkpoint stays out.
    st = _storage_with_chain(tmp_path / "citynode.db")
    longer = chain(0, "noise", 10)
    try:
        st.put_checkpoint(KEY.public_key, "noise", 10, mth([r.id for r in longer]),
                          cp_env(longer, 10)).result(10)
        s = export_from_storage(st, KEY.public_key, None, tmp_path / "r.bundle",
                                card=None, now_ms=NOW)
    finally:
        st.close()
    assert (s.counts.checkpoints, s.skipped_checkpoints) == (2, 1)
    assert s.to_json()["skipped_checkpoints"] == 1
    rep = audit(tmp_path / "r.bundle")
    assert rep.ok and rep.findings == [], rep.render_text()
    assert rep.feeds["noise"].checkpoints_matched == 2


def test_export_of_a_node_that_lacks_a_feed_audits_with_a_warning(tmp_path: Path) -> None:
    # The origin's card lists "permits" (partners only): this node holds none of it.
    card = card_env(feeds=(("air-quality", "public"), ("noise", "public"),
                           ("permits", "partners")))
    st = _storage_with_chain(tmp_path / "citynode.db")
    try:
        s = export_from_storage(st, KEY.public_key, None, tmp_path / "p.bundle", card=card,
                                now_ms=NOW)
        one = export_from_storage(st, KEY.public_key, ["noise"], tmp_path / "n.bundle",
                                  card=card, now_ms=NOW)
    finally:
        st.close()
    assert s.card_feeds_not_held == ("permits",)
    assert one.card_feeds_not_held == ("air-quality", "permits")
    rep = audit(tmp_path / "p.bundle")
    assert rep.ok and warnings(rep) == {"missing_feed"}
    assert rep.feeds_not_covered == ["permits"]
    [f] = rep.findings
    assert f.feed == "permits" and "access partners" in f.message
    assert audit(tmp_path / "n.bundle").feeds_not_covered == ["air-quality", "permits"]


# --------------------------------------------------------------------------- CLI


def test_cli_export_then_audit(tmp_path: Path) -> None:
    st = _storage_with_chain(tmp_path / "citynode.db")
    st.set_meta("card:" + KEY.public_key.hex(),
                card_env(feeds=(("air-quality", "public"), ("noise", "public")))).result(10)
    st.close()
    out = tmp_path / "k.bundle"
    runner = CliRunner()
    r = runner.invoke(export_cmd, ["-d", str(tmp_path), "--origin", KEY.node_id,
                                   "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["records"] == 12 and summary["cards"] == 1
    # audit needs no data dir at all
    r = runner.invoke(audit_cmd, [str(out), "--origin", KEY.node_id, "--json"],
                      env={"CITYNODE_DIR": None})
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["ok"] is True and rep["records"] == 12 and rep["card"]["name"] == "Testville"
    r = runner.invoke(audit_cmd, [str(out), "--origin", KEY.node_id])
    assert r.exit_code == 0 and "OK: 0 error(s)" in r.output
    # exporting again needs --force
    r = runner.invoke(export_cmd, ["-d", str(tmp_path), "--origin", KEY.node_id,
                                   "--out", str(out)])
    assert r.exit_code == 1 and "--force" in r.output
    # a tampered bundle: exit status 1, human report names the finding
    data = out.read_bytes()
    i = data.index(b"reading-0002")
    out.write_bytes(data[:i] + b"X" + data[i + 1:])
    r = runner.invoke(audit_cmd, [str(out), "--origin", KEY.node_id])
    assert r.exit_code == 1
    assert "[payload_mismatch]" in r.output and "FAILED" in r.output
    r = runner.invoke(audit_cmd, [str(out), "--origin", KEY.node_id, "--json",
                                  "--workers", "0"])
    assert r.exit_code == 1 and json.loads(r.output)["ok"] is False


def test_cli_export_without_card_says_so(tmp_path: Path) -> None:
    _storage_with_chain(tmp_path / "citynode.db").close()
    r = CliRunner().invoke(export_cmd, ["-d", str(tmp_path), "--origin", OTHER.node_id,
                                        "--feed", "noise", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "3 record(s) in 1 feed(s)" in r.output and "no card" in r.output


def test_cli_audit_fails_a_bundle_missing_its_last_record(tmp_path: Path) -> None:
    path = standard(tmp_path)
    items = raw_items(path)
    del items[index_of(items, "noise", 8)]
    put_items(path, fix_end(items))
    r = CliRunner().invoke(audit_cmd, [str(path), "--origin", KEY.node_id])
    assert r.exit_code == 1, r.output
    assert "ERROR   [missing_records] noise seq 8: seq 8 missing" in r.output
    assert "checkpoint_beyond" not in r.output and "FAILED: 1 error(s)" in r.output


def test_cli_export_notes_what_the_bundle_leaves_out(tmp_path: Path) -> None:
    st = _storage_with_chain(tmp_path / "citynode.db")
    longer = chain(0, "noise", 10)
    st.put_checkpoint(KEY.public_key, "noise", 10, mth([r.id for r in longer]),
                      cp_env(longer, 10)).result(10)
    st.set_meta("card:" + KEY.public_key.hex(),
                card_env(feeds=(("noise", "public"), ("permits", "partners")))).result(10)
    st.close()
    runner = CliRunner()
    out = tmp_path / "k.bundle"
    r = runner.invoke(export_cmd, ["-d", str(tmp_path), "--origin", KEY.node_id,
                                   "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "1 checkpoint(s) of a size beyond the records held here were left out" in r.output
    assert "card lists feed(s) permits of which no record is held here" in r.output
    # air-quality is not on the card: its access is unknown, so never taken as public;
    # records in clear that are not public are left out unless asked for
    assert "left out feed(s) in clear that are not public: air-quality (unknown)." in r.output
    assert "8 record(s) in 1 feed(s)" in r.output
    r = runner.invoke(audit_cmd, [str(out), "--origin", KEY.node_id])
    assert r.exit_code == 0, r.output
    assert "WARNING [missing_feed] permits:" in r.output
    assert "--feed permits, or --include-partners" in r.output
    assert "origin's card also lists permits, NOT in this bundle" in r.output
    # asked for one feed: the others are left out on purpose, no note about them
    r = runner.invoke(export_cmd, ["-d", str(tmp_path), "--origin", KEY.node_id,
                                   "--feed", "noise", "--out", str(out), "--force"])
    assert r.exit_code == 0 and "card lists" not in r.output, r.output


def test_cli_export_warns_when_the_bundle_holds_non_public_feeds(tmp_path: Path) -> None:
    # A partner exporting another city's records: its partners-only feed is in clear.
    st = _storage_with_chain(tmp_path / "citynode.db")
    st.set_meta("card:" + KEY.public_key.hex(),
                card_env(feeds=(("noise", "public"), ("air-quality", "partners")))).result(10)
    st.close()
    args = ["-d", str(tmp_path), "--origin", KEY.node_id, "--out", str(tmp_path / "b")]
    # By default it is left out, and the note says how to include it.
    r = CliRunner().invoke(export_cmd, args)
    assert r.exit_code == 0, r.output
    assert "8 record(s) in 1 feed(s)" in r.output
    assert "left out feed(s) in clear that are not public: air-quality (partners)" in r.output
    r = CliRunner().invoke(export_cmd, [*args, "--force", "--json"])
    out = json.loads(r.stdout)
    assert out["not_public"] == [] and out["records"] == 8
    assert out["left_out_not_public"] == [{"feed": "air-quality", "access": "partners"}]
    assert out["card_feeds_not_held"] == []  # left out on purpose, and held here
    # Named, or with --include-partners, it goes in, with a warning.
    for extra in (["--feed", "air-quality", "--feed", "noise"], ["--include-partners"]):
        r = CliRunner().invoke(export_cmd, [*args, "--force", *extra])
        assert r.exit_code == 0 and "12 record(s) in 2 feed(s)" in r.output, r.output
        assert ("not public: air-quality (partners). Records of air-quality are in clear"
                in r.output), r.output
    r = CliRunner().invoke(export_cmd, [*args, "--feed", "noise", "--force"])
    assert r.exit_code == 0 and "not public" not in r.output, r.output
    # Nothing left to export by default: one clear error, no empty bundle.
    only = tmp_path / "only"
    only.mkdir()
    st = Storage.open(only / "citynode.db")
    st.append(list(chain(0, "air-quality", 4))).result(10)
    st.set_meta("card:" + KEY.public_key.hex(),
                card_env(feeds=(("air-quality", "partners"),))).result(10)
    st.close()
    r = CliRunner().invoke(export_cmd, ["-d", str(only), "--origin", KEY.node_id,
                                        "--out", str(only / "b")])
    assert r.exit_code == 1 and "--include-partners" in r.output, r.output
    assert not (only / "b").exists()


def test_cli_export_tells_a_restricted_feeds_sealed_records_from_ones_in_clear(
        tmp_path: Path) -> None:
    """A restricted feed goes into a default bundle when its payloads are sealed; one
    that also holds records in clear (signed before it was restricted) is left out like
    a partners feed, and the notes say which is which."""
    st = Storage.open(tmp_path / "citynode.db")
    sealed, prev = [], None
    for seq in (1, 2):
        r = sign_record(KEY, feed="sec", seq=seq, prev=prev, time_ms=T0 + seq * MIN,
                        type="org.example.Test", data={"n": seq},
                        readers=[OTHER.public_key])
        sealed.append(r)
        prev = r.id
    st.append(sealed + list(chain(0, "was-partners", 3))).result(10)
    st.set_meta("card:" + KEY.public_key.hex(), card_env(feeds=(
        ("sec", "restricted"), ("was-partners", "restricted")))).result(10)
    st.close()
    args = ["-d", str(tmp_path), "--origin", KEY.node_id, "--out", str(tmp_path / "b")]
    r = CliRunner().invoke(export_cmd, args)
    assert r.exit_code == 0 and "2 record(s) in 1 feed(s)" in r.output, r.output
    assert "left out feed(s) in clear that are not public: was-partners (restricted, " \
        "with records in clear)" in r.output
    assert "sec (restricted): their payloads are sealed to their readers" in r.output
    r = CliRunner().invoke(export_cmd, [*args, "--force", "--include-partners"])
    assert r.exit_code == 0 and "5 record(s) in 2 feed(s)" in r.output, r.output
    assert "Records of was-partners are in clear" in r.output
    assert "sealed to their readers" not in r.output


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    typo = KEY.node_id[:-1] + ("b" if KEY.node_id.endswith("a") else "a")
    cases = [
        (audit_cmd, [str(tmp_path / "missing.bundle"), "--origin", KEY.node_id], "cannot read"),
        (audit_cmd, [str(tmp_path), "--origin", "cn1abc"], ""),
        (export_cmd, ["-d", str(tmp_path), "--origin", KEY.node_id, "--out",
                      str(tmp_path / "o")], "no citynode database"),
        (export_cmd, ["-d", str(tmp_path), "--origin", typo, "--out",
                      str(tmp_path / "o")], "node id"),
    ]
    for cmd, args, text in cases:
        r = runner.invoke(cmd, args)
        assert r.exit_code in (1, 2), r.output
        assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert lines and lines[-1].startswith("Error:") and text in lines[-1], r.output
    assert not (tmp_path / "citynode.db").exists()  # export never creates a database


def test_check_storage_still_reports_clean_chains(tmp_path: Path) -> None:
    from citynode.audit import check_storage

    st = _storage_with_chain(tmp_path / "citynode.db")
    try:
        rep = check_storage(st)
    finally:
        st.close()
    assert (rep.records, rep.feeds, rep.problems) == (15, 3, [])


def test_a_chain_ending_inside_a_settled_window_is_flagged_unconfirmed(
        tmp_path: Path) -> None:
    """B1: a recovery names seq 6 as the retired key's last record. A bundle holding a
    thief's chain 1..5 under that key verifies record by record; since it ends below
    the named head, the audit says the records cannot be checked against the named
    chain (settled_unconfirmed). A bundle holding the honest chain through seq 6
    confirms it."""
    from citynode.core import keylog
    from citynode.core.keys import NodeKey, Verifier

    k0, k1, q0, new, nxt, q1 = (SigningKey(bytes([i]) * 32) for i in (1, 2, 0x40, 5, 6, 7))
    inc = keylog.incept(k0, k1.public_key, q0.public_key, T0)
    ident = keylog.identity_of(inc.body)
    nk = NodeKey(k0.seed, ident, keylog.identity_id(ident), keylog.encode_log([inc]))

    def signed(n: int, tag: str) -> list[Record]:
        out, prev = [], None
        for seq in range(1, n + 1):
            out.append(sign_record(nk, feed="noise", seq=seq, prev=prev, time_ms=T0 + seq,
                                   type="org.example.Test", data={"n": seq, "tag": tag}))
            prev = out[-1].id
        return out

    honest, thief = signed(6, "honest"), signed(5, "thief")
    st0 = keylog.verify_log(ident, [inc.envelope], verifier=Verifier())
    rec = keylog.recover(st0, q0, new.public_key, nxt.public_key, q1.public_key, T0 + 100,
                         {"noise": (6, honest[5].id)})
    log = keylog.encode_log([inc, rec])
    forged = write(tmp_path / "thief.bundle", {"noise": [r.envelope for r in thief]},
                   origin=ident)
    rep = audit_bundle(forged, nk.node_id, now_ms=NOW, key_logs=[log])
    assert "settled_unconfirmed" in warnings(rep) and not errors(rep)
    good = write(tmp_path / "honest.bundle", {"noise": [r.envelope for r in honest]},
                 origin=ident)
    rep = audit_bundle(good, nk.node_id, now_ms=NOW, key_logs=[log])
    assert "settled_unconfirmed" not in warnings(rep) and not errors(rep)
