"""Prometheus metrics of one node, in a registry of its own (so tests can run several
nodes in one process without their counters mixing)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["FEED_STATE_SERIES_MAX", "Metrics"]

#: Feeds with a ``citynode_feed_state`` series (one series each): bounds the metric's
#: cardinality on a node hearing of many feeds.
FEED_STATE_SERIES_MAX = 1000


class Metrics:
    """The node's metrics. ``render()`` gives the Prometheus text exposition format."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.stored = Counter(
            "citynode_records_stored", "Records verified and stored", ["kind"], registry=r
        )
        self.rejected = Counter(
            "citynode_records_rejected", "Records or messages rejected, by reason",
            ["reason"], registry=r,
        )
        self.duplicates = Counter(
            "citynode_records_duplicate", "Copies received of records already held, by how "
            "they came (as citynode_records_received)", ["via"], registry=r
        )
        self.received = Counter(
            "citynode_records_received", "Record copies received from partners, by how: "
            "push (pushed to us), or fetched by us in a sync round (sync), after an "
            "announcement (graft) or to fill a gap in a chain (gap)", ["via"], registry=r
        )
        self.verified = Counter(
            "citynode_records_verified", "Records from outside whose signature this node "
            "checked (decoded, checked, verified). A record held, or being checked for "
            "another copy, is not checked again: at most once per record, unless a copy "
            "failed", registry=r,
        )
        self.forks = Counter("citynode_forks_detected", "Equivocation proofs stored", registry=r)
        self.published = Counter(
            "citynode_records_published", "Records signed by this node", registry=r
        )
        self.partner_up = Gauge(
            "citynode_partner_up", "1 if the last exchange with the partner succeeded",
            ["partner"], registry=r,
        )
        self.partner_queue = Gauge(
            "citynode_partner_queue", "Records waiting to be pushed to the partner",
            ["partner"], registry=r,
        )
        self.partner_invalid = Counter(
            "citynode_partner_invalid", "Invalid items received from a partner, by reason",
            ["partner", "reason"], registry=r,
        )
        self.pending = Gauge(
            "citynode_pending_records", "Records held until a gap in their chain is filled",
            registry=r,
        )
        self.db_size = Gauge("citynode_db_size_bytes", "Size of the database file", registry=r)
        self.feeds = Gauge("citynode_feeds", "Feeds held (own and replicated)", registry=r)
        self.own_forgeries = Gauge(
            "citynode_own_forgeries", "Own feeds of which a record signed with this node's "
            "key that it never signed was seen (the key may be stolen: citynode key recover)",
            registry=r,
        )
        self.liveness = Gauge(
            "citynode_feed_liveness", "Feeds held or heard of, by liveness state (live, "
            "silent, lagging, withheld, dead, unknown: docs/PROTOCOL.md, Liveness)",
            ["state"], registry=r,
        )
        self.feed_state = Gauge(
            "citynode_feed_state", "1 per feed, labelled with its origin (node id), feed "
            "and liveness state (docs/PROTOCOL.md, Liveness); one series per feed, at most "
            f"{FEED_STATE_SERIES_MAX} feeds (own feeds first, then by origin and feed)",
            ["origin", "feed", "state"], registry=r,
        )
        self.streams = Gauge("citynode_live_streams", "Open live streams (SSE)", registry=r)
        self.connections_refused = Counter(
            "citynode_connections_refused", "Connections closed on arrival: max_connections "
            "were open", registry=r,
        )
        self.connections_refused_address = Counter(
            "citynode_connections_refused_address", "Connections closed on arrival: "
            "max_connections_per_address were open from the same address", registry=r,
        )
        self.connections_stalled = Counter(
            "citynode_connections_stalled", "Connections closed for completing no request "
            "head within read_timeout_seconds while none was served (slow clients, "
            "slowloris)", registry=r,
        )
        self.stream_lagged = Counter(
            "citynode_stream_lagged", "Times a live stream fell behind and re-read from the "
            "database (a subscriber slower than the feed)", registry=r,
        )
        self.push_latency = Histogram(
            "citynode_push_seconds", "Duration of a push request to a partner",
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5), registry=r,
        )

        # Bridges (citynode/bridges/), by bridge name.
        self.bridge_received = Counter(
            "citynode_bridge_messages_received", "Messages a bridge received from its "
            "broker (redelivered copies included)", ["bridge"], registry=r)
        self.bridge_published = Counter(
            "citynode_bridge_messages_published", "Messages a bridge made records of",
            ["bridge"], registry=r)
        self.bridge_duplicates = Counter(
            "citynode_bridge_messages_duplicate", "Messages a bridge had already made a "
            "record or dead letter of (a redelivery after a crash or reconnect)",
            ["bridge"], registry=r)
        self.bridge_dead_lettered = Counter(
            "citynode_bridge_messages_dead_lettered", "Messages a bridge could not make a "
            "record of, kept in its dead-letter table, by reason", ["bridge", "reason"],
            registry=r)
        self.bridge_connected = Gauge(
            "citynode_bridge_connected", "1 while the bridge is connected to its broker",
            ["bridge"], registry=r)

        # Console sign-ins (citynode/transport/api_console.py, docs/CONSOLE.md).
        self.console_sign_ins = Counter(
            "citynode_console_sign_ins", "Console sign-in attempts, by outcome: ok, "
            "wrong_token, throttled (refused unread while the client's wait lasts)",
            ["outcome"], registry=r)

        # Alerts (citynode/node/alerts.py, docs/ALERTS.md).
        self.alerts = Counter(
            "citynode_alerts", "Alert events raised, by alert code and status (firing, "
            "resolved)", ["alert", "status"], registry=r)
        self.alert_deliveries = Counter(
            "citynode_alert_deliveries", "Alert delivery attempts to webhooks, by outcome: "
            "ok, retry (failed, will retry), failed (gave up), dropped (queue full)",
            ["outcome"], registry=r)

    def rejected_total(self) -> int:
        """Everything counted in ``citynode_records_rejected``, all reasons together."""
        return int(sum(s.value for m in self.rejected.collect() for s in m.samples
                       if s.name.endswith("_total")))

    def set_feed_states(self, states: list[tuple[str, str, str]], own: str) -> None:
        """``citynode_feed_state`` from ``(origin node id, feed, state)`` of every feed:
        one series per feed (a feed that changed state loses its old series), the feeds
        of ``own`` (this node's id) first, at most FEED_STATE_SERIES_MAX."""
        self.feed_state.clear()
        ranked = sorted(states, key=lambda s: (s[0] != own, s[0], s[1]))
        for origin, feed, state in ranked[:FEED_STATE_SERIES_MAX]:
            self.feed_state.labels(origin, feed, state).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
