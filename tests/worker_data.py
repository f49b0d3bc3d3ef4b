"""What the stream-worker tests and benchmark need: a data dir with clean data, batch features in the Feast
store, a champion and a challenger in the registry, the batch path's ground truth, and a fresh embedded broker.

Built once (small simulated data) and copied per test, so every test starts from the same bootstrapped state.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import sqlalchemy as sa
from polars.testing import assert_frame_equal

from fraud_detection.broker import ALL_TOPICS, EmbeddedBroker, ensure_topics, read_topic
from fraud_detection.core import Settings
from fraud_detection.feature_store import (
    MERCHANT_RISK_OFFLINE,
    STATE_OFFLINE,
    TIMESTAMP,
    from_wire,
    get_store,
    read_state,
)
from fraud_detection.features import (
    FEATURE_SCHEMA,
    FEATURES,
    STATE_SCHEMA,
    assert_same_features,
    batch_features,
    state_from_history,
)
from fraud_detection.registry import load
from fraud_detection.results_store import get_engine, predictions
from fraud_detection.testing import PARTITIONS, build_data_dir, db_url, result_rows, settings_for  # noqa: F401 (used by the tests)
from fraud_detection.worker import WorkerStats, load_merchant_risk, run_worker

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Truth:
    "The batch path's answer for the held-out (test) transactions."
    train: pl.DataFrame  # clean training transactions (their state is what the batch run pushed)
    test: pl.DataFrame  # clean test transactions, in time order (what is replayed)
    features: pl.DataFrame  # their batch features over the whole history, with the same merchant-risk table
    state: pl.DataFrame  # every customer's state after train + test


def batch_truth(data: Path) -> Truth:
    "Features and final state as the batch path computes them (merchant risk: the table the batch run wrote)."
    train = pl.read_parquet(data / "clean" / "train.parquet")
    test = pl.read_parquet(data / "clean" / "test.parquet")
    everything = pl.concat([train, test])
    feats = batch_features(everything, load_merchant_risk(data / MERCHANT_RISK_OFFLINE))
    feats = feats.join(test.select("trans_num"), on="trans_num", how="semi")
    return Truth(train, test, feats, state_from_history(everything).sort("customer_id"))


def worker_env(data: Path, bootstrap: str, group: str = "fraud-stream-worker", **extra: str) -> dict[str, str]:
    "Environment of a worker subprocess (same settings as `settings_for`)."
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")}
    return env | {"FRAUD_DATA_DIR": str(data), "FRAUD_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                  "FRAUD_CONSUMER_GROUP": group, "FRAUD_TOPIC_PARTITIONS": str(PARTITIONS), "COLUMNS": "250",
                  "FRAUD_LOG_LEVEL": "INFO", **extra}


@contextmanager
def fresh_broker():
    "A new embedded broker with the system's topics (one per test: topics start empty)."
    with EmbeddedBroker() as b:
        ensure_topics(b.bootstrap, ALL_TOPICS, partitions=PARTITIONS)
        yield b.bootstrap


def start_worker(data: Path, bootstrap: str, log_path: Path, *args: str, group: str = "fraud-stream-worker",
                 **env: str) -> subprocess.Popen:
    "A stream worker subprocess (`fraud stream work`); its log and final JSON summary go to `log_path`."
    code = "import sys; from fraud_detection.cli import app; app(sys.argv[1:])"
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-c", code, "stream", "work", *args], cwd=ROOT, env=worker_env(data, bootstrap, group, **env),
                                stdout=log, stderr=subprocess.STDOUT)


def summary(log_path: Path) -> dict:
    "The JSON summary a worker printed last."
    return json.loads([ln for ln in log_path.read_text().splitlines() if ln.startswith("{")][-1])


def stop_worker(proc: subprocess.Popen, log_path: Path, timeout: float = 30.0) -> dict:
    "SIGTERM a worker, wait for its clean exit, return its JSON summary."
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout) == 0, f"worker exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
    return summary(log_path)


def result_count(url: str) -> int:
    "Rows in the results table (0 before the worker created it)."
    try:
        with get_engine(url).connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(predictions)).scalar()
    except sa.exc.OperationalError:
        return 0


def wait_for(cond, timeout: float, what: str, every: float = 0.2):
    "Poll `cond()` until truthy; its value, or AssertionError after `timeout` seconds."
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def stored_features(rows: pl.DataFrame) -> pl.DataFrame:
    "The model input the worker stored (`result_rows`' decoded features) as a typed frame, with trans_num, sorted by (ts, trans_num)."
    rows = rows.sort("ts", "trans_num")
    feats = pl.DataFrame(rows["features"].to_list(), schema={f: FEATURE_SCHEMA[f] for f in FEATURES})
    return feats.with_columns(trans_num=rows["trans_num"], ts=rows["ts"])


def topic_messages(bootstrap: str, topic: str, expected: int, timeout: float = 5.0) -> list:
    "The messages of a topic: reads `expected` + 1 (so one too many shows), waiting at most `timeout` s for them."
    return read_topic(bootstrap, topic, expected + 1, timeout=timeout)


def copy_data_dir(src: Path, dst: Path) -> Path:
    "A private copy of a prepared data dir."
    shutil.copytree(src, dst)
    return dst


def assert_matches_batch(data: Path, url: str, truth: Truth, expect: pl.DataFrame | None = None,
                         applied: pl.DataFrame | None = None, ignore: set[str] | frozenset = frozenset(),
                         online: Settings | None = None) -> pl.DataFrame:
    """Exactly one results row per expected transaction (default: all of test), with the batch path's features and
    scores (to float tolerance), and online + offline customer state equal to the batch path's state after train + applied
    transactions (default: the expected ones). Rows of `ignore`d trans_nums (checked elsewhere) are left out. Returns
    the rows."""
    expect = truth.test if expect is None else expect
    rows = result_rows(url)
    rows = rows.filter(~pl.col("trans_num").is_in(list(ignore))) if ignore else rows
    assert rows.height == expect.height, f"{rows.height} results rows for {expect.height} transactions"
    assert set(rows["trans_num"]) == set(expect["trans_num"])
    want = truth.features.join(expect.select("trans_num"), on="trans_num", how="semi").sort("ts", "trans_num")
    assert_same_features(stored_features(rows), want)  # float sums over windows: equal to ~1e-15 relative
    rows = rows.sort("ts", "trans_num")
    registry = data / "registry"
    np.testing.assert_allclose(rows["fraud_probability"].to_numpy(), load("champion", registry).predict_proba(want),
                               rtol=1e-9, atol=0)
    np.testing.assert_allclose(rows["challenger_probability"].to_numpy(),
                               load("challenger", registry).predict_proba(want), rtol=1e-9, atol=0)
    applied = expect if applied is None else applied
    customers = applied["customer_id"].unique().sort().to_list()
    truth_state = state_from_history(pl.concat([truth.train, applied])).filter(pl.col("customer_id").is_in(customers))
    got = read_state(get_store(online or Settings(data_dir=data)), customers)  # `online`: e.g. a Redis store
    assert_frame_equal(got.sort("customer_id"), truth_state)
    parts = pl.read_parquet(data / STATE_OFFLINE / "*" / "part-*.parquet")
    latest = parts.sort(TIMESTAMP).group_by("customer_id", maintain_order=True).last()
    offline = from_wire(latest, STATE_SCHEMA).filter(pl.col("customer_id").is_in(customers)).sort("customer_id")
    assert_frame_equal(offline, truth_state)
    return rows


def last_assignment(log: Path) -> list[int] | None:
    "The partitions of the last 'assigned partitions [...]' line of a worker log, or None."
    found = re.findall(r"assigned partitions \[([0-9, ]*)\]", log.read_text() if log.exists() else "")
    return [int(x) for x in found[-1].split(",") if x.strip()] if found else None


class LiveWorker:
    "`run_worker` in a thread with live stats, stopped on exit."
    def __init__(self, settings: Settings, **kw):
        self.stats, self.stop = WorkerStats("live"), threading.Event()
        self.thread = threading.Thread(target=run_worker, args=(settings,), daemon=True,
                                       kwargs={"stop_event": self.stop, "stats": self.stats, "max_wait": 0.05, **kw})

    def __enter__(self) -> LiveWorker:
        self.thread.start()
        wait_for(lambda: self.stats.assigned, 60, "the worker joining the group")
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive()

    def wait(self, messages: int, timeout: float = 30.0) -> WorkerStats:
        "Wait until `messages` messages have been processed (and committed) in all."
        wait_for(lambda: self.stats.messages >= messages, timeout, f"{messages} messages processed")
        return self.stats
