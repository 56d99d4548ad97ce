"""A real HTTP receiver for the sinks' tests and scripts/bench-bridge: an aiohttp server
on a loopback port that parses each request with the official CloudEvents SDK (or keeps
NGSI-LD upserts), and can be told to fail (answer 500, refuse with 400) or to go away
for a while and come back on the same port.

A tool for tests and benchmarks (as citynode/bridges/mosquitto.py): it needs the
``cloudevents`` SDK of the test extra; the node never imports it."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

from aiohttp import web
from cloudevents.core.bindings.http import HTTPMessage, from_http_event

from citynode.cluster import free_ports

__all__ = ["Receiver"]


class Receiver:
    """``await start()``; ``url``; ``events`` (acknowledged, in order of arrival)."""

    def __init__(self, *, max_field_size: int = 1 << 20) -> None:
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}/events"
        self.events: list[Any] = []  # CloudEvents acknowledged (2xx), in arrival order
        self.times: list[float] = []  # when each of them arrived (time.perf_counter())
        self.upserts: list[tuple[dict[str, str], Any]] = []  # NGSI-LD (headers, body)
        self.requests = 0
        self.seen: Counter[str] = Counter()  # every event id received, answered or not
        self.fail_next = 0  # answer this many requests with 500
        self.delay = 0.0  # seconds before each answer (a slow receiver)
        self.refuse: set[str] = set()  # event ids answered 400
        self.max_field_size = max_field_size
        self.errors: list[str] = []  # requests the SDK could not parse
        self._runner: web.AppRunner | None = None
        self.arrived = asyncio.Event()

    async def _events(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.read()
        try:
            event = from_http_event(HTTPMessage(dict(request.headers), body))
        except Exception as exc:  # the SDK's refusal (any kind) is the test's finding
            self.errors.append(f"{type(exc).__name__}: {exc}")
            return web.Response(status=400, text=str(exc))
        self.seen[event.get_id()] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=500, text="try again")
        if event.get_id() in self.refuse:
            return web.Response(status=400, text="not for us")
        self.events.append(event)
        self.times.append(time.perf_counter())
        self.arrived.set()
        return web.Response(status=204)

    async def _upsert(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=503, text="busy")
        body = json.loads(await request.read())
        self.upserts.append((dict(request.headers), body))
        self.arrived.set()
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/events", self._events)
        app.router.add_post("/ngsi-ld/v1/entityOperations/upsert", self._upsert)
        self._runner = web.AppRunner(app, max_field_size=self.max_field_size,
                                     max_line_size=self.max_field_size)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def acked_ids(self) -> list[str]:
        return [e.get_id() for e in self.events]
