"""A small scored dataset for the app tests: predictions, worker stats, a training reference, a run and a report."""
from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl

from fraud_detection import results_store
from fraud_detection.notebook_runs import RunRecord
from fraud_detection.testing import fake_predictions

_MODEL_TEMPLATE: Path | None = None


def _model_template() -> Path:
    "A registry (champion v0001, challenger v0002) and their evaluation reports from tiny synthetic data, built once."
    global _MODEL_TEMPLATE
    if _MODEL_TEMPLATE is None:
        from fraud_detection import registry
        from fraud_detection.evaluate import write_report
        from fraud_detection.model import time_split, train_model
        from fraud_detection.testing import SYNTHETIC_FEATURES as FEATURES  # the synthetic frame's columns
        from fraud_detection.testing import synthetic_features
        root = Path(tempfile.mkdtemp(prefix="fraud-model-template-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        tr, va = time_split(synthetic_features(6000, fraud_rate=0.03, seed=1, days=60), valid_frac=0.3)
        for i, depth in enumerate((3, 2)):
            m = train_model(tr, va, FEATURES, params={"max_depth": depth}, num_boost_round=30, early_stopping_rounds=10,
                            nthread=1)
            v = registry.register(m, root=root / "registry")
            registry.promote_if_better(v, va, root=root / "registry")
            write_report({"full": m}, va, root / "reports" / v, shap_rows=200)
            assert v == f"v000{i + 1}"
        _MODEL_TEMPLATE = root
    return _MODEL_TEMPLATE


def make_scored_home(root: Path, n: int = 200, seed: int = 7) -> dict:
    "Fill root/data and root/runs as the running system would; returns what was written."
    data, runs = root / "data", root / "runs"
    now = datetime.now(UTC).replace(tzinfo=None)
    eng = results_store.get_engine(f"sqlite:///{data / 'fraud.db'}")
    results_store.create_tables(eng)
    preds = fake_predictions(n, seed=seed, end=now)
    results_store.write_predictions(eng, preds)
    for i in range(6):
        for w in ("worker-0", "worker-1"):
            results_store.write_worker_stats(eng, w, processed=400 + 10 * i, dlq=i % 2, lag=120 - 20 * i, throughput=40.0 + i,
                                       ts=now - timedelta(minutes=6 - i), duplicates=i, retries=2 * (i == 3),
                                       outage_seconds=12.5 * (i == 3))
    # training reference: the same kind of rows, amounts less than half (so amount drifts, the rest does not)
    ref = fake_predictions(1500, seed=seed + 1, end=now - timedelta(days=60), days=60)
    feats = pl.DataFrame([json.loads(json.dumps(f)) for f in ref["features"].to_list()], infer_schema_length=None)
    feats = feats.with_columns(pl.col("amt") * 0.45, pl.col("log_amt") - 0.8)
    (data / "features").mkdir(parents=True, exist_ok=True)
    feats.write_parquet(data / "features" / "train.parquet")
    # one recorded retraining run with its executed notebook
    (runs / "retrain").mkdir(parents=True, exist_ok=True)
    nb = runs / "retrain" / "20260101T000000000000Z.ipynb"
    nb.write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    RunRecord(name="retrain", parameters={"scale": "demo"}, output=str(nb), status="ok", seconds=42.0, trigger="drift").save()
    # a registry with champion and challenger, and their evaluation reports (real artefacts of the training code)
    for sub in ("registry", "reports"):
        shutil.copytree(_model_template() / sub, data / sub)
    # the champion's drift reference (its scored validation period): the training-like rows above
    feats.with_columns(ref.select("ts", "fraud_probability", "decision")).write_parquet(
        data / "registry" / "v0001" / "drift_reference.parquet")
    eng.dispose()
    return {"db": data / "fraud.db", "predictions": preds, "url": f"sqlite:///{data / 'fraud.db'}"}
