"""Stream worker benchmark: throughput vs the raw consume rate of the same broker, and feature freshness at a rate.

Builds a data dir once (simulated data, batch features in the Feast SQLite store, the test fixture's champion and
challenger: XGBoost, ≤80 and ≤40 trees), and per run, on a fresh embedded broker:

- throughput: the held-out transactions are produced to `transactions` (4 partitions); one consumer doing nothing
  else reads them (`broker.measure_consume_rate`, the baseline), then one worker processes all of them from a copy of
  the bootstrapped data dir (fresh consumer group, fresh results database); throughput = messages / (end of the last
  batch - start of the first), group join excluded like the baseline's;
- freshness: a joined worker scores a replay at `--rate` tx/s; freshness = scored time - Kafka message timestamp,
  from every results row (`latency_ms`).

Prints the median of --runs runs of each figure, the ratio to the baseline, where the worker's time goes (per step),
and the goals (throughput ≥ 0.8 × raw consume rate, freshness p99 ≤ 1 s at 1,000 tx/s).

    .venv/bin/python bench/bench_worker.py [--scale demo] [--runs 3] [--rate 1000] [--explain flagged]
"""
from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from worker_data import build_data_dir, db_url, result_rows, settings_for  # noqa: E402

from fraud_detection.broker import (  # noqa: E402
    ALL_TOPICS,
    TOPIC_TRANSACTIONS,
    EmbeddedBroker,
    ensure_topics,
    measure_consume_rate,
)
from fraud_detection.producer import replay  # noqa: E402
from fraud_detection.schema import decode_transaction, frame_to_messages, message_headers  # noqa: E402
from fraud_detection.worker import run_worker  # noqa: E402


@contextmanager
def broker():
    "A fresh embedded broker with the system's topics (4 partitions)."
    with EmbeddedBroker() as b:
        ensure_topics(b.bootstrap, ALL_TOPICS, partitions=4)
        yield b.bootstrap


def worker_run(base: Path, work: Path, bootstrap: str, group: str, explain, **kw):
    "run_worker on a fresh copy of the bootstrapped data dir (a new path each time: engines are cached per URL)."
    shutil.copytree(base, work)
    return run_worker(settings_for(work, bootstrap, group=group), explain=explain, **kw)


def throughput_run(base: Path, work: Path, bootstrap: str, test, run: int, explain) -> dict:
    "Raw consume rate and worker throughput over the same messages (on a fresh broker)."
    t = time.perf_counter()
    replay(test, bootstrap, progress=False)
    print(f"  produced {test.height:,} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    raw = measure_consume_rate(bootstrap, TOPIC_TRANSACTIONS, test.height)
    st = worker_run(base, work, bootstrap, f"tput-{run}", explain, max_messages=test.height)
    assert st.scored == test.height, st.summary()
    return {"raw": raw, "worker": st.throughput, "stages": dict(st.stages), "busy": st.seconds, "batches": st.batches}


def freshness_run(base: Path, work: Path, bootstrap: str, test, run: int, rate: float, explain) -> dict:
    "Freshness percentiles of a worker scoring a replay at `rate` tx/s (the worker joins before the replay starts)."
    stop, out, joined = threading.Event(), {}, threading.Event()

    class Joined(logging.Handler):
        def emit(self, record):
            if "assigned partitions" in record.getMessage():
                joined.set()
    handler = Joined()
    logging.getLogger("fraud_detection.worker").addHandler(handler)
    logging.getLogger("fraud_detection.worker").setLevel(logging.INFO)

    def work_fn():
        out["stats"] = worker_run(base, work, bootstrap, f"fresh-{run}", explain, max_messages=test.height,
                                  stop_event=stop)
    t = threading.Thread(target=work_fn, daemon=True)
    t.start()
    try:
        assert joined.wait(60), "the worker did not join the group"
        rep = replay(test, bootstrap, rate=rate, progress=False)
        t.join(120)
    finally:
        stop.set()
        t.join(30)
        logging.getLogger("fraud_detection.worker").removeHandler(handler)
    lat = result_rows(db_url(work))["latency_ms"].to_numpy()
    assert len(lat) == test.height, (len(lat), test.height)
    return {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "max": float(lat.max()), "sent_rate": rep.rate}


def repeated(test, copies: int):
    "`copies` back-to-back copies of the held-out period (later timestamps, new trans_nums): more volume, same data."
    import polars as pl
    span = test["ts"].max() - test["ts"].min() + timedelta(days=1)
    return pl.concat([test.with_columns(ts=pl.col("ts") + k * span,
                                        unix_time=pl.col("unix_time") + int(k * span.total_seconds()),
                                        trans_num=pl.col("trans_num") + f"-{k}") for k in range(copies)])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="demo", help="simulator scale of the data (demo: ~9.9k held-out tx)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--copies", type=int, default=10, help="held-out period replayed this many times for throughput")
    ap.add_argument("--rate", type=float, default=1000.0, help="tx/s of the freshness replay")
    ap.add_argument("--fresh-seconds", type=float, default=10.0, help="length of the freshness replay")
    ap.add_argument("--explain", choices=["flagged", "all", "none"], default="flagged")
    a = ap.parse_args(argv)
    explain = {"all": True, "flagged": "flagged", "none": False}[a.explain]
    import polars as pl
    tmp = Path(tempfile.mkdtemp(prefix="bench_worker_"))
    try:
        t0 = time.perf_counter()
        base = tmp / "base"
        build_data_dir(base, scale=a.scale, fraud_rate=0.01)
        test = pl.read_parquet(base / "clean" / "test.parquet")
        print(f"data: {a.scale}, {test.height:,} held-out transactions (x{a.copies} for throughput), built in "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
        volume = repeated(test, a.copies)
        msgs = frame_to_messages(test, validate=False)
        t = time.perf_counter()
        for _, v in msgs:
            decode_transaction(v, message_headers())
        decode = len(msgs) / (time.perf_counter() - t)
        tput, fresh = [], []
        for run in range(a.runs):
            with broker() as bootstrap:
                tput.append(throughput_run(base, tmp / f"tput-{run}", bootstrap, volume, run, explain))
            r = tput[-1]
            print(f"run {run + 1}: raw consume {r['raw']:,.0f}/s, worker {r['worker']:,.0f}/s "
                  f"({r['worker'] / r['raw']:.3f}x), {r['batches']} batches", file=sys.stderr)
        n = min(test.height, int(a.rate * a.fresh_seconds))
        for run in range(a.runs):
            with broker() as bootstrap:
                fresh.append(freshness_run(base, tmp / f"fresh-{run}", bootstrap, test.head(n), run, a.rate, explain))
            f = fresh[-1]
            print(f"run {run + 1}: freshness at {f['sent_rate']:,.0f} tx/s: p50 {f['p50']:.0f} ms, "
                  f"p99 {f['p99']:.0f} ms, max {f['max']:.0f} ms", file=sys.stderr)
        raw = statistics.median(r["raw"] for r in tput)
        worker = statistics.median(r["worker"] for r in tput)
        ratio = statistics.median(r["worker"] / r["raw"] for r in tput)
        busy = sum(r["busy"] for r in tput)
        stages = {k: sum(r["stages"].get(k, 0.0) for r in tput) / busy for k in tput[0]["stages"]}
        p99 = statistics.median(f["p99"] for f in fresh)
        res = {"raw_consume_per_s": raw, "worker_per_s": worker, "ratio": ratio, "decode_per_s": decode,
               "freshness_p50_ms": statistics.median(f["p50"] for f in fresh), "freshness_p99_ms": p99,
               "stages_share": stages}
        print(f"worker throughput: {worker:,.0f} tx/s = {ratio:.3f} x raw consume rate {raw:,.0f} msg/s "
              f"(goal >= 0.8x: {'met' if ratio >= 0.8 else 'NOT met'}); decode alone {decode:,.0f} msg/s")
        print("worker time by step: " + ", ".join(f"{k} {v:.0%}" for k, v in sorted(stages.items(), key=lambda x: -x[1])))
        print(f"freshness at {a.rate:,.0f} tx/s: p50 {res['freshness_p50_ms']:.0f} ms, p99 {p99:.0f} ms "
              f"(goal <= 1000 ms: {'met' if p99 <= 1000 else 'NOT met'})  [median of {a.runs} runs, explain={a.explain}]")
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
