"""A small scored dataset for the app tests: predictions, worker stats, a training reference, a run and a report."""
from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl

from fraud_detection import results as R
from fraud_detection.runs import RunRecord


def make_scored_home(root: Path, n: int = 200, seed: int = 7) -> dict:
    "Fill root/data and root/runs as the running system would; returns what was written."
    data, runs = root / "data", root / "runs"
    now = datetime.now(UTC).replace(tzinfo=None)
    eng = R.get_engine(f"sqlite:///{data / 'fraud.db'}")
    R.create_tables(eng)
    preds = R.fake_predictions(n, seed=seed, end=now)
    R.write_predictions(eng, preds)
    for i in range(6):
        for w in ("worker-0", "worker-1"):
            R.write_worker_stats(eng, w, processed=400 + 10 * i, dlq=i % 2, lag=120 - 20 * i, throughput=40.0 + i,
                                 ts=now - timedelta(minutes=6 - i))
    # training reference: the same kind of rows, amounts less than half (so amount drifts, the rest does not)
    ref = R.fake_predictions(1500, seed=seed + 1, end=now - timedelta(days=60), days=60)
    feats = pl.DataFrame([json.loads(json.dumps(f)) for f in ref["features"].to_list()], infer_schema_length=None)
    feats = feats.with_columns(pl.col("amt") * 0.45, pl.col("log_amt") - 0.8)
    (data / "features").mkdir(parents=True, exist_ok=True)
    feats.write_parquet(data / "features" / "train.parquet")
    # one recorded retraining run with its executed notebook
    (runs / "retrain").mkdir(parents=True, exist_ok=True)
    nb = runs / "retrain" / "20260101T000000000000Z.ipynb"
    nb.write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    RunRecord(name="retrain", parameters={"scale": "demo"}, output=str(nb), status="ok", seconds=42.0, trigger="drift").save()
    # the evaluation report of the serving model version
    rep = data / "reports" / "v2"
    rep.mkdir(parents=True, exist_ok=True)
    (rep / "metrics.json").write_text(json.dumps({"version": "v2", "pr_auc": 0.874, "roc_auc": 0.991,
                                                  "at_threshold": {"precision": 0.81, "recall": 0.77, "f1": 0.79}}))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 0.5, 0.8, 1], [1, 0.9, 0.7, 0.1])
    ax.set(xlabel="recall", ylabel="precision", title="PR curve (test data)")
    fig.tight_layout()
    fig.savefig(rep / "pr_curve.png", dpi=80)
    plt.close(fig)
    eng.dispose()
    return {"db": data / "fraud.db", "predictions": preds, "url": f"sqlite:///{data / 'fraud.db'}"}
