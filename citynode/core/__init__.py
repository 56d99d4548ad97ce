"""The citynode protocol, pure: no I/O, no event loop, no clock (time is a parameter).

Modules: encoding (canonical msgpack), keys (node ids, signing), records (bodies,
envelopes, verification), types (payload types), chain (feed chain decisions and fork
proofs), sync (frontiers and sync decisions), checkpoints (Merkle tree heads and proofs),
filters (the record filter: parsed once, rendered to SQL, matched in memory).
"""
