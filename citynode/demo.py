"""``citynode demo``: four partner cities on this machine, sharing live data.

Jakarta, Seoul, Surabaya and Singapore each get their own data dir, key and HTTPS
certificate and run as separate ``citynode run`` processes on 127.0.0.1. They are
partnered as a partial mesh::

    Surabaya ── Jakarta ── Singapore ── Seoul

so Seoul gets Jakarta's and Surabaya's records only by relay, verifying the origin's
signature itself at every hop. Each city publishes air quality (PM2.5, PM10, NO2 in
µg/m³ at real station names), traffic flow and weather; Singapore issues one
cyber-security notice. A live table shows what each node holds from each origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from citynode.cluster import Cluster, LocalNode

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["run_demo"]

Place = tuple[str, float, float]  # name, longitude, latitude


class City(TypedDict):
    stations: list[Place]  # air-quality stations; the first also reports the weather
    roads: list[Place]
    pm25: float  # typical PM2.5 in µg/m³
    temp: float  # typical temperature in °C


CITIES: dict[str, City] = {
    "Jakarta": {
        "stations": [("DKI1 Bundaran HI", 106.8230, -6.1950),
                     ("DKI4 Lubang Buaya", 106.9090, -6.2886)],
        "roads": [("Jl. Jenderal Sudirman", 106.8219, -6.2146),
                  ("Jl. M.H. Thamrin", 106.8229, -6.1862)],
        "pm25": 42.0, "temp": 31.0,
    },
    "Seoul": {
        "stations": [("Jongno-gu", 126.9794, 37.5720), ("Gangnam-gu", 127.0473, 37.5172)],
        "roads": [("Olympic-daero", 127.0016, 37.5196), ("Gangbyeon-bukro", 127.0118, 37.5288)],
        "pm25": 18.0, "temp": 4.0,
    },
    "Surabaya": {
        "stations": [("SUF1 Wonorejo", 112.7944, -7.3083), ("SUF6 Tandes", 112.6655, -7.2573)],
        "roads": [("Jl. Raya Darmo", 112.7378, -7.2875), ("Jl. Ahmad Yani", 112.7323, -7.3211)],
        "pm25": 33.0, "temp": 30.0,
    },
    "Singapore": {
        "stations": [("Central", 103.8198, 1.3521), ("Jurong West", 103.7063, 1.3404)],
        "roads": [("Pan Island Expressway", 103.8480, 1.3367),
                  ("East Coast Parkway", 103.9006, 1.2976)],
        "pm25": 14.0, "temp": 29.0,
    },
}
# Surabaya - Jakarta - Singapore - Seoul: Seoul reaches Jakarta and Surabaya only by relay.
LINKS = [("Jakarta", "Surabaya"), ("Jakarta", "Singapore"), ("Singapore", "Seoul")]


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _air(city: City, station: Place, t: float,
         rng: random.Random) -> dict[str, Any]:
    name, lon, lat = station
    daily = 1 + 0.25 * math.sin(t / 3600)
    pm25 = round(city["pm25"] * daily * rng.uniform(0.85, 1.15), 1)
    return {
        "dateObserved": _iso(t),
        "location": {"type": "Point", "coordinates": [lon, lat]},
        "name": name,
        "pm25": pm25,
        "pm10": round(pm25 * rng.uniform(1.4, 1.9), 1),
        "no2": {"value": round(rng.uniform(12, 45), 1), "unitCode": "GQ"},
        "airQualityLevel": "good" if pm25 < 15 else "moderate" if pm25 < 35 else "unhealthy",
    }


def _traffic(road: Place, t: float, rng: random.Random) -> dict[str, Any]:
    name, lon, lat = road
    speed = rng.uniform(8, 55)
    return {
        "dateObserved": _iso(t),
        "location": {"type": "Point", "coordinates": [lon, lat]},
        "name": name,
        "intensity": rng.randint(40, 400),
        "averageVehicleSpeed": round(speed, 1),
        "occupancy": round(rng.uniform(0.1, 0.9), 2),
        "congested": speed < 15,
    }


def _weather(city: City, t: float, rng: random.Random) -> dict[str, Any]:
    _name, lon, lat = city["stations"][0]
    return {
        "dateObserved": _iso(t),
        "location": {"type": "Point", "coordinates": [lon, lat]},
        "temperature": round(city["temp"] + rng.uniform(-1.5, 1.5), 1),
        "relativeHumidity": round(rng.uniform(0.55, 0.9), 2),
        "atmosphericPressure": round(rng.uniform(1005, 1015), 1),
        "windSpeed": round(rng.uniform(2, 18), 1),
        "precipitation": round(max(0.0, rng.gauss(0.5, 1.5)), 1),
    }


NOTICE = {
    "severity": "high",
    "tlp": "TLP:GREEN",
    "affectedSystem": "Traffic signal controllers (firmware < 4.2)",
    "title": "Default credentials on roadside traffic controllers",
    "description": "Controllers exposed on the municipal network accept the vendor's default "
                   "administrator password. Rotate credentials and restrict management access.",
    "dateIssued": "",
    "indicators": [{"type": "ipv4", "value": "203.0.113.45"},
                   {"type": "domain", "value": "update-check.example.net"}],
}


async def _publisher(node: LocalNode, city: City, stop: asyncio.Event,
                     counts: dict[str, int], rng: random.Random) -> None:
    tick = 0
    while not stop.is_set():
        now = time.time()
        air = [_air(city, s, now, rng) for s in city["stations"]]
        await node.publish("air-quality", "AirQualityObserved", air)
        counts[node.name] += len(air)
        if tick % 2 == 0:
            tr = [_traffic(r, now, rng) for r in city["roads"]]
            await node.publish("traffic", "TrafficFlowObserved", tr)
            counts[node.name] += len(tr)
        if tick % 3 == 0:
            await node.publish("weather", "WeatherObserved", [_weather(city, now, rng)])
            counts[node.name] += 1
        if node.name == "Singapore" and tick == 4:
            notice = dict(NOTICE, dateIssued=_iso(now))
            await node.publish("cyber-notices", "CyberSecurityNotice", [notice])
            counts[node.name] += 1
        tick += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def _holdings(nodes: list[LocalNode]) -> dict[str, dict[str, int]]:
    """holder name -> origin name -> records held."""
    by_id = {n.node_id: n.name for n in nodes}
    out: dict[str, dict[str, int]] = {}
    for n in nodes:
        row: dict[str, int] = {}
        try:
            for f in await n.feeds():
                o = by_id.get(f["origin"], f["origin"][:10])
                row[o] = row.get(o, 0) + int(f["seq"])
        except Exception:  # a node restarting: show what we have
            row = {}
        out[n.name] = row
    return out


def _table(nodes: list[LocalNode], held: dict[str, dict[str, int]], published: dict[str, int],
           title: str) -> Table:
    from rich.table import Table

    t = Table(title=title, caption="every record verified (Ed25519 + chain) by every node "
              "that holds it; Seoul gets Jakarta and Surabaya only by relay")
    t.add_column("holds \u2193 / from \u2192")
    for o in nodes:
        t.add_column(o.name, justify="right")
    for h in nodes:
        cells = []
        for o in nodes:
            n = held.get(h.name, {}).get(o.name, 0)
            mark = "[green]\u2713[/]" if n and n >= published[o.name] else " "
            cells.append(f"{n} {mark}")
        t.add_row(h.name, *cells)
    t.add_row("[dim]published[/]", *[f"[dim]{published[o.name]}[/]" for o in nodes])
    return t


async def _demo(base: Path, duration: float) -> bool:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    cluster = Cluster(base)
    names = list(CITIES)
    console.print(f"creating 4 city nodes in {base} ...")
    nodes = cluster.create(names, settings={("federation", "pull_interval_seconds"): 2.0})
    try:
        await cluster.start()
        by_name = {n.name: n for n in nodes}
        for a, b in LINKS:
            await cluster.link(by_name[a], by_name[b])
        console.print("partners: " + ", ".join(f"{a} \u2194 {b}" for a, b in LINKS))
        stop = asyncio.Event()
        published = dict.fromkeys(names, 0)
        rng = random.Random(2026)
        pubs = [asyncio.create_task(_publisher(n, CITIES[n.name], stop, published, rng))
                for n in nodes]
        t_end = time.monotonic() + duration
        converged = False
        with Live(console=console, refresh_per_second=4) as live:
            while time.monotonic() < t_end:
                held = await _holdings(nodes)
                left = max(0, int(t_end - time.monotonic()))
                live.update(_table(nodes, held, published, f"citynode demo \u2014 {left} s left"))
                await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*pubs)
            settle = time.monotonic() + 40  # ends as soon as every node holds everything
            while time.monotonic() < settle:
                held = await _holdings(nodes)
                converged = all(held[h.name].get(o.name, 0) == published[o.name]
                                for h in nodes for o in nodes)
                live.update(_table(nodes, held, published,
                                   "converged \u2713" if converged else "settling ..."))
                if converged:
                    break
                await asyncio.sleep(0.5)
        return converged
    finally:
        await cluster.close()
        cluster.stop()
        console.print()
        console.print("stopped all node processes")
        console.print(f"data dirs are in {base}; look around with, for example:")
        d = nodes[1].dir
        exe = _citynode_command()
        for cmd in (f"records -d {d} --feed air-quality --limit 5", f"feeds -d {d}",
                    f"partner list -d {d}", f"check -d {d}", f"forks -d {d}"):
            console.print(f"  {exe} {cmd}", soft_wrap=True, highlight=False)


def _citynode_command() -> str:
    """How to call citynode from the user's shell: inside a virtualenv (scripts/demo
    makes .venv), by its full path, which works whether or not the venv is activated."""
    import sys

    beside = Path(sys.executable).with_name("citynode")
    if sys.prefix != sys.base_prefix and beside.exists():
        return str(beside)
    return "citynode"


def run_demo(duration: float = 30.0, base: Path | None = None) -> bool:
    """Run the demo for ``duration`` seconds; True if every node ended with every record."""
    if base is None:
        base = Path(tempfile.mkdtemp(prefix="citynode-demo-"))
    return asyncio.run(_demo(base, duration))
