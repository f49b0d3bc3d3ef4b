"""Benchmark: batch pipeline at 1.8 M → 50 M transactions: time and peak memory per stage, one machine vs Spark.

For each size, simulated raw data (the simulator's full calendar, ≈1,830 transactions per customer; sizes above
5,000 customers are simulated in pieces of ≤ 5,000 customers with different seeds and merged time-ordered), then
each stage in a fresh subprocess, reporting wall time and the process's peak RSS:

- single machine (bounded memory, `fraud_detection.partitioned`): `ingest` (chunked, streaming stitch),
  `features` (what `fraud features build` computes: entity risk from daily counts + customer state, bucket by
  bucket), `training_set` (`build_training_set`: every transaction's features in customer buckets) and, with
  `--train`, `train` (XGBoost external memory over the bucket files);
- baseline, measured in the same run up to `--baseline-max` rows: the in-memory path (ingest in one chunk;
  `train.build_datasets`: `batch_features` over all rows at once);
- Spark, with `--spark`: `spark_training_set` on a real standalone cluster started here (master + 2 workers,
  1 core and `--worker-memory` each): wall time only (memory is spread over the JVMs and Python workers).

Target (DESIGN.md, issue 15): single-machine peak RSS ≤ 6 GB at 50 M rows, time linear in rows.
The machine running this is shared (2 cores, 24 GB): read times as ratios within one run.

Usage: python bench/bench_scale.py [--sizes 1.8M,9M,18M,50M] [--work DIR] [--spark] [--train]
       [--baseline-max 9M] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROWS_PER_CUSTOMER = 1_832  # the simulator's full calendar (1,000 customers → 1.83 M transactions)
PIECE = 5_000  # customers simulated at once (≈3.7 GB peak)
TARGET_GB = 6.0
DELAY = 7


def rows_of(size: str) -> int:
    "1.8M → 1_800_000."
    s = size.strip().upper()
    return int(float(s[:-1]) * 1_000_000) if s.endswith("M") else int(s)


def peak_gb() -> float:
    "This process's peak RSS in GB (Linux: ru_maxrss in KB)."
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


# ---- stages: each runs in its own process (`--stage NAME`), prints one JSON line ----

def stage_simulate(work: Path, customers: int) -> dict:
    from fraud_detection.simulate import simulate_to_files
    raw = work / "raw"
    if customers <= PIECE:
        simulate_to_files(customers, raw, seed=42, progress=False)
        return {}
    import polars as pl
    pieces = []
    for i, start in enumerate(range(0, customers, PIECE)):
        d = work / f"piece-{i}"
        if not (d / "test.parquet").exists():
            subprocess.run([sys.executable, __file__, "--stage", "simulate", "--work", str(d),
                            "--customers", str(min(PIECE, customers - start)), "--seed", str(42 + i)], check=True)
        pieces.append(d)
    raw.mkdir(parents=True, exist_ok=True)
    for stem in ("train", "test"):  # time-ordered, as real files are (streaming merge of sorted pieces)
        pl.scan_parquet([p / f"{stem}.parquet" for p in pieces]).sort("trans_date_trans_time") \
            .sink_parquet(raw / f"{stem}.parquet", engine="streaming")
    for p in pieces:
        shutil.rmtree(p)
    return {}


def stage_ingest(work: Path, in_memory: bool) -> dict:
    "Chunked ingest (the default), or the whole file as one chunk (the path before chunking: the baseline)."
    from fraud_detection.ingest import IngestReport, ingest_file, ingest_files
    files = [work / "raw" / "train.parquet", work / "raw" / "test.parquet"]
    if in_memory:
        rep = IngestReport([ingest_file(f, work / "clean-mem", "bench", chunk_rows=2**31) for f in files])
        shutil.rmtree(work / "clean-mem")
    else:
        rep = ingest_files(files, work / "clean", key="bench", progress=False)
    assert not rep.failed
    return {"rows": rep.rows_in}


def stage_features(work: Path) -> dict:
    "Entity risk + customer state as of the end of training (what `fraud features build` computes), bucketed."
    import polars as pl

    from fraud_detection.features import risk_from_daily
    from fraud_detection.partitioned import (
        bucketed_state,
        daily_counts,
        n_buckets,
        partition_clean,
        scan_clean,
    )
    sources = [work / "clean" / "train.parquet", work / "clean" / "test.parquet"]
    rows = scan_clean(sources).select(pl.len()).collect().item()
    risk = risk_from_daily(daily_counts(scan_clean(sources)), DELAY)
    as_of = pl.scan_parquet(sources[0]).select(pl.col("ts").max()).collect().item()
    parts = partition_clean([sources[0]], work / "state-parts", n_buckets(rows))
    state = bucketed_state(parts, before=as_of + __import__("datetime").timedelta(microseconds=1))
    (work / "features").mkdir(exist_ok=True)
    risk.write_parquet(work / "features" / "entity_risk.parquet")
    state.write_parquet(work / "features" / "customer_state.parquet")
    shutil.rmtree(work / "state-parts")
    return {"rows": rows, "customers": state.height, "risk_rows": risk.height}


def stage_training_set(work: Path, in_memory: bool) -> dict:
    sources = [work / "clean" / "train.parquet", work / "clean" / "test.parquet"]
    if in_memory:
        from fraud_detection.train import build_datasets, load_clean
        tr, te = load_clean(work / "clean")
        a, b = build_datasets(tr, te, DELAY)
        return {"rows": a.height + b.height}
    from fraud_detection.partitioned import build_training_set
    m = build_training_set(sources, work / "training", DELAY)
    return {"rows": m["rows"], "buckets": m["buckets"]}


def stage_train(work: Path, rounds: int) -> dict:
    from fraud_detection.features import FEATURES
    from fraud_detection.partitioned import train_external
    s = train_external(work / "training", FEATURES, num_boost_round=rounds, early_stopping_rounds=20)
    return {"trees": s.meta["trees"], "test_pr_auc": s.meta["metrics"]["test"]["pr_auc"]}


def stage_spark(work: Path, worker_memory: str) -> dict:
    from fraud_detection.spark import LocalCluster, spark_session, spark_training_set
    sources = [work / "clean" / "train.parquet", work / "clean" / "test.parquet"]
    t0 = time.perf_counter()
    with LocalCluster(2, cores=1, memory=worker_memory, work_dir=work / "spark-cluster") as cl:
        up = time.perf_counter() - t0
        spark = spark_session(cl.master_url, executor_memory=worker_memory)
        t1 = time.perf_counter()
        m = spark_training_set(spark, sources, work / "spark-training", DELAY)
        job = time.perf_counter() - t1
        spark.stop()
    shutil.rmtree(work / "spark-training", ignore_errors=True)
    return {"rows": m["rows"], "buckets": m["buckets"], "cluster_start_s": round(up, 1), "job_s": round(job, 1)}


def run_stage(args: argparse.Namespace) -> None:
    work, t0 = Path(args.work), time.perf_counter()
    fn = {"simulate": lambda: stage_simulate(work, args.customers),
          "ingest": lambda: stage_ingest(work, args.in_memory),
          "features": lambda: stage_features(work),
          "training_set": lambda: stage_training_set(work, args.in_memory),
          "train": lambda: stage_train(work, args.rounds),
          "spark": lambda: stage_spark(work, args.worker_memory)}[args.stage]
    if args.stage == "simulate" and args.seed is not None and args.customers <= PIECE:
        from fraud_detection.simulate import simulate_to_files
        simulate_to_files(args.customers, work, seed=args.seed, progress=False)
        out = {}
    else:
        out = fn()
    print(json.dumps({"stage": args.stage, "seconds": round(time.perf_counter() - t0, 1),
                      "peak_gb": round(peak_gb(), 2), **out}), flush=True)


def measure(stage: str, work: Path, *extra: str) -> dict:
    "Run one stage in a fresh process; its JSON line."
    p = subprocess.run([sys.executable, __file__, "--stage", stage, "--work", str(work), *extra],
                       capture_output=True, text=True)
    if p.returncode:
        print(p.stdout[-2000:], p.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"stage {stage} failed")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1.8M,9M,18M,50M")
    ap.add_argument("--work", default=None, help="data folder (default: a folder under /tmp, removed unless --keep)")
    ap.add_argument("--spark", action="store_true", help="also time the Spark path on a local 2-worker cluster")
    ap.add_argument("--train", action="store_true", help="also time external-memory training")
    ap.add_argument("--rounds", type=int, default=100, help="most boosting rounds with --train")
    ap.add_argument("--baseline-max", default="9M", help="run the in-memory baseline up to this size")
    ap.add_argument("--worker-memory", default="2g", help="memory of each Spark worker")
    ap.add_argument("--keep", action="store_true", help="keep the data folders")
    ap.add_argument("--only", default=None, help="comma-separated subset of ingest,features,training_set,train,"
                    "baseline,spark (default: the single-machine stages + whatever --train/--spark add)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--customers", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        return run_stage(args)
    root = Path(args.work or f"/tmp/bench-scale-{os.getpid()}")
    results = []
    for size in args.sizes.split(","):
        rows = rows_of(size)
        work = root / size
        customers = max(10, round(rows / ROWS_PER_CUSTOMER))
        if not (work / "raw" / "test.parquet").exists():
            sim = measure("simulate", work, "--customers", str(customers))
            print(f"{size}: simulated {customers:,} customers in {sim['seconds']} s (peak {sim['peak_gb']} GB)", flush=True)
        res = {"size": size, "customers": customers}
        stages = ["ingest", "features", "training_set", "baseline"] + ["train"] * args.train + ["spark"] * args.spark
        only = set(args.only.split(",")) if args.only else set(stages)
        for name, extra in [("ingest", ()), ("features", ()), ("training_set", ()), ("train", ("--rounds", str(args.rounds)))]:
            if name not in only:
                continue
            r = measure(name, work, *extra)
            res[name] = r
            print(f"{size}: {name:<13} {r['seconds']:>7.1f} s  peak {r['peak_gb']:5.2f} GB  {r}", flush=True)
        if "baseline" in only and rows <= rows_of(args.baseline_max):
            for name in ("ingest", "training_set"):
                r = measure(name, work, "--in-memory")
                res[f"{name}_in_memory"] = r
                print(f"{size}: {name + ' (in memory)':<27} {r['seconds']:>7.1f} s  peak {r['peak_gb']:5.2f} GB", flush=True)
        if "spark" in only:
            r = measure("spark", work, "--worker-memory", args.worker_memory)
            res["spark"] = r
            print(f"{size}: spark training set {r['job_s']:>7.1f} s (+ cluster start {r['cluster_start_s']} s)  {r}", flush=True)
        results.append(res)
        if not args.keep:
            shutil.rmtree(work)
    print("\nsize   rows        stage          seconds  s/M rows  peak GB")
    for res in results:
        for k in ("ingest", "features", "training_set", "train", "ingest_in_memory", "training_set_in_memory"):
            if k in res:
                r = res[k]
                n = r.get("rows") or res.get("training_set", {}).get("rows") or round(rows_of(res["size"]))
                ok = "" if "in_memory" in k or r["peak_gb"] <= TARGET_GB else "  > 6 GB target"
                print(f"{res['size']:<6} {n:>11,} {k:<24} {r['seconds']:>7.1f} {r['seconds'] / n * 1e6:>8.1f}  {r['peak_gb']:>6.2f}{ok}")
        if "spark" in res:
            r = res["spark"]
            print(f"{res['size']:<6} {r['rows']:>11,} {'spark training_set':<24} {r['job_s']:>7.1f} "
                  f"{r['job_s'] / r['rows'] * 1e6:>8.1f}     (2 workers × 1 core)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    if not args.keep and not args.work:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
