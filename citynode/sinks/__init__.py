"""Sinks: records of this node delivered into the systems partners already run.

    config.py      ``[[sinks.*]]`` tables of node.toml: parsed and validated (pure)
    cloudevents.py a record -> a CloudEvents 1.0 HTTP request (structured or binary; pure)
    ngsild.py      records -> NGSI-LD entities, and a batch upsert request (pure)
    outbox.py      the durable outbox every sink delivers from: a cursor over the records,
                   retries with capped backoff and jitter, in order per feed (asyncio)
    service.py     the role the node starts: one delivery task per sink
    receiver.py    a real HTTP receiver for tests and scripts/bench-bridge (needs the
                   cloudevents SDK of the test extra; the node never imports it)

A sink takes on each committed record its filter selects (in the same transaction that
moves its cursor), delivers it, and forgets it only once the receiver acknowledged it.
"""
