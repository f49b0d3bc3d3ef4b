"""Feast feature store against the real online stores: SQLite file and Redis, plus the batch pipeline.

Round trips must be exact (lists, microsecond timestamps, floats); a dead or hung Redis must fail fast.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from datetime import date, datetime, timezone
from pathlib import Path

import polars as pl
import pytest
import redis

from fraud_detection.broker import free_port
from fraud_detection.core import Settings, get_settings
from fraud_detection.feature_store import (
    CUSTOMER_VIEW,
    MERCHANT_RISK_OFFLINE,
    PUSH_SOURCE,
    STATE_OFFLINE,
    OnlineStoreUnavailable,
    _online,
    _state_frame,
    _state_wire,
    apply,
    build_batch_features,
    data_dir,
    get_store,
    materialize,
    push_state,
    read_merchant_risk,
    read_online_rows,
    read_state,
    write_offline_merchant_risk,
)
from fraud_detection.features import RISK_SCHEMA, STATE_SCHEMA, merchant_risk_table, state_from_history

FEAST_TEST_DB = 12  # Redis db used only by these tests: flushed before and after each test


def _db_url(redis_url: str, db: int = FEAST_TEST_DB) -> str:
    return redis_url.rsplit("/", 1)[0] + f"/{db}"


@pytest.fixture
def redis_db(redis_url: str):
    "URL of the dedicated Redis db, empty at start, flushed after."
    url = _db_url(redis_url)
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store(request, fraud_home: Path):
    "An applied store with an isolated data dir, for each online store."
    if request.param == "redis":
        url = request.getfixturevalue("redis_db")
        s = Settings(online_store="redis", redis_url=url)
    else:
        s = Settings()
    st = get_store(s)
    apply(st)
    return st


def _state(n: int = 3) -> pl.DataFrame:
    "Hand-made state rows in the contract schema, with values that would expose lossy storage."
    rows = []
    for i in range(n):
        last = datetime(2020, 6, 1, 12, 0, 0, 123457 + i)
        rows.append(dict(
            customer_id=f"c{i}", n_prior=i + 1, sum_amt=0.1 + 0.2 * i, sumsq_amt=1e-300 + i, last_ts=last,
            last_trans_num=f"t{i}", last_lat=40.000001 * (i + 1), last_long=-73.123456789,
            recent_ts=[datetime(1999, 12, 31, 23, 59, 59, 999999), last][: 1 + i % 2] + ([last] if i % 2 == 0 else []),
            recent_amt=[1e300, 0.1 + 0.2, 5e-324][: 2 + i % 2], merchants=[f"fraud_Ünïcode {i}", "m, with comma"],
            categories=["travel"] * (i + 1)))
    return pl.DataFrame(rows, schema=STATE_SCHEMA)


def test_state_round_trip_exact(store):
    state = _state(5)
    push_state(store, state, to="online")
    got = read_state(store, [f"c{i}" for i in range(5)])
    assert got.schema == pl.Schema(STATE_SCHEMA)
    assert got.equals(state), (got, state)  # bit-exact: microseconds, list order, 5e-324, unicode



def test_state_agrees_with_feasts_own_push_and_read(store):
    "push_state and read_state work under FeatureStore.push / get_online_features: each agrees with Feast's own."
    state, asked = _state(4), ["c3", "nobody", "c0", "c1", "c2", "c3"]
    push_state(store, state, to="online")
    theirs = _state_frame(_online(store, [f"{CUSTOMER_VIEW}:{c}" for c in list(STATE_SCHEMA)[1:]], {"customer_id": asked}))
    assert theirs.height == 4 and read_state(store, asked).equals(theirs)
    newer = state.with_columns(n_prior=pl.col("n_prior") + 10, last_trans_num=pl.col("last_trans_num") + "b")
    store.push(PUSH_SOURCE, _state_wire(newer).to_pandas())  # Feast's own write path
    expected = pl.DataFrame({"customer_id": ["c3", "c0", "c1", "c2"]}).join(newer, on="customer_id", how="left")
    assert read_state(store, asked).equals(expected)

def test_missing_customers_are_absent(store):
    push_state(store, _state(2), to="online")
    got = read_state(store, ["nobody", "c1", "c1", "c0"])
    assert got["customer_id"].to_list() == ["c1", "c0"]
    assert read_state(store, ["nobody"]).is_empty()


def test_same_second_update_is_not_lost(store):
    "Two transactions of one customer in the same second: the second state must replace the first."
    first = _state(1)
    second = first.with_columns(n_prior=pl.lit(2, pl.Int64), last_trans_num=pl.lit("t-later"))
    push_state(store, first, to="online")
    push_state(store, second, to="online")
    assert read_state(store, ["c0"])["last_trans_num"].to_list() == ["t-later"]


def test_push_online_and_offline_writes_parquet(store):
    state = _state(3)
    push_state(store, state)  # default: online_and_offline
    push_state(store, state.head(1), to="offline")
    parts = sorted((data_dir(store) / STATE_OFFLINE).glob("*/part-*.parquet"))
    assert len(parts) == 2
    offline = pl.read_parquet(parts)
    assert offline.height == 4 and offline["event_timestamp"].dtype == pl.Datetime("us", "UTC")
    # Feast reads the folder as the push source's batch source: point-in-time lookup of what was served
    ent = pl.DataFrame({"customer_id": ["c2"], "event_timestamp": [datetime(2021, 1, 1, tzinfo=timezone.utc)]})
    hist = store.get_historical_features(entity_df=ent.to_pandas(), features=[f"{CUSTOMER_VIEW}:n_prior"]).to_df()
    assert hist["n_prior"].tolist() == [3]


def test_merchant_risk_materialize_and_read(store, fraud_home):
    tx = pl.DataFrame({"trans_num": ["a", "b", "c"], "ts": [datetime(2020, 1, 1, 9), datetime(2020, 1, 2, 9),
                                                               datetime(2020, 1, 3, 9)],
                       "merchant": ["m1", "m2", "m1"], "is_fraud": [1, 0, 0]})
    from fraud_detection.core import clean_schema
    tx = pl.concat([pl.DataFrame(schema=clean_schema()), tx], how="diagonal_relaxed")
    risk = merchant_risk_table(tx, label_delay_days=0)
    write_offline_merchant_risk(risk, data_dir(store) / MERCHANT_RISK_OFFLINE)
    materialize(store, end=datetime(2020, 1, 3, 12))
    got = read_merchant_risk(store, ["m1", "zz", "m2"])
    want = risk.filter(pl.col("entity") == "merchant", pl.col("day") == date(2020, 1, 3)).sort("key")
    assert got.equals(want), (got, want)
    assert read_merchant_risk(store, ["zz"]).is_empty()


def test_batch_pipeline_end_to_end(store, fraud_home):
    "simulate → ingest → build_batch_features → online state equals state_from_history of the training period."
    from fraud_detection.ingest import ingest_files
    from fraud_detection.simulate import simulate_to_files
    d = data_dir(store)
    ingest_files(simulate_to_files("small", out_dir=d / "raw", seed=7), d / "clean", key="test", progress=False)
    summary = build_batch_features(d / "clean", label_delay_days=3, store=store)
    train = pl.read_parquet(d / "clean" / "train.parquet")
    assert summary["rows"] == train.height and summary["online_store"] == store.config.online_store.type
    want = state_from_history(train).sort("customer_id")
    got = read_state(store, want["customer_id"].to_list())
    assert got.equals(want)
    risk = pl.read_parquet(d / MERCHANT_RISK_OFFLINE)
    assert risk["merchant"].n_unique() == summary["merchants"]
    last_day = train["ts"].max().date()
    on = read_merchant_risk(store, train["merchant"].unique().to_list())
    assert on.height == summary["merchants"] and set(on["day"]) == {last_day}
    want_risk = merchant_risk_table(train, 3).filter(pl.col("day") == last_day)
    assert on.sort("key").equals(want_risk.filter(pl.col("entity") == "merchant").sort("key"))
    keys = {e: train[e].unique().to_list() for e in ("category", "zip")}  # the other entities' views, read online
    n = max(len(v) for v in keys.values())
    _, rows = read_online_rows(store, ["nobody"] * n, [""] * n, keys={e: (v * n)[:n] for e, v in keys.items()})
    got_other = pl.DataFrame(rows, schema=RISK_SCHEMA, orient="row").sort("entity", "key")
    assert got_other.equals(want_risk.filter(pl.col("entity") != "merchant").sort("entity", "key"))


def test_scheduled_run_leaves_customer_state_to_the_stream(store, fraud_home):
    "push_online=False (the scheduler's mode while the stream runs): merchant risk refreshed online, state untouched."
    from fraud_detection.ingest import ingest_files
    from fraud_detection.simulate import simulate_to_files
    d = data_dir(store)
    ingest_files(simulate_to_files("small", out_dir=d / "raw", seed=7), d / "clean", key="test", progress=False)
    summary = build_batch_features(d / "clean", label_delay_days=3, store=store, push_online=False)
    train = pl.read_parquet(d / "clean" / "train.parquet")
    assert read_state(store, train["customer_id"].unique().to_list()).height == 0
    assert read_merchant_risk(store, train["merchant"].unique().to_list()).height == summary["merchants"]
    assert (d / "features").is_dir() and not summary["pushed_online"]




@pytest.fixture
def redis_store_applied(fraud_home, redis_db):
    "Data dir whose Redis registry has the definitions applied (with a live Redis)."
    apply(get_store(Settings(online_store="redis", redis_url=redis_db)))
    return fraud_home


@pytest.mark.redis
def test_redis_down_fails_fast(redis_store_applied):
    "Nothing listens on the port: the read raises a ConnectionError at once instead of retrying for seconds."
    st = get_store(Settings(online_store="redis", redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    t0 = time.perf_counter()
    with pytest.raises(OnlineStoreUnavailable, match="Connection refused") as e:
        read_state(st, ["c0"])
    assert time.perf_counter() - t0 < 0.5
    assert isinstance(e.value.__cause__, redis.exceptions.ConnectionError)


@pytest.mark.redis
def test_redis_hung_times_out(redis_store_applied):
    "A server that accepts connections but never answers: the read times out within the socket timeout."
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)  # the kernel completes the handshake; nobody ever replies
        port = srv.getsockname()[1]
        st = get_store(Settings(online_store="redis", redis_url=f"redis://127.0.0.1:{port}/0"), timeout=0.1)
        t0 = time.perf_counter()
        with pytest.raises(OnlineStoreUnavailable, match="redis online store unavailable"):
            read_merchant_risk(st, ["m1"])
        assert time.perf_counter() - t0 < 1.0


def test_sqlite_unreadable_raises_unavailable(fraud_home):
    "An online database that cannot be opened is reported as OnlineStoreUnavailable too."
    apply(get_store(Settings()))
    db = Path(get_store(Settings()).config.online_store.path)
    db.unlink()
    db.mkdir()  # a folder where the database file was: sqlite cannot open it
    with pytest.raises(OnlineStoreUnavailable, match="sqlite online store unavailable"):
        read_state(get_store(Settings()), ["c0"])


@pytest.mark.slow
def test_scheduled_notebook_with_papermill(fraud_home):
    "The scheduled notebook runs with papermill on a tiny dataset and prints its summary."
    from fraud_detection.ingest import ingest_files
    from fraud_detection.simulate import simulate_to_files
    d = get_settings().data
    ingest_files(simulate_to_files("small", out_dir=d / "raw", seed=3), d / "clean", key="test", progress=False)
    home = get_settings().home
    out = fraud_home / "out.ipynb"
    subprocess.run([sys.executable, "-m", "papermill", str(home / "scheduled" / "batch_features.ipynb"), str(out),
                    "-p", "data_dir", str(d), "-p", "label_delay_days", "2", "--cwd", str(home / "scheduled")],
                   check=True, capture_output=True, timeout=300)
    text = out.read_text()
    assert "customers" in text and str(d) in text
    assert (d / MERCHANT_RISK_OFFLINE).is_file() and any((d / STATE_OFFLINE).glob("*/part-*.parquet"))
    assert read_state(get_store(Settings()), [pl.read_parquet(d / "clean" / "train.parquet")["customer_id"][0]]).height == 1
