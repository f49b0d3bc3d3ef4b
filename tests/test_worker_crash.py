"""Crash safety of the stream worker: kill -9 a worker process at random points and at each step of a batch,
restart it, and check that every transaction has exactly one results row with the batch path's features and
scores, and that the online and offline customer state equal the batch path's state.
"""
from __future__ import annotations

import random
import signal
import subprocess
import time

import pytest
from worker_data import (
    assert_matches_batch,
    db_url,
    fresh_broker,
    result_count,
    start_worker,
    stop_worker,
    summary,
    topic_messages,
    wait_for,
)

from fraud_detection.broker import TOPIC_PREDICTIONS
from fraud_detection.core import stop_process_group
from fraud_detection.producer import replay
from fraud_detection.worker import STEPS

pytestmark = pytest.mark.kafka
SMALL_BATCHES = ("--batch-size", "64", "--max-wait", "0.05")  # many batches, so kills land inside them




def _finish(data, bootstrap, log, n: int) -> dict:
    "Run a worker until every transaction has a results row, stop it cleanly (SIGTERM), return its summary."
    start = log.stat().st_size if log.exists() else 0
    w = start_worker(data, bootstrap, log, *SMALL_BATCHES)
    try:  # joined (its SIGTERM handler set) and everything scored
        wait_for(lambda: b"assigned partitions" in log.read_bytes()[start:], 90, "the worker joining")
        wait_for(lambda: result_count(db_url(data)) >= n, 120, f"{n} results rows")
    finally:
        out = stop_worker(w, log)
    return out


def _kill_randomly(data, bootstrap, log, kills: int, seed: int, total: int) -> list[int]:
    """Start a worker, let it score a random while, SIGKILL it mid-stream; `kills` times, or until all `total` are
    scored. Rows seen at each kill."""
    rng, seen = random.Random(seed), []
    for _ in range(kills):
        before = result_count(db_url(data))
        if before >= total:  # nothing left to interrupt
            break
        w = start_worker(data, bootstrap, log, *SMALL_BATCHES)
        try:
            wait_for(lambda b=before, w=w: w.poll() is not None or result_count(db_url(data)) > b, 90,
                     "the worker scoring")
            time.sleep(rng.uniform(0.0, 0.6))  # somewhere inside some batch: parse, score, publish, write, push...
            assert w.poll() is None, f"worker exited early:\n{log.read_text()[-2000:]}"
        finally:
            stop_process_group(w, signal.SIGKILL)
        seen.append(result_count(db_url(data)))
    return seen


@pytest.mark.slow  # 85 s; `make test` keeps the crash after each step, test_kill9_many_times kills ten times
def test_kill9_at_random_points(data, truth, tmp_path):
    "Three kill -9s at random moments while scoring, then a clean run: nothing lost, nothing twice."
    n = truth.test.height
    log = tmp_path / "worker.log"
    with fresh_broker() as bootstrap:
        replay(truth.test, bootstrap, progress=False)
        seen = _kill_randomly(data, bootstrap, log, kills=3, seed=42, total=n)
        assert seen[-1] < n, "the kills came too late to test anything"
        last = _finish(data, bootstrap, log, n)
        published = topic_messages(bootstrap, TOPIC_PREDICTIONS, 2 * n)
    assert_matches_batch(data, db_url(data), truth)
    assert {m.key().decode() for m in published} == set(truth.test["trans_num"])  # at least once each
    assert last["dlq"] == 0 and last["scored"] == n - seen[-1]


def _crash_at(data, bootstrap, log, steps) -> None:
    "One worker run per step, each SIGKILLing itself right after that step of its (i + 2)-th batch."
    for i, step in enumerate(steps):
        w = start_worker(data, bootstrap, log, *SMALL_BATCHES, FRAUD_WORKER_CRASH_AFTER=f"{step}:{2 + i}")
        try:  # start-up (imports, stores, the group join) can take a minute next to Spark's JVMs on 2 cores
            code = w.wait(180)
        except subprocess.TimeoutExpired:
            stop_process_group(w, signal.SIGKILL)
            raise AssertionError(f"no crash after {step} within 180 s; the worker's log:\n{log.read_text()[-3000:]}") from None
        assert code == -signal.SIGKILL, log.read_text()[-2000:]
        assert f"crash injected after {step}" in log.read_text()


def test_crash_after_each_step(data, truth, tmp_path):
    "A crash right after publishing, after the state push, after the results write; then a clean run."
    n = truth.test.height
    log = tmp_path / "worker.log"
    with fresh_broker() as bootstrap:
        replay(truth.test, bootstrap, progress=False)
        _crash_at(data, bootstrap, log, ("publish", "push", "write"))  # `write` last: the clean run redoes it
        last = _finish(data, bootstrap, log, n)
        published = topic_messages(bootstrap, TOPIC_PREDICTIONS, 2 * n)
    assert_matches_batch(data, db_url(data), truth)
    assert {m.key().decode() for m in published} == set(truth.test["trans_num"])  # at least once each
    # the crash after `write` left one batch scored but not in the state: replayed as state-only (duplicates)
    assert last["duplicates"] > 0 and last["dlq"] == 0


@pytest.mark.slow
def test_kill9_many_times(data, truth, tmp_path):
    "A crash after each step (commit too), then ten kill -9s at random moments."
    n = truth.test.height
    log = tmp_path / "worker.log"
    with fresh_broker() as bootstrap:
        replay(truth.test, bootstrap, progress=False)
        _crash_at(data, bootstrap, log, STEPS)
        seen = _kill_randomly(data, bootstrap, log, kills=10, seed=7, total=n)
        assert len(seen) >= 5 and seen[0] < n, seen  # most kills landed while there was work left
        _finish(data, bootstrap, log, n)
    assert_matches_batch(data, db_url(data), truth)
    assert summary(log)["dlq"] == 0
