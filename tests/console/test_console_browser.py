"""The web console in a real browser: Debian's Chromium, driven by Selenium through
Debian's chromedriver, against two real ``citynode run`` processes that are partners
over HTTPS. A missing browser is a failure, never a skip (.ci/run installs it).

The browser trusts exactly the node's certificate (by its public key hash, for this
test's profile only), loads the console, and the test checks: no console error and no
CSP violation; the map's markers are the stations published (with the AQI the EPA
breakpoints give); a record published at the partner shows on the live view within
2 s; every plot's time axis is labelled in clock times at whole-second steps; the
operator view is guarded by the sign-in, says when a partner's last error was (and
shows it as history once the partner is up again), and signing out leaves no console
cookie in the browser. It saves desktop and phone-width screenshots to
``build/screenshots/`` in the checkout (``SCREENSHOTS``; ``CITYNODE_SCREENSHOT_DIR``
moves them; ``CITYNODE_SCREENSHOT=1`` also copies them to docs/console.png and
docs/console-phone.png) and prints the console's time to first paint
(``scripts/bench-console`` measures it properly).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from citynode.cluster import Cluster, LocalNode
from citynode.identity import CERT_FILE, TLS_DIR
from tests.conftest import eventually

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FEED = "air-quality"
AQ = "AirQualityObserved"
REPO = Path(__file__).resolve().parents[2]
#: Where the screenshots go (CI keeps this dir as an artifact); build/ is not tracked.
SCREENSHOTS = Path(os.environ.get("CITYNODE_SCREENSHOT_DIR", REPO / "build" / "screenshots"))


def spki_hash(node: LocalNode) -> str:
    """base64 SHA-256 of the node certificate's public key: what Chromium's
    --ignore-certificate-errors-spki-list takes (that key only, no other)."""
    cert = x509.load_pem_x509_certificate((node.dir / TLS_DIR / CERT_FILE).read_bytes())
    der = cert.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


class Browser:
    """One headless Chromium with a fresh profile."""

    def __init__(self, profile: Path, trust: list[str]) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        for path in (CHROMIUM, CHROMEDRIVER):
            if not os.access(path, os.X_OK):
                pytest.fail(f"{path} is missing: apt-get install chromium chromium-driver "
                            "(.ci/run does)")
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                     "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                     "--ignore-certificate-errors-spki-list=" + ",".join(trust),
                     "--window-size=1280,900"):
            opts.add_argument(flag)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
        self.driver.set_script_timeout(20)

    def logs(self) -> list[dict[str, Any]]:
        return list(self.driver.get_log("browser"))

    def wait(self, condition: Any, timeout: float = 20.0, what: str = "") -> Any:
        from selenium.common.exceptions import (
            StaleElementReferenceException,
            TimeoutException,
        )
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            # Live updates redraw the tables: an element found may go stale at once.
            return WebDriverWait(self.driver, timeout, poll_frequency=0.02,
                                 ignored_exceptions=(StaleElementReferenceException,)
                                 ).until(condition)
        except TimeoutException:
            pytest.fail(f"not within {timeout} s: {what}")

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def fetch_status(self, path: str) -> int:
        """The status of a same-origin GET made by the page itself (its cookies)."""
        return int(self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(arguments[0], {cache: 'no-store'}).then(r => done(r.status),"
            " e => done(-1));", path))

    def screenshot(self, path: Path, width: int) -> None:
        """The whole page at ``width`` CSS pixels."""
        self.driver.set_window_size(width, 900)
        time.sleep(0.4)  # the plots resize after a short debounce
        height = int(self.js("return document.documentElement.scrollHeight"))
        self.driver.set_window_size(width, min(height + 100, 8000))
        self.js("window.scrollTo(0, 0)")
        time.sleep(0.4)
        self.driver.save_screenshot(str(path))

    def quit(self) -> None:
        self.driver.quit()


@pytest.fixture
def browsers(tmp_path: Path) -> Iterator[list[Browser]]:
    made: list[Browser] = []
    yield made
    for b in made:
        b.quit()


def aq(lon: float, lat: float, **values: float) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"dateObserved": now, "location": {"type": "Point", "coordinates": [lon, lat]},
            **values}


def station_key(node: LocalNode, subject: str) -> str:
    return f"{node.node_id}|{FEED}|{subject}"


def errors_in(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Console entries that are errors, or that mention a blocked resource (a CSP
    violation is reported as an error; the match on text is a second net)."""
    return [e for e in logs if e.get("level") == "SEVERE"
            or "Content Security Policy" in e.get("message", "")
            or "Refused to" in e.get("message", "")]


async def test_console_in_chromium(cluster: Cluster, browsers: list[Browser],
                                   tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    jakarta, surabaya = cluster.create(["Jakarta", "Surabaya"])
    # Issue 13: the partner's feed states its terms and a heartbeat cadence; the
    # console shows both, and the feed's completeness state.
    with (surabaya.dir / "node.toml").open("a") as f:
        f.write(f'\n[feeds.{FEED}]\naccess = "public"\nlicense = "CC-BY-4.0"\n'
                'attribution = "Surabaya air network"\ncadence_seconds = 2\n')
    await cluster.start()
    await cluster.link(jakarta, surabaya)
    # Stations: three at the partner, one of the node's own. Expected AQI (EPA 2024):
    # PM2.5 35.0 -> 99; PM2.5 55.0 -> 149; NO2 200 µg/m³ = 106 ppb -> 102 (over
    # PM2.5 5.0 -> 28); PM2.5 9.0 -> 50.
    published = [
        (surabaya, "SBY-Wonorejo", aq(112.80, -7.31, pm25=35.0, pm10=40.0), 99),
        (surabaya, "SBY-Kebonsari", aq(112.71, -7.33, pm25=55.0), 149),
        (surabaya, "SBY-Tandes", aq(112.67, -7.25, pm25=5.0, no2=200.0), 102),
        (jakarta, "DKI1-Bundaran-HI", aq(106.82, -6.19, pm25=9.0), 50),
    ]
    for node, subject, payload, _aqi in published:
        await node.publish(FEED, AQ, [payload], subject=subject)

    async def replicated() -> bool:
        feeds = {(f["origin"], f["feed"]): f["seq"] for f in await jakarta.feeds()}
        return feeds.get((surabaya.node_id, FEED)) == 3

    await eventually(replicated)

    b = Browser(tmp_path / "profile", [spki_hash(jakarta)])
    browsers.append(b)
    b.driver.get(jakarta.url + "/")
    b.wait(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1",
           what="the console loaded")
    b.wait(lambda d: "connected" in d.find_element(By.ID, "live-status").text,
           what="the live stream opened")
    paint = b.js("return performance.getEntriesByType('paint')"
                 ".map(e => [e.name, e.startTime])")
    nav = b.js("const n = performance.getEntriesByType('navigation')[0];"
               "return [n.responseEnd, n.domContentLoadedEventEnd, n.loadEventEnd]")
    paints = dict(paint)
    assert "first-contentful-paint" in paints, paint
    print(f"\nconsole time to first paint: {paints.get('first-paint', 0):.0f} ms, first "
          f"contentful paint {paints['first-contentful-paint']:.0f} ms, DOM ready "
          f"{nav[1]:.0f} ms, load {nav[2]:.0f} ms (headless Chromium, 127.0.0.1)")
    assert b.js("return document.title").startswith("Jakarta")
    # Keyboard: the first Tab reaches the skip link; markers and station names are
    # links (focusable, with a name); every form field has a label.
    from selenium.webdriver.common.keys import Keys

    b.driver.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    assert b.js("return document.activeElement.className") == "skip"
    assert b.js("return [...document.querySelectorAll('input, select, textarea')]"
                ".every(i => i.labels && i.labels.length > 0)")
    assert b.js("return [...document.querySelectorAll('#map a')].every(a =>"
                " a.getAttribute('href').startsWith('#plot-') && a.tabIndex === 0)")
    # Loading the page, signed out, logs nothing: no error, no CSP violation.
    assert errors_in(b.logs()) == []

    # The markers are the stations published, each with the AQI the breakpoints give.
    expected = {station_key(n, s): aqi for n, s, _p, aqi in published}
    markers = b.js("return [...document.querySelectorAll('#map a[data-station]')].map(a =>"
                   " [a.dataset.station, a.querySelector('circle').getAttribute('class'),"
                   " a.getAttribute('aria-label')])")
    assert {m[0] for m in markers} == set(expected)
    for key, cls, label in markers:
        # The band's colour: 0-50 -> aqi-1, 51-100 -> aqi-2, 101-150 -> aqi-3.
        assert cls == "aqi-" + str(1 + (expected[key] > 50) + (expected[key] > 100)), key
        # One reading is less than the 24 h the PM AQI averages over: marked "≈";
        # one hourly reading covers the hour NO2's averages over (SBY-Tandes).
        mark = "" if key.endswith("SBY-Tandes") else "≈"
        assert f"AQI {mark}{expected[key]}," in label, label
    rows = b.js("return [...document.querySelectorAll('#stations tbody tr')].map(r =>"
                " [r.dataset.station, r.dataset.aqi])")
    assert {k: int(v) for k, v in rows} == expected
    # Its colour band is the EPA's for that AQI (99: Moderate, 149: USG, 50: Good).
    row = b.driver.find_element(By.CSS_SELECTOR, f'#stations tr[data-station="'
                                f'{station_key(surabaya, "SBY-Wonorejo")}"]')
    assert "Moderate" in row.text and "35.0" in row.text
    assert len(b.driver.find_elements(By.CSS_SELECTOR, "#plots figure.plot")) == 4
    assert len(b.driver.find_elements(By.CSS_SELECTOR, "#plots canvas")) >= 4
    freshness = b.driver.find_element(By.ID, "freshness").text
    assert "Jakarta (this node)" in freshness and "Surabaya" in freshness

    # Completeness and terms per origin and feed: the partner's feed is live or silent
    # (its heartbeats arrive), with its licence and attribution; the node's own feed
    # states no terms.
    def feed_row(d: Any, origin: LocalNode) -> Any:
        return d.find_element(By.CSS_SELECTOR, f'#feeds tr[data-feed="{origin.node_id}|{FEED}"]')

    b.wait(lambda d: feed_row(d, surabaya).get_attribute("data-state") in ("live", "silent"),
           timeout=30, what="the partner's feed with a known completeness state")
    cells = [c.text for c in feed_row(b.driver, surabaya).find_elements(By.TAG_NAME, "td")]
    assert cells[0] == "Surabaya" and cells[5] in ("live", "silent"), cells
    assert cells[6] == "CC-BY-4.0" and cells[7] == "Surabaya air network", cells
    own = [c.text for c in feed_row(b.driver, jakarta).find_elements(By.TAG_NAME, "td")]
    assert own[6] == "not stated" and own[7] == "—", own

    # Live: a record published at the partner appears here within 2 s.
    live = station_key(surabaya, "SBY-Live")
    start = time.monotonic()
    await surabaya.publish(FEED, AQ, [aq(112.75, -7.28, pm25=12.3)], subject="SBY-Live")
    b.wait(lambda d: d.find_elements(By.CSS_SELECTOR, f'#stations tr[data-station="{live}"]'),
           timeout=max(0.1, 2.0 - (time.monotonic() - start)),
           what="the partner's new record on the live view")
    elapsed = time.monotonic() - start
    print(f"partner publish -> shown on the console: {elapsed * 1000:.0f} ms")
    assert elapsed <= 2.0
    assert b.driver.find_elements(By.CSS_SELECTOR, f'#map a[data-station="{live}"]')
    assert b.driver.find_elements(By.CSS_SELECTOR, f'#plots figure[data-station="{live}"]')
    # A new value of a known station updates its row (and its plot's caption).
    wono = station_key(surabaya, "SBY-Wonorejo")
    await surabaya.publish(FEED, AQ, [aq(112.80, -7.31, pm25=20.0)], subject="SBY-Wonorejo")
    b.wait(lambda d: "20.0" in d.find_element(
        By.CSS_SELECTOR, f'#stations tr[data-station="{wono}"]').text,
        what="an update of a known station")
    caption = b.driver.find_element(By.CSS_SELECTOR, f'#plots figure[data-station="{wono}"]'
                                    " figcaption").text
    assert caption.startswith("2 readings") and "latest 20.0" in caption
    # Every plot's time axis is labelled in clock times, at whole-second steps: two
    # readings seconds apart used to get sub-second ticks (one second labelled many
    # times, or fractions).
    # One plot a row (the widest plots, the most ticks): a few seconds over ~900 px.
    b.driver.set_window_size(960, 900)
    time.sleep(0.6)  # the plots resize after a short debounce
    ticks = b.js("return [...document.querySelectorAll('#plots .chart')].map(c =>"
                 " c.dataset.xTicks || '')")
    b.driver.set_window_size(1280, 900)
    time.sleep(0.6)
    assert len(ticks) == 5 and all(ticks), ticks
    for labels in (t.split("|") for t in ticks):
        assert all(re.fullmatch(r"\d\d:\d\d:\d\d", x) for x in labels), labels
        assert len(set(labels)) == len(labels), labels

    assert errors_in(b.logs()) == []

    # The operator view: refused without a session, refused with a wrong token.
    assert not b.driver.find_element(By.ID, "op-view").is_displayed()
    assert b.fetch_status("/console/api/operator") == 403
    assert b.fetch_status("/v1/admin/partners") == 403
    token_input = b.driver.find_element(By.ID, "token")
    token_input.send_keys("not-the-token")
    b.driver.find_element(By.CSS_SELECTOR, "#signin button[type=submit]").click()
    b.wait(lambda d: "wrong" in d.find_element(By.ID, "signin-error").text,
           what="the wrong token refused")
    assert not b.driver.find_element(By.ID, "op-view").is_displayed()
    assert b.fetch_status("/console/api/operator") == 403
    # The right token (typed, then Enter: the form works from the keyboard).
    token_input.send_keys(jakarta.token + Keys.ENTER)
    b.wait(lambda d: d.find_element(By.ID, "op-view").is_displayed(),
           what="the operator view after signing in")
    partners = b.driver.find_element(By.ID, "op-partners")
    b.wait(lambda d: "Surabaya" in partners.text and "up" in partners.text,
           what="the partner listed as up")
    assert b.fetch_status("/console/api/operator") == 200
    # The session does not open the bearer-token operator API.
    assert b.fetch_status("/v1/admin/partners") == 403
    assert b.fetch_status("/metrics") == 403
    # The token is nowhere the page's scripts can read: cookies are HttpOnly, the
    # field was cleared, no storage was used.
    assert b.js("return document.cookie") == ""
    assert b.js("return localStorage.length + sessionStorage.length") == 0
    assert jakarta.token not in b.driver.page_source
    feeds_text = b.driver.find_element(By.ID, "op-feeds").text
    assert FEED in feeds_text and "(own)" in feeds_text
    # The operator's view of every feed: the partner's cadence (from its card) and state.
    op_row = b.driver.find_element(By.CSS_SELECTOR,
                                   f'#op-feeds tr[data-feed="{surabaya.node_id}|{FEED}"]')
    op_cells = [c.text for c in op_row.find_elements(By.TAG_NAME, "td")]
    assert op_cells[5] == "2 s" and op_cells[8] in ("live", "silent", "lagging"), op_cells
    assert "citynode_records_stored" in b.driver.find_element(By.ID, "op-metrics").text

    shots = SCREENSHOTS
    shots.mkdir(parents=True, exist_ok=True)
    for old in ("console-desktop.png", "console-phone.png"):
        (shots / old).unlink(missing_ok=True)  # a stale file must not pass for a new one
    b.screenshot(shots / "console-desktop.png", 1280)
    b.screenshot(shots / "console-phone.png", 390)
    # Usable at phone width: nothing wider than the screen but the scrolling tables.
    overflow = b.js("return document.documentElement.scrollWidth")
    assert overflow <= 390, overflow
    for shot in ("console-desktop.png", "console-phone.png"):
        assert (shots / shot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", shot
    print(f"screenshots: {shots / 'console-desktop.png'}, {shots / 'console-phone.png'}")
    if os.environ.get("CITYNODE_SCREENSHOT") == "1":
        shutil.copy(shots / "console-desktop.png", REPO / "docs" / "console.png")
        shutil.copy(shots / "console-phone.png", REPO / "docs" / "console-phone.png")

    # A partner's last error says when it was; once the partner is up again it is
    # shown as history (older than the last good exchange), not as a current error.
    surabaya.stop()
    b.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#op-partners td.err-recent"),
           timeout=60, what="the stopped partner's error")
    recent = b.driver.find_element(By.CSS_SELECTOR, "#op-partners td.err-recent").text
    assert re.search(r"\((\d+ (s|min)) ago\)$", recent), recent
    await cluster.start([surabaya])
    b.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#op-partners td.err-stale"),
           timeout=90, what="the partner up again, its error shown as history")
    stale = b.driver.find_element(By.CSS_SELECTOR, "#op-partners td.err-stale")
    assert stale.text.startswith("before the last success: ") and " ago)" in stale.text
    assert stale.get_attribute("title").startswith("at 20")

    # Sign out: the view closes, the old session is refused, the cookies are gone
    # (both were there: the session's and its CSRF token's).
    b.driver.set_window_size(1280, 900)
    assert {c["name"] for c in b.driver.get_cookies()} >= {
        "__Host-cn_session", "__Host-cn_csrf"}, b.driver.get_cookies()
    b.driver.find_element(By.ID, "signout").click()
    b.wait(lambda d: not d.find_element(By.ID, "op-view").is_displayed(),
           what="signed out")
    assert b.fetch_status("/console/api/operator") == 403
    # No console cookie is left in the browser (Selenium sees HttpOnly ones too).
    assert {c["name"] for c in b.driver.get_cookies()} & {
        "__Host-cn_session", "__Host-cn_csrf"} == set(), b.driver.get_cookies()

    # Since the live part, the only errors are the refusals asked for above (Chromium
    # logs every 4xx answer): nothing else failed, nothing was blocked.
    refused = {jakarta.url + p for p in ("/console/api/operator", "/v1/admin/partners",
                                         "/metrics", "/console/session")}
    bad = [e for e in errors_in(b.logs())
           if not (e.get("source") == "network" and "status of 403" in e["message"]
                   and e["message"].split(" - ")[0] in refused)]
    assert not bad, json.dumps(bad, indent=1)
