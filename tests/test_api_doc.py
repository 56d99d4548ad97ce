"""Every route the node serves is documented: docs/API.md for the API, docs/CONSOLE.md
for the web console. A route added without its line in the docs fails here."""

from __future__ import annotations

import re
from pathlib import Path

from citynode.node import Node
from citynode.transport.server import build_app
from tests.conftest import make_node_dir

DOCS = Path(__file__).resolve().parent.parent / "docs"
# "`GET /v1/records/{id}`", "`POST /v1/publish?feed=F…`": a method, then a path
_DOCUMENTED = re.compile(r"`(GET|POST|PUT|DELETE|PATCH) (/[^`?\s\[]*)")


def _shape(path: str) -> str:
    """A path with its variable parts blanked: ``{rid}``, ``{id}`` and ``NAME`` (the
    docs' way of writing one) are one route."""
    return re.sub(r"\{[^}]*\}|(?<=/)[A-Z][A-Z_]*(?=/|$)", "{}", path)


def documented(doc: str) -> set[tuple[str, str]]:
    return {(m, _shape(p)) for m, p in _DOCUMENTED.findall((DOCS / doc).read_text())}


def test_every_route_is_in_the_docs(tmp_path: Path) -> None:
    app = build_app(Node.load(make_node_dir(tmp_path, "Jakarta")))
    api, console = documented("API.md"), documented("CONSOLE.md")
    served = set()
    for route in app.router.routes():
        if route.method == "HEAD":  # aiohttp adds one for each GET
            continue
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        assert isinstance(path, str), route
        served.add((route.method, _shape(path)))
    console_routes = {r for r in served if r[1] == "/" or r[1].startswith("/console")}
    missing = sorted((served - console_routes) - api) + sorted(console_routes - console)
    assert missing == [], f"routes served but not documented: {missing}"
    assert len(served) > 30  # the router was read, not an empty app


def test_the_route_pattern_reads_the_docs_tables() -> None:
    api = documented("API.md")
    assert ("POST", "/v1/bridges/ngsi/{}") in api and ("GET", "/v1/records") in api
    assert ("GET", "/v1/admin/sinks") in api and ("DELETE", "/v1/admin/partners/{}") in api
