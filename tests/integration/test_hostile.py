"""A hostile partner attacks an honest node; the honest federation is unaffected.

Honest nodes H and Y are real ``citynode run`` processes, partners of each other. The
hostile node X ("Mallory") is an in-process node that H has added as a partner; the
test signs requests with X's key directly (:class:`PeerClient`), so it can send what no
honest node would. Every bad item must be rejected, stored nowhere, and counted per
reason in ``/v1/admin/partners`` and ``/metrics``; Y's records keep replicating.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from citynode.cli import main as cli_main
from citynode.cluster import Cluster, LocalNode, set_config
from citynode.core.chain import ForkProof, verify_fork_proof
from citynode.core.keylog import origin_id
from citynode.core.keys import DOMAIN_RECORD, Verifier, parse_node_id
from citynode.core.records import Record, encode_record, make_body, sign_record
from citynode.errors import PeerRejected
from citynode.transport.client import PeerClient
from tests.conftest import InProc, eventually

pytestmark = pytest.mark.integration

FAST = {("federation", "pull_interval_seconds"): 1.0, ("federation", "backoff_max_seconds"): 2.0}
TYPE = "org.example.Test"
Make = Callable[..., Awaitable[InProc]]
State = dict[tuple[str, str], tuple[int, int]]


@dataclass
class Arena:
    h: LocalNode  # the honest node under attack
    y: LocalNode  # its honest partner
    x: InProc  # the hostile partner
    client: PeerClient  # requests to H signed with X's key
    published: dict[str, int] = field(default_factory=dict)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def xid(self) -> str:
        return self.x.node.node_id

    def sign(self, feed: str, seq: int, prev: bytes | None, data: dict[str, Any]) -> Record:
        return sign_record(self.x.node.key, feed=feed, seq=seq, prev=prev,
                           time_ms=self.x.node.now_ms(), type=TYPE, data=data)


def summary(push_answer: dict[str, Any]) -> dict[str, Any]:
    """The documented counts of a push answer, ``rejected`` in index order (it comes in
    no promised order); ``dup`` (indexes of duplicates) must be empty in these tests."""
    assert push_answer.get("dup", []) == [], push_answer
    keys = ("accepted", "duplicates", "pending", "forks")
    return {**{k: push_answer[k] for k in keys}, "rejected": sorted(push_answer["rejected"])}


async def state(n: LocalNode) -> State:
    return {(f["origin"], f["feed"]): (f["seq"], f["count"]) for f in await n.feeds()}


async def holdings(n: LocalNode) -> dict[tuple[str, str], list[tuple[int, str]]]:
    out = {}
    for origin, feed in await state(n):
        page = await n.api("GET", f"/v1/records?origin={origin}&feed={feed}&limit=1000",
                           operator=True)
        assert page["next"] is None
        out[(origin, feed)] = [(r["seq"], r["id"]) for r in page["records"]]
    return out


async def invalid(n: LocalNode, partner: str) -> dict[str, int]:
    """The ``invalid`` counts (by reason) ``n`` shows for ``partner``."""
    for p in (await n.api("GET", "/v1/admin/partners"))["partners"]:
        if p["node_id"] == partner:
            return dict(p["invalid"])
    raise AssertionError(f"{partner} is not a partner of {n.name}")


async def metrics(n: LocalNode) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = (await n.api("GET", "/metrics", raw=True)).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def total(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    """Sum of samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (k, lab), v in m.items() if k == name and want <= set(lab))


def cli_json(*args: str) -> Any:
    """Run a ``citynode`` command with ``--json`` in this process (same code as the
    command line); it must succeed."""
    r = CliRunner().invoke(cli_main, [*args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


async def honest_publisher(arena: Arena, n: LocalNode) -> None:
    """Publish 3 records every 0.1 s until told to stop."""
    arena.published[n.name] = 0
    while not arena.stop.is_set():
        out = await n.publish("test", TYPE, [{"n": arena.published[n.name] + j}
                                             for j in range(3)])
        assert out["first_seq"] == arena.published[n.name] + 1
        arena.published[n.name] += 3
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def arena(cluster: Cluster, inproc: Make, **h_limits: Any) -> AsyncIterator[Arena]:
    """H and Y (processes, linked), X (in-process, a partner of H only); Y and H publish
    honest records the whole time. On exit: H and Y converge exactly, and H counted
    nothing invalid from Y."""
    h, y = cluster.create(["Honest", "Yonder"], settings=FAST)
    for k, v in h_limits.items():
        set_config(h.dir / "node.toml", "limits", k, v)
    await cluster.start()
    await cluster.link(h, y)
    # Mallory's records are signed here, not published through its node, so its card
    # must name their feeds (a feed no card lists is treated as partners-only).
    x = await inproc("Mallory", settings=FAST, feeds={"x": "public", "evil": "public"})
    await h.api("POST", "/v1/admin/partners", json_body={"url": x.url, "id": x.node.node_id})
    client = PeerClient(x.node.key, h.url, node_id=h.node_id, fingerprint=h.fingerprint)
    ar = Arena(h, y, x, client)
    pubs = [asyncio.create_task(honest_publisher(ar, n)) for n in (h, y)]
    try:
        await asyncio.sleep(0.3)  # the attack starts while honest traffic flows
        yield ar
        await asyncio.sleep(0.3)
        ar.stop.set()
        await asyncio.gather(*pubs)

        async def converged() -> bool:
            sh, sy = await state(h), await state(y)
            return sh == sy and all(
                sh.get((n.node_id, "test")) == (ar.published[n.name],) * 2 for n in (h, y))

        await eventually(converged, timeout=30, interval=0.2)
        assert await holdings(h) == await holdings(y)
        assert await invalid(h, y.node_id) == {}
        assert await invalid(y, h.node_id) == {}
    finally:
        ar.stop.set()
        for t in pubs:
            t.cancel()
        await asyncio.gather(*pubs, return_exceptions=True)
        await client.close()


async def test_tampered_and_forged_records_are_rejected_and_counted(
    cluster: Cluster, inproc: Make
) -> None:
    async with arena(cluster, inproc) as ar:
        h, y = ar.h, ar.y
        r1 = ar.sign("x", 1, None, {"n": 1, "s": "aaaa"})
        r2 = ar.sign("x", 2, r1.id, {"n": 2, "s": "aaaa"})
        body = r2.body.replace(b"\xa4feed\xa1x", b"\xa4feed\xa1y")
        assert body != r2.body
        tampered_body = encode_record(body, r2.sig, r2.payload)
        tampered_sig = encode_record(r2.body, r2.sig[:10] + bytes([r2.sig[10] ^ 1])
                                     + r2.sig[11:], r2.payload)
        # claims Y's origin (which H accepts), signed with X's key
        forged_body, forged_payload = make_body(
            origin=parse_node_id(y.node_id), feed="test", seq=10_000, prev=b"\x01" * 32,
            time_ms=ar.x.node.now_ms(), type=TYPE, data={"n": 666})
        forged = encode_record(forged_body, ar.x.node.key.sign(DOMAIN_RECORD, forged_body),
                               forged_payload)
        garbage = b"\x00" * 80
        # the signed body whole, the payload beside it not the one its digest names
        tampered_payload = encode_record(r2.body, r2.sig, r2.payload.replace(b"aaaa", b"aaab"))
        out = await ar.client.push([r1.envelope, tampered_body, tampered_sig, forged, garbage])
        assert summary(out) == {
            "accepted": 1, "duplicates": 0, "pending": 0, "forks": 0,
            "rejected": [[1, "bad_signature"], [2, "bad_signature"], [3, "bad_signature"],
                         [4, "bad_envelope"]]}, out
        # (alone: in one batch it would be a copy of tampered_sig's id, checked once)
        out = await ar.client.push([tampered_payload])
        assert out["rejected"] == [[0, "payload_mismatch"]] and out["accepted"] == 0, out
        # the genuine record the tampered copies came from is still accepted
        out = await ar.client.push([r2.envelope])
        assert out["accepted"] == 1 and out["rejected"] == [], out

        for bad in (body, forged_body):
            with pytest.raises(PeerRejected) as e:
                await h.api("GET", f"/v1/records/{hashlib.sha256(bad).hexdigest()}",
                            operator=True)
            assert e.value.status == 404
        assert (await state(h))[(ar.xid, "x")] == (2, 2)
        assert await invalid(h, ar.xid) == {"bad_signature": 3, "bad_envelope": 1,
                                            "payload_mismatch": 1}
        m = await metrics(h)
        for reason, n in [("bad_signature", 3), ("bad_envelope", 1), ("payload_mismatch", 1)]:
            assert total(m, "citynode_partner_invalid_total", partner="Mallory",
                         reason=reason) == n, reason
            assert total(m, "citynode_records_rejected_total", reason=reason) == n, reason
        assert total(m, "citynode_partner_invalid_total") == 5
        assert total(m, "citynode_records_rejected_total") == 5

    # Y never saw any of it; it holds X's two genuine records, relayed by H.
    sy = await state(y)
    assert sy[(ar.xid, "x")] == (2, 2)
    assert sy[(y.node_id, "test")] == (ar.published["Yonder"],) * 2
    assert total(await metrics(y), "citynode_records_rejected_total") == 0


async def test_equivocation_keeps_the_first_and_spreads_the_proof(
    cluster: Cluster, inproc: Make
) -> None:
    async with arena(cluster, inproc) as ar:
        h, y = ar.h, ar.y
        first = ar.sign("evil", 1, None, {"n": 1})
        second = ar.sign("evil", 1, None, {"n": 2})
        out = await ar.client.push([first.envelope])
        assert out["accepted"] == 1, out

        async def y_has_first() -> bool:
            return (await state(y)).get((ar.xid, "evil")) == (1, 1)

        await eventually(y_has_first, timeout=20)
        out = await ar.client.push([second.envelope])
        assert summary(out) == {"accepted": 0, "duplicates": 0, "pending": 0, "forks": 1,
                                "rejected": []}, out

        for n in (h, y):
            page = await n.api("GET", f"/v1/records?origin={ar.xid}&feed=evil",
                               operator=True)
            assert [r["id"] for r in page["records"]] == [first.id.hex()], n.name
            with pytest.raises(PeerRejected) as e:
                await n.api("GET", f"/v1/records/{second.id.hex()}", operator=True)
            assert e.value.status == 404

        def proof_ok(entry: dict[str, Any]) -> None:
            assert (entry["origin"], entry["feed"], entry["seq"], entry["kind"]) == \
                (ar.xid, "evil", 1, "fork"), entry
            p = ForkProof.decode(base64.b64decode(entry["proof"]))
            # the canonical proof: both records without their payloads
            assert {p.a, p.b} == {encode_record(r.body, r.sig, None) for r in (first, second)}
            a, b = verify_fork_proof(p, Verifier(), key_states=ar.x.node.policy.keys.state)
            assert {a.id, b.id} == {first.id, second.id}

        forks_h = cli_json("forks", "-d", str(h.dir))["forks"]
        assert len(forks_h) == 1, forks_h
        proof_ok(forks_h[0])

        # H forwards the proof to its other partners.
        async def y_knows() -> bool:
            out = cli_json("forks", "-d", str(y.dir))
            return len(out["forks"]) > 0

        await eventually(y_knows, timeout=20, interval=0.3)
        forks_y = cli_json("forks", "-d", str(y.dir))["forks"]
        assert len(forks_y) == 1, forks_y
        proof_ok(forks_y[0])
        assert forks_y[0]["reported_by"] == h.node_id

        # The same equivocation again is no new proof.
        await ar.client.push([second.envelope])
        forks_h = cli_json("forks", "-d", str(h.dir))["forks"]
        assert len(forks_h) == 1, forks_h
        for n in (h, y):
            assert total(await metrics(n), "citynode_forks_detected_total") == 1, n.name
    assert origin_id(first.origin, first.key) == ar.xid


async def test_oversized_and_garbage_batches_are_rejected_and_counted(
    cluster: Cluster, inproc: Make
) -> None:
    max_request = 1_000_000
    async with arena(cluster, inproc, max_request_bytes=max_request) as ar:
        h = ar.h
        rec = ar.sign("x", 1, None, {"n": 1})
        too_many = msgpack.packb([rec.envelope] * 1001, use_bin_type=True)
        assert len(too_many) < max_request
        too_big = msgpack.packb([b"\x00" * 200_000] * 6, use_bin_type=True)
        assert len(too_big) > max_request
        cases = [
            ("more than max_batch_records (1000) envelopes", too_many, 400),
            ("a body over max_request_bytes", too_big, 413),
            ("garbage bytes", b"\xc1\xff\x00 not msgpack at all" * 10, 400),
            ("msgpack that is not an array", msgpack.packb({"push": "me"}), 400),
            ("an array of non-bin items", msgpack.packb([1, "two", None]), 400),
        ]
        problems: list[str] = []
        for what, body, status in cases:
            before_inv = sum((await invalid(h, ar.xid)).values())
            before = await metrics(h)
            with pytest.raises(PeerRejected) as e:
                await ar.client.request("POST", "/v1/push", body)
            assert e.value.status == status, (what, str(e.value))
            after_inv = sum((await invalid(h, ar.xid)).values())
            after = await metrics(h)
            rejected = (total(after, "citynode_records_rejected_total")
                        - total(before, "citynode_records_rejected_total"))
            if rejected != 1:
                problems.append(f"{what} (HTTP {status}): citynode_records_rejected_total "
                                f"grew by {rejected}, not 1")
            if status == 413:
                # The body (and so its signature) was never read: it cannot be blamed on
                # a partner, only counted.
                continue
            if after_inv - before_inv != 1:
                problems.append(f"{what}: /v1/admin/partners invalid for the sender grew by "
                                f"{after_inv - before_inv}, not 1")
            grew = (total(after, "citynode_partner_invalid_total", partner="Mallory")
                    - total(before, "citynode_partner_invalid_total", partner="Mallory"))
            if grew != 1:
                problems.append(f"{what}: citynode_partner_invalid_total{{partner=\"Mallory\"}}"
                                f" grew by {grew}, not 1")
        assert (ar.xid, "x") not in await state(h)  # nothing of it stored
        # H still takes X's well-formed traffic after all that.
        out = await ar.client.push([rec.envelope])
        assert out["accepted"] == 1, out
        assert (await state(h))[(ar.xid, "x")] == (1, 1)
    # (honest traffic converged on leaving the arena)
    assert not problems, "rejected but not counted:\n" + "\n".join(problems)
