"""1,000 simulated cities running the real replica (citynode.sim): convergence, copies,
bytes, an in-sync reconciliation round, fork detection, wall time.

Every city publishes on a random partner graph of degree 3-8; the simulator verifies
every record's real Ed25519 signature once (cached by id: the signature work of a real
run is per node, the simulator's is per record) and counts every byte it sends. Targets
(issue 11): convergence within 2*log2(N) sync rounds; at most 1.2 copies received per
record needed; bytes sent at most 1.3x the payload bytes that had to travel; one
reconciliation round between two nodes in sync under 5 KB with 1,000 origins x 5 feeds;
the whole run in 5 minutes. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from typing import Any

from citynode.core import replica as rp
from citynode.sim import Sim, random_graph, sign


def in_sync_round_bytes(origins: int, feeds: int, seed: int) -> tuple[int, int]:
    """Bytes and messages of one session between two real replicas holding the same
    ``origins * feeds`` chains."""
    rng = random.Random(seed)
    heads = {(rng.randbytes(32), f"feed-{f}"): (rng.randrange(1, 1000), rng.randbytes(32))
             for _ in range(origins) for f in range(feeds)}
    a_key, b_key = b"\x01" * 32, b"\x02" * 32
    a = rp.Replica(rp.ReplicaConfig(self_key=a_key))
    b = rp.Replica(rp.ReplicaConfig(self_key=b_key))
    a.load(heads)
    b.load(heads)
    a.add_partner(b_key, 0)
    b.add_partner(a_key, 0)
    pending = [x for x in a.tick(0) if isinstance(x, rp.SendSync)]
    nbytes = msgs = 0
    while pending:
        req = pending.pop()
        nbytes += len(req.payload)
        msgs += 1
        answer = next(x for x in b.on_sync(a_key, req.payload, 0, initiator=False)
                      if isinstance(x, rp.SendSync))
        nbytes += len(answer.payload)
        msgs += 1
        pending = [x for x in a.on_sync(b_key, answer.payload, 0, initiator=True)
                   if isinstance(x, rp.SendSync)]
    return nbytes, msgs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--records", type=int, default=1, help="records per city per feed")
    ap.add_argument("--feeds", type=int, default=1, help="feeds each city publishes on")
    ap.add_argument("--forkers", type=int, default=5, help="hostile cities that fork")
    ap.add_argument("--loss", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--announce", action="store_true",
                    help="announce heads on lazy links (as the node does today)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    n = args.nodes
    rng = random.Random(args.seed)
    edges = random_graph(rng, n, 3, 8)
    sim = Sim(n, edges, seed=args.seed, loss=args.loss, announce=args.announce)
    t_setup = time.perf_counter() - t0
    forkers = rng.sample(range(n), min(args.forkers, n // 4))
    for i in forkers:
        sim.nodes[i].honest = False
    kinds_before = dict(sim.bytes_by_kind)
    before = {nd.index: (nd.stats.bytes_sent, nd.stats.received) for nd in sim.nodes}
    for nd in sim.nodes:
        for f in range(args.feeds):
            nd.publish(f"feed-{f}", args.records)
    rounds = sim.run_until_converged(20 * max(1.0, math.log2(n)), step=0.1)
    honest = sim.honest()
    ids = sim.honest_ids()
    sent = sum(nd.stats.bytes_sent - before[nd.index][0] for nd in sim.nodes)
    received = sum(nd.stats.received - before[nd.index][1] for nd in honest)
    need = len(ids) * (len(honest) - 1)
    payload = sum(sim.size(nd.by_id[r]) for r in ids for nd in honest[:1]) * (len(honest) - 1)
    copies = received / need if need else 0.0
    by_kind = {k: v - kinds_before.get(k, 0) for k, v in sorted(sim.bytes_by_kind.items())}
    sim.check_invariants()

    # One round between two honest partners in sync, in the simulator.
    a = honest[0]
    b_pk = sorted(a.partners)[0]
    b = sim.by_pk[b_pk]
    sim.run_rounds(3)  # past any push wave: rounds are no longer deferred
    link = frozenset((a.index, b.index))
    sync_before = sim.sync_bytes[link]
    a.run(a.replica.sync_now(b_pk, sim.now))
    sim.step_to(sim.now + 4 * sim.latency[1] + 2 * sim.tick_ms)
    pair_bytes = sim.sync_bytes[link] - sync_before
    chains_held = len(a.replica.heads)
    sync_bytes, sync_msgs = in_sync_round_bytes(1000, 5, args.seed)

    # Forks: each hostile city signs a second record at its head seq and hands it to
    # one honest node far away; every honest node must end up holding the proof.
    fork_rounds: float | None = None
    if forkers:
        t_fork = sim.now
        for i in forkers:
            bad = sim.nodes[i]
            head = bad.replica.heads[(bad.pk, "feed-0")]
            prev = bad.store[(bad.pk, "feed-0")][head.seq - 2].id if head.seq > 1 else None
            twin = sign(bad.key, "feed-0", head.seq, prev, sim.now, {"n": -1})
            target = rng.choice(honest)
            sim.send(bad, target.pk, "push", [twin], sim.size(twin))
        want = {(sim.nodes[i].pk, "feed-0") for i in forkers}
        limit = sim.now + 40 * sim.interval
        while sim.now < limit and not all(want <= nd.proofs.keys() for nd in honest):
            sim.run_rounds(0.1)
        if all(want <= nd.proofs.keys() for nd in honest):
            fork_rounds = (sim.now - t_fork) / sim.interval
    forks_everywhere = sum(1 for nd in honest if len(nd.proofs) >= len(forkers))
    wall = time.perf_counter() - t0

    target_rounds = 2 * math.log2(n)
    ratio = sent / payload if payload else 0.0
    figures: dict[str, Any] = {
        "bench": "sim",
        "nodes": n,
        "edges": len(edges),
        "records": len(ids),
        "rounds": round(rounds, 2),
        "rounds_target": round(target_rounds, 2),
        "copies_per_record": round(copies, 3),
        "bytes_sent": sent,
        "payload_bytes": payload,
        "bytes_ratio": round(ratio, 3),
        "in_sync_round_bytes_5000_chains": sync_bytes,
        "in_sync_round_messages": sync_msgs,
        "sim_pair_round_bytes": pair_bytes,
        "sim_pair_chains": chains_held,
        "forkers": len(forkers),
        "honest_nodes_with_every_proof": forks_everywhere,
        "honest_nodes": len(honest),
        "fork_rounds": None if fork_rounds is None else round(fork_rounds, 2),
        "bytes_by_kind": by_kind,
        "setup_s": round(t_setup, 1),
        "wall_s": round(wall, 1),
        "result_hash": sim.result_hash()[:16],
    }
    figures["pass"] = {
        "rounds": rounds <= target_rounds,
        "copies": copies <= 1.2,
        "bytes": ratio <= 1.3,
        "in_sync_round": sync_bytes < 5000,
        "forks": fork_rounds is not None or not forkers,
        "wall": wall < 300,
    }
    print(f"{n} cities, {len(edges)} partner links (degree 3-8), {len(ids)} honest records, "
          f"{len(forkers)} forking cities")
    print(f"sync rounds to converge:   {rounds:.2f} (target <= 2*log2(N) = {target_rounds:.1f})")
    print(f"copies received / needed:  {copies:.3f} (target <= 1.2)")
    print(f"bytes sent / payload:      {ratio:.3f} ({sent} / {payload}; target <= 1.3)")
    print(f"in-sync round, 1000x5:     {sync_bytes} bytes in {sync_msgs} messages "
          "(target < 5000)")
    print(f"in-sync round in the sim:  {pair_bytes} bytes ({chains_held} chains, framing "
          "included)")
    print(f"forks: {forks_everywhere}/{len(honest)} honest nodes hold every proof, in "
          f"{fork_rounds} rounds")
    print(f"wall time: {wall:.1f} s (setup {t_setup:.1f} s)")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
