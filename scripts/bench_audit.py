"""Offline audit benchmark: ``citynode audit`` on a bundle of 100,000 records.

Builds a bundle (one origin, realistic AirQualityObserved records, signed checkpoints),
then audits it as ``citynode audit`` does (signature checks on worker threads: libsodium
releases the GIL) and single-threaded, and compares both with the raw PyNaCl verify rate
measured in the same run on the same messages: on one core (the issue's target, ratio
>= 0.8), and on every core with as many threads (the ceiling of a threaded audit on this
machine, the fair comparison for it). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nacl.bindings
from bench_data import PAYLOAD  # scripts/ is on sys.path when run as a script

from citynode.audit import audit_bundle
from citynode.bundle import write_bundle
from citynode.cli_audit import default_workers
from citynode.core.checkpoints import MerkleLog, sign_checkpoint
from citynode.core.keys import DOMAIN_RECORD, SigningKey
from citynode.core.records import decode_record, sign_record


def build(path: Path, n: int) -> tuple[SigningKey, list[bytes]]:
    key = SigningKey(b"\x2a" * 32)
    envs, prev = [], None
    log = MerkleLog()
    now = int(time.time() * 1000)
    for seq in range(1, n + 1):
        r = sign_record(key, feed="air-quality", seq=seq, prev=prev, time_ms=now - n + seq,
                        type="AirQualityObserved", data=dict(PAYLOAD, pm25=float(seq % 90)),
                        subject="DKI1 Bundaran HI")
        prev = r.id
        envs.append(r.envelope)
        log.append(r.id)
    cps = [sign_checkpoint(key, "air-quality", s, log.root(s), now).envelope
           for s in (n // 2, n)]
    write_bundle(path, origin=key.public_key, card=None, feeds={"air-quality": envs},
                 checkpoints=cps, now_ms=now)
    return key, envs


def raw_rate(key: SigningKey, envs: list[bytes]) -> float:
    msgs = []
    for e in envs:
        body, sig, _payload = decode_record(e)
        msgs.append(sig + DOMAIN_RECORD + body)
    pk, op = key.public_key, nacl.bindings.crypto_sign_open
    t = time.perf_counter()
    for m in msgs:
        op(m, pk)
    return len(msgs) / (time.perf_counter() - t)


def raw_rate_all_cores(key: SigningKey, envs: list[bytes]) -> float:
    """Raw verify rate with one thread per core, each on its share (the GIL is released
    in libsodium): what any threaded audit on this machine could reach at most."""
    msgs = []
    for e in envs:
        body, sig, _payload = decode_record(e)
        msgs.append(sig + DOMAIN_RECORD + body)
    pk, op = key.public_key, nacl.bindings.crypto_sign_open
    cores = os.cpu_count() or 1
    shares = [msgs[i::cores] for i in range(cores)]

    def run(share: list[bytes]) -> None:
        for m in share:
            op(m, pk)

    with ThreadPoolExecutor(cores) as pool:
        t = time.perf_counter()
        list(pool.map(run, shares))
        return len(msgs) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=100_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bench.bundle"
        t = time.perf_counter()
        key, envs = build(path, args.records)
        build_s = time.perf_counter() - t
        now = int(time.time() * 1000) + 60_000
        raws, raws_all, threaded, single = [], [], [], []
        for _ in range(2):  # interleaved: the machines are shared and noisy
            raws.append(raw_rate(key, envs))
            raws_all.append(raw_rate_all_cores(key, envs))
            rep = audit_bundle(path, key.node_id, now_ms=now, workers=default_workers())
            assert rep.ok, rep.render_text()
            threaded.append(rep.record_items / rep.seconds)
            rep1 = audit_bundle(path, key.node_id, now_ms=now, workers=0)
            assert rep1.ok
            single.append(rep1.record_items / rep1.seconds)
        raw, raw_all = max(raws), max(raws_all)
        thr, one = max(threaded), max(single)
        size = path.stat().st_size
    cores = os.cpu_count() or 1
    print(f"bundle: {args.records} records, {size / 1e6:.1f} MB (built in {build_s:.1f} s)")
    print(f"raw PyNaCl verify, 1 core:       {raw:9.0f} /s")
    print(f"raw PyNaCl verify, {cores} core(s):    {raw_all:9.0f} /s")
    print(f"citynode audit (as the CLI runs it, {default_workers()} verifying threads): "
          f"{thr:9.0f} records/s  ratio {thr / raw:.3f} to 1 core (target >= 0.8), "
          f"{thr / raw_all:.3f} to {cores} core(s)")
    print(f"citynode audit, single thread:   {one:9.0f} records/s  ratio {one / raw:.3f} "
          "to 1 core")
    print(json.dumps({"bench": "audit", "records": args.records, "raw_verify_per_s": round(raw),
                      "raw_verify_all_cores_per_s": round(raw_all), "cores": cores,
                      "audit_per_s": round(thr), "ratio": round(thr / raw, 3),
                      "ratio_to_all_cores": round(thr / raw_all, 3),
                      "audit_single_thread_per_s": round(one),
                      "ratio_single_thread": round(one / raw, 3),
                      "python": sys.version.split()[0]}))


if __name__ == "__main__":
    main()
