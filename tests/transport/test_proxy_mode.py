"""Behind a reverse proxy: TLS off on a loopback port, no certificate in the card."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from citynode.errors import ConfigError
from citynode.transport.client import fetch_card
from tests.conftest import InProc, make_node_dir

Make = Callable[..., Awaitable[InProc]]


async def test_plain_http_node_behind_a_proxy_pairs_and_replicates(inproc: Make) -> None:
    # The proxy holds a CA certificate; the node itself speaks plain HTTP on loopback.
    proxied = await inproc("Surabaya", settings={("tls", "enabled"): False})
    assert proxied.url.startswith("http://")
    card = await fetch_card(proxied.url, proxied.node.node_id, now_ms=proxied.node.now_ms())
    assert card.tls is None  # nothing to pin: partners validate the proxy's CA certificate
    other = await inproc("Jakarta")
    await other.node.add_partner(proxied.url, proxied.node.node_id)
    await proxied.node.add_partner(other.url, other.node.node_id)
    (rec,) = await proxied.node.publish("water", "org.example.Test", [{"n": 1}])
    for _ in range(100):
        if other.node.heads.get((proxied.node.public_key, "water")):
            break
        await asyncio.sleep(0.1)
    assert other.node.heads[(proxied.node.public_key, "water")].id == rec.id


def test_plain_http_on_a_public_address_needs_a_trusted_proxy(tmp_path: Path) -> None:
    d = make_node_dir(tmp_path, "Seoul")
    text = (d / "node.toml").read_text()
    text = text.replace('listen = "127.0.0.1:', 'listen = "0.0.0.0:')
    text = text.replace("enabled = true", "enabled = false", 1)
    (d / "node.toml").write_text(text)
    from citynode.config import load_config

    with pytest.raises(ConfigError, match=r"trusted_proxy|plaintext|public"):
        load_config(d / "node.toml")
