"""A local Mosquitto broker for the tests and the bridge benchmark (as cluster.py is for
nodes): started on a free loopback port in a directory of its own with a generated
config (persistence in that directory), stopped or restarted by its caller; plus the
station messages and [[bridges.mqtt]] table they use.

Mosquitto (the Debian package) is a test dependency that .ci/run installs: a missing
broker is an error, never a skip.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt

from citynode.cluster import free_ports

__all__ = ["Broker", "bridge_toml", "reading", "wait_for"]

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class Broker:
    """One ``mosquitto`` process on 127.0.0.1 (``port``; ``tls_port`` too when given
    certificate files)."""

    def __init__(self, base: Path, *, tls: list[str] | None = None) -> None:
        """``tls``: lines of mosquitto.conf for a second listener on ``tls_port``
        (certfile, keyfile, ...); the plain listener stays open to anyone."""
        self.dir = base / "mosquitto"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port, self.tls_port = free_ports(2)
        self.proc: subprocess.Popen[bytes] | None = None
        lines = [
            "per_listener_settings true",
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.dir}/",
            "autosave_interval 1",
            # Stay the user who runs the tests (mosquitto drops root for "mosquitto").
            f"user {getpass.getuser()}",
            "max_queued_messages 100000",
            "max_inflight_messages 100",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if tls is not None:
            lines += [f"listener {self.tls_port} 127.0.0.1", *tls]
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.log = self.dir / "mosquitto.log"

    def start(self) -> None:
        """Start mosquitto and wait until it accepts connections (fails the test if it
        cannot: no skip)."""
        if not Path(MOSQUITTO).exists():
            raise RuntimeError("mosquitto is not installed: apt-get install mosquitto")
        logf = open(self.log, "ab")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=logf,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        logf.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto not listening: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its persistent sessions) and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    async def publish(self, messages: list[tuple[str, bytes]], *, client_id: str = "test-pub",
                      in_flight: int = 1) -> None:
        """Publish ``(topic, payload)`` at QoS 1, each acknowledged by the broker, in
        order (``in_flight`` > 1: that many awaiting their acknowledgement at once)."""
        async with aiomqtt.Client("127.0.0.1", self.port, identifier=client_id,
                                  timeout=60, max_inflight_messages=in_flight) as c:
            c.pending_calls_threshold = 10**9  # warns of many publishes in flight: wanted
            if in_flight == 1:
                for topic, payload in messages:
                    await c.publish(topic, payload, qos=1)
                return
            await asyncio.gather(*(c.publish(t, p, qos=1) for t, p in messages))


def reading(i: int, **extra: Any) -> bytes:
    """A station's message: JSON with a unique reading number ``i``."""
    doc = {"n": i, "label": f"reading-{i}", "values": {"pm25": 10.0 + i % 50, "no2": 20.0},
           "ts": "2026-12-07T07:00:00+07:00",
           "geo": {"type": "Point", "coordinates": [106.823, -6.195]}} | extra
    return json.dumps(doc).encode()


def bridge_toml(port: int, *, name: str = "air", extra: str = "") -> str:
    """A [[bridges.mqtt]] table for a broker on 127.0.0.1:``port``: station readings of
    ``city/air/<station>/reading`` become AirQualityObserved records of air-quality."""
    return f"""
[[bridges.mqtt]]
name = "{name}"
host = "127.0.0.1"
port = {port}
{extra}

[[bridges.mqtt.routes]]
topic = "city/air/+/reading"
feed = "air-quality"
type = "AirQualityObserved"
subject = "station-{{topic.2}}"

[bridges.mqtt.routes.fields]
pm25 = "values.pm25"
no2 = "values.no2"
dateObserved = "ts"
location = "geo"
name = "label"
"""


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float = 30.0,
                   what: str = "condition") -> None:
    """Wait until ``check()`` is true; raise AssertionError naming ``what`` if it is not
    within ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if await check():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.1)
