"""Backup benchmark: ``citynode backup`` and ``citynode restore`` of a node holding
1,000,000 records.

Builds the data dir directly (signed AirQualityObserved records of 4 origins appended
through Storage, as a node stores them), then measures, in the same run:

* a plain file copy of the database, fsynced (the peer: what any durable backup must
  at least cost; the backup itself copies the database twice: SQLite's page copy into
  a working file, then into the tar, hashing it on the way);
* ``make_backup`` (what ``citynode backup`` runs) of the idle node: time, file size;
* ``make_backup`` again while a writer appends 10 records at a time, as a busy node
  does: the writer's latency before and during the backup (the backup must not block
  the node's writer for long: in WAL mode readers never wait for it, nor it for them);
* ``restore_backup`` into a new directory (verify every checksum, quick_check, mark).

Last line: one JSON object; ``pass`` holds if the backup costs at most 4 times the plain
copy (two copies and a hash, with room for SQLite's page-by-page work) and the
writer's worst append during it stays under 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_data import PAYLOAD  # scripts/ is on sys.path when run as a script
from nacl.pwhash import argon2id

from citynode.backup import make_backup, restore_backup
from citynode.core.keys import SigningKey
from citynode.core.records import Record, sign_record
from citynode.datadir import init_data_dir
from citynode.storage import Storage

ORIGINS = 4
BATCH = 5000


def build(st: Storage, n: int) -> dict[bytes, tuple[int, bytes | None]]:
    """Append ``n`` records of :data:`ORIGINS` origins; returns each chain's head."""
    keys = [SigningKey(bytes([i + 1]) * 32) for i in range(ORIGINS)]
    heads: dict[bytes, tuple[int, bytes | None]] = {k.public_key: (0, None) for k in keys}
    now = int(time.time() * 1000) - n
    done = 0
    t = time.perf_counter()
    while done < n:
        batch: list[Record] = []
        for i in range(min(BATCH, n - done)):
            key = keys[(done + i) % ORIGINS]
            seq, prev = heads[key.public_key]
            r = sign_record(key, feed="air-quality", seq=seq + 1, prev=prev,
                            time_ms=now + done + i, type="AirQualityObserved",
                            data=dict(PAYLOAD, pm25=float((done + i) % 90)),
                            subject="DKI1 Bundaran HI")
            heads[key.public_key] = (seq + 1, r.id)
            batch.append(r)
        st.append(batch).result()
        done += len(batch)
        if done % 100_000 == 0:
            print(f"  built {done:>9,} records ({done / (time.perf_counter() - t):,.0f}/s)",
                  flush=True)
    return heads


def writer_latencies(st: Storage, heads: dict[bytes, tuple[int, bytes | None]],
                     stop: threading.Event, out: list[float]) -> None:
    """Append 10 records at a time until ``stop``; each append's latency in ``out``."""
    key = SigningKey(bytes([1]) * 32)
    seq, prev = heads[key.public_key]
    while not stop.is_set():
        batch = []
        for _ in range(10):
            seq += 1
            r = sign_record(key, feed="air-quality", seq=seq, prev=prev,
                            time_ms=int(time.time() * 1000), type="AirQualityObserved",
                            data=dict(PAYLOAD), subject="DKI1 Bundaran HI")
            prev = r.id
            batch.append(r)
        t = time.perf_counter()
        st.append(batch, durable=True).result()
        out.append(time.perf_counter() - t)
        time.sleep(0.01)
    heads[key.public_key] = (seq, prev)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--dir", default=None, help="where the data directories go")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="citynode-bench-backup-", dir=args.dir))
    try:
        d = base / "node"
        init_data_dir(d, name="Bench", listen="127.0.0.1:18443",
                      kdf_opslimit=argon2id.OPSLIMIT_MIN, kdf_memlimit=argon2id.MEMLIMIT_MIN)
        db = d / "citynode.db"
        st = Storage.open(db)
        try:
            t = time.perf_counter()
            heads = build(st, args.records)
            build_s = time.perf_counter() - t
            st.barrier().result()
        finally:
            st.close()  # folds the WAL in: the file is the whole database
        db_bytes = db.stat().st_size

        t = time.perf_counter()
        shutil.copyfile(db, base / "plain-copy.db")
        with open(base / "plain-copy.db", "rb+") as f:
            os.fsync(f.fileno())  # a backup is durable: so is the peer
        copy_s = time.perf_counter() - t
        (base / "plain-copy.db").unlink()

        idle = make_backup(d, base / "idle.cnbackup")
        (base / "idle.cnbackup").unlink()

        st = Storage.open(db)
        try:
            before: list[float] = []
            stop = threading.Event()
            w = threading.Thread(target=writer_latencies, args=(st, heads, stop, before))
            w.start()
            time.sleep(2.0)
            stop.set()
            w.join()
            during: list[float] = []
            stop = threading.Event()
            w = threading.Thread(target=writer_latencies, args=(st, heads, stop, during))
            w.start()
            try:
                busy = make_backup(d, base / "busy.cnbackup")
            finally:
                stop.set()
                w.join()
        finally:
            st.close()

        t = time.perf_counter()
        # "the database was lost, the key was not": over the node dir, its key kept
        restored = restore_backup(base / "busy.cnbackup", d, replace=True)
        restore_s = time.perf_counter() - t
    finally:
        shutil.rmtree(base, ignore_errors=True)

    m = idle.manifest
    ratio = idle.seconds / copy_s if copy_s > 0 else float("nan")
    worst = max(during) if during else float("nan")
    print(f"database: {m.records:,} records, {db_bytes / 1e6:.1f} MB (built in {build_s:.0f} s)")
    print(f"plain file copy:          {copy_s:6.2f} s")
    print(f"backup (idle node):       {idle.seconds:6.2f} s, {idle.size / 1e6:.1f} MB "
          f"({idle.size / m.records:.0f} B/record), {ratio:.2f} x the plain copy")
    print(f"backup (writer busy):     {busy.seconds:6.2f} s, {busy.manifest.records:,} records "
          f"in its snapshot; {len(during)} appends of 10 during it")
    print(f"writer append latency:    before p50 {statistics.median(before) * 1e3:.1f} ms, "
          f"max {max(before) * 1e3:.1f} ms; during backup p50 "
          f"{statistics.median(during) * 1e3:.1f} ms, p99 {pct(during, 0.99) * 1e3:.1f} ms, "
          f"max {worst * 1e3:.1f} ms")
    print(f"restore (verify, check, mark): {restore_s:6.2f} s, "
          f"{restored.manifest.records:,} records")
    ok = ratio <= 4 and worst < 1.0
    print(json.dumps({
        "bench": "backup", "records": m.records, "db_bytes": db_bytes,
        "backup_s": round(idle.seconds, 3), "backup_bytes": idle.size,
        "backup_bytes_per_record": round(idle.size / max(1, m.records), 1),
        "copy_s": round(copy_s, 3), "ratio_to_copy": round(ratio, 2),
        "busy_backup_s": round(busy.seconds, 3),
        "writer_p50_ms_before": round(statistics.median(before) * 1e3, 2),
        "writer_p50_ms_during": round(statistics.median(during) * 1e3, 2),
        "writer_p99_ms_during": round(pct(during, 0.99) * 1e3, 2),
        "writer_max_ms_during": round(worst * 1e3, 2),
        "restore_s": round(restore_s, 3), "pass": ok,
        "python": sys.version.split()[0]}))


if __name__ == "__main__":
    main()
