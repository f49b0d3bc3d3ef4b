"""Benchmark: `simulate` at demo scale and at full Sparkov scale (≈1.30 M + 0.56 M rows).

Times `simulate("demo")` (median of --demo-runs) and `simulate("full")` (median of --full-runs) and prints
rows, seconds and rows/s. Baseline, measured in the same run on the same frames: writing them to parquet
(`train.parquet` + `test.parquet`, the least any producer of these files pays), and the ratio
simulate / write. Also times `simulate_to_files(..., csv=True)` once at full scale. Target (issue):
full scale ≤ 60 s on 2 cores.

Usage: python bench/bench_simulate.py [--demo-runs 3] [--full-runs 3] [--no-csv]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import polars as pl

from fraud_detection.simulate import simulate, simulate_to_files

TARGET_S = 60.0


def timed(fn, runs: int) -> tuple[float, object]:
    "Median wall time of `runs` calls of `fn`, and its last result."
    times, out = [], None
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def write_parquet(frames: tuple[pl.DataFrame, pl.DataFrame], d: Path) -> None:
    "The baseline: write both frames as parquet."
    frames[0].write_parquet(d / "train.parquet")
    frames[1].write_parquet(d / "test.parquet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-runs", type=int, default=3)
    ap.add_argument("--full-runs", type=int, default=3)
    ap.add_argument("--no-csv", action="store_true", help="skip the full-scale simulate_to_files(csv=True) timing")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_simulate_") as d:
        d = Path(d)
        full = None
        for scale, runs in (("demo", a.demo_runs), ("full", a.full_runs)):
            sim, frames = timed(lambda scale=scale: simulate(scale), runs)
            base, _ = timed(lambda frames=frames: write_parquet(frames, d), runs)
            n = sum(len(f) for f in frames)
            fraud = sum(int(f["is_fraud"].sum()) for f in frames) / n
            print(f"{scale:>4}: {len(frames[0]):,} train + {len(frames[1]):,} test rows, fraud {fraud:.3%}")
            print(f"      simulate:               {sim:7.2f} s  ({n / sim:,.0f} rows/s)   median of {runs}")
            print(f"      baseline write parquet: {base:7.2f} s  ({n / base:,.0f} rows/s)   median of {runs}")
            print(f"      ratio simulate / write parquet: {sim / base:.2f}x")
            full = sim
            del frames
        if not a.no_csv:
            t = time.perf_counter()
            paths = simulate_to_files("full", d / "files", csv=True, progress=False)
            mb = sum(p.stat().st_size for p in paths) / 1e6
            print(f"simulate_to_files('full', csv=True): {time.perf_counter() - t:.2f} s ({mb:,.0f} MB written)")
        print(f"target full ≤ {TARGET_S:.0f} s: {'met' if full <= TARGET_S else 'NOT MET'}")


if __name__ == "__main__":
    main()
