"""`citynode bridges` on a node that is not running: its bridges as configured, and the
dead letters its storage holds."""

from __future__ import annotations

import json
from pathlib import Path

from citynode.bridges.mosquitto import bridge_toml
from citynode.storage import Storage
from tests.conftest import make_node_dir
from tests.test_cli import cli, ok


def test_a_node_without_bridges_says_where_to_read(tmp_path: Path) -> None:
    d = make_node_dir(tmp_path, "Jakarta")
    assert "no bridges in node.toml" in ok("bridges", "-d", str(d)).stdout
    assert json.loads(ok("bridges", "-d", str(d), "--json").stdout) == {
        "bridges": [], "dead_letters": []}


def test_a_stopped_node_shows_its_bridges_and_dead_letters(tmp_path: Path) -> None:
    d = make_node_dir(tmp_path, "Jakarta")
    with open(d / "node.toml", "a") as f:
        f.write(bridge_toml(1883))
    ok("bridges", "-d", str(d))  # creates and migrates the database
    with Storage.open(d / "citynode.db") as st:
        for i in range(3):
            st.bridge_dead_letter("air", bytes([i]) * 32, "", f"city/air/s{i}/reading",
                                  "not_json", "not UTF-8 JSON: ...", b"\xff{oops", 7,
                                  1_700_000_000_000 + i, 10000)
    out = json.loads(ok("bridges", "-d", str(d), "--json", "--dead-letters", "2").stdout)
    (b,) = out["bridges"]
    assert b["name"] == "air" and b["running"] is False and b["broker"] == "127.0.0.1:1883"
    assert (b["dead_letters_held"], b["dead_letters_dropped"]) == (3, 0)
    assert [x["topic"] for x in out["dead_letters"]] == ["city/air/s2/reading",
                                                         "city/air/s1/reading"]
    assert out["dead_letters"][0]["excerpt"] == "\ufffd{oops"
    text = ok("bridges", "-d", str(d)).stdout
    assert "node not running" in text and "not_json" in text
    r = cli("bridges", "-d", str(d), "--dead-letters", "5000")
    assert r.exit_code == 2 and "5000" in r.stderr
