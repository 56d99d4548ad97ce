"""A box across the antimeridian (``min_lon > max_lon``) works end to end over real
HTTPS: a page of records (storage's SQL), a stream's catch-up (SQL) and its live tail
(the filter's in-memory match), and the verifying client, which checks each record it
receives against the box it asked for."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from citynode.client import Client
from citynode.core.filters import BBox, RecordFilter
from citynode.core.records import Record
from tests.conftest import InProc, eventually

Make = Callable[..., Awaitable[InProc]]
TYPE = "org.example.Sensor"
BOX = (170.0, -20.0, -170.0, 20.0)  # longitudes 170..180 and -180..-170
QS = "bbox=170,-20,-170,20"


def _at(name: str, lon: float, lat: float) -> dict[str, Any]:
    return {"name": name, "location": {"type": "Point", "coordinates": [lon, lat]}}


# Inside: both sides of the antimeridian, and its edges. Outside: the box's longitudes
# with the wrong latitude, the rest of the world, and no location at all.
INSIDE = [_at("fiji", 178.4, -18.1), _at("samoa", -171.8, -13.8), _at("east-edge", 180.0, 0.0),
          _at("west-edge", -180.0, 0.0), _at("corner", 170.0, 20.0)]
OUTSIDE = [_at("tokyo", 139.7, 35.7), _at("hawaii", -157.8, 21.3), _at("south", 175.0, -40.0),
           _at("zero", 0.0, 0.0), {"name": "nowhere"}]


async def _publish(n: InProc, items: list[dict[str, Any]]) -> None:
    await n.node.publish("sensors", TYPE, items)


async def _events(n: InProc, path_qs: str, want: int, out: list[str]) -> None:
    """The names of the records a raw SSE stream sends, until ``want`` came."""
    async with n.session.get(f"{n.url}{path_qs}", headers={"Accept": "application/json"},
                             timeout=aiohttp.ClientTimeout(total=None)) as r:
        assert r.status == 200, await r.text()
        async for raw in r.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("data: "):
                out.append(json.loads(line[6:])["data"]["name"])
                if len(out) == want:
                    return


async def _until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    async def poll() -> bool:
        return check()

    await eventually(poll, timeout)


def _names(recs: list[Record]) -> list[str]:
    return [r.data["name"] for r in recs]


async def test_records_page_and_client_query_across_the_antimeridian(inproc: Make) -> None:
    n = await inproc("Suva")
    await _publish(n, OUTSIDE[:2] + INSIDE[:3] + OUTSIDE[2:] + INSIDE[3:])
    inside = [i["name"] for i in INSIDE]
    async with n.session.get(f"{n.url}/v1/records?{QS}",
                             headers={"Accept": "application/json"}) as r:
        assert r.status == 200, await r.text()
        page = await r.json()
    assert [rec["data"]["name"] for rec in page["records"]] == inside
    # The same box the other way round (not crossing) holds the rest of the located world.
    async with n.session.get(f"{n.url}/v1/records?bbox=-170,-20,170,20",
                             headers={"Accept": "application/json"}) as r:
        assert [rec["data"]["name"] for rec in (await r.json())["records"]] == [
            "zero", "corner"]
    async with Client(n.url, fingerprint=n.node.identity.cert_fingerprint) as c:
        got = [rec async for rec in c.query(bbox=BOX, page_size=2)]
        assert _names(got) == inside
        got = [rec async for rec in c.query(feed="sensors", bbox=(178.0, -20, -179.0, -1))]
        assert _names(got) == ["fiji"]


async def test_stream_across_the_antimeridian_catch_up_and_live(inproc: Make) -> None:
    """The catch-up (SQL) and the live tail (in memory) send the same records."""
    n = await inproc("Apia")
    await _publish(n, OUTSIDE[:2] + INSIDE[:2])  # stored before: the catch-up
    # A stream without a cursor starts after the newest committed record.
    assert await n.node.streams.cursor() == n.node.storage.max_rowid()
    raw: list[str] = []
    from_now: list[str] = []
    client: list[tuple[int, str]] = []
    async with Client(n.url, fingerprint=n.node.identity.cert_fingerprint) as c:
        async def follow() -> None:
            async for cur, rec in c.subscribe(bbox=BOX, last_event_id=0):
                client.append((cur, rec.data["name"]))
                if len(client) == len(INSIDE):
                    return

        tasks = [asyncio.create_task(follow()),
                 asyncio.create_task(_events(n, f"/v1/stream?{QS}&after=0", len(INSIDE), raw)),
                 asyncio.create_task(_events(n, f"/v1/stream?{QS}", len(INSIDE) - 2,
                                             from_now))]

        await _until(lambda: len(n.node.subscribers) == 3)
        # Stored while the streams are live: the tail matches them in memory.
        await _publish(n, [OUTSIDE[2], INSIDE[2], OUTSIDE[3]])
        await _publish(n, [INSIDE[3], OUTSIDE[4], INSIDE[4]])
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    inside = [i["name"] for i in INSIDE]
    assert [name for _cur, name in client] == inside
    assert raw == inside
    assert from_now == inside[2:]


async def test_streams_with_equal_filters_share_one_group(inproc: Make) -> None:
    """The tail matches once per group: two streams whose filters are spelt differently
    but parse to the same filter are one group."""
    n = await inproc("Nadi")
    tasks = [asyncio.create_task(_events(n, f"/v1/stream?{qs}", 1, []))
             for qs in (QS, "bbox=170.0,-20,-170,20.000")]
    await _until(lambda: len(n.node.subscribers) == 2)
    groups = {sub.group for sub in n.node.subscribers}
    assert len(groups) == 1
    assert next(iter(groups))[0] == RecordFilter(bbox=BBox(*BOX))
    await _publish(n, [INSIDE[0]])
    await asyncio.wait_for(asyncio.gather(*tasks), 60)


@pytest.mark.parametrize("qs", ["bbox=0,3,1,1", "bbox=170,-20,-170"])
async def test_a_box_that_is_not_one_is_still_refused(inproc: Make, qs: str) -> None:
    n = await inproc("Lautoka")
    for path in ("/v1/records", "/v1/stream"):
        async with n.session.get(f"{n.url}{path}?{qs}") as r:
            assert r.status == 400
            body = await r.json()
        assert body["error"] == "bad_request" and "bbox is min_lon" in body["message"]
    assert not n.node.subscribers
