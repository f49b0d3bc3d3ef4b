"""`StreamWorker.process` over any batch composition (hypothesis): batches of zero valid transactions, one, all
duplicates, all stale, rows the model refuses, garbage, and mixes, in any order. Every step runs for real: parse,
state read (Feast, SQLite online store), dedupe against the results database, triage, features, score (a real
champion that refuses chosen rows), publish to the embedded broker (DLQ included), write, push, commit.
"""
from __future__ import annotations

import json
import random
import threading
from datetime import date, datetime, timedelta

import polars as pl
import pytest
from confluent_kafka import Consumer, Message, Producer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst
from worker_data import assert_matches_batch, fresh_broker, result_rows, settings_for, topic_messages

from fraud_detection.broker import TOPIC_DLQ, TOPIC_TRANSACTIONS, consumer_config, producer_config
from fraud_detection.core import CATEGORIES
from fraud_detection.feature_store import MERCHANT_RISK_OFFLINE, get_store
from fraud_detection.model import Scorer
from fraud_detection.results_store import create_tables, get_engine
from fraud_detection.schema import MAX_AMT, MIN_AMT, frame_to_messages, message_headers
from fraud_detection.worker import MerchantRisk, Models, StreamWorker

pytestmark = pytest.mark.kafka
HEADERS = message_headers()
GARBAGE = [(b'{"trans_num": ', HEADERS), (b"\xff\xfe", HEADERS), (b"", HEADERS), (b"[]", HEADERS),
           (b"{}", HEADERS), (b'{"a": 1}', [("schema", b"transactions/v0")]), (b"{}", [])]
KINDS = ["new", "new", "new", "refused", "duplicate", "copy_in_batch", "stale", "garbage"]


class Refusing(Scorer):
    "The registered champion, raising on the rows whose trans_num is in `refuse` (a model error on specific input)."
    def __init__(self, base: Scorer, refuse: set[str]):
        super().__init__(base.booster, base.meta, nthread=1)
        self.refuse = refuse

    def score(self, features: pl.DataFrame, explain=True, top_k: int = 3) -> pl.DataFrame:
        if bad := self.refuse & set(features["trans_num"].to_list()):
            raise ValueError(f"refusing {sorted(bad)[:2]}")
        return super().score(features, explain=explain, top_k=top_k)


class Harness:
    "A StreamWorker on real services, fed hand-made `Message`s with increasing offsets of partition 0."
    def __init__(self, data, bootstrap: str):
        s = settings_for(data, bootstrap, group="property")
        self.engine = get_engine(s.database_url)
        create_tables(self.engine)
        self.refuse: set[str] = set()
        models = Models(data / "registry")
        models.champion = Refusing(models.champion, self.refuse)
        self.consumer = Consumer(consumer_config(bootstrap, "property"))
        self.worker = StreamWorker(self.consumer, Producer(producer_config(bootstrap)), get_store(s), self.engine,
                                   models, MerchantRisk(data / MERCHANT_RISK_OFFLINE))
        self.offset = 0

    def messages(self, items: list[tuple[bytes | None, bytes | None, list]]) -> list[Message]:
        out = []
        for key, value, headers in items:
            out.append(Message(topic=TOPIC_TRANSACTIONS, partition=0, offset=self.offset, key=key, value=value,
                               headers=headers, timestamp=(1, 1_700_000_000_000 + self.offset)))
            self.offset += 1
        return out

    def counters(self) -> tuple[int, int, int, int]:
        st = self.worker.stats
        return st.scored, st.duplicates, st.dlq, st.messages

    def close(self) -> None:
        "Close the clients before the broker goes."
        self.consumer.close()
        self.worker.producer.flush(10)
        self.worker.consumer = self.worker.producer = None

    def committed(self) -> int:
        from confluent_kafka import TopicPartition
        return self.consumer.committed([TopicPartition(TOPIC_TRANSACTIONS, 0)], timeout=10)[0].offset


def test_process_any_batch_composition(data, truth):
    "Counters add up per batch, offsets are committed, and at the end results and state equal the batch truth."
    test = truth.test
    good = frame_to_messages(test)
    with fresh_broker() as bootstrap:
        h = Harness(data, bootstrap)
        cursor, scored, refused = 0, [], []

        @settings(max_examples=40, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(plan=hst.lists(hst.sampled_from(KINDS), max_size=10), seed=hst.integers(0, 2**32))
        def one_batch(plan: list[str], seed: int) -> None:
            nonlocal cursor
            start = cursor  # transactions before it are in the state: their older copies are stale
            rng, items, want = random.Random(seed), [], {"scored": 0, "duplicates": 0, "dlq": 0}
            new_in_batch = []
            for kind in plan:
                if kind in ("new", "refused") and cursor < test.height:
                    key, value = good[cursor]
                    tn = test["trans_num"][cursor]
                    items.append((key, value, HEADERS))
                    new_in_batch.append((key, value))
                    (refused if kind == "refused" else scored).append(tn)
                    if kind == "refused":
                        h.refuse.add(tn)
                    want["dlq" if kind == "refused" else "scored"] += 1
                    cursor += 1
                elif kind == "duplicate" and scored:
                    i = test["trans_num"].index_of(rng.choice(scored))
                    items.append((*good[i], HEADERS))
                    want["duplicates"] += 1
                elif kind == "copy_in_batch" and new_in_batch:
                    items.append((*rng.choice(new_in_batch), HEADERS))
                    want["duplicates"] += 1
                elif kind == "stale" and start:
                    i = rng.randrange(start)
                    row = json.loads(good[i][1])
                    ts = datetime.fromisoformat(row["ts"]) - timedelta(days=1)
                    row |= {"trans_num": f"stale-{h.offset}-{len(items)}", "ts": ts.isoformat()}
                    items.append((good[i][0], json.dumps(row).encode(), HEADERS))
                    want["dlq"] += 1
                else:  # garbage (or a kind with nothing to copy yet)
                    items.append((b"k", *rng.choice(GARBAGE)))
                    want["dlq"] += 1
            if not items:
                return
            rng.shuffle(items)  # any order: a customer's new transactions too
            before = h.counters()
            h.worker.process(h.messages(items))
            assert h.worker.drain()  # delivered and committed: the counters are final
            after = h.counters()
            got = dict(zip(["scored", "duplicates", "dlq", "messages"], (a - b for a, b in zip(after, before, strict=True)), strict=True))
            assert got == want | {"messages": len(items)}, (plan, got, want)
            assert h.committed() == h.offset

        try:
            one_batch()
            dlq = topic_messages(bootstrap, TOPIC_DLQ, h.worker.stats.dlq, timeout=10)
        finally:
            h.close()
    st = h.worker.stats
    assert st.messages == st.scored + st.duplicates + st.dlq and len(dlq) == st.dlq
    assert st.dlq_reasons.get("model_error", 0) == len(refused) and cursor > 20
    assert sum(st.dlq_reasons.values()) == st.dlq
    done = test.head(cursor)
    assert_matches_batch(data, f"sqlite:///{data / 'fraud.db'}", truth,
                         expect=done.filter(~pl.col("trans_num").is_in(refused)), applied=done)


def test_duplicate_of_a_batch_in_flight(data, truth):
    """A copy of a transaction whose batch is still being delivered (not in the results table yet) is a duplicate:
    not scored twice, not dead-lettered as stale. The delivery thread is held for a second, so the second batch
    is computed while the first is in flight."""
    good = frame_to_messages(truth.test)
    with fresh_broker() as bootstrap:
        h = Harness(data, bootstrap)
        try:
            gate = threading.Event()
            h.worker._delivery.submit(gate.wait, 30)  # the delivery thread is busy until the gate opens
            first = [(*good[i], HEADERS) for i in range(20)]
            h.worker.process(h.messages(first))
            assert h.worker.in_flight == 20 and len(h.worker.delivering()) == 20
            threading.Timer(1.0, gate.set).start()
            h.worker.process(h.messages([first[3], first[7], (*good[20], HEADERS)]))
            assert h.worker.drain()
            st = h.worker.stats
            assert (st.messages, st.scored, st.duplicates, st.dlq) == (23, 21, 2, 0), st.summary()
            assert h.committed() == h.offset
        finally:
            h.close()
    rows = result_rows(f"sqlite:///{data / 'fraud.db'}")
    assert rows.height == 21 and rows["trans_num"].n_unique() == 21


# --- schema-valid values anywhere in their ranges ------------------------------------------------------------------

def _text(lo: int, hi: int):
    return hst.text(hst.characters(exclude_categories=("Cs",)), min_size=lo, max_size=hi)


@hst.composite
def valid_transaction(draw, customers: list[str]) -> dict:
    "A transaction valid by the schema with any values its ranges allow (year 1 on, amounts from a cent...)."
    today = date.today()  # born by today, 0-120 years old at ts: ts before today + 121 years
    ts = draw(hst.datetimes(datetime(1, 1, 1), datetime(today.year + 119, 12, 31, 23, 59, 59, 999999)))
    age = draw(hst.integers(max(0, ts.year - today.year), min(120, ts.year - 1)))
    dob = date(ts.year - age, 1, 1)
    f = lambda lo, hi: hst.floats(lo, hi, allow_nan=False)  # noqa: E731
    return dict(trans_num=draw(_text(1, 64)), ts=ts.isoformat(), unix_time=draw(hst.integers(-(2**63), 2**63 - 1)),
                customer_id=draw(hst.one_of(hst.sampled_from(customers), _text(1, 64))), merchant=draw(_text(1, 200)),
                category=draw(hst.sampled_from(CATEGORIES)), amt=draw(hst.floats(MIN_AMT, MAX_AMT)),
                gender=draw(hst.sampled_from("FM")), city=draw(_text(1, 200)),
                state=draw(hst.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=2, max_size=2)),
                zip=draw(hst.integers(0, 99999)), lat=draw(f(-90, 90)), long=draw(f(-180, 180)),
                city_pop=draw(hst.integers(0, 2**63 - 1)), job=draw(_text(0, 200)), dob=dob.isoformat(),
                merch_lat=draw(f(-90, 90)), merch_long=draw(f(-180, 180)), is_fraud=draw(hst.sampled_from([None, 0, 1])))


@pytest.mark.slow  # an exploration: 300 examples
def test_schema_valid_values_never_stop_the_stream(data, truth):
    """Transactions valid by schema with values anywhere in their ranges (any year, denormal amounts, extreme
    coordinates, any unicode): `process` never raises; each is scored, a duplicate, stale, or dead-lettered as a
    model_error; neither the feature code nor the model raised on any of them (all features finite)."""
    customers = truth.test["customer_id"].unique().sort().head(5).to_list()
    with fresh_broker() as bootstrap:
        h = Harness(data, bootstrap)
        h.worker.explain = True  # every row explained: XGBoost's matrix check sees every feature row

        @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(txs=hst.lists(valid_transaction(customers), min_size=1, max_size=6))
        def one_batch(txs: list[dict]) -> None:
            for i, t in enumerate(txs):  # unique ids (hypothesis repeats small strings: those would be duplicates)
                t["trans_num"] = f"{t['trans_num'][:50]}#{h.offset + i}"
            items = [(t["customer_id"].encode(), json.dumps(t).encode(), HEADERS) for t in txs]
            before = h.counters()
            h.worker.process(h.messages(items))
            assert h.worker.drain()  # delivered and committed: the counters are final
            scored, duplicates, dlq, messages = (a - b for a, b in zip(h.counters(), before, strict=True))
            assert messages == len(items) == scored + duplicates + dlq
            assert h.committed() == h.offset

        try:
            one_batch()
        finally:
            h.close()
    st_ = h.worker.stats
    assert set(st_.dlq_reasons) <= {"stale"}, st_.dlq_reasons  # never feature_error, model_error or invalid
    assert result_rows(f"sqlite:///{data / 'fraud.db'}").height == st_.scored > st_.messages / 3
