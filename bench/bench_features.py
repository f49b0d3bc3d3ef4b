"""Benchmark of fraud_detection.features at Sparkov scale (synthetic, generated here with numpy).

Prints: batch_features time (median of 3) against a baseline measured in the same run (sort by customer and time +
a per-customer `cum_sum().over()`: the least any per-customer history feature costs); incremental throughput in
micro-batches of 1, 100 and 10,000 rows carrying the state; one-transaction latency p50/p99 of `request_row` (the
API's path: dicts in and out, the formulas' Python side) and of `request_features` (the same, from and to frames).
Usage: python bench/bench_features.py [rows]   (default 1,850,000 rows, 1,000 customers, 693 merchants, 2 years)
"""
from __future__ import annotations

import statistics
import sys
import time
from datetime import datetime

import numpy as np
import polars as pl

from fraud_detection.core import CATEGORIES, clean_schema
from fraud_detection.features import (
    FEATURES,
    RISK_SCHEMA,
    batch_features,
    incremental_features,
    merchant_risk_slice,
    merchant_risk_table,
    merge_state,
    request_features,
    request_row,
    risk_keys,
    state_from_history,
)


def sparkov_like(n: int = 1_850_000, customers: int = 1000, merchants: int = 693, days: int = 730,
                 seed: int = 0) -> pl.DataFrame:
    "Clean transactions with Sparkov's shape: ≈2.5 tx per customer per day, one category per merchant."
    rng = np.random.default_rng(seed)
    cust, merch = rng.integers(0, customers, n), rng.integers(0, merchants, n)
    t0 = int(datetime(2019, 1, 1).timestamp())
    unix = t0 + rng.integers(0, days * 86400, n)
    mlat, mlong = rng.uniform(25, 48, merchants), rng.uniform(-120, -70, merchants)
    df = pl.DataFrame({
        "trans_num": pl.Series(rng.permutation(n)).cast(pl.String).str.zfill(12),
        "ts": pl.Series(unix * 1_000_000).cast(pl.Datetime("us")), "unix_time": unix,
        "customer_id": pl.Series(cust).cast(pl.String).str.zfill(8),
        "merchant": pl.Series(merch).cast(pl.String).str.zfill(4),
        "category": np.array(CATEGORIES)[rng.integers(0, len(CATEGORIES), merchants)][merch],
        "amt": np.round(rng.lognormal(3.5, 1.2, n), 2), "gender": np.where(cust % 2 == 0, "F", "M"),
        "city": "X", "state": "NY", "zip": 10000 + cust, "lat": rng.uniform(25, 48, customers)[cust],
        "long": rng.uniform(-120, -70, customers)[cust], "city_pop": 100 + cust * 37 % 100_000, "job": "clerk",
        "dob": pl.Series(3000 + cust * 13 % 20_000).cast(pl.Date),
        "merch_lat": mlat[merch] + rng.normal(0, 0.5, n), "merch_long": mlong[merch] + rng.normal(0, 0.5, n),
        "is_fraud": (rng.random(n) < 0.005).astype(np.int8)})
    return df.cast(clean_schema()).sort("ts", "trans_num")


def timed(f, runs: int = 3) -> float:
    "Median wall time of `runs` calls."
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main(n: int = 1_850_000) -> None:
    t = time.perf_counter()
    tx = sparkov_like(n)
    print(f"data: {tx.height:,} rows, {tx['customer_id'].n_unique()} customers, {tx['merchant'].n_unique()} merchants "
          f"(generated in {time.perf_counter() - t:.1f} s)")
    t = time.perf_counter()
    risk = merchant_risk_table(tx, label_delay_days=7)
    print(f"merchant_risk_table (every risk entity): {time.perf_counter() - t:.2f} s ({risk.height:,} rows)")

    base = timed(lambda: tx.sort("customer_id", "ts").with_columns(c=pl.col("amt").cum_sum().over("customer_id")))
    batch = timed(lambda: batch_features(tx, risk))
    print(f"batch_features ({len(FEATURES)} features): {batch:.2f} s median of 3 ({tx.height / batch:,.0f} rows/s); baseline sort + "
          f"cum_sum().over(): {base:.2f} s; ratio {batch / base:.1f}x")

    cut = tx.height - 120_000  # history before the replayed tail
    t = time.perf_counter()
    state0 = state_from_history(tx[:cut])
    print(f"state_from_history({cut:,} rows): {time.perf_counter() - t:.2f} s, {state0.height} customers, "
          f"mean {state0['recent_ts'].list.len().mean():.1f} recent rows, "
          f"{state0.estimated_size() / state0.height:,.0f} bytes per customer in memory")
    for size, batches in ((1, 1000), (100, 200), (10_000, 10)):
        state, rows = state0, tx[cut:cut + size * batches]
        t = time.perf_counter()
        for i in range(batches):
            batch = rows[i * size:(i + 1) * size]
            _, updated = incremental_features(state, batch, merchant_risk_slice(risk, batch))
            state = merge_state(state, updated)
        dt = time.perf_counter() - t
        print(f"incremental, micro-batches of {size:>6,}: {rows.height / dt:>9,.0f} rows/s "
              f"({dt / batches * 1e3:.2f} ms per batch incl. merchant_risk_slice and merge_state)")

    latest = risk.sort("day").group_by("entity", "key").last()  # what the online store holds per entity key
    lookup = {(r["entity"], r["key"]): r for r in latest.select(list(RISK_SCHEMA)).to_dicts()}
    calls = [tx.row(cut + i, named=True) for i in range(2000)]
    states = {c: state0.filter(pl.col("customer_id") == c) for c in {r["customer_id"] for r in calls}}
    state_rows = {c: s.row(0, named=True) for c, s in states.items()}
    risk_rows = {r["trans_num"]: [lookup[k] for k in risk_keys(r).items() if k in lookup] for r in calls}
    risks = {t: pl.DataFrame(rows, schema=RISK_SCHEMA, orient="row") for t, rows in risk_rows.items()}
    for label, with_risk in (("state + entity risk rows", True), ("state only", False)):
        for name, fn in (("request_row", lambda r, m: request_row(r, state_rows[r["customer_id"]], m and risk_rows[m])),
                         ("request_features", lambda r, m: request_features(r, states[r["customer_id"]], m and risks[m]))):
            lat = []
            for r in calls:
                m = r["trans_num"] if with_risk else None
                t = time.perf_counter()
                fn(r, m)
                lat.append(time.perf_counter() - t)
            p50, p99 = np.percentile(lat, [50, 99]) * 1e3
            print(f"{name} ({label}, {len(calls)} calls): p50 {p50:.3f} ms, p99 {p99:.3f} ms")
    floor = []
    for r in calls:
        t = time.perf_counter()
        pl.from_dicts([r]).with_columns(pl.col("amt").log1p())
        floor.append(time.perf_counter() - t)
    print(f"floor (one-row frame + one expression): p50 {np.percentile(floor, 50) * 1e3:.3f} ms")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_850_000)
