"""Bridges: the systems a city already runs, connected to its node.

One module per bridge, plus what they share:

    config.py    ``[[bridges.*]]`` tables of node.toml: parsed and validated (pure)
    mapping.py   a message (topic + bytes) -> feed, type, subject, payload (pure)
    mqtt.py      MQTT in: subscribe, map, publish through the node, dead-letter (asyncio)

A bridge runs inside the node as a background task the coordinator starts; it publishes
through the node's publishing role exactly as ``POST /v1/publish`` does, and keeps its
own state (message identities, dead letters) through storage methods of its own.
"""
