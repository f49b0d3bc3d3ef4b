"""Training-set point-in-time join of merchant risk: Feast `get_historical_features` vs the polars as-of join.

Merchant-risk table at Sparkov scale (700 merchants x 538 days, written by `write_offline_merchant_risk`);
entity frames of N transactions (random merchant, random time). Both give, per transaction, the merchant's
latest row dated on or before its day. Feast runs on the file (Dask) offline store of feature_store.yaml;
the baseline is the polars `join_asof` that `fraud_detection.features.batch_features` performs.

Prints seconds per N (median of RUNS), the ratio, and checks both agree on the rows Feast returns.
Usage: python bench/bench_historical_features.py [--sizes 10000,100000] [--runs 1]
1 M rows is not attempted by default: Feast's Dask store first merges every entity row with all rows of its
merchant (1 M x 538 = 5e8 rows) before filtering by time, beyond this machine's memory.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from fraud_detection.core import Settings
from fraud_detection.feature_store import (
    MERCHANT_RISK_OFFLINE,
    MERCHANT_VIEW,
    TIMESTAMP,
    apply,
    data_dir,
    get_store,
    write_offline_merchant_risk,
)
from fraud_detection.features import RISK_SCHEMA

START, DAYS, MERCHANTS = date(2019, 1, 1), 538, 700


def risk_table(rng: np.random.Generator) -> pl.DataFrame:
    "A full (merchant, day) grid like merchant_risk_table's at Sparkov scale."
    m = pl.DataFrame({"merchant": [f"fraud_M{i:03d}" for i in range(MERCHANTS)]})
    d = pl.DataFrame({"day": pl.date_range(START, START + timedelta(days=DAYS - 1), eager=True)})
    g = m.join(d, how="cross")
    return g.with_columns(merchant_n_30d=pl.Series(rng.integers(0, 400, g.height)),
                          merchant_fraud_rate_30d=pl.Series(rng.random(g.height) * 0.05)).cast(RISK_SCHEMA)


def entities(n: int, rng: np.random.Generator) -> pl.DataFrame:
    "n transactions: random merchant, random microsecond time within the calendar (all after its first day)."
    t0 = datetime(START.year, START.month, START.day)
    us = rng.integers(0, DAYS * 86_400_000_000, n)
    return pl.DataFrame({"merchant": [f"fraud_M{i:03d}" for i in rng.integers(0, MERCHANTS, n)],
                         TIMESTAMP: pl.Series(us).cast(pl.Duration("us")) + t0}) \
        .with_columns(pl.col(TIMESTAMP).dt.replace_time_zone("UTC"), row=pl.int_range(pl.len()))


def polars_asof(ent: pl.DataFrame, risk: pl.DataFrame) -> pl.DataFrame:
    return ent.with_columns(day=pl.col(TIMESTAMP).dt.date()).sort("day") \
        .join_asof(risk.sort("day"), on="day", by="merchant", check_sortedness=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--polars-only", default="1000000", help="sizes timed with polars only (Feast infeasible)")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    risk = risk_table(rng)
    feats = [f"{MERCHANT_VIEW}:merchant_n_30d", f"{MERCHANT_VIEW}:merchant_fraud_rate_30d"]
    with tempfile.TemporaryDirectory(prefix="bench_hist_") as tmp:
        store = get_store(Settings(data_dir=Path(tmp) / "data"))
        apply(store)
        write_offline_merchant_risk(risk, data_dir(store) / MERCHANT_RISK_OFFLINE)
        print(f"merchant-risk table {risk.height:,} rows ({MERCHANTS} merchants x {DAYS} days)")
        for n in map(int, a.sizes.split(",")):
            ent = entities(n, rng)
            tf, tp = [], []
            for _ in range(a.runs):
                t = time.perf_counter()
                hist = store.get_historical_features(entity_df=ent.to_pandas(), features=feats).to_df()
                tf.append(time.perf_counter() - t)
                t = time.perf_counter()
                ref = polars_asof(ent, risk)
                tp.append(time.perf_counter() - t)
            got = pl.from_pandas(hist).select("row", "merchant_n_30d", "merchant_fraud_rate_30d") \
                .join(ref.select("row", "merchant_n_30d", "merchant_fraud_rate_30d"), on="row", suffix="_pl")
            agree = (got["merchant_n_30d"].cast(pl.Int64) == got["merchant_n_30d_pl"].cast(pl.Int64)).all() and \
                (got["merchant_fraud_rate_30d"] == got["merchant_fraud_rate_30d_pl"]).all()
            f, p = statistics.median(tf), statistics.median(tp)
            print(f"N={n:>9,}  feast get_historical_features {f:8.2f} s   polars join_asof {p:6.3f} s   "
                  f"ratio {f / p:8.0f}x   rows returned by feast {hist.shape[0]:,}/{n:,}   values agree: {agree}")
        for n in map(int, filter(None, a.polars_only.split(","))):
            ent = entities(n, rng)
            t = time.perf_counter()
            polars_asof(ent, risk)
            print(f"N={n:>9,}  feast not run (memory)                   polars join_asof {time.perf_counter() - t:6.3f} s")


if __name__ == "__main__":
    main()
