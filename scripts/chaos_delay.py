"""A delaying TCP relay for scripts/chaos (``partition``): latency on a link where the
kernel has no ``tc netem`` (CONFIG_NET_SCH_NETEM unset).

It listens on ``--listen`` (host:port), connects each accepted connection to
``--to`` (host:port) from ``--source`` (an address the nftables redirect that sends
traffic here leaves alone), and forwards the bytes both ways, each chunk held
``--delay-ms`` (plus a uniform jitter of up to ``--jitter-ms``, never reordering) before
it is written on. What it does not do, that netem does: delay each packet (it delays
what one read returns), or delay the TCP handshake and its acknowledgements (the
kernel answers those on each leg at once). Loss stays with nftables, on the real link.

Prints ``ready`` once listening, then ``connection`` for each connection it relays;
runs until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               delay_s: float, jitter_s: float, rng: random.Random) -> None:
    """Copy ``reader`` to ``writer``, each chunk due ``delay_s`` (+ jitter) after it was
    read and never before the chunk ahead of it."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            await asyncio.sleep(max(0.0, due - loop.time()))
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    sender = asyncio.create_task(send())
    last = 0.0
    try:
        while True:
            data = await reader.read(65536)
            due = max(last, loop.time() + delay_s + rng.uniform(0.0, jitter_s))
            last = due
            await queue.put((due, data))
            if not data:
                break
        await sender
    finally:
        sender.cancel()


async def serve(a: argparse.Namespace) -> None:
    lhost, lport = a.listen.rsplit(":", 1)
    thost, tport = a.to.rsplit(":", 1)
    rng = random.Random(a.seed)
    delay, jitter = a.delay_ms / 1000, a.jitter_ms / 1000

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        print("connection", flush=True)  # (counted by scripts/chaos)
        try:
            ur, uw = await asyncio.wait_for(asyncio.open_connection(
                thost, int(tport), local_addr=(a.source, 0) if a.source else None), 10)
        except (OSError, TimeoutError):
            cw.close()  # the link is cut: as a refused or timed-out connect
            return
        try:
            await asyncio.gather(pump(cr, uw, delay, jitter, rng),
                                 pump(ur, cw, delay, jitter, rng))
        except (OSError, ConnectionError):
            pass
        finally:
            for w in (cw, uw):
                w.close()

    server = await asyncio.start_server(handle, lhost, int(lport))
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", required=True, help="host:port to accept on")
    ap.add_argument("--to", required=True, help="host:port to relay to")
    ap.add_argument("--source", help="address to connect from")
    ap.add_argument("--delay-ms", type=float, default=20.0)
    ap.add_argument("--jitter-ms", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
