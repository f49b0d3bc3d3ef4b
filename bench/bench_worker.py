"""Stream worker benchmark: throughput vs the raw consume rate of the same broker, and feature freshness at a rate,
with each results store (SQLite file, local PostgreSQL).

Builds a data dir once (simulated data, batch features in the Feast SQLite store, the test fixture's champion and
challenger: XGBoost, ≤80 and ≤40 trees), and per run, on a fresh embedded broker:

- throughput: the held-out transactions are produced to `transactions` (4 partitions); one consumer doing nothing
  else reads them (`broker.measure_consume_rate`, the baseline), then, for each results store in turn, one worker
  processes all of them from a copy of the bootstrapped data dir (fresh consumer group, fresh results database: a new
  SQLite file, or a new PostgreSQL database dropped after the run); throughput = messages / (end of the last batch -
  start of the first), group join excluded like the baseline's;
- freshness: a joined worker scores a replay at `--rate` tx/s; freshness = scored time - Kafka message timestamp,
  from every results row (`latency_ms`).

Prints, per results store, the median of --runs runs of each figure, the ratio to the baseline measured in the same
run, where the worker's time goes (µs per message, per step, grouped by thread: the worker computes batch N+1 in
its main thread while its delivery thread writes and pushes batch N and its publishing thread queues batch N's
messages), and the goals (issue #14: ≥ 25 k tx/s with SQLite, ≥ 20 k tx/s with PostgreSQL, freshness p99 ≤ 500 ms
at 1,000 tx/s).

    .venv/bin/python bench/bench_worker.py [--scale demo] [--runs 3] [--rate 1000] [--explain flagged]
                                           [--db sqlite,postgres] [--postgres-url postgresql+psycopg://...] [--no-freshness]
                                           [--distinct-customers] [--batch-size 10000] [--without write,push]

`--distinct-customers` measures production cardinality (every message a different card: the state cache never
hits, every message reads and pushes a customer's state). The online store is the settings' (`FRAUD_ONLINE_STORE`,
SQLite by default); with Redis, use a fresh database (`FRAUD_REDIS_URL`), one run and one results store
(`--runs 1 --db sqlite`): state persists there across runs.

`--without publish,write,push` replaces those delivery steps by no-ops: how far taking them out of the worker's
process could go (a ceiling, not a result).

It also prints the CPU time per message from the worker's first batch to its end (all threads of the process):
unlike the wall-clock figures, it does not depend on what else the machine runs.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

import numpy as np

from fraud_detection.broker import (  # noqa: E402
    ALL_TOPICS,
    TOPIC_TRANSACTIONS,
    EmbeddedBroker,
    ensure_topics,
    measure_consume_rate,
)
from fraud_detection.producer import replay  # noqa: E402
from fraud_detection.schema import decode_transaction, frame_to_messages, message_headers  # noqa: E402
from fraud_detection.testing import build_data_dir, db_url, fresh_pg_database, result_rows, settings_for  # noqa: E402
from fraud_detection.worker import BATCH_SIZE, EXPLAIN_OPTIONS, StreamWorker, run_worker  # noqa: E402


@contextmanager
def broker():
    "A fresh embedded broker with the system's topics (4 partitions)."
    with EmbeddedBroker() as b:
        ensure_topics(b.bootstrap, ALL_TOPICS, partitions=4)
        yield b.bootstrap


@contextmanager
def cpu_of_batches():
    """A list that receives the CPU time (all threads of this process) from the first `StreamWorker.process` call to
    the end of the block: the worker's batches, its delivery threads included, without its start-up."""
    spent, process, first = [], StreamWorker.process, []

    def timed(self, msgs):
        if not first:
            first.append(time.process_time())
        return process(self, msgs)
    StreamWorker.process = timed
    try:
        yield spent
    finally:
        StreamWorker.process = process
        spent.append(time.process_time() - first[0] if first else 0.0)


def results_db(kind: str, work: Path, postgres_url: str):
    "A context giving the URL of a fresh, empty results database: a SQLite file in `work`, or a new PostgreSQL database."
    if kind == "sqlite":
        return nullcontext(db_url(work))
    return fresh_pg_database(postgres_url, prefix="bench_worker")


def worker_run(base: Path, work: Path, bootstrap: str, group: str, explain, url: str, **kw):
    "run_worker on a fresh copy of the bootstrapped data dir (a new path each time: engines are cached per URL)."
    shutil.copytree(base, work)
    return run_worker(settings_for(work, bootstrap, group=group, db_url=url), explain=explain, **kw)


def throughput_run(base: Path, work: Path, bootstrap: str, test, run: int, explain, dbs: list[str],
                   postgres_url: str, batch_size: int) -> dict:
    "Raw consume rate, then each results store's worker throughput over the same messages (on a fresh broker)."
    t = time.perf_counter()
    replay(test, bootstrap, progress=False)
    print(f"  produced {test.height:,} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    out = {"raw": measure_consume_rate(bootstrap, TOPIC_TRANSACTIONS, test.height)}
    for kind in dbs:
        with results_db(kind, work / kind, postgres_url) as url, cpu_of_batches() as cpu:
            st = worker_run(base, work / kind, bootstrap, f"tput-{run}-{kind}", explain, url, max_messages=test.height,
                            batch_size=batch_size)
        assert st.scored == test.height, st.summary()
        out[kind] = {"worker": st.throughput, "stages": dict(st.stages), "stages_cpu": dict(st.stages_cpu),
                     "busy": st.seconds, "batches": st.batches,
                     "messages": st.messages, "cpu": sum(cpu)}
    return out


def freshness_run(base: Path, work: Path, bootstrap: str, test, run: int, rate: float, explain, kind: str,
                  postgres_url: str) -> dict:
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
        out["stats"] = worker_run(base, work, bootstrap, f"fresh-{run}-{kind}", explain, url, max_messages=test.height,
                                  stop_event=stop)
    with results_db(kind, work, postgres_url) as url:
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
        lat = result_rows(url)["latency_ms"].to_numpy()
    assert len(lat) == test.height, (len(lat), test.height)
    st = out["stats"]
    return {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "max": float(lat.max()), "sent_rate": rep.rate, "batches": st.batches, "messages": st.messages,
            "stages": dict(st.stages)}


def repeated(test, copies: int):
    "`copies` back-to-back copies of the held-out period (later timestamps, new trans_nums): more volume, same data."
    import polars as pl
    span = test["ts"].max() - test["ts"].min() + timedelta(days=1)
    return pl.concat([test.with_columns(ts=pl.col("ts") + k * span,
                                        unix_time=pl.col("unix_time") + int(k * span.total_seconds()),
                                        trans_num=pl.col("trans_num") + f"-{k}") for k in range(copies)])


COMPUTE = ["parse", "state_read", "dedupe", "features", "score"]  # StreamWorker.process, before the hand-over
DELIVER = ["publish", "write", "push"]  # the delivery thread (publish: the publishing thread, alongside)
GOALS = {"sqlite": 25_000, "postgres": 20_000}  # issue #14: tx/s per worker with each results store
FRESH_GOAL_MS = 500  # issue #14: freshness p99 at 1,000 tx/s


def report(kind: str, tput: list[dict], fresh: list[dict], a) -> dict:
    "Print and return one results store's medians: throughput, ratio to raw consume, steps, freshness."
    worker = statistics.median(r[kind]["worker"] for r in tput)
    ratio = statistics.median(r[kind]["worker"] / r["raw"] for r in tput)
    busy = sum(r[kind]["busy"] for r in tput)
    n = sum(r[kind]["messages"] for r in tput)
    steps = {k: sum(r[kind]["stages"].get(k, 0.0) for r in tput) for k in tput[0][kind]["stages"]}
    steps_cpu = {k: sum(r[kind]["stages_cpu"].get(k, 0.0) for r in tput) / n * 1e6 for k in steps}
    p99 = statistics.median(f["p99"] for f in fresh) if fresh else None
    res = {"worker_per_s": worker, "ratio": ratio, "stages_share": {k: v / busy for k, v in steps.items()},
           "stages_us_per_msg": {k: v / n * 1e6 for k, v in steps.items()}, "stages_cpu_us_per_msg": steps_cpu,
           "freshness_p50_ms": statistics.median(f["p50"] for f in fresh) if fresh else None, "freshness_p99_ms": p99,
           "cpu_us_per_msg": sum(r[kind]["cpu"] for r in tput) / n * 1e6}
    goal = GOALS[kind]
    print(f"{kind}: worker throughput {worker:,.0f} tx/s = {ratio:.3f} x raw consume rate "
          f"(goal >= {goal:,} tx/s: {'met' if worker >= goal else 'NOT met'}); runs: "
          + ", ".join(f"{r[kind]['worker']:,.0f}" for r in tput))
    groups = {"computing (main thread)": [k for k in steps if k in COMPUTE],
              "delivering (delivery and publishing threads)": [k for k in steps if k in DELIVER],
              "committing (main thread)": [k for k in steps if k not in COMPUTE + DELIVER]}
    print(f"{kind}: worker time by step (µs per message; the threads overlap, so the groups add up to more "
          f"than the {busy / n * 1e6:.1f} µs/msg of wall time): " + "; ".join(
              f"{g} {sum(res['stages_us_per_msg'][k] for k in ks):.1f} = "
              + " + ".join(f"{k} {res['stages_us_per_msg'][k]:.1f}" for k in sorted(ks, key=lambda k: -steps[k]))
              for g, ks in groups.items() if ks))
    print(f"{kind}: CPU time of the thread running each step (µs per message; the rest of the process's CPU is "
          f"polars' and librdkafka's own threads, polls, the collector): " + ", ".join(
              f"{k} {steps_cpu[k]:.1f}" for k in sorted(steps_cpu, key=lambda k: -steps_cpu[k]))
          + f"; sum {sum(steps_cpu.values()):.1f}")
    print(f"{kind}: CPU from the first batch to the end (all threads) {res['cpu_us_per_msg']:.1f} µs/msg = "
          f"{1e6 / res['cpu_us_per_msg']:,.0f} msg per CPU-second (the worker's cost, whatever else the machine runs)")
    if fresh:
        print(f"{kind}: freshness at {a.rate:,.0f} tx/s: p50 {res['freshness_p50_ms']:.0f} ms, p99 {p99:.0f} ms "
              f"(goal <= {FRESH_GOAL_MS} ms: {'met' if p99 <= FRESH_GOAL_MS else 'NOT met'}); runs p99: "
              + ", ".join(f"{f['p99']:.0f}" for f in fresh))
        batches = sum(f["batches"] for f in fresh)
        per = {k: sum(f["stages"].get(k, 0.0) for f in fresh) / batches * 1e3 for k in fresh[0]["stages"]}
        print(f"{kind}: at that rate, {sum(f['messages'] for f in fresh) / batches:.0f} messages per batch, "
              f"ms per batch by step: " + ", ".join(f"{k} {per[k]:.1f}" for k in sorted(per, key=lambda k: -per[k]))
              + f"; total {sum(per.values()):.1f} ms")
    return res


def without(steps: str) -> None:
    "Replace the named delivery steps of the worker by no-ops in this process (the write still counts its rows)."
    import fraud_detection.worker as w
    names = {s.strip() for s in steps.split(",") if s.strip()}
    if unknown := names - set(DELIVER):
        raise SystemExit(f"--without: unknown step(s) {sorted(unknown)}: use {', '.join(DELIVER)}")

    def no_insert(engine, rows, before_commit=None):
        if before_commit is not None:
            before_commit()  # the messages are still waited for, if they are published
        return rows.height
    noops = {"publish": {"_queue": lambda worker, msgs, b: setattr(b, "queued", True),
                         "_acknowledged": lambda worker, b, queueing=None: None},
             "write": {"write_predictions": no_insert}, "push": {"_push": lambda worker, b: None}}
    for name in names:
        for attr, noop in noops[name].items():
            assert hasattr(w, attr), f"fraud_detection.worker has no {attr}: --without is out of date"
            setattr(w, attr, noop)
    if names:
        print(f"WITHOUT {', '.join(sorted(names))}: those steps do nothing in this run (a ceiling, not a result)",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="demo", help="simulator scale of the data (demo: ~9.9k held-out tx)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--copies", type=int, default=10, help="held-out period replayed this many times for throughput")
    ap.add_argument("--rate", type=float, default=1000.0, help="tx/s of the freshness replay")
    ap.add_argument("--fresh-seconds", type=float, default=10.0, help="length of the freshness replay")
    ap.add_argument("--explain", choices=list(EXPLAIN_OPTIONS), default="flagged")
    ap.add_argument("--db", default="sqlite,postgres", help="results stores, comma-separated: sqlite, postgres")
    ap.add_argument("--postgres-url", default=os.environ.get(
        "FRAUD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
        help="server where each run creates (and drops) its own database")
    ap.add_argument("--no-freshness", action="store_true", help="throughput only")
    ap.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="most messages per micro-batch (throughput)")
    ap.add_argument("--without", default="", help="delivery steps to replace by no-ops, comma-separated: publish, "
                    "write, push (what moving them out of the worker's process could buy at most; not a result)")
    ap.add_argument("--distinct-customers", action="store_true",
                    help="give every throughput message its own customer (production cardinality: every state read "
                         "misses the cache and every message pushes a state row)")
    a = ap.parse_args(argv)
    dbs = [d.strip() for d in a.db.split(",") if d.strip()]
    if unknown := set(dbs) - set(GOALS):
        ap.error(f"unknown results store(s) {sorted(unknown)}: use sqlite, postgres")
    explain = EXPLAIN_OPTIONS[a.explain]
    without(a.without)
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
        if a.distinct_customers:
            volume = volume.with_columns(customer_id=pl.format("{}-{}", "customer_id", pl.int_range(pl.len())))
        msgs = frame_to_messages(test, validate=False)
        t = time.perf_counter()
        for _, v in msgs:
            decode_transaction(v, message_headers())
        decode = len(msgs) / (time.perf_counter() - t)
        tput, fresh = [], {kind: [] for kind in dbs}
        for run in range(a.runs):
            with broker() as bootstrap:
                tput.append(throughput_run(base, tmp / f"tput-{run}", bootstrap, volume, run, explain, dbs,
                                           a.postgres_url, a.batch_size))
            r = tput[-1]
            print(f"run {run + 1}: raw consume {r['raw']:,.0f}/s; " + "; ".join(
                f"{kind} worker {r[kind]['worker']:,.0f}/s ({r[kind]['worker'] / r['raw']:.3f}x, "
                f"{r[kind]['batches']} batches)" for kind in dbs), file=sys.stderr)
        n = min(test.height, int(a.rate * a.fresh_seconds))
        for run in range(0 if a.no_freshness else a.runs):
            for kind in dbs:
                with broker() as bootstrap:
                    fresh[kind].append(freshness_run(base, tmp / f"fresh-{run}-{kind}", bootstrap, test.head(n), run,
                                                     a.rate, explain, kind, a.postgres_url))
                f = fresh[kind][-1]
                print(f"run {run + 1}: {kind} freshness at {f['sent_rate']:,.0f} tx/s: p50 {f['p50']:.0f} ms, "
                      f"p99 {f['p99']:.0f} ms, max {f['max']:.0f} ms", file=sys.stderr)
        raw = statistics.median(r["raw"] for r in tput)
        print(f"raw consume rate (one consumer doing nothing, same broker and messages): {raw:,.0f} msg/s; "
              f"decode_transaction alone {decode:,.0f} msg/s  [median of {a.runs} runs, explain={a.explain}, "
              f"batches of up to {a.batch_size:,}, "
              f"{volume.height:,} messages, 2-core machine shared with other jobs]")
        res = {"raw_consume_per_s": raw, "decode_per_s": decode}
        for kind in dbs:
            res[kind] = report(kind, tput, fresh[kind], a)
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
