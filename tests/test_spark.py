"""The Spark path against a REAL standalone cluster: a master and two workers (spark-class ...Master/...Worker from
the pyspark wheel, loopback only, executors on this venv's Python) started by the fixture and stopped after.

Fast suite: Spark features, the merchant-risk table and relabelling == polars on the demo data. Slow: a model trained
by xgboost.spark.SparkXGBClassifier (2 workers) registered, loaded, scored and explained by the real API server;
customer state on Spark == polars; a larger period in many buckets, Spark == polars.
"""
from __future__ import annotations

import os
from pathlib import Path

import httpx
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from fraud_detection.broker import free_port
from fraud_detection.features import FEATURES, batch_features
from fraud_detection.ingest import ingest_files
from fraud_detection.partitioned import bucketed_state, build_training_set, partition_clean
from fraud_detection.simulate import simulate_to_files
from fraud_detection.testing import build_system, require, start_server, stop_server

DELAY = 7


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    "A standalone Spark master + 2 workers (1 core, 1 GB each) on 127.0.0.1, for this module."
    from fraud_detection.spark import LocalCluster, SparkUnavailable, require_spark
    try:
        require_spark()
    except SparkUnavailable as e:
        require(False, str(e))
    with LocalCluster(2, cores=1, memory="1g", work_dir=tmp_path_factory.mktemp("spark-cluster")) as c:
        assert c.alive_workers() == 2
        yield c


@pytest.fixture(scope="module")
def spark(cluster):
    from fraud_detection.spark import spark_session
    s = spark_session(cluster.master_url, app="fraud-tests")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> list[Path]:
    "Clean demo data (simulated, ingested): train.parquet and test.parquet."
    d = tmp_path_factory.mktemp("demo")
    raw = simulate_to_files("demo", d / "raw", seed=11, progress=False)
    rep = ingest_files(raw, d / "clean", key="tests", progress=False)
    assert not rep.failed
    return rep.outputs


@pytest.fixture(scope="module")
def spark_set(spark, demo, tmp_path_factory) -> Path:
    "The Spark-built training set of the demo data (5 customer buckets)."
    from fraud_detection.spark import spark_training_set
    out = tmp_path_factory.mktemp("spark-set") / "training"
    m = spark_training_set(spark, demo, out, DELAY, rows_per_bucket=10_000)
    assert m["buckets"] == 5 and m["master"].startswith("spark://127.0.0.1:")
    return out


def test_spark_features_equal_polars(spark_set, demo, tmp_path):
    "Same feature code per customer group on the cluster: every row and column equals the polars paths'."
    got = pl.read_parquet(spark_set / "*.parquet").sort("ts", "trans_num")
    build_training_set(demo, tmp_path / "polars", DELAY, rows_per_bucket=7_000)  # other buckets: 7 of them
    want = pl.read_parquet(tmp_path / "polars" / "*.parquet").sort("ts", "trans_num").select(got.columns)
    assert got.height == want.height == sum(pl.scan_parquet(p).select(pl.len()).collect().item() for p in demo)
    assert_frame_equal(got, want)
    assert set(FEATURES) <= set(got.columns)  # all 78 features, entity risk of merchant, category and zip included
    from fraud_detection.features import merchant_risk_table
    everything = pl.concat([pl.read_parquet(p) for p in demo])
    unbucketed = batch_features(everything, merchant_risk_table(everything, DELAY))
    assert_frame_equal(got.drop("split"), unbucketed.select([c for c in got.columns if c != "split"]))


def test_spark_risk_table_equals_polars(spark, demo):
    "Daily counts from Spark's groupBy, windows by features.risk_from_daily: merchant_risk_table bit for bit."
    from fraud_detection.features import RISK_ENTITIES, merchant_risk_table
    from fraud_detection.spark import read_clean, spark_merchant_risk
    everything = pl.concat([pl.read_parquet(p) for p in demo])
    got = spark_merchant_risk(read_clean(spark, demo), DELAY)
    assert got.equals(merchant_risk_table(everything, DELAY))
    assert got["entity"].unique(maintain_order=True).to_list() == list(RISK_ENTITIES)


def test_spark_relabel_equals_polars(spark, demo):
    "Analyst labels override is_fraud on Spark by the rule of the in-memory and bucketed paths (`model.relabel`)."
    from datetime import datetime

    from fraud_detection.model import LABEL, relabel
    from fraud_detection.partitioned import scan_clean
    from fraud_detection.spark import read_clean, spark_relabel
    everything = scan_clean(demo).collect()
    fraud, legit = (everything.filter(pl.col(LABEL) == v).sort("ts")["trans_num"][10] for v in (1, 0))
    lab = pl.DataFrame({"trans_num": [fraud, legit, fraud], "label": [1, 1, 0],
                        "labelled_at": [datetime(2020, 1, 1), datetime(2020, 1, 1), datetime(2020, 2, 1)]})
    got = pl.from_arrow(spark_relabel(read_clean(spark, demo), lab).toArrow())
    assert got.columns == everything.columns
    got, want = (f.select("trans_num", LABEL).sort("trans_num") for f in (got, relabel(everything, lab)))
    assert_frame_equal(got, want)
    assert dict(got.filter(pl.col("trans_num").is_in([fraud, legit])).iter_rows()) == {fraud: 0, legit: 1}


@pytest.mark.slow  # 55-80 s of training on the cluster
def test_spark_trained_model_in_api(spark, spark_set, tmp_path):
    "SparkXGBClassifier (2 workers) → registry → champion → the API scores and explains with it."
    from fraud_detection.registry import load
    from fraud_detection.spark import spark_train
    scorer = spark_train(spark, spark_set, num_boost_round=40, early_stopping_rounds=10, num_workers=2)
    assert "SparkXGBClassifier (num_workers=2)" in scorer.meta["training"] and scorer.features == FEATURES
    assert scorer.meta["metrics"]["test"]["roc_auc"] > 0.7
    system = build_system(tmp_path, scorer=scorer)  # registers it, makes it champion, fills the online store
    champion = load("champion", system.settings.data / "registry")
    assert champion.version == system.version and champion.meta["training"] == scorer.meta["training"]
    assert champion.row_explainer is not None  # TreeShap tabulates the Spark-trained booster
    ref = {r["trans_num"]: r for r in system.reference().iter_rows(named=True)}
    port = free_port()
    proc = start_server(system.settings, port)
    try:
        seen: set[str] = set()  # a customer's later held-out transactions would need its state pushed in between
        firsts = [b for b in system.bodies() if not (b["customer_id"] in seen or seen.add(b["customer_id"]))]
        for body in firsts[:10]:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json=body, timeout=10)
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["model_version"] == system.version and got["degraded"] is False
            assert len(got["reasons"]) == 3 and all(x["feature"] in FEATURES for x in got["reasons"])
            assert abs(got["fraud_probability"] - ref[body["trans_num"]]["fraud_probability"]) < 1e-6
    finally:
        stop_server(proc)


@pytest.mark.slow
def test_spark_customer_state_equals_polars(spark, demo, tmp_path):
    "The online store's customer state, per bucket on the cluster, equals the polars state."
    from fraud_detection.features import STATE_SCHEMA
    from fraud_detection.spark import read_clean, spark_customer_state
    got = pl.from_arrow(spark_customer_state(read_clean(spark, demo), 4).toArrow()).cast(STATE_SCHEMA)
    want = bucketed_state(partition_clean(demo, tmp_path / "parts", 3))
    assert_frame_equal(got.sort("customer_id"), want)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_spark_pipeline_many_buckets(spark, tmp_path):
    "A larger period (many buckets, several executor tasks each) through the Spark path == polars path."
    from fraud_detection.spark import spark_training_set
    raw = simulate_to_files(500, tmp_path / "raw", seed=2, progress=False)  # full calendar, ≈0.9 M rows
    clean = ingest_files(raw, tmp_path / "clean", key="tests", progress=False).outputs
    m = spark_training_set(spark, clean, tmp_path / "spark", DELAY, rows_per_bucket=80_000)
    assert m["buckets"] >= 10
    build_training_set(clean, tmp_path / "polars", DELAY, rows_per_bucket=300_000)
    got = pl.scan_parquet(tmp_path / "spark" / "*.parquet").sort("ts", "trans_num").collect()
    want = pl.scan_parquet(tmp_path / "polars" / "*.parquet").sort("ts", "trans_num").select(got.columns).collect()
    assert_frame_equal(got, want)
    assert os.environ.get("PYSPARK_PYTHON")  # executors ran this venv's Python


@pytest.mark.slow
def test_spark_build_batch_features_equals_polars(spark, demo, tmp_path):
    "`fraud features build` on Spark writes the same merchant risk and customer state as the polars pipeline."
    from fraud_detection.core import Settings
    from fraud_detection.feature_store import (
        MERCHANT_RISK_OFFLINE,
        STATE_OFFLINE,
        build_batch_features,
        get_store,
        read_offline_merchant_risk,
    )
    from fraud_detection.spark import spark_build_batch_features
    clean_dir = demo[0].parent
    out = {}
    for name, build in (("polars", build_batch_features), ("spark", spark_build_batch_features)):
        store = get_store(Settings(data_dir=tmp_path / name))
        kw = {"spark": spark} if name == "spark" else {}
        out[name] = build(clean_dir=clean_dir, label_delay_days=DELAY, store=store, push_online=False, **kw)
    assert out["spark"]["customers"] == out["polars"]["customers"] and out["spark"]["as_of"] == out["polars"]["as_of"]
    risk = [read_offline_merchant_risk(tmp_path / n / MERCHANT_RISK_OFFLINE) for n in ("polars", "spark")]
    assert_frame_equal(risk[1], risk[0])
    state = [pl.read_parquet(tmp_path / n / STATE_OFFLINE / "*" / "part-*.parquet").drop("event_timestamp")
             .sort("customer_id") for n in ("polars", "spark")]
    assert_frame_equal(state[1], state[0])


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_scheduled_notebooks_on_spark(demo, tmp_path):
    "scheduled/batch_features.ipynb and retrain.ipynb with a Spark master: the cluster computes; same outputs."
    import shutil
    import subprocess
    import sys

    from fraud_detection.feature_store import MERCHANT_RISK_OFFLINE, STATE_OFFLINE, read_offline_merchant_risk
    from fraud_detection.registry import load
    from fraud_detection.spark import LocalCluster
    home = Path(__file__).resolve().parents[1]

    def run(nb: str, data: Path, *params: str, env: dict | None = None) -> str:
        out = tmp_path / f"{nb}-{data.name}.ipynb"
        subprocess.run([sys.executable, "-m", "papermill", str(home / "scheduled" / f"{nb}.ipynb"), str(out),
                        "-p", "data_dir", str(data), *params, "--cwd", str(home / "scheduled")],
                       check=True, capture_output=True, timeout=900, env=env)
        return out.read_text()
    for name in ("polars", "spark"):
        shutil.copytree(demo[0].parent, tmp_path / name / "clean")
    build = ("-p", "label_delay_days", str(DELAY), "-p", "push_online", "False")
    run("batch_features", tmp_path / "polars", *build)
    with LocalCluster(2, cores=1, memory="1g", work_dir=tmp_path / "cluster") as c:  # its own: the module's is busy
        text = run("batch_features", tmp_path / "spark", *build, "-p", "spark_master", c.master_url)
        assert "engine: spark (spark://127.0.0.1" in text
        text = run("retrain", tmp_path / "spark", "-p", "num_boost_round", "40", "-p", "grid", "None",
                   env={**os.environ, "FRAUD_SPARK_MASTER": c.master_url})  # engine "auto": Spark when it is set
    assert "engine: spark on spark://127.0.0.1" in text and "PROMOTED" in text
    assert "SparkXGBClassifier" in load("champion", tmp_path / "spark" / "registry").meta["training"]
    risk = [read_offline_merchant_risk(tmp_path / n / MERCHANT_RISK_OFFLINE) for n in ("polars", "spark")]
    assert_frame_equal(risk[1], risk[0])
    state = [pl.read_parquet(tmp_path / n / STATE_OFFLINE / "*" / "part-*.parquet").drop("event_timestamp")
             .sort("customer_id") for n in ("polars", "spark")]
    assert_frame_equal(state[1], state[0])
