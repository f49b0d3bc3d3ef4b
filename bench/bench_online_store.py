"""Online-store read latency of one customer's state: `read_state` through Feast, SQLite and Redis.

`read_online` reads state and merchant risk of one transaction in one call on the FeatureService (what the
API does per request). Baselines measured in the same run on the same stored row: a raw `sqlite3` SELECT of the row from Feast's
table, and a raw redis-py HGETALL of Feast's key (the floor any client pays: one round trip). Also shown:
Feast's `get_online_features(...).to_dict()` alone, to split Feast's cost from the polars conversion.

Prints p50/p99 in ms (median over RUNS runs of READS reads each) and the ratio to the baseline.

Then a stream worker's micro-batch (`--customers` states at once, production cardinality): `push_state` and
`read_state`, which go straight to the online store's `online_write_batch` / `online_read`, against Feast's own
`FeatureStore.push` and `get_online_features` on the same states in the same run (µs per customer, median of runs).
Usage: python bench/bench_online_store.py [--reads 1000] [--runs 3] [--customers 5000]
Redis: FRAUD_BENCH_REDIS_URL (default redis://127.0.0.1:6379/13; that db is flushed before and after).
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import redis

from fraud_detection.core import Settings
from fraud_detection.feature_store import (
    CUSTOMER_VIEW,
    PUSH_SOURCE,
    _online,
    _state_frame,
    _state_wire,
    apply,
    get_store,
    push_state,
    read_online,
    read_state,
)
from fraud_detection.features import STATE_SCHEMA


def realistic_state(n_customers: int = 200) -> pl.DataFrame:
    "States of a busy customer's size: 60 recent transactions, 120 merchants, 14 categories."
    t0 = datetime(2020, 6, 1)
    rows = [dict(customer_id=f"cust{i:05d}", n_prior=900, sum_amt=61234.56, sumsq_amt=9.1e6, last_ts=t0,
                 last_trans_num=f"{i:032x}", last_lat=40.7, last_long=-73.9,
                 recent_ts=[t0 - timedelta(hours=3 * k) for k in range(59, -1, -1)],
                 recent_amt=[12.34 + k for k in range(60)], merchants=[f"fraud_Merchant {k}" for k in range(120)],
                 categories=[f"cat{k}" for k in range(14)]) for i in range(n_customers)]
    return pl.DataFrame(rows, schema=STATE_SCHEMA)


def timed(fn, reads: int) -> tuple[float, float]:
    "p50 and p99 in ms of `reads` calls of fn (after 50 warm-up calls)."
    for _ in range(50): fn()
    ts = []
    for _ in range(reads):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    q = statistics.quantiles(ts, n=100, method="inclusive")
    return q[49] * 1e3, q[98] * 1e3


def median_runs(fn, reads: int, runs: int) -> tuple[float, float]:
    res = [timed(fn, reads) for _ in range(runs)]
    return statistics.median(r[0] for r in res), statistics.median(r[1] for r in res)


def bench_store(settings: Settings, state: pl.DataFrame, reads: int, runs: int) -> dict[str, tuple[float, float]]:
    store = get_store(settings)
    apply(store)
    push_state(store, state, to="online")
    cid = state["customer_id"][7]
    assert read_state(store, [cid]).equals(state.filter(pl.col("customer_id") == cid))
    feats = [f"{CUSTOMER_VIEW}:{c}" for c in STATE_SCHEMA if c != "customer_id"]
    out = {"read_state": median_runs(lambda: read_state(store, [cid]), reads, runs),
           "read_online (state+risk)": median_runs(lambda: read_online(store, [cid], ["fraud_X"]), reads, runs),
           "get_online_features": median_runs(
               lambda: store.get_online_features(features=feats, entity_rows={"customer_id": [cid]}).to_dict(),
               reads, runs)}
    if settings.online_store == "sqlite":
        con = sqlite3.connect(store.config.online_store.path)
        table = f"{store.config.project}_{CUSTOMER_VIEW}"
        keys = [k for (k,) in con.execute(f"SELECT DISTINCT entity_key FROM {table}")]
        key = keys[7]
        sql = f"SELECT feature_name, value, event_ts FROM {table} WHERE entity_key = ?"
        out["baseline sqlite3 SELECT"] = median_runs(lambda: con.execute(sql, (key,)).fetchall(), reads, runs)
        con.close()
    else:
        client = redis.Redis.from_url(settings.redis_url)
        key = next(k for k in client.scan_iter() if client.type(k) == b"hash")
        out["baseline redis HGETALL"] = median_runs(lambda: client.hgetall(key), reads, runs)
        client.close()
    return out


def bench_batch(settings: Settings, state: pl.DataFrame, runs: int) -> dict[str, float]:
    "µs per customer of a whole batch's state push and read: the direct path and Feast's own, alternated run by run."
    store = get_store(settings)
    apply(store)
    ids, feats = state["customer_id"].to_list(), [f"{CUSTOMER_VIEW}:{c}" for c in STATE_SCHEMA if c != "customer_id"]
    ways = {"push: Feast's FeatureStore.push (baseline)": lambda: store.push(PUSH_SOURCE, _state_wire(state).to_pandas()),
            "push: push_state (online_write_batch)": lambda: push_state(store, state, to="online"),
            "read: Feast's get_online_features (baseline)": lambda: _state_frame(_online(store, feats, {"customer_id": ids})),
            "read: read_state (online_read)": lambda: read_state(store, ids)}
    spent: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(runs):
        for name, fn in ways.items():
            t = time.perf_counter(); fn(); spent[name].append(time.perf_counter() - t)
    assert read_state(store, ids).equals(state)
    return {k: statistics.median(v) / len(ids) * 1e6 for k, v in spent.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reads", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--customers", type=int, default=5000, help="states in the micro-batch part")
    a = ap.parse_args()
    state, batch = realistic_state(), realistic_state(a.customers)
    url = os.environ.get("FRAUD_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
    with tempfile.TemporaryDirectory(prefix="bench_online_") as tmp:
        results = {"sqlite": bench_store(Settings(data_dir=Path(tmp) / "sqlite"), state, a.reads, a.runs)}
        batches = {"sqlite": bench_batch(Settings(data_dir=Path(tmp) / "sqlite-batch"), batch, a.runs)}
        rc = redis.Redis.from_url(url)
        try:
            rc.ping()
        except redis.exceptions.ConnectionError:
            print(f"Redis at {url} not reachable: skipping the Redis half")
        else:
            rc.flushdb()
            try:
                results["redis"] = bench_store(Settings(data_dir=Path(tmp) / "redis", online_store="redis",
                                                        redis_url=url), state, a.reads, a.runs)
                rc.flushdb()
                batches["redis"] = bench_batch(Settings(data_dir=Path(tmp) / "redis-batch", online_store="redis",
                                                        redis_url=url), batch, a.runs)
            finally:
                rc.flushdb()
    print(f"one customer's state ({len(STATE_SCHEMA) - 1} features, 60-element lists), "
          f"{a.reads} reads x {a.runs} runs (median of runs)")
    for store, res in results.items():
        base = next(v for k, v in res.items() if k.startswith("baseline"))
        for name, (p50, p99) in res.items():
            print(f"  {store:6} {name:26} p50 {p50:7.3f} ms  p99 {p99:7.3f} ms   "
                  f"ratio to baseline p50 {p50 / base[0]:6.1f}x  p99 {p99 / base[1]:6.1f}x")
    print(f"a micro-batch of {a.customers:,} customers' states, µs per customer (median of {a.runs} runs)")
    for store, res in batches.items():
        for verb in ("push", "read"):
            (base_name, base), (name, ours) = [(k, v) for k, v in res.items() if k.startswith(verb)]
            print(f"  {store:6} {base_name:45} {base:7.1f}\n  {store:6} {name:45} {ours:7.1f}   "
                  f"{base / ours:4.1f}x faster")


if __name__ == "__main__":
    main()
