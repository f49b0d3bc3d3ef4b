"""The results store against SQLite and the local PostgreSQL (a fresh database per session, dropped after)."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import polars as pl
import pytest
import sqlalchemy as sa

from fraud_detection import results_store as R
from fraud_detection.testing import fake_predictions, fresh_pg_database


@pytest.fixture(scope="session")
def pg_database(postgres_url: str):
    "URL of a fresh PostgreSQL database for this session (dropped afterwards)."
    with fresh_pg_database(postgres_url) as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request, tmp_path):
    "An empty results store on each backend."
    if request.param == "sqlite":
        eng = R.get_engine(f"sqlite:///{tmp_path}/fraud.db")
    else:
        eng = R.get_engine(request.getfixturevalue("pg_database"))
        R.metadata.drop_all(eng)
    R.create_tables(eng)
    yield eng
    if request.param == "sqlite":
        eng.dispose()


END = datetime(2026, 3, 1, 12)


def test_write_predictions_is_idempotent(engine):
    df = fake_predictions(120, seed=3, end=END)
    assert R.write_predictions(engine, df) == 120
    assert R.write_predictions(engine, df) == 0  # re-delivery of the same batch
    more = fake_predictions(30, seed=4, end=END)
    assert R.write_predictions(engine, pl.concat([df.sample(20, seed=1), more], how="vertical_relaxed")) == 30
    assert R.write_predictions(engine, []) == 0
    with engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(R.predictions)).scalar() == 150


def test_duplicates_inside_one_batch_and_minimal_rows(engine):
    row = {"trans_num": "t1", "customer_id": "c1", "ts": datetime(2026, 1, 1, 10, tzinfo=timezone(timedelta(hours=2))),
           "amt": 12.5, "fraud_probability": 0.7, "decision": "review", "model_version": "v1",
           "reasons": [{"feature": "amt", "value": 12.5, "contribution": float("nan")}], "features": {"amt": 12.5, "amt_z": None}}
    assert R.write_predictions(engine, [row, dict(row, amt=99.0)]) == 1
    got = R.read_prediction(engine, "t1")
    assert got["amt"] == 12.5  # first occurrence kept
    assert got["ts"] == datetime(2026, 1, 1, 8)  # aware → naive UTC
    assert got["reasons"] == [{"feature": "amt", "value": 12.5, "contribution": None}]  # NaN → null
    assert got["features"] == {"amt": 12.5, "amt_z": None} and got["challenger_probability"] is None
    assert isinstance(got["scored_at"], datetime)


def test_bad_rows_fail_the_whole_batch(engine):
    good = fake_predictions(3, seed=5, end=END).to_dicts()
    with pytest.raises(ValueError, match="bad decision"):
        R.write_predictions(engine, good + [dict(good[0], trans_num="x", decision="block")])
    with pytest.raises(ValueError, match="first"):
        R.write_predictions(engine, [dict(good[0], first="Jane")])  # PII column is refused, not silently stored
    with pytest.raises(sa.exc.IntegrityError):
        R.write_predictions(engine, [dict(good[0], amt=None)])
    assert R.read_alerts(engine, decisions=None).height == 0


def test_concurrent_overlapping_writers(engine):
    df = fake_predictions(400, seed=6, end=END)
    batches = [df.slice(i, 200) for i in (0, 100, 200, 0)]
    with ThreadPoolExecutor(4) as ex:
        inserted = list(ex.map(lambda b: R.write_predictions(engine, b), batches))
    assert sum(inserted) == 400


def test_alerts_filters_order_and_summary(engine):
    df = fake_predictions(200, seed=7, end=END)
    R.write_predictions(engine, df)
    al = R.read_alerts(engine)
    expected = df.filter(pl.col("decision") != "approve")
    assert al.height == expected.height and al["ts"].is_sorted(descending=True)
    assert set(al["trans_num"]) == set(expected["trans_num"])
    since = END - timedelta(days=3)
    sub = R.read_alerts(engine, since=since, min_score=0.6, max_amt=500, categories=["grocery_pos", "misc_net", "travel"])
    exp = expected.filter((pl.col("ts") >= since) & (pl.col("fraud_probability") >= 0.6) & (pl.col("amt") <= 500)
                          & pl.col("category").is_in(["grocery_pos", "misc_net", "travel"]))
    assert sorted(sub["trans_num"]) == sorted(exp["trans_num"])
    s = R.alert_summary(engine, since=since)
    e = expected.filter(pl.col("ts") >= since)
    assert s["n"] == e.height and s["n_decline"] == e.filter(pl.col("decision") == "decline").height
    assert abs(s["amount"] - e["amt"].sum()) < 1e-6 and s["labelled"] == 0
    assert R.read_alerts(engine, decisions=None).height == 200
    R.write_label(engine, al["trans_num"][0], 1)
    assert R.alert_summary(engine)["labelled"] == 1


def test_labels_latest_wins(engine):
    R.write_predictions(engine, fake_predictions(10, seed=8, end=END))
    tns = R.read_alerts(engine, decisions=None)["trans_num"].to_list()
    for lab in (1, 0, 1, 0):
        R.write_label(engine, tns[0], lab, note=f"pass {lab}", analyst="a1")
    R.write_label(engine, tns[1], 1)
    R.write_label(engine, "unknown-tx", 1, source="issuer")  # labels may arrive for transactions not scored here
    lab = R.read_labels(engine)
    assert lab.height == 3 and dict(zip(lab["trans_num"], lab["label"], strict=True))[tns[0]] == 0
    assert R.read_prediction(engine, tns[0])["label"]["label"] == 0
    with engine.connect() as c:  # the full history stays for audit
        assert c.execute(sa.select(sa.func.count()).select_from(R.labels)).scalar() == 6
    with pytest.raises(ValueError):
        R.write_label(engine, tns[0], -1)


def test_labelled_predictions_delay_rule(engine):
    now = datetime(2026, 3, 1)
    base = {"customer_id": "c", "amt": 10.0, "fraud_probability": 0.5, "decision": "review", "model_version": "v1"}
    rows = [dict(base, trans_num="old_fraud", ts=now - timedelta(days=10), is_fraud=1),
            dict(base, trans_num="old_legit", ts=now - timedelta(days=8), is_fraud=0),
            dict(base, trans_num="edge", ts=now - timedelta(days=7), is_fraud=1),          # exactly at the delay: known
            dict(base, trans_num="recent_fraud", ts=now - timedelta(days=3), is_fraud=1),  # too recent: unknown
            dict(base, trans_num="recent_analyst", ts=now - timedelta(days=1), is_fraud=0),
            dict(base, trans_num="old_overridden", ts=now - timedelta(days=20), is_fraud=1),
            dict(base, trans_num="old_unlabelled", ts=now - timedelta(days=20), is_fraud=None)]
    R.write_predictions(engine, rows)
    R.write_label(engine, "recent_analyst", 1)
    R.write_label(engine, "old_overridden", 0)
    lp = R.labelled_predictions(engine, label_delay_days=7, now=now)
    got = {t: (lab, src) for t, lab, src in lp.select("trans_num", "label", "label_source").iter_rows()}
    assert got == {"old_fraud": (1, "delayed"), "old_legit": (0, "delayed"), "edge": (1, "delayed"),
                   "recent_analyst": (1, "analyst"), "old_overridden": (0, "analyst")}
    # default now = the event clock (latest ts = now - 1 day): 'edge' is then too recent
    assert "edge" not in R.labelled_predictions(engine, 7)["trans_num"].to_list()
    assert R.labelled_predictions(engine, 7, now=now, since=now - timedelta(days=7, hours=1))["trans_num"].to_list() == \
        ["edge", "recent_analyst"]
    wf = R.labelled_predictions(engine, 7, now=now, with_features=True)
    assert {"features", "reasons"} <= set(wf.columns)


def test_empty_store_reads(engine):
    assert R.read_alerts(engine).height == 0 and R.read_labels(engine).height == 0
    lp = R.labelled_predictions(engine, 7)
    assert lp.height == 0 and {"label", "label_source", "fraud_probability"} <= set(lp.columns)
    assert R.event_clock(engine) is None and R.read_prediction(engine, "x") is None
    assert R.alert_summary(engine) == {"n": 0, "amount": 0.0, "labelled": 0, "n_approve": 0, "n_review": 0, "n_decline": 0}
    assert R.read_worker_stats(engine).height == 0


def test_json_columns_are_valid_json(engine):
    "reasons: JSON objects; features: a JSON array of numbers in the order of the names stored once per model version."
    df = fake_predictions(20, seed=9, end=END)
    R.write_predictions(engine, df)
    with engine.connect() as c:
        names = R.feature_names(c, df["model_version"].unique())
        assert names == {v: df["features"].struct.fields for v in df["model_version"].unique()}
        for reasons, feats, version in c.execute(sa.select(R.predictions.c.reasons, R.predictions.c.features,
                                                           R.predictions.c.model_version)):
            assert isinstance(json.loads(reasons), list) and len(json.loads(feats)) == len(names[version])


def _tricky_rows(n: int = 60) -> pl.DataFrame:
    """Worker-shaped rows (reasons as JSON text, features a struct) with the values a bulk path can get wrong: '', NULL, NaN, quotes, commas,
    newlines, non-ASCII, whole-second and sub-second times, a duplicate trans_num."""
    df = fake_predictions(n, seed=11, end=END)
    df = df.with_columns(reasons=pl.format("[{}]", pl.col("reasons").list.eval(pl.element().struct.json_encode()).list.join(",")))
    odd = ["", 'quote "q", comma', "line\nbreak", "naïve café ✓", None, "back\\slash"]
    return pl.concat([df.with_columns(
        merchant=pl.Series([odd[i % len(odd)] for i in range(n)]),
        state=pl.when(pl.int_range(n) % 3 == 0).then(None).otherwise(pl.col("state")),
        challenger_probability=pl.when(pl.int_range(n) % 4 == 0).then(float("nan")).otherwise(pl.col("challenger_probability")),
        ts=pl.when(pl.int_range(n) % 2 == 0).then(pl.col("ts").dt.truncate("1s")).otherwise(pl.col("ts"))),
        df.head(1).with_columns(amt=pl.lit(-1.0))])  # a second copy of the first trans_num: the first wins


def test_bulk_write_stores_what_sqlalchemy_stores(engine, tmp_path):
    "write_predictions' bulk statement (executemany / COPY) stores exactly what SQLAlchemy's own INSERT stores."
    df = _tricky_rows()
    assert R.write_predictions(engine, df) == df.height - 1
    ref = R.get_engine(f"sqlite:///{tmp_path}/ref.db")
    R.create_tables(ref)
    with ref.begin() as c:  # the reference: SQLAlchemy Core, one dict per row, the dict rules (features as vectors)
        c.execute(R.predictions.insert(), R._prediction_rows(R._feature_vectors(df)[0].to_dicts()))
    with engine.connect() as c, ref.connect() as r:
        got = [dict(x) for x in c.execute(R.predictions.select().order_by(R.predictions.c.trans_num)).mappings()]
        want = [dict(x) for x in r.execute(R.predictions.select().order_by(R.predictions.c.trans_num)).mappings()]
    for g, w in zip(got, want, strict=True):
        assert {k: v for k, v in g.items() if k != "scored_at"} == {k: v for k, v in w.items() if k != "scored_at"}
    if engine.dialect.name == "sqlite":  # same text in the file, so range queries on ts compare the same way
        q = "SELECT trans_num, ts FROM predictions ORDER BY trans_num"
        with engine.connect() as c, ref.connect() as r:
            assert c.exec_driver_sql(q).all() == r.exec_driver_sql(q).all()
    first = R.read_prediction(engine, df["trans_num"][0])
    assert first["amt"] == df["amt"][0] and first["merchant"] == ""
    assert R.write_predictions(engine, df) == 0  # redelivery: nothing new
    ref.dispose()


def test_frame_with_zone_and_nested_columns(engine):
    "A frame with aware datetimes and nested reasons/features is stored like its dicts."
    df = fake_predictions(5, seed=12, end=END).with_columns(pl.col("ts").dt.replace_time_zone("Europe/Paris"))
    assert R.write_predictions(engine, df) == 5
    got = R.read_prediction(engine, df["trans_num"][0])
    assert got["ts"] == df["ts"][0].astimezone(timezone.utc).replace(tzinfo=None)
    first = df.to_dicts()[0]
    assert got["reasons"] == json.loads(R._to_json(first["reasons"])) and got["features"] == first["features"]
