"""Soak: a live stream at FRAUD_SOAK_RATE tx/s (default 500) for FRAUD_SOAK_SECONDS (default 600) with faults at random:
kill -9 of the worker (restarted as a supervisor would), PostgreSQL and Redis outages through TCP proxies, malformed
messages. At the end every valid transaction is scored exactly once with the batch path's features and scores, every
bad message is in the DLQ, the online state equals the batch truth, and the worker's memory is flat over the last
part of the run (no kills there: the same process throughout). Prints the counts.

The valid stream is the held-out period replayed again and again, each lap shifted later in time with new
trans_nums, so every customer's transactions stay in time order and the batch truth is the batch path over
train + everything sent.
"""
from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from datetime import timedelta

import numpy as np
import polars as pl
import pytest
import redis
import sqlalchemy as sa
from confluent_kafka import Producer
from polars.testing import assert_frame_equal
from tcp_proxy import TcpProxy
from worker_data import fresh_broker, start_worker, stop_worker, stored_features, wait_for

from fraud_detection.broker import TOPIC_DLQ, TOPIC_TRANSACTIONS, producer_config, read_topic
from fraud_detection.core import Settings
from fraud_detection.feature_store import MERCHANT_RISK_OFFLINE, apply, get_store, push_state, read_state
from fraud_detection.features import assert_same_features, batch_features, state_from_history
from fraud_detection.registry import load
from fraud_detection.results_store import get_engine, predictions
from fraud_detection.schema import frame_to_messages, message_headers
from fraud_detection.testing import fresh_pg_database, result_rows
from fraud_detection.worker import load_merchant_risk

SECONDS = float(os.environ.get("FRAUD_SOAK_SECONDS", "600"))
RATE = float(os.environ.get("FRAUD_SOAK_RATE", "500"))
BAD_SHARE = 0.005  # of the messages sent
pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis,
              pytest.mark.timeout(2 * SECONDS + 900)]  # the run, catching up, the batch-path check


def laps(test: pl.DataFrame, n: int) -> pl.DataFrame:
    "The first `n` transactions of `test` replayed lap after lap, each lap later than the last, with new trans_nums."
    span = test["ts"].max() - test["ts"].min() + timedelta(days=1)
    k = -(-n // test.height)
    out = pl.concat([test.with_columns(trans_num=pl.col("trans_num") + f"-{i}", ts=pl.col("ts") + span * i,
                                       unix_time=pl.col("unix_time") + int(span.total_seconds()) * i)
                     for i in range(k)])
    return out.head(n)


class Stream:
    "Produces valid transactions at `rate` per second with bad messages mixed in at random, in a thread."
    def __init__(self, bootstrap: str, valid: pl.DataFrame, rate: float, rng: random.Random):
        self.messages = frame_to_messages(valid, validate=False)
        self.bootstrap, self.rate, self.rng = bootstrap, rate, rng
        self.sent, self.bad = 0, []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        p, headers, t0 = Producer(producer_config(self.bootstrap)), message_headers(), time.monotonic()
        for i, (key, value) in enumerate(self.messages):
            while i > (time.monotonic() - t0) * self.rate:
                time.sleep(0.01)
            p.produce(TOPIC_TRANSACTIONS, key=key, value=value, headers=headers)
            if self.rng.random() < BAD_SHARE:
                tag = f"bad-{len(self.bad)}"
                value = self.rng.choice([f'{{"{tag}": ', f'["{tag}"]', f'{{"trans_num": "{tag}"}}'])
                p.produce(TOPIC_TRANSACTIONS, key=key, value=value.encode(), headers=headers)
                self.bad.append(tag)
            self.sent = i + 1
            p.poll(0)
        assert p.flush(60) == 0


def rss_mb(pid: int) -> float | None:
    "Resident memory of a process in MB (None if it is gone)."
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _proxy_for(url: str, default_port: int) -> TcpProxy:
    u = sa.engine.make_url(url) if "://" in url and not url.startswith("redis") else None
    if u is not None:
        return TcpProxy((u.host or "127.0.0.1", u.port or default_port))
    hostport = url.split("//")[1].split("/")[0]
    host, port = hostport.split(":")
    return TcpProxy((host, int(port)))


def test_soak(data, truth, postgres_url, redis_url, tmp_path):
    n = int(SECONDS * RATE)
    rng = random.Random(14)
    valid = laps(truth.test, n)
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    db = redis_url.rsplit("/", 1)[1]
    direct_store = Settings(data_dir=data, online_store="redis", redis_url=redis_url)
    store = get_store(direct_store)
    apply(store)
    push_state(store, state_from_history(truth.train), to="online")
    log = tmp_path / "worker.log"
    faults = {"kill -9": 0, "db outage": 0, "redis outage": 0, "outage seconds": 0.0}
    rss: list[tuple[float, float]] = []
    with fresh_pg_database(postgres_url, prefix="fraud_soak") as pg, _proxy_for(pg, 5432) as pg_proxy, \
            _proxy_for(redis_url, 6379) as redis_proxy, fresh_broker() as bootstrap:
        env = {"FRAUD_DB_URL": sa.engine.make_url(pg).set(host="127.0.0.1", port=pg_proxy.port)
               .render_as_string(hide_password=False), "FRAUD_ONLINE_STORE": "redis",
               "FRAUD_REDIS_URL": f"redis://127.0.0.1:{redis_proxy.port}/{db}"}
        engine = get_engine(pg)

        def count() -> int:
            try:
                with engine.connect() as c:
                    return c.execute(sa.select(sa.func.count()).select_from(predictions)).scalar()
            except sa.exc.SQLAlchemyError:
                return 0

        worker = start_worker(data, bootstrap, log, **env)
        stream = Stream(bootstrap, valid, RATE, rng)
        stream.thread.start()
        t0 = time.monotonic()
        calm = SECONDS / 2  # the last half: no kills (the same process, for the memory check)

        started = [0.0]  # when the current worker process started (s since t0)

        def sample() -> None:  # the worker's memory every 2 s during the calm part, after a 60 s warm-up
            while stream.thread.is_alive():
                elapsed = time.monotonic() - t0
                if elapsed > max(SECONDS - calm, started[0] + 60) and (m := rss_mb(worker.pid)):
                    rss.append((elapsed, m))
                time.sleep(2)
        threading.Thread(target=sample, daemon=True).start()
        cycle: list[str] = []
        try:
            while stream.thread.is_alive():
                elapsed = time.monotonic() - t0
                if worker.poll() is not None:
                    raise AssertionError(f"the worker exited by itself ({worker.returncode}):\n"
                                         f"{log.read_text()[-3000:]}")
                wait = rng.uniform(10, 30)
                if elapsed + wait > SECONDS - 5:
                    time.sleep(1)
                    continue
                time.sleep(wait)
                if not cycle:  # each kind once per cycle, in random order (kills only before the calm part)
                    cycle = rng.sample(["kill -9", "db outage", "redis outage"], 3)
                kind = cycle.pop()
                if kind == "kill -9" and time.monotonic() - t0 >= SECONDS - calm:
                    continue
                if kind == "kill -9":  # once it is scoring (a worker still starting up would be a cheap kill)
                    before = count()
                    wait_for(lambda b=before, w=worker: count() > b or w.poll() is not None, 120, "the worker scoring")
                    time.sleep(rng.uniform(0, 1))
                    worker.send_signal(signal.SIGKILL)
                    worker.wait()
                    worker = start_worker(data, bootstrap, log, **env)
                    started[0] = time.monotonic() - t0
                else:
                    proxy = pg_proxy if kind == "db outage" else redis_proxy
                    secs = rng.uniform(5, 30)
                    proxy.cut()
                    time.sleep(secs)
                    proxy.restore()
                    faults["outage seconds"] += secs
                faults[kind] += 1
            stream.thread.join()
            wait_for(lambda: count() >= n, 600 + SECONDS, f"{n} results rows")  # a loaded machine catches up slowly
            time.sleep(2)
            last = stop_worker(worker, log, timeout=60)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        dlq = read_topic(bootstrap, TOPIC_DLQ, len(stream.bad) * 3 + 10, timeout=10)
        rows = result_rows(pg)  # features decoded: {name: value} per row
    # exactly once, with the batch path's features and scores
    counts = {"valid sent": stream.sent, "worker starts": log.read_text().count("consuming transactions"), "bad sent": len(stream.bad), "results rows": rows.height,
              "distinct scored": rows["trans_num"].n_unique(), "dlq messages": len(dlq), **faults,
              "last worker": {k: last[k] for k in ("messages", "scored", "duplicates", "dlq", "dlq_reasons", "retries",
                                                    "outages", "outage_seconds")}}
    assert rows.height == rows["trans_num"].n_unique() == n and set(rows["trans_num"]) == set(valid["trans_num"])
    everything = pl.concat([truth.train, valid])
    want = batch_features(everything, load_merchant_risk(data / MERCHANT_RISK_OFFLINE)).join(
        valid.select("trans_num"), on="trans_num", how="semi").sort("ts", "trans_num")
    rows = rows.sort("ts", "trans_num")
    assert_same_features(stored_features(rows), want)
    np.testing.assert_allclose(rows["fraud_probability"].to_numpy(),
                               load("champion", data / "registry").predict_proba(want), rtol=1e-9, atol=0)
    # every bad message in the DLQ (a redelivered batch may dead-letter one twice)
    dlq_text = {(m.value() or b"").decode(errors="replace") for m in dlq}
    missing = [b for b in stream.bad if not any(f'"{b}"' in t for t in dlq_text)]
    assert not missing, missing[:5]
    # online state = batch truth
    customers = valid["customer_id"].unique().sort().to_list()
    truth_state = state_from_history(everything).filter(pl.col("customer_id").is_in(customers))
    assert_frame_equal(read_state(get_store(direct_store), customers).sort("customer_id"), truth_state)
    # memory flat over the calm part (a restarted worker's first minute is warm-up): the last third's median within
    # 10 % (and 40 MB) of the first third's
    mem = np.array([m for _, m in rss])
    third = max(1, len(mem) // 3)
    growth = float(np.median(mem[-third:]) - np.median(mem[:third])) if len(mem) >= 3 else 0.0
    counts["rss MB (calm part: first, last, growth)"] = [round(float(mem[0]), 1), round(float(mem[-1]), 1),
                                                          round(growth, 1)] if len(mem) else None
    print("\nSOAK", json.dumps({"seconds": SECONDS, "rate": RATE, **counts}, default=str))
    assert len(mem) >= 3 and growth <= max(0.10 * float(np.median(mem[:third])), 40.0), counts
    client.flushdb()
