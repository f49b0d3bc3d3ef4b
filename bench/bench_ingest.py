"""Benchmark: `ingest_files` on Sparkov-size Kaggle CSVs (≈1.30 M + 0.56 M rows).

Builds synthetic raw CSVs once in a temporary folder (Kaggle format with the leading unnamed index
column, ≈1,000 customers, ≈700 merchants, a few hundred deliberately bad rows), then times ingest
(median of N runs) against the baseline of a plain `pl.read_csv` of the same files, measured in the
same run. Target (DESIGN.md: ingest + features ≤ 60 s): ingest alone ≤ 30 s on 2 cores.

Usage: python bench/bench_ingest.py [--rows-train 1296675] [--rows-test 555719] [--runs 3]
"""
from __future__ import annotations

import argparse
import binascii
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl

from fraud_detection.core import CATEGORIES, DOB_FORMAT, RAW_COLUMNS, RAW_TIME_FORMAT
from fraud_detection.ingest import ingest_files

TARGET_S = 30.0
N_CUSTOMERS, N_MERCHANTS = 1_000, 693


def people(rng: np.random.Generator) -> pl.DataFrame:
    "Synthetic customers: identity, home and demographics (invented values)."
    n = N_CUSTOMERS
    firsts = np.array(["Jennifer", "Michael", "Ann", "Robert", "Mary", "David", "Linda", "James", "Susan", "John"])
    lasts = np.array(["Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Lopez"])
    jobs = np.array(["Teacher", "Nurse", "Engineer, civil", "Accountant", "Designer, jewellery", "Pilot"])
    dob = np.datetime64("1930-01-01") + rng.integers(0, 26_000, n).astype("timedelta64[D]")
    return pl.DataFrame({
        "cc_num": rng.integers(10**15, 5 * 10**18, n).astype(str),
        "first": firsts[rng.integers(0, len(firsts), n)], "last": lasts[rng.integers(0, len(lasts), n)],
        "gender": np.where(rng.random(n) < 0.55, "F", "M"),
        "street": [f"{i} {s} Street" for i, s in zip(rng.integers(1, 9999, n), rng.choice(lasts, n), strict=True)],
        "city": [f"Town{i}" for i in rng.integers(0, 900, n)], "state": rng.choice(["NY", "TX", "CA", "PA", "OH"], n),
        "zip": rng.integers(1_000, 99_999, n).astype(str), "lat": np.round(rng.uniform(25, 48, n), 4).astype(str),
        "long": np.round(rng.uniform(-124, -68, n), 4).astype(str), "city_pop": rng.integers(20, 2_900_000, n).astype(str),
        "job": jobs[rng.integers(0, len(jobs), n)], "dob": pl.Series(dob).dt.strftime(DOB_FORMAT),
    })


def transactions(rng: np.random.Generator, cust: pl.DataFrame, n: int, start: datetime, days: int,
                 n_bad: int) -> pl.DataFrame:
    "`n` Kaggle-format raw rows over `days` days from `start`, `n_bad` of them with one invalid value."
    secs = np.sort(rng.integers(0, days * 86_400, n)) + int(start.timestamp())
    who = rng.integers(0, len(cust), n)
    merchant = rng.integers(0, N_MERCHANTS, n)
    df = cust[who].with_columns(
        trans_date_trans_time=pl.from_epoch(pl.Series(secs), "s").dt.strftime(RAW_TIME_FORMAT),
        merchant=pl.format("fraud_Merchant {}, Kub and Sons", pl.Series(merchant)),
        category=pl.Series(np.array(CATEGORIES)[merchant % len(CATEGORIES)]),
        amt=pl.Series(np.round(rng.lognormal(3.8, 1.1, n).clip(1, 28_000), 2)).cast(pl.String),
        trans_num=pl.Series(np.frombuffer(binascii.hexlify(rng.bytes(16 * n)), dtype="S32")).cast(pl.String),
        unix_time=pl.Series(secs - 220_000_000).cast(pl.String),
        merch_lat=(pl.col("lat").cast(pl.Float64) + rng.uniform(-1, 1, n)).round(6).cast(pl.String),
        merch_long=(pl.col("long").cast(pl.Float64) + rng.uniform(-1, 1, n)).round(6).cast(pl.String),
        is_fraud=pl.Series(np.where(rng.random(n) < 0.0058, "1", "0")),
    ).select(RAW_COLUMNS)
    bad = rng.choice(n, n_bad, replace=False)
    kinds = [("amt", "-5.00"), ("amt", "abc"), ("trans_date_trans_time", "2019-13-45 99:00:00"), ("category", "crypto")]
    for i, (col, val) in enumerate(kinds):
        mask = np.zeros(n, dtype=bool)
        mask[bad[i::len(kinds)]] = True
        df = df.with_columns(pl.when(pl.Series(mask)).then(pl.lit(val)).otherwise(col).alias(col))
    return df.with_row_index("")  # Kaggle's leading unnamed index column


def timed(fns: list, runs: int) -> tuple[list[float], list]:
    "Median wall time of each of `fns` over `runs` rounds (interleaved, so load changes hit all alike), last results."
    times: list[list[float]] = [[] for _ in fns]
    outs: list = [None] * len(fns)
    for _ in range(runs):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times], outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows-train", type=int, default=1_296_675)
    ap.add_argument("--rows-test", type=int, default=555_719)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    rng = np.random.default_rng(7)
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as d:
        d = Path(d)
        t = time.perf_counter()
        cust = people(rng)
        files = [d / "fraudTrain.csv", d / "fraudTest.csv"]
        transactions(rng, cust, a.rows_train, datetime(2019, 1, 1), 534, 400).write_csv(files[0])
        transactions(rng, cust, a.rows_test, datetime(2020, 6, 21), 194, 200).write_csv(files[1])
        n = a.rows_train + a.rows_test
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"built {n:,} raw rows ({mb:,.0f} MB CSV) in {time.perf_counter() - t:.1f} s")

        # baselines: a plain typed read (bad values become null silently) and the all-strings read ingest starts from
        (base, strs, ing), (_, _, rep) = timed([
            lambda: [pl.read_csv(f, ignore_errors=True) for f in files],
            lambda: [pl.read_csv(f, infer_schema=False) for f in files],
            lambda: ingest_files(files, d / "clean", key="bench-key", progress=False)], a.runs)
        assert not rep.failed and rep.rows_in == n and rep.rows_ok + rep.rows_rejected == n, str(rep)
        print(rep)
        print(f"baseline pl.read_csv (typed, ignore_errors): {base:6.2f} s  ({n / base:,.0f} rows/s)   median of {a.runs}")
        print(f"pl.read_csv (all strings):                   {strs:6.2f} s  ({n / strs:,.0f} rows/s)")
        print(f"ingest_files:                                {ing:6.2f} s  ({n / ing:,.0f} rows/s)   median of {a.runs}")
        print(f"ratio ingest / typed read_csv: {ing / base:.2f}x   (ingest / string read: {ing / strs:.2f}x)")
        print(f"target ingest ≤ {TARGET_S:.0f} s: {'met' if ing <= TARGET_S else 'NOT MET'}")


if __name__ == "__main__":
    main()
