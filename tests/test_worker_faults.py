"""Nothing in the input stops the stream: garbage-only batches, every kind of bad message alone in its batch and
mixed, rows that make scoring raise, a champion that cannot score anything. Real embedded broker, real Feast store
(SQLite online), real results database, real registered models.
"""
from __future__ import annotations

import json
import logging
import re
import time
from datetime import timedelta

import polars as pl
import pytest
from confluent_kafka import Producer
from worker_data import (
    LiveWorker,
    assert_matches_batch,
    db_url,
    fresh_broker,
    result_rows,
    settings_for,
    topic_messages,
    wait_for,
)

from fraud_detection.broker import TOPIC_DLQ, TOPIC_TRANSACTIONS, producer_config
from fraud_detection.core import Settings
from fraud_detection.feature_store import get_store, read_state
from fraud_detection.features import FEATURES, state_from_history
from fraud_detection.model import Scorer
from fraud_detection.producer import replay
from fraud_detection.registry import load, register, set_alias
from fraud_detection.schema import frame_to_messages, message_headers
from fraud_detection.worker import WorkerStats, run_worker

pytestmark = pytest.mark.kafka
HEADERS = message_headers()


def produce(bootstrap: str, items: list[tuple[bytes | None, bytes | None, list | None]]) -> None:
    "Send (key, value, headers) messages to `transactions`, in order, and wait for the broker's acknowledgements."
    p = Producer(producer_config(bootstrap))
    for key, value, headers in items:
        p.produce(TOPIC_TRANSACTIONS, key=key, value=value, headers=HEADERS if headers is None else headers)
    assert p.flush(10) == 0


def garbage(key: bytes) -> list[tuple[bytes, bytes, list | None, str]]:
    "Five malformed messages of different kinds: (key, value, headers, expected reason code)."
    return [(key, b'{"trans_num": "x", ', None, "bad_json"), (key, b"\xff\xfe\x00garbage", None, "bad_json"),
            (key, b"[1, 2, 3]", None, "not_object"), (key, b"", None, "empty"),
            (key, b'{"a": 1}', [("schema", b"transactions/v0")], "unknown_schema")]


def dlq_codes(bootstrap: str, n: int) -> list[str]:
    "Reason codes of the DLQ's messages (reads one more than `n`, so an extra one shows)."
    return sorted(dict(m.headers())["reason"].decode().split(":")[0] for m in topic_messages(bootstrap, TOPIC_DLQ, n))


def test_five_garbage_messages_after_a_replay(data, truth):
    "Issue 14's case: a replay, then five malformed messages with nothing valid between them, then a valid one."
    test = truth.test.head(201)
    with fresh_broker() as bootstrap:
        replay(test.head(200), bootstrap, progress=False)
        first = run_worker(settings_for(data, bootstrap), idle_exit=1.0)
        bad = garbage(b"anything")
        produce(bootstrap, [(k, v, h) for k, v, h, _ in bad])
        second = run_worker(settings_for(data, bootstrap), idle_exit=1.0)
        replay(test.tail(1), bootstrap, progress=False)
        third = run_worker(settings_for(data, bootstrap), idle_exit=1.0)
        codes = dlq_codes(bootstrap, 5)
    assert (first.messages, first.scored, first.dlq) == (200, 200, 0)
    assert (second.messages, second.scored, second.dlq, second.batches) == (5, 0, 5, 1)  # one batch of garbage only
    assert second.dlq_reasons == {"bad_json": 2, "not_object": 1, "empty": 1, "unknown_schema": 1}
    assert (third.messages, third.scored, third.dlq) == (1, 1, 0)  # offsets committed: the garbage is not redelivered
    assert codes == sorted(c for *_, c in bad)
    assert_matches_batch(data, db_url(data), truth, expect=test)


def test_three_garbage_messages_on_an_empty_topic(data, truth):
    "The issue's reproduction: three garbage messages on an empty topic; then a valid one is scored."
    with fresh_broker() as bootstrap:
        produce(bootstrap, [(k, v, h) for k, v, h, _ in garbage(b"k")[:3]])
        first = run_worker(settings_for(data, bootstrap), idle_exit=1.0)
        replay(truth.test.head(1), bootstrap, progress=False)
        second = run_worker(settings_for(data, bootstrap), idle_exit=1.0)
        codes = dlq_codes(bootstrap, 3)
    assert (first.messages, first.dlq, first.scored, first.dlq_reasons) == (3, 3, 0, {"bad_json": 2, "not_object": 1})
    assert (second.messages, second.scored) == (1, 1)
    assert codes == ["bad_json", "bad_json", "not_object"]
    assert_matches_batch(data, db_url(data), truth, expect=truth.test.head(1))


# --- the fault matrix -------------------------------------------------------------------------------------------

def _edit(value: bytes, **changes) -> bytes:
    return json.dumps(json.loads(value) | changes).encode()


def _raw(raw: str, field: str, literal: str) -> bytes:
    "The JSON text with one number replaced by a literal json.dumps would not write (NaN, Infinity)."
    out, n = re.subn(rf'"{field}":\s*[-0-9.eE+]+', f'"{field}":{literal}', raw, count=1)
    assert n == 1, raw
    return out.encode()


def faults(template: bytes) -> dict[str, tuple[bytes | None, list | None, str]]:
    "Every kind of bad message, built from one valid message value: kind → (value, headers, expected reason code)."
    row = json.loads(template)
    raw = template.decode()
    return {
        "not_json": (b'{"trans_num": "x", ', None, "bad_json"),
        "invalid_utf8": (raw.replace('"merchant":"', '"merchant":"\udcff', 1).encode("utf-8", "surrogateescape"),
                         None, "bad_json"),
        "binary": (b"\xff\xfe\x00\x01garbage", None, "bad_json"),
        "deep_nesting": (b"[" * 50_000 + b"]" * 50_000, None, "bad_json"),
        "not_object": (b'"a string"', None, "not_object"),
        "empty": (b"", None, "empty"),
        "null_value": (None, None, "empty"),
        "wrong_schema_header": (template, [("schema", b"transactions/v0")], "unknown_schema"),
        "no_schema_header": (template, [], "unknown_schema"),
        "missing_field": (json.dumps({k: v for k, v in row.items() if k != "amt"}).encode(), None, "missing_field"),
        "extra_field": (_edit(template, cc_num="4000123412341234"), None, "extra_field"),
        "bad_type": (_edit(template, zip="ten"), None, "wrong_type"),
        "null_id": (_edit(template, customer_id=None), None, "wrong_type"),
        "nan": (_raw(raw, "amt", "NaN"), None, "not_finite"),
        "infinity": (_raw(raw, "amt", "Infinity"), None, "not_finite"),
        "minus_infinity_lat": (_raw(raw, "lat", "-Infinity"), None, "out_of_range"),
        "negative_amount": (_edit(template, amt=-5.0), None, "out_of_range"),
        # 1e-323 passed a `> 0` bound and made `amt_ratio` inf (found by hypothesis): amounts start at a cent now
        "sub_cent_amount": (_edit(template, amt=1e-323), None, "out_of_range"),
        "latitude_91": (_edit(template, lat=91.0), None, "out_of_range"),
        "unknown_category": (_edit(template, category="casino"), None, "bad_value"),
        "bad_timestamp": (_edit(template, ts="2020-13-01T00:00:00"), None, "bad_timestamp"),
        "dob_in_future": (_edit(template, dob="2999-01-01"), None, "out_of_range"),
        "oversized": (_edit(template, job="x" * 900_000), None, "out_of_range"),  # 900 kB: under the broker's limit
    }


def stale_copy(test: pl.DataFrame) -> bytes:
    "An out-of-order transaction: a new trans_num one day before its customer's first test transaction (applied)."
    first = test.head(1)
    return frame_to_messages(first.with_columns(trans_num=pl.lit("stale-copy"), ts=pl.col("ts") - timedelta(days=1),
                                                unix_time=pl.col("unix_time") - 86400))[0][1]


def _snapshot(st: WorkerStats) -> dict:
    return {"scored": st.scored, "duplicates": st.duplicates, "dlq": st.dlq, "stale": st.stale, "batches": st.batches,
            **{f"dlq:{k}": v for k, v in st.dlq_reasons.items()}}


def _delta(before: dict, after: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


def test_each_fault_alone_in_its_batch(data, truth):
    """Every kind of bad message alone in a batch after a normal replay: each is dead-lettered with its reason (or
    counted as a duplicate), the counters say which, and the stream goes on to score a valid message after them."""
    test = truth.test.head(150)
    good = frame_to_messages(test)
    template = good[0][1]
    kinds = faults(template)
    # explain every row (the path with the most steps); a model error on one row is tested in test_worker_property
    with fresh_broker() as bootstrap, LiveWorker(settings_for(data, bootstrap), explain=True) as w:
        replay(test.head(149), bootstrap, progress=False)
        n = w.wait(149).messages
        got = {}

        def one(kind: str, key: bytes, value: bytes | None, headers: list | None) -> None:
            nonlocal n
            before = _snapshot(w.stats)
            produce(bootstrap, [(key, value, headers)])
            n += 1
            got[kind] = _delta(before, _snapshot(w.wait(n)))

        for kind, (value, headers, _) in kinds.items():
            one(kind, good[0][0], value, headers)
        one("duplicate", *good[5], None)  # an already-scored transaction, delivered again
        one("out_of_order", good[0][0], stale_copy(test), None)
        one("valid_after", *good[149], None)
        dlq = topic_messages(bootstrap, TOPIC_DLQ, len(kinds) + 1)
        stats = w.stats
    for kind, (_, _, code) in kinds.items():
        assert got[kind] == {"dlq": 1, f"dlq:{code}": 1, "batches": 1}, (kind, got[kind])
    assert got["duplicate"] == {"duplicates": 1, "batches": 1}
    assert got["out_of_order"] == {"dlq": 1, "dlq:stale": 1, "stale": 1, "batches": 1}
    assert got["valid_after"] == {"scored": 1, "batches": 1}
    reasons = {dict(m.headers())["source"].decode(): dict(m.headers())["reason"].decode() for m in dlq}
    assert len(dlq) == len(reasons) == len(kinds) + 1
    assert sorted(r.split(":")[0] for r in reasons.values()) == sorted([c for *_, c in kinds.values()] + ["stale"])
    assert stats.messages == 150 + len(kinds) + 2 and stats.retries == 0
    assert_matches_batch(data, db_url(data), truth, expect=test)


def test_all_faults_mixed_among_valid(data, truth):
    "Every kind of bad message, a duplicate and an out-of-order one, mixed among 300 valid ones: same outcome."
    test = truth.test.head(300)
    good = frame_to_messages(test)
    kinds = faults(good[0][1])
    items, bad = [], list(kinds.items())
    for i, (key, value) in enumerate(good):
        items.append((key, value, None))
        if i % 10 == 5 and bad:  # on the same keys as valid ones: same partitions, same batches
            _, (v, h, _) = bad.pop()
            items.append((key, v, h))
    assert not bad
    items += [(*good[7], None), (good[0][0], stale_copy(test), None)]
    with fresh_broker() as bootstrap:
        produce(bootstrap, items)
        stats = run_worker(settings_for(data, bootstrap), idle_exit=1.0)
        codes = dlq_codes(bootstrap, len(kinds) + 1)
    assert (stats.messages, stats.scored, stats.duplicates, stats.dlq, stats.stale) == (
        len(items), 300, 1, len(kinds) + 1, 1)
    want = {}
    for *_, c in kinds.values():
        want[c] = want.get(c, 0) + 1
    assert stats.dlq_reasons == want | {"stale": 1}
    assert codes == sorted([c for *_, c in kinds.values()] + ["stale"])
    assert_matches_batch(data, db_url(data), truth, expect=test)


# --- a model that cannot score -----------------------------------------------------------------------------------

def test_champion_that_cannot_score_dead_letters_without_blocking(data, truth):
    """A champion whose feature list does not match the feature rows (a real model file) raises on every row: after
    one retry and isolation every transaction is dead-lettered as model_error, offsets are committed, the state is
    still applied, and the stream goes on."""
    registry = data / "registry"
    champ = load("champion", registry)
    broken = Scorer(champ.booster, {**champ.meta, "features": [*FEATURES[:-1], "no_such_feature"]})
    set_alias("challenger", None, root=registry)
    set_alias("champion", register(broken, root=registry), root=registry)
    test = truth.test.head(40)
    with fresh_broker() as bootstrap:
        replay(test, bootstrap, progress=False)
        t0 = time.monotonic()
        first = run_worker(settings_for(data, bootstrap), idle_exit=1.0)
        seconds = time.monotonic() - t0
        again = run_worker(settings_for(data, bootstrap), idle_exit=1.0)
        codes = dlq_codes(bootstrap, test.height)
    assert (first.messages, first.scored, first.dlq, first.dlq_reasons) == (40, 0, 40, {"model_error": 40})
    assert again.messages == 0  # committed: nothing redelivered
    assert codes == ["model_error"] * 40 and seconds < 60
    assert result_rows(db_url(data)).height == 0
    customers = test["customer_id"].unique().to_list()
    truth_state = state_from_history(pl.concat([truth.train, test])).filter(pl.col("customer_id").is_in(customers))
    online = read_state(get_store(Settings(data_dir=data)), customers)
    assert online.sort("customer_id").equals(truth_state.sort("customer_id"))


# --- a corrupt champion at hot reload ------------------------------------------------------------------------------

def test_corrupt_champion_at_reload_keeps_the_model(data, truth, caplog):
    "A corrupt model promoted mid-stream: the worker keeps scoring with its model, says so once; mended, it reloads."
    registry = data / "registry"
    test = truth.test.head(90)
    version = load("champion", registry).version
    caplog.set_level(logging.ERROR, logger="fraud_detection.worker")
    with fresh_broker() as bootstrap, LiveWorker(settings_for(data, bootstrap), stats_every=0.1) as w:
        replay(test.head(30), bootstrap, progress=False)
        w.wait(30)
        bad = register(load("challenger", registry), root=registry)
        (registry / bad / "model.ubj").write_bytes(b"\x00 not a model")
        set_alias("champion", bad, root=registry)
        wait_for(lambda: w.stats.model_error, 10, "the failed reload in the status")
        replay(test.slice(30, 30), bootstrap, progress=False)
        w.wait(60)
        status = w.stats.summary()
        time.sleep(0.5)  # several more checks: still one log line
        set_alias("champion", version, root=registry)  # mended (rolled back)
        wait_for(lambda: w.stats.model_error is None, 10, "the mended registry")
        replay(test.tail(30), bootstrap, progress=False)
        w.wait(90)
    assert status["model_version"] == version and status["model_error"].startswith("XGBoostError")
    assert [r.getMessage() for r in caplog.records if "model reload failed" in r.getMessage()] == [
        f"{w.stats.worker_id}: model reload failed, keeping champion {version}: {status['model_error']}"]
    rows = assert_matches_batch(data, db_url(data), truth, expect=test)
    assert rows["model_version"].unique().to_list() == [version]
