"""The stream worker against the real embedded broker, Feast store, results database and registered models.

End to end with parity against the batch path, malformed messages to the DLQ, redelivery, PostgreSQL results,
two workers in one group. Crash safety (kill -9) is in test_worker_crash.py.
"""
from __future__ import annotations

import json
import threading

import polars as pl
import pytest
from confluent_kafka import Producer
from worker_data import (
    PARTITIONS,
    assert_matches_batch,
    db_url,
    fresh_broker,
    last_assignment,
    result_count,
    settings_for,
    start_worker,
    stop_worker,
    topic_messages,
    wait_for,
)

from fraud_detection.broker import (
    TOPIC_ALERTS,
    TOPIC_DLQ,
    TOPIC_PREDICTIONS,
    TOPIC_TRANSACTIONS,
    producer_config,
)
from fraud_detection.core import PII_COLUMNS
from fraud_detection.producer import replay
from fraud_detection.results_store import get_engine, read_worker_stats
from fraud_detection.schema import frame_to_messages, message_headers
from fraud_detection.testing import fresh_pg_database
from fraud_detection.worker import run_worker

pytestmark = pytest.mark.kafka




def test_end_to_end_matches_batch(data, truth):
    "A replayed held-out period: every transaction scored once, features and scores = batch path, state pushed."
    with fresh_broker() as bootstrap:
        report = replay(truth.test, bootstrap, progress=False)
        assert report.delivered == truth.test.height > 2000
        stats = run_worker(settings_for(data, bootstrap), idle_exit=1.5, stats_every=0.5)
        n = truth.test.height
        assert (stats.messages, stats.scored, stats.dlq, stats.duplicates) == (n, n, 0, 0)
        assert stats.partitions == set(range(PARTITIONS))
        rows = assert_matches_batch(data, db_url(data), truth)
        preds = topic_messages(bootstrap, TOPIC_PREDICTIONS, n)
        alerts = topic_messages(bootstrap, TOPIC_ALERTS, n)
    assert len(preds) == n
    flagged = rows.filter(pl.col("decision") != "approve")
    assert 0 < flagged.height < n and len(alerts) == flagged.height
    assert {m.key().decode() for m in alerts} == set(flagged["trans_num"])
    msg = json.loads(preds[0].value())
    row = rows.filter(pl.col("trans_num") == preds[0].key().decode()).row(0, named=True)
    assert msg["fraud_probability"] == row["fraud_probability"] and msg["features"] == row["features"]
    assert not set(PII_COLUMNS) & set(msg)
    # reasons: top-3 SHAP for every alert (explain="flagged"), none stored for approved rows
    assert all(len(json.loads(r)) == 3 for r in flagged["reasons"])
    assert set(rows.filter(pl.col("decision") == "approve")["reasons"]) == {"[]"}
    assert rows["challenger_version"].unique().to_list() == ["v0002"]
    assert rows["latency_ms"].min() > 0 and rows["partition"].n_unique() == PARTITIONS
    ws = read_worker_stats(get_engine(db_url(data)))
    assert ws["processed"].sum() == n and ws["worker_id"].unique().to_list() == [stats.worker_id]


BAD = {  # kind → (value, headers); every one must reach the DLQ with a reason starting with its code
    "bad_json": (b'{"trans_num": "x", ', None),
    "binary": (b"\xff\xfe\x00garbage", None),
    "not_object": (b"[1, 2, 3]", None),
    "missing_field": ("drop:amt", None),
    "wrong_type": ({"zip": "ten"}, None),
    "out_of_range": ({"amt": -5.0}, None),  # negative amount
    "bad_value": ({"category": "casino"}, None),
    "bad_timestamp": ({"ts": "yesterday"}, None),
    "extra_field": ({"cc_num": "4000123412341234"}, None),  # PII must not pass
    "empty": (b"", None),
    "unknown_schema": (None, [("schema", b"transactions/v0")]),
    "no_header": (None, []),
}


def _bad_messages(row: dict) -> list[tuple[str, bytes, list]]:
    "(expected code, value, headers) for every kind in BAD, built from one valid row."
    out = []
    for kind, (spec, headers) in BAD.items():
        code = "unknown_schema" if kind == "no_header" else "bad_json" if kind == "binary" else kind
        if isinstance(spec, bytes):
            value = spec
        elif spec is None:
            value = json.dumps(row).encode()
        elif isinstance(spec, str):
            value = json.dumps({k: v for k, v in row.items() if k != spec.split(":")[1]}).encode()
        else:
            value = json.dumps(row | spec).encode()
        out.append((code, value, message_headers() if headers is None else headers))
    return out


def test_malformed_messages_go_to_dlq(data, truth):
    "Twelve kinds of bad input among valid ones: all in the DLQ with reason and source, the stream goes on."
    test = truth.test.head(400)
    good = frame_to_messages(test)
    template = json.loads(good[0][1])
    bad = _bad_messages(template)
    stale = frame_to_messages(pl.read_parquet(data / "clean" / "train.parquet").tail(1))[0]  # already in the state
    with fresh_broker() as bootstrap:
        p = Producer(producer_config(bootstrap))
        sent_bad = []
        for i, (key, value) in enumerate(good):
            p.produce(TOPIC_TRANSACTIONS, key=key, value=value, headers=message_headers())
            if i % 30 == 0 and bad:  # bad messages between good ones, on the same keys
                code, v, h = bad.pop()
                p.produce(TOPIC_TRANSACTIONS, key=key, value=v, headers=h)
                sent_bad.append((code, v))
            if i == 200:  # a duplicate of an earlier transaction and a stale one
                p.produce(TOPIC_TRANSACTIONS, key=good[10][0], value=good[10][1], headers=message_headers())
                p.produce(TOPIC_TRANSACTIONS, key=stale[0], value=stale[1], headers=message_headers())
        assert p.flush(10) == 0 and not bad
        del p  # no reconnect attempts once the broker stops
        stats = run_worker(settings_for(data, bootstrap), idle_exit=1.5)
        dlq = topic_messages(bootstrap, TOPIC_DLQ, len(sent_bad) + 1)
    assert (stats.scored, stats.dlq, stats.stale, stats.duplicates) == (400, len(BAD) + 1, 1, 1)
    assert_matches_batch(data, db_url(data), truth, expect=test)
    got = [(dict(m.headers())["reason"].decode(), m.value() or b"") for m in dlq]
    assert sorted((r.split(":")[0], v) for r, v in got) == sorted([*sent_bad, ("stale", stale[1])])
    assert all(dict(m.headers())["source"].decode().startswith(f"{TOPIC_TRANSACTIONS}/") for m in dlq)


def test_redelivery_is_harmless(data, truth):
    "The whole topic delivered again (a new consumer group): nothing rescored, republished or re-applied."
    test = truth.test.head(600)
    with fresh_broker() as bootstrap:
        replay(test, bootstrap, progress=False)
        first = run_worker(settings_for(data, bootstrap, group="first"), idle_exit=1.5)
        again = run_worker(settings_for(data, bootstrap, group="second"), idle_exit=1.5)
        preds = topic_messages(bootstrap, TOPIC_PREDICTIONS, test.height)
    assert first.scored == test.height
    assert (again.messages, again.scored, again.duplicates, again.dlq) == (test.height, 0, test.height, 0)
    assert len(preds) == test.height
    assert_matches_batch(data, db_url(data), truth, expect=test)


@pytest.fixture
def pg_url(postgres_url):
    "A fresh PostgreSQL database for one test (dropped after)."
    with fresh_pg_database(postgres_url, prefix="fraud_worker") as url:
        yield url


@pytest.mark.postgres
def test_results_in_postgres(data, truth, pg_url):
    "Same end to end with the results in PostgreSQL (FRAUD_DB_URL)."
    test = truth.test.head(800)
    with fresh_broker() as bootstrap:
        replay(test, bootstrap, progress=False)
        stats = run_worker(settings_for(data, bootstrap, db_url=pg_url), idle_exit=1.5)
    assert stats.scored == test.height
    assert_matches_batch(data, pg_url, truth, expect=test)
    assert not (data / "fraud.db").exists()


def test_two_workers_split_partitions(data, truth, tmp_path):
    "Two worker processes in one group: each owns half the partitions, together they score everything once."
    n = truth.test.height
    with fresh_broker() as bootstrap:
        logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
        workers = [start_worker(data, bootstrap, log) for log in logs]
        try:
            # both members joined and the partitions split before anything is produced
            wait_for(lambda: all(len(last_assignment(log) or []) == PARTITIONS // 2 for log in logs), 60,
                     "the partitions split between the two workers")
            replay(truth.test, bootstrap, progress=False)
            wait_for(lambda: result_count(db_url(data)) >= n, 60, "every transaction scored")
        finally:
            summaries = [stop_worker(w, log) for w, log in zip(workers, logs, strict=True)]
    a, b = summaries
    assert a["scored"] > 0 and b["scored"] > 0 and a["scored"] + b["scored"] == n
    assert set(a["assigned"]) | set(b["assigned"]) == set(range(PARTITIONS))
    assert not set(a["assigned"]) & set(b["assigned"])
    assert a["duplicates"] == b["duplicates"] == 0
    assert_matches_batch(data, db_url(data), truth)



def test_rebalance_mid_stream(data, truth, tmp_path):
    "A second worker joins a live stream: partitions move, the new owner continues from the pushed state."
    n = truth.test.height
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    with fresh_broker() as bootstrap:
        workers = [start_worker(data, bootstrap, logs[0])]
        producer = threading.Thread(target=replay, args=(truth.test, bootstrap), daemon=True,
                                    kwargs={"rate": n / 45, "progress": False})  # a live stream of 45 s: a joining worker needs ~12 s, more under load
        try:
            wait_for(lambda: last_assignment(logs[0]) == list(range(PARTITIONS)), 60, "the first worker joined")
            producer.start()
            wait_for(lambda: result_count(db_url(data)) > 0, 30, "the first worker scoring")
            workers.append(start_worker(data, bootstrap, logs[1]))
            wait_for(lambda: all(len(last_assignment(log) or []) == PARTITIONS // 2 for log in logs), 60,
                     "the partitions split between the two workers")
            assert result_count(db_url(data)) < n, "the stream ended before the rebalance"
            wait_for(lambda: result_count(db_url(data)) >= n, 60, "every transaction scored")
        finally:
            producer.join(60)
            a, b = [stop_worker(w, log) for w, log in zip(workers, logs, strict=True)]
    assert a["scored"] > 0 and b["scored"] > 0 and a["scored"] + b["scored"] == n
    assert a["partitions"] == list(range(PARTITIONS)) and not set(a["assigned"]) & set(b["assigned"])
    assert_matches_batch(data, db_url(data), truth)
