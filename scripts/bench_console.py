"""Console benchmark: the web console's time to first paint, in Debian's headless
Chromium (driven by Selenium through Debian's chromedriver), from a real ``citynode
run`` process over HTTPS on 127.0.0.1.

The node holds ``--stations`` air-quality stations with ``--readings`` readings each
(the console loads the last 24 hours of them, draws the map and one plot per station).
The page is loaded ``--loads`` times in one fresh browser profile: the first load is
cold (nothing cached), the others warm (assets revalidated: ``Cache-Control:
no-cache``). For each load, from the browser's own performance API:

* first paint and first contentful paint (``performance.getEntriesByType('paint')``);
* DOM ready and load (the navigation entry);
* ready: the moment the page marks itself ready (``<body data-ready="1">``: names,
  map, every record of the last 24 h, plots drawn, the live stream asked for), seen by
  a MutationObserver installed before the page's own scripts run.

Last line: one JSON object; ``pass`` holds if the median first contentful paint is at
most ``--limit-ms`` (1000 ms by default: a console on the city's own network should
show something within a second).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from citynode.cluster import Cluster, LocalNode
from citynode.identity import CERT_FILE, TLS_DIR

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Installed before any script of the page: when <body data-ready="1"> appears, keep
# performance.now() (a MutationObserver sees it at once; polling from Selenium would add
# its round trip).
_READY_OBSERVER = """
window.__citynodeReadyAt = null;
new MutationObserver((_, obs) => {
  if (document.body && document.body.dataset.ready === "1") {
    window.__citynodeReadyAt = performance.now();
    obs.disconnect();
  }
}).observe(document, {subtree: true, attributes: true, attributeFilter: ["data-ready"]});
"""


def spki_hash(node: LocalNode) -> str:
    """base64 SHA-256 of the node certificate's public key (Chromium trusts that key)."""
    cert = x509.load_pem_x509_certificate((node.dir / TLS_DIR / CERT_FILE).read_bytes())
    der = cert.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def chromium(profile: Path, trust: str) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            sys.exit(f"error: {path} is missing: apt-get install chromium chromium-driver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                 f"--ignore-certificate-errors-spki-list={trust}", "--window-size=1280,900"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": _READY_OBSERVER})
    return driver


def load_once(driver: Any, url: str, timeout: float = 60.0) -> dict[str, float]:
    """Load the console once; its timings (ms since navigation start)."""
    driver.get(url)
    deadline = time.monotonic() + timeout
    while driver.execute_script("return window.__citynodeReadyAt") is None:
        if time.monotonic() > deadline:
            raise SystemExit(f"error: the console was not ready within {timeout} s")
        time.sleep(0.05)
    t = driver.execute_script("""
        const p = Object.fromEntries(performance.getEntriesByType('paint')
                                     .map(e => [e.name, e.startTime]));
        const n = performance.getEntriesByType('navigation')[0];
        return {fp: p['first-paint'], fcp: p['first-contentful-paint'],
                dom: n.domContentLoadedEventEnd, load: n.loadEventEnd,
                ready: window.__citynodeReadyAt,
                markers: document.querySelectorAll('#map a[data-station]').length};
    """)
    return {k: float(v) for k, v in t.items() if v is not None}


async def publish(node: LocalNode, stations: int, readings: int) -> None:
    """``stations`` stations around Jakarta, ``readings`` hourly readings each (the
    newest now), in batches of one station's readings."""
    now = dt.datetime.now(dt.UTC)
    for s in range(stations):
        lon, lat = 106.7 + (s % 10) * 0.03, -6.3 + (s // 10) * 0.03
        items = [{"dateObserved": (now - dt.timedelta(hours=readings - 1 - h))
                  .strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "location": {"type": "Point", "coordinates": [lon, lat]},
                  "pm25": 5.0 + (s * 7 + h * 3) % 60, "no2": 20.0 + (s + h) % 80}
                 for h in range(readings)]
        await node.publish("air-quality", "AirQualityObserved", items, subject=f"ST-{s:03}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stations", type=int, default=40)
    ap.add_argument("--readings", type=int, default=24, help="per station, hourly")
    ap.add_argument("--loads", type=int, default=10)
    ap.add_argument("--limit-ms", type=float, default=1000.0,
                    help="most median first contentful paint that passes")
    ap.add_argument("--dir", default=None, help="where the node's data dir goes")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="citynode-bench-console-", dir=args.dir))
    runs: list[dict[str, float]] = []
    markers = 0
    try:
        cluster = Cluster(base)
        [node] = cluster.create(["Jakarta"])

        async def setup() -> None:
            await cluster.start()
            await publish(node, args.stations, args.readings)
            await cluster.close()

        asyncio.run(setup())
        driver = chromium(base / "profile", spki_hash(node))
        try:
            for _ in range(args.loads):
                runs.append(load_once(driver, node.url + "/"))
            markers = int(runs[-1].get("markers", 0))
        finally:
            driver.quit()
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)

    if markers != args.stations:
        sys.exit(f"error: the map shows {markers} stations, {args.stations} were published")

    def col(key: str) -> list[float]:
        return [r[key] for r in runs if key in r]

    cold, warm = runs[0], runs[1:] or runs
    fcp = statistics.median(col("fcp"))
    print(f"console of a node holding {args.stations} stations x {args.readings} readings "
          f"({args.stations * args.readings:,} records), headless Chromium, 127.0.0.1")
    print(f"{'load':>6} {'first paint':>12} {'first cont.':>12} {'DOM ready':>10} "
          f"{'load':>8} {'ready':>8}   (ms)")
    for i, r in enumerate(runs):
        print(f"{'cold' if i == 0 else i:>6} {r.get('fp', float('nan')):12.0f} "
              f"{r.get('fcp', float('nan')):12.0f} {r['dom']:10.0f} {r['load']:8.0f} "
              f"{r['ready']:8.0f}")
    print(f"median first contentful paint {fcp:.0f} ms (limit {args.limit_ms:.0f} ms); "
          f"median ready with data {statistics.median(col('ready')):.0f} ms")
    print(json.dumps({
        "bench": "console", "stations": args.stations, "records": args.stations * args.readings,
        "loads": len(runs),
        "first_paint_ms_cold": round(cold.get("fp", float("nan")), 1),
        "fcp_ms_cold": round(cold.get("fcp", float("nan")), 1),
        "ready_ms_cold": round(cold["ready"], 1),
        "first_paint_ms_median": round(statistics.median(col("fp")), 1),
        "fcp_ms_median": round(fcp, 1),
        "fcp_ms_warm_median": round(statistics.median([r["fcp"] for r in warm]), 1),
        "ready_ms_median": round(statistics.median(col("ready")), 1),
        "limit_ms": args.limit_ms, "pass": fcp <= args.limit_ms,
        "python": sys.version.split()[0]}))


if __name__ == "__main__":
    main()
