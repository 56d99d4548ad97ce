/* citynode console: plain JavaScript, no build step. Reads only this node's own API
   (same origin: the CSP allows nothing else) and never puts received text into HTML:
   every value goes in through textContent or an attribute. docs/CONSOLE.md. */
"use strict";

(function () {
  const SVGNS = "http://www.w3.org/2000/svg";
  const DAY_MS = 24 * 3600 * 1000;
  const MAX_PAGES = 20;          // initial load: at most 20 pages of 1000 records
  const MAX_POINTS = 2000;       // per station kept for the plots
  const MAX_PLOTS = 24;          // stations beyond this are in the table only
  const state = {
    names: {}, self: null, feeds: [], liveness: new Map(), stations: new Map(), plots: new Map(),
    csrf: null, opTimer: null, land: null, firstPaint: null,
  };

  // ------------------------------------------------------------------ small helpers

  function $(sel) { return document.querySelector(sel); }
  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function svg(tag, attrs) {
    const e = document.createElementNS(SVGNS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function row(cells) {
    const tr = document.createElement("tr");
    for (const c of cells) {
      if (c instanceof Node) { tr.appendChild(c); continue; }
      const td = el("td", c === null || c === undefined ? "—" : c);
      if (typeof c === "number") td.className = "num";
      tr.appendChild(td);
    }
    return tr;
  }
  function cell(text, cls) { return el("td", text, cls); }
  async function getJSON(path) {
    const r = await fetch(path, { headers: { Accept: "application/json" }, cache: "no-store" });
    if (!r.ok) {
      const err = new Error(path + ": " + r.status);
      err.status = r.status;
      try { err.body = await r.json(); } catch (e) { err.body = null; }
      throw err;
    }
    return r.json();
  }
  function short(id) { return id && id.length > 14 ? id.slice(0, 10) + "…" + id.slice(-4) : id; }
  function cityName(origin) { return state.names[origin] || short(origin); }
  function ago(ms) {
    if (ms === null || ms === undefined) return "—";
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 90) return s + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    if (s < 172800) return Math.round(s / 3600) + " h";
    return Math.round(s / 86400) + " d";
  }
  function iso(ms) { return ms ? new Date(ms).toISOString().replace(".000Z", "Z") : "—"; }
  function fmt(v, digits) {
    if (v === null || v === undefined || !isFinite(v)) return "—";
    return Number(v).toFixed(digits === undefined ? 1 : digits);
  }

  // ------------------------------------------------------------------ AQI (US EPA)
  // US EPA, "Technical Assistance Document for the Reporting of Daily Air Quality --
  // the Air Quality Index (AQI)", EPA-454/B-24-002, May 2024: breakpoints per
  // pollutant, the concentration truncated as the document says, then linear
  // interpolation inside the band; the station's AQI is the highest sub-index.
  // Concentrations are the mean over each pollutant's averaging period of the values
  // held (PM 24 h, O3 and CO 8 h, NO2 and SO2 1 h); gases are converted from µg/m³ at
  // 25 °C and 1 atm (24.45 L/mol).
  const BANDS = [
    [0, 50, "Good"], [51, 100, "Moderate"], [101, 150, "Unhealthy for sensitive groups"],
    [151, 200, "Unhealthy"], [201, 300, "Very unhealthy"], [301, 500, "Hazardous"],
  ];
  const POLLUTANTS = {
    pm25: { label: "PM2.5", hours: 24, unit: "µg/m³", conv: (u) => u, trunc: 1,
      bp: [0.0, 9.0, 9.1, 35.4, 35.5, 55.4, 55.5, 125.4, 125.5, 225.4, 225.5, 325.4] },
    pm10: { label: "PM10", hours: 24, unit: "µg/m³", conv: (u) => u, trunc: 0,
      bp: [0, 54, 55, 154, 155, 254, 255, 354, 355, 424, 425, 604] },
    o3: { label: "O₃", hours: 8, unit: "ppm", conv: (u) => u * 24.45 / 48.00 / 1000, trunc: 3,
      bp: [0.000, 0.054, 0.055, 0.070, 0.071, 0.085, 0.086, 0.105, 0.106, 0.200],
      // Above 0.200 ppm the 8-hour table ends; the 1-hour table's upper bands apply.
      above: [0.205, 0.404, 0.405, 0.604] },
    no2: { label: "NO₂", hours: 1, unit: "ppb", conv: (u) => u * 24.45 / 46.01, trunc: 0,
      bp: [0, 53, 54, 100, 101, 360, 361, 649, 650, 1249, 1250, 2049] },
    so2: { label: "SO₂", hours: 1, unit: "ppb", conv: (u) => u * 24.45 / 64.07, trunc: 0,
      bp: [0, 35, 36, 75, 76, 185, 186, 304, 305, 604, 605, 1004] },
    co: { label: "CO", hours: 8, unit: "ppm", conv: (u) => u * 24.45 / 28.01 / 1000, trunc: 1,
      bp: [0.0, 4.4, 4.5, 9.4, 9.5, 12.4, 12.5, 15.4, 15.5, 30.4, 30.5, 50.4] },
  };
  const SHOWN = ["pm25", "pm10", "no2", "o3", "so2", "co"];
  const MOLAR = { no2: 46.01, o3: 48.00, so2: 64.07, co: 28.01, no: 30.01, nh3: 17.03 };

  function truncate(v, digits) { const f = Math.pow(10, digits); return Math.floor(v * f + 1e-9) / f; }

  function subIndex(name, conc) {
    const p = POLLUTANTS[name];
    let c = truncate(p.conv(conc), p.trunc);
    let bp = p.bp;
    let bands = BANDS;
    if (p.above && c > bp[bp.length - 1]) { bp = p.above; bands = BANDS.slice(4); }
    for (let i = 0; i < bp.length; i += 2) {
      const lo = bp[i], hi = bp[i + 1];
      const last = i + 2 >= bp.length;
      if (c <= hi || last) {
        if (c < lo) c = lo;   // between two bands after truncation: cannot happen, kept safe
        const b = bands[i / 2];
        return Math.round((b[1] - b[0]) / (hi - lo) * (c - lo) + b[0]);
      }
    }
    return null;
  }
  function band(aqi) {
    if (aqi === null || aqi === undefined) return 0;
    for (let i = 0; i < BANDS.length; i++) if (aqi <= BANDS[i][1]) return i + 1;
    return 6;
  }
  function bandName(aqi) { const b = band(aqi); return b ? BANDS[b - 1][2] : "No value"; }

  // A measurement: a number in its default unit, or {value, unitCode} (core/types.py).
  // Returned in µg/m³ (mg/m³ for CO, its default), or null if not convertible.
  function measure(name, raw) {
    let v = raw, unit = null;
    if (raw !== null && typeof raw === "object") { v = raw.value; unit = raw.unitCode || null; }
    if (typeof v !== "number" || !isFinite(v) || v < 0) return null;
    const dflt = name === "co" ? "GP" : "GQ";
    unit = unit || dflt;
    let ug;
    if (unit === "GQ") ug = v;
    else if (unit === "GP") ug = v * 1000;
    else if ((unit === "59" || unit === "61") && MOLAR[name]) {
      ug = (unit === "59" ? v * 1000 : v) * MOLAR[name] / 24.45;
    } else return null;
    return name === "co" ? ug / 1000 : ug;
  }

  // ------------------------------------------------------------------ stations

  function position(loc) {
    if (!loc || typeof loc !== "object") return null;
    let c = loc.coordinates;
    const depth = { Point: 0, LineString: 1, Polygon: 2 }[loc.type];
    if (depth === undefined) return null;
    for (let i = 0; i < depth; i++) c = Array.isArray(c) ? c[0] : null;
    if (!Array.isArray(c) || typeof c[0] !== "number" || typeof c[1] !== "number") return null;
    if (Math.abs(c[0]) > 180 || Math.abs(c[1]) > 90) return null;
    return [c[0], c[1]];
  }

  // One record in; the key of the station it changed, or null. Tombstones (a record erased or pruned
  // keeps its place but not its data) and records without a location are skipped.
  function addRecord(rec) {
    if (!rec || rec.type !== "AirQualityObserved" || rec.erased || rec.pruned) return null;
    const d = rec.data;
    if (!d || typeof d !== "object") return null;
    const pos = position(d.location);
    if (!pos) return null;
    const label = String(d.stationName || rec.subject || d.stationCode || (pos[1].toFixed(3) + ", " + pos[0].toFixed(3)));
    const ident = d.stationCode || rec.subject || d.stationName || (pos[0] + "," + pos[1]);
    const key = rec.origin + "|" + rec.feed + "|" + ident;
    let t = Date.parse(d.dateObserved);
    if (!isFinite(t)) t = rec.time;
    let st = state.stations.get(key);
    if (!st) {
      st = { key, label, origin: rec.origin, feed: rec.feed, pos, points: [], latest: null, latestT: -Infinity };
      state.stations.set(key, st);
    }
    const values = {};
    for (const name of SHOWN) {
      if (name in d) { const m = measure(name, d[name]); if (m !== null) values[name] = m; }
    }
    st.points.push({ t, values });
    if (st.points.length > 1 && st.points[st.points.length - 2].t > t) st.points.sort((a, b) => a.t - b.t);
    if (st.points.length > MAX_POINTS) st.points.splice(0, st.points.length - MAX_POINTS);
    if (t >= st.latestT) { st.latestT = t; st.latest = values; st.pos = pos; st.label = label; }
    computeAqi(st);
    return key;
  }

  function computeAqi(st) {
    let best = null, dominant = null, provisional = false;
    st.means = {};
    for (const name of SHOWN) {
      const win = POLLUTANTS[name].hours * 3600 * 1000;
      const pts = st.points.filter((p) => p.t > st.latestT - win && name in p.values);
      if (!pts.length) continue;
      const mean = pts.reduce((s, p) => s + p.values[name], 0) / pts.length;
      st.means[name] = mean;
      const idx = subIndex(name, mean);
      if (idx !== null && (best === null || idx > best)) {
        best = idx; dominant = name;
        // Less than the averaging period held (one reading of an hourly station
        // covers an hour): marked, not hidden.
        const covered = pts[pts.length - 1].t - pts[0].t + 3600 * 1000;
        provisional = covered < win * 0.75;
      }
    }
    st.aqi = best; st.dominant = dominant; st.provisional = provisional;
  }

  function stationId(st) {
    let h = 0;
    for (let i = 0; i < st.key.length; i++) h = (h * 31 + st.key.charCodeAt(i)) >>> 0;
    return "st-" + h.toString(36);
  }

  // ------------------------------------------------------------------ the map

  // TopoJSON (quantized, delta-encoded arcs) -> rings of [lon, lat].
  function decodeLand(topo) {
    const [sx, sy] = topo.transform.scale, [tx, ty] = topo.transform.translate;
    const arcs = topo.arcs.map((arc) => {
      let x = 0, y = 0;
      return arc.map((p) => { x += p[0]; y += p[1]; return [x * sx + tx, y * sy + ty]; });
    });
    const ring = (ids) => {
      const out = [];
      for (const id of ids) {
        const a = id < 0 ? arcs[~id].slice().reverse() : arcs[id];
        out.push(...(out.length ? a.slice(1) : a));
      }
      return out;
    };
    const rings = [];
    for (const g of topo.objects.land.geometries) {
      const polys = g.type === "Polygon" ? [g.arcs] : g.type === "MultiPolygon" ? g.arcs : [];
      for (const poly of polys) for (const r of poly) rings.push(ring(r));
    }
    return rings;
  }

  function drawMap() {
    const map = $("#map");
    clear(map);
    const stations = [...state.stations.values()];
    let minLon = -180, maxLon = 180, minLat = -60, maxLat = 80;
    if (stations.length) {
      minLon = Math.min(...stations.map((s) => s.pos[0])); maxLon = Math.max(...stations.map((s) => s.pos[0]));
      minLat = Math.min(...stations.map((s) => s.pos[1])); maxLat = Math.max(...stations.map((s) => s.pos[1]));
      const span = Math.max(maxLon - minLon, (maxLat - minLat) * 1.6, 4);
      const cx = (minLon + maxLon) / 2, cy = (minLat + maxLat) / 2;
      minLon = cx - span * 0.65; maxLon = cx + span * 0.65;
      minLat = Math.max(-85, cy - span * 0.42); maxLat = Math.min(85, cy + span * 0.42);
    }
    // Equirectangular, longitudes scaled by cos(mid-latitude): shapes stay right nearby.
    const k = Math.max(0.2, Math.cos((minLat + maxLat) / 2 * Math.PI / 180));
    const X = (lon) => lon * k, Y = (lat) => -lat;
    const w = (maxLon - minLon) * k, h = maxLat - minLat;
    map.setAttribute("viewBox", [X(minLon), Y(maxLat), w, h].map((v) => v.toFixed(4)).join(" "));
    map.setAttribute("preserveAspectRatio", "xMidYMid meet");
    const title = svg("title", {});
    title.textContent = stations.length + " stations on the map";
    map.appendChild(title);
    if (state.land) {
      let dpath = "";
      for (const r of state.land) {
        dpath += "M" + r.map((p) => X(p[0]).toFixed(3) + " " + Y(p[1]).toFixed(3)).join("L") + "Z";
      }
      map.appendChild(svg("path", { d: dpath, class: "land" }));
    }
    const step = niceStep((maxLon - minLon) / 4);
    let grid = "";
    for (let lon = Math.ceil(minLon / step) * step; lon <= maxLon; lon += step) grid += "M" + X(lon) + " " + Y(maxLat) + "V" + Y(minLat);
    for (let lat = Math.ceil(minLat / step) * step; lat <= maxLat; lat += step) grid += "M" + X(minLon) + " " + Y(lat) + "H" + X(maxLon);
    map.appendChild(svg("path", { d: grid, class: "grid" }));
    const r = Math.max(w, h) / 70;
    for (const st of stations) {
      const label = st.label + " (" + cityName(st.origin) + "): AQI " + (st.aqi === null ? "none" : (st.provisional ? "≈" : "") + st.aqi) + ", " + bandName(st.aqi);
      const a = svg("a", { href: "#plot-" + stationId(st), "aria-label": label, "data-station": st.key });
      const c = svg("circle", { cx: X(st.pos[0]).toFixed(4), cy: Y(st.pos[1]).toFixed(4), r: r.toFixed(4), class: "aqi-" + band(st.aqi) });
      const t = svg("title", {}); t.textContent = label;
      c.appendChild(t);
      a.appendChild(c);
      const show = () => { $("#map-focus").textContent = label; };
      a.addEventListener("focus", show);
      a.addEventListener("mouseenter", show);
      map.appendChild(a);
    }
  }
  function niceStep(x) {
    for (const s of [0.5, 1, 2, 5, 10, 20, 30, 45, 60]) if (s >= x) return s;
    return 90;
  }

  function drawLegend() {
    const ul = $("#legend");
    clear(ul);
    BANDS.forEach((b, i) => {
      const li = el("li");
      const sw = el("span", "", "swatch aqi-" + (i + 1));
      sw.setAttribute("aria-hidden", "true");
      li.append(sw, el("span", b[0] + "–" + b[1] + " " + b[2]));
      ul.appendChild(li);
    });
  }

  // ------------------------------------------------------------------ table and plots

  function drawStations(changed) {
    const tbody = $("#stations tbody");
    clear(tbody);
    const list = [...state.stations.values()].sort((a, b) => cityName(a.origin).localeCompare(cityName(b.origin)) || a.label.localeCompare(b.label));
    $("#stations-empty").hidden = list.length > 0;
    for (const st of list) {
      const v = st.latest || {};
      const aqiText = st.aqi === null ? "—" : (st.provisional ? "≈" : "") + st.aqi;
      const aqiCell = cell(aqiText, "num aqi-" + band(st.aqi));
      const name = el("td");
      const link = el("a", st.label);
      link.href = "#plot-" + stationId(st);
      name.appendChild(link);
      const tr = row([name, cityName(st.origin), aqiCell, bandName(st.aqi),
        fmt(v.pm25), fmt(v.pm10), fmt(v.no2), fmt(v.o3), fmt(v.so2), fmt(v.co, 2), iso(st.latestT)]);
      for (let i = 4; i <= 9; i++) tr.children[i].className = "num";
      tr.dataset.station = st.key;
      tr.dataset.aqi = st.aqi === null ? "" : String(st.aqi);
      if (changed && changed.has(st.key)) tr.className = "fresh";
      tbody.appendChild(tr);
    }
  }

  const SERIES_COLOURS = { pm25: "#0b5cad", pm10: "#8250df", no2: "#bf3989", o3: "#1a7f37", so2: "#9a6700", co: "#57606a" };

  function plotData(st) {
    const names = SHOWN.filter((n) => st.points.some((p) => n in p.values));
    const xs = st.points.map((p) => p.t / 1000);
    const data = [xs, ...names.map((n) => st.points.map((p) => (n in p.values ? p.values[n] : null)))];
    return { names, data };
  }

  function summary(st, names) {
    const parts = names.map((n) => {
      const vals = st.points.map((p) => p.values[n]).filter((x) => x !== undefined);
      const unit = n === "co" ? "mg/m³" : "µg/m³";
      return POLLUTANTS[n].label + " latest " + fmt(vals[vals.length - 1]) + " " + unit + " (min " + fmt(Math.min(...vals)) + ", max " + fmt(Math.max(...vals)) + ")";
    });
    return st.points.length + " readings from " + iso(st.points[0].t) + " to " + iso(st.latestT) + ". " + parts.join("; ") + ".";
  }

  function drawPlot(st) {
    const id = stationId(st);
    let p = state.plots.get(st.key);
    const { names, data } = plotData(st);
    if (!p) {
      if (state.plots.size >= MAX_PLOTS) return;
      const fig = el("figure", null, "plot");
      fig.id = "plot-" + id;
      fig.tabIndex = -1;
      fig.dataset.station = st.key;
      const h = el("h3", st.label + " — " + cityName(st.origin));
      const chart = el("div", null, "chart");
      chart.setAttribute("role", "img");
      const cap = el("figcaption");
      cap.id = "cap-" + id;
      chart.setAttribute("aria-labelledby", cap.id);
      fig.append(h, chart, cap);
      $("#plots").appendChild(fig);
      p = { fig, chart, cap, names: null, u: null };
      state.plots.set(st.key, p);
    }
    p.cap.textContent = summary(st, names);
    if (typeof uPlot === "undefined") return;
    if (!p.u || p.names.join() !== names.join()) {
      if (p.u) p.u.destroy();
      p.names = names;
      const width = Math.max(240, p.chart.clientWidth || 300);
      p.u = new uPlot({
        width, height: 200, cursor: { drag: { x: false, y: false } },
        // One reading alone: an hour either side (uPlot would widen it to years).
        scales: { x: { time: true, range: (u, lo, hi) => (u.data[0].length === 1 ? [u.data[0][0] - 3600, u.data[0][0] + 3600] : [lo, hi]) } },
        series: [{}, ...names.map((n) => ({ label: POLLUTANTS[n].label, stroke: SERIES_COLOURS[n], width: 1.5, spanGaps: true, points: { size: 5 } }))],
        axes: [{ incrs: TIME_INCRS, values: clockTicks }, { size: 46 }],
      }, data, p.chart);
    } else {
      p.u.setData(data);
    }
  }

  // The time axis of every plot: whole-second steps only (readings come seconds apart at
  // most; a sub-second step labels one second many times), labelled as local clock
  // times. The labels drawn are also kept as text on the chart (data-x-ticks).
  const TIME_INCRS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800, 2592000];
  function clockTicks(u, splits) {
    const span = u.scales.x.max - u.scales.x.min;
    const labels = splits.map((s) => clockTime(s, span));
    if (u.root.parentNode) u.root.parentNode.dataset.xTicks = labels.join("|");
    return labels;
  }
  function clockTime(sec, span) {
    const d = new Date(sec * 1000);
    const p2 = (n) => String(n).padStart(2, "0");
    const hm = p2(d.getHours()) + ":" + p2(d.getMinutes());
    // Over two days or more: the date and the minute; otherwise the time to the second.
    if (span >= 172800) return p2(d.getMonth() + 1) + "-" + p2(d.getDate()) + " " + hm;
    return hm + ":" + p2(d.getSeconds());
  }

  function resizePlots() {
    for (const p of state.plots.values()) {
      if (p.u) p.u.setSize({ width: Math.max(240, p.chart.clientWidth), height: 200 });
    }
  }

  // ------------------------------------------------------------------ feeds and freshness

  // The terms of a feed (its origin's signed card): the licence, and a link to the
  // terms document (https only: the card allows nothing else, checked again here).
  function termsCell(t) {
    const td = el("td");
    if (!t) { td.textContent = "unknown"; td.className = "muted"; return td; }
    if (t.license) td.appendChild(el("span", t.license, "license"));
    if (t.terms_url && /^https:\/\//.test(t.terms_url)) {
      if (t.license) td.appendChild(document.createTextNode(" + "));
      const a = el("a", "terms");
      a.href = t.terms_url;
      a.rel = "noopener noreferrer";
      a.title = "SHA-256 " + (t.terms_digest || "");
      td.appendChild(a);
    }
    if (!td.firstChild) { td.textContent = "not stated"; td.className = "muted"; }
    return td;
  }

  function drawFeeds() {
    const now = Date.now();
    const tb = $("#feeds tbody");
    clear(tb);
    const feeds = state.feeds.slice();
    // Feeds heard of (a heartbeat, a card) of which no record is held yet, or any more.
    for (const [key, lv] of state.liveness) {
      if (!feeds.some((f) => f.origin + "|" + f.feed === key)) {
        feeds.push({ origin: lv.origin, feed: lv.feed, seq: lv.head, count: lv.head, last_time: null, heard: true });
      }
    }
    feeds.sort((a, b) => cityName(a.origin).localeCompare(cityName(b.origin)) || a.feed.localeCompare(b.feed));
    for (const f of feeds) {
      const lv = state.liveness.get(f.origin + "|" + f.feed);
      const st = lv ? lv.state : "unknown";
      const stCell = cell(st, "state state-" + st);
      if (lv && lv.signed_size !== null && lv.signed_size !== undefined) stCell.title = "the origin signed " + lv.signed_size + " records" + (lv.cadence_s ? "; heartbeat every " + lv.cadence_s + " s" : "");
      const terms = lv ? lv.terms : null;
      const tr = row([cityName(f.origin), f.feed, f.seq, f.count, iso(f.last_time), stCell, termsCell(terms), terms && terms.attribution ? terms.attribution : "—"]);
      tr.dataset.feed = f.origin + "|" + f.feed;
      tr.dataset.state = st;
      tb.appendChild(tr);
    }
    const byOrigin = new Map();
    for (const f of feeds) {
      if (f.heard) continue;
      const o = byOrigin.get(f.origin) || { feeds: 0, last: 0 };
      o.feeds += 1; o.last = Math.max(o.last, f.last_time);
      byOrigin.set(f.origin, o);
    }
    const fb = $("#freshness tbody");
    clear(fb);
    for (const [origin, o] of byOrigin) {
      const who = cityName(origin) + (origin === state.self ? " (this node)" : "");
      fb.appendChild(row([who, o.feeds, iso(o.last), ago(now - o.last)]));
    }
  }

  async function loadFeeds() {
    try {
      state.feeds = (await getJSON("/v1/feeds")).feeds || [];
    } catch (e) { /* shown as stale ages; the live status says if the node is gone */ }
    try {
      // Completeness and terms of every feed this page may list (docs/API.md).
      const lv = (await getJSON("/v1/liveness")).feeds || [];
      state.liveness = new Map(lv.map((f) => [f.origin + "|" + f.feed, f]));
    } catch (e) { /* the states stay as last shown */ }
    drawFeeds();
  }

  function noteFeed(rec) {
    const f = state.feeds.find((x) => x.origin === rec.origin && x.feed === rec.feed);
    if (f) {
      if (rec.seq > f.seq) { f.seq = rec.seq; f.count += 1; f.last_time = rec.time; }
    } else {
      state.feeds.push({ origin: rec.origin, feed: rec.feed, seq: rec.seq, count: 1, last_time: rec.time, head: rec.id });
    }
  }

  // ------------------------------------------------------------------ live data

  function redraw(changed) {
    // The table and the map are redrawn whole: keep the keyboard focus where it was
    // (the same station's link or marker), or a live update would throw it away.
    const a = document.activeElement;
    const where = a && a.closest ? (a.closest("#map") ? "#map a" : a.closest("#stations") ? "#stations tr" : null) : null;
    const key = where ? (a.dataset.station || (a.closest("tr") && a.closest("tr").dataset.station)) : null;
    drawStations(changed);
    drawMap();
    if (where && key) {
      const sel = where + '[data-station="' + CSS.escape(key) + '"]';
      const back = document.querySelector(where === "#map a" ? sel : sel + " a");
      if (back) back.focus();
    }
    for (const st of state.stations.values()) if (!changed || changed.has(st.key)) drawPlot(st);
  }

  async function loadRecent() {
    const since = Date.now() - DAY_MS;
    let after = 0, cursor = 0, complete = false;
    for (let page = 0; page < MAX_PAGES; page++) {
      const q = "/v1/records?type=AirQualityObserved&limit=1000&since=" + since + (after ? "&after=" + after : "");
      const out = await getJSON(q);
      for (const rec of out.records) { addRecord(rec); if (rec.cursor > cursor) cursor = rec.cursor; }
      if (out.next === null || out.next === undefined) { complete = true; break; }
      after = out.next; cursor = Math.max(cursor, out.next);
    }
    redraw(null);
    // Everything up to `cursor` is loaded: the stream resumes after it, so nothing
    // published in between is lost. (If the 24 h did not fit, it starts from now.)
    return { since, cursor: complete ? cursor : null };
  }

  // Live records are drawn in batches, at most five times a second: a busy feed
  // must not redraw the table, the map and the plots for every record.
  const pending = new Set();
  let scheduled = null;
  function schedule() {
    if (scheduled !== null) return;
    scheduled = setTimeout(() => {
      scheduled = null;
      if (pending.size) { const changed = new Set(pending); pending.clear(); redraw(changed); }
      drawFeeds();
    }, 200);
  }

  function connect(from) {
    const status = $("#live-status");
    let url = "/v1/stream?type=AirQualityObserved&format=json&since=" + from.since;
    if (from.cursor !== null) url += "&after=" + from.cursor;
    const es = new EventSource(url);
    es.onopen = () => { status.textContent = "Live: connected"; status.className = "live on"; };
    es.onerror = () => { status.textContent = "Live: reconnecting…"; status.className = "live off"; };
    es.addEventListener("record", (ev) => {
      let rec;
      try { rec = JSON.parse(ev.data); } catch (e) { return; }
      noteFeed(rec);
      const key = addRecord(rec);
      if (key !== null) pending.add(key);
      schedule();
    });
  }

  // ------------------------------------------------------------------ operator view

  function showSignedIn(on) {
    $("#signin").hidden = on;
    $("#op-view").hidden = !on;
    if (!on && state.opTimer) { clearInterval(state.opTimer); state.opTimer = null; }
  }

  // A partner's last error, with when it happened; one older than its last good
  // exchange is history (the partner is fine since): said so, and shown muted.
  function errorCell(p, now) {
    if (!p.last_error) return cell("—", "wrap");
    const when = p.last_error_ms ? ago(now - p.last_error_ms) + " ago" : "time unknown";
    const stale = Boolean(p.last_error_ms && p.last_ok_ms && p.last_ok_ms > p.last_error_ms);
    const td = cell((stale ? "before the last success: " : "") + p.last_error + " (" + when + ")", stale ? "wrap muted err-stale" : "wrap err-recent");
    if (p.last_error_ms) td.title = "at " + iso(p.last_error_ms);
    return td;
  }

  function drawOperator(v) {
    state.csrf = v.csrf || state.csrf;
    const now = v.now_ms;
    const up = v.partners.filter((p) => p.up).length;
    $("#op-summary").textContent = v.name + ": " + (v.ready ? "ready" : "NOT READY") + "; " + up + " of " + v.partners.length + " partners up; " + v.forks.length + " fork or split-view proofs held; " + v.pending + " records waiting for a gap to fill; database " + (v.readiness.database_writable ? "writable" : "NOT writable") + (v.readiness.disk_full ? " (disk full)" : "") + ".";
    const pb = $("#op-partners tbody");
    clear(pb);
    for (const p of v.partners) {
      const inv = Object.entries(p.invalid || {}).map(([k, n]) => k + ": " + n).join(", ") || "0";
      const stateCell = cell(p.up ? "up" : "down", p.up ? "up" : "down");
      const err = errorCell(p, now);
      pb.appendChild(row([(p.name || "") + " " + short(p.node_id), stateCell, p.last_ok_ms ? ago(now - p.last_ok_ms) + " ago" : "never", p.failures, p.queue, inv, p.clock_offset_s === null || p.clock_offset_s === undefined ? "—" : fmt(p.clock_offset_s, 1) + " s", err]));
    }
    const fb = $("#op-feeds tbody");
    clear(fb);
    for (const f of v.feeds) {
      const late = f.late_s === null ? cell("no cadence declared", "muted") : cell(f.late_s > 0 ? ago(f.late_s * 1000) : "on time", f.late_s > 0 ? "late" : "");
      const st = f.state || "unknown";
      const tr = row([cityName(f.origin) + (f.own ? " (own)" : ""), f.feed, f.access || "—", f.seq, f.count, f.cadence_s === null || f.cadence_s === undefined ? "—" : ago(f.cadence_s * 1000), ago(f.age_s * 1000), late, cell(st, "state state-" + st)]);
      tr.dataset.feed = f.origin + "|" + f.feed;
      tr.dataset.state = st;
      fb.appendChild(tr);
    }
    const blocked = Object.keys(v.own_blocked || {}), forked = Object.keys(v.own_forked || {});
    $("#op-blocked").textContent = (forked.length ? "Publishing stopped (fork of an own feed): " + forked.join(", ") + ". " : "") + (blocked.length ? "Publishing paused until partners' records are fetched: " + blocked.join(", ") + "." : "") || "Publishing is open on every own feed.";
    const kb = $("#op-forks tbody");
    clear(kb);
    if (!v.forks.length) kb.appendChild(row([cell("No fork or split view known.", "muted")]));
    for (const f of v.forks) kb.appendChild(row([cityName(f.origin), f.feed, f.seq, f.kind, iso(f.found_at), f.reported_by]));
    $("#op-cp-note").textContent = "Own feeds are checkpointed every " + v.checkpoint_interval_s + " s.";
    const cb = $("#op-checkpoints tbody");
    clear(cb);
    for (const c of v.checkpoints) cb.appendChild(row([c.feed, c.size, c.head, c.behind, c.root ? c.root.slice(0, 16) + "…" : "none yet"]));
    const mb = $("#op-metrics tbody");
    clear(mb);
    const names = Object.keys(v.metrics).sort();
    for (const name of names) {
      for (const s of v.metrics[name]) {
        const labels = Object.entries(s.labels).map(([k, x]) => k + "=" + (k === "partner" ? short(x) : x)).join(", ");
        mb.appendChild(row([name, labels || "—", s.value]));
      }
    }
  }

  async function loadOperator() {
    try {
      const v = await getJSON("/console/api/operator");
      showSignedIn(true);
      drawOperator(v);
      if (!state.opTimer) state.opTimer = setInterval(loadOperator, 5000);
      return true;
    } catch (e) {
      showSignedIn(false);
      return false;
    }
  }

  async function signIn(ev) {
    ev.preventDefault();
    const input = $("#token"), err = $("#signin-error");
    err.textContent = "";
    const token = input.value.trim();
    if (!token) { err.textContent = "Enter the operator token."; input.focus(); return; }
    try {
      const { csrf } = await getJSON("/console/api/csrf");
      const r = await fetch("/console/session", {
        method: "POST", cache: "no-store",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify({ token }),
      });
      input.value = "";   // the token is not kept anywhere in the page
      if (!r.ok) {
        err.textContent = r.status === 403 ? "Sign-in refused: wrong operator token."
          : r.status === 429 ? "Too many wrong tokens from this address: try again in " + (r.headers.get("Retry-After") || "a few") + " s."
          : "Sign-in failed (" + r.status + ").";
        input.focus();
        return;
      }
      state.csrf = (await r.json()).csrf;
      if (await loadOperator()) $("#op-summary").focus();
    } catch (e) {
      err.textContent = "Sign-in failed: the node did not answer.";
    }
  }

  async function signOut() {
    await fetch("/console/session/end", { method: "POST", cache: "no-store", headers: { "X-CSRF-Token": state.csrf || "" } });
    state.csrf = null;
    showSignedIn(false);
    $("#token").focus();
  }

  // ------------------------------------------------------------------ start

  async function start() {
    drawLegend();
    $("#op-summary").tabIndex = -1;
    $("#signin").addEventListener("submit", signIn);
    $("#signout").addEventListener("click", signOut);
    let resizeTimer = null;
    window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(() => { resizePlots(); }, 150); });
    try {
      const me = await getJSON("/console/api/public");
      state.names = me.names || {}; state.self = me.node;
      $("#node-name").textContent = me.name;
      document.title = me.name + " — citynode console";
    } catch (e) { /* the page still works with node ids */ }
    try { state.land = decodeLand(await getJSON("/console/land-110m.json")); } catch (e) { state.land = null; }
    drawMap();
    await loadFeeds();
    setInterval(loadFeeds, 10000);
    let from = { since: Date.now() - DAY_MS, cursor: null };
    try { from = await loadRecent(); } catch (e) { $("#live-status").textContent = "Could not load records: " + e.message; }
    connect(from);
    try {
      if ((await getJSON("/console/api/session")).signed_in) await loadOperator();
      else showSignedIn(false);
    } catch (e) { showSignedIn(false); }
    document.body.dataset.ready = "1";
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
