"""A tiny real fraud system for the API tests and benchmark.

Simulated transactions (the simulator's `small` period), cleaned by ingest; the last `n_incoming` held out
(all on the last day, so one materialized merchant-risk row per merchant is the one the batch path uses);
features of the rest from the shared code; an XGBoost model trained on them, registered and made champion;
a Feast online store (SQLite, or Redis at `redis_url`) holding every customer's state after the history
and the merchants' risk, as the stream worker and the batch pipeline would leave them.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import polars as pl

from fraud_detection.core import Settings, stop_process_group
from fraud_detection.feature_store import (
    MERCHANT_RISK_OFFLINE,
    apply,
    data_dir,
    get_store,
    materialize,
    push_state,
    write_offline_merchant_risk,
)
from fraud_detection.features import FEATURES, batch_features, merchant_risk_table, state_from_history
from fraud_detection.ingest import clean_frame
from fraud_detection.model import Scorer, time_split, train_model
from fraud_detection.registry import register, set_alias
from fraud_detection.schema import Transaction
from fraud_detection.simulate import simulate


@dataclass
class ApiSystem:
    settings: Settings  # data dir of this system (registry, online store)
    clean: pl.DataFrame  # all clean transactions, sorted by (ts, trans_num)
    history: pl.DataFrame  # the part in the online store
    incoming: pl.DataFrame  # held out: to be scored
    risk: pl.DataFrame  # merchant_risk_table of `clean`
    scorer: Scorer  # the champion
    version: str

    def reference(self) -> pl.DataFrame:
        "The batch path: features of every transaction from its full history, scored by the champion."
        return self.scorer.score(batch_features(self.clean, self.risk))

    def bodies(self) -> list[dict]:
        "The incoming transactions as JSON request bodies."
        return [json.loads(Transaction.model_validate(r).model_dump_json()) for r in self.incoming.iter_rows(named=True)]


def train_tiny(feats: pl.DataFrame, rounds: int = 30, seed: int = 0) -> Scorer:
    "A small real XGBoost model on feature rows (time split 70/30)."
    train, valid = time_split(feats, valid_frac=0.3)
    return train_model(train, valid, FEATURES, num_boost_round=rounds, early_stopping_rounds=10, seed=seed, nthread=1)


def build_system(root: Path,  # folder for data/
                 online_store: str = "sqlite",  # or "redis"
                 redis_url: str | None = None,  # Redis for online_store="redis"
                 n_incoming: int = 30,  # held-out transactions
                 seed: int = 3,  # simulator seed
                 scorer: Scorer | None = None,  # serve this model (default: a tiny one trained on the history)
                 ) -> ApiSystem:
    "Build the system under root/data."
    kw = {"redis_url": redis_url} if redis_url else {}
    settings = Settings(data_dir=root / "data", online_store=online_store, **kw)
    raw, _ = simulate("small", seed=seed)
    clean, _ = clean_frame(raw, key="tests")
    last_day = clean["ts"].max().date()
    n_incoming = min(n_incoming, clean.filter(pl.col("ts").dt.date() == last_day).height)
    history, incoming = clean.head(clean.height - n_incoming), clean.tail(n_incoming)
    risk = merchant_risk_table(clean, settings.label_delay_days)
    if scorer is None:
        scorer = train_tiny(batch_features(history, merchant_risk_table(history, settings.label_delay_days)))
    reg = settings.data / "registry"
    version = register(scorer, root=reg)
    set_alias("champion", version, root=reg)
    store = get_store(settings)
    apply(store)
    push_state(store, state_from_history(history), to="online")
    write_offline_merchant_risk(risk, data_dir(store) / MERCHANT_RISK_OFFLINE)
    materialize(store, end=incoming["ts"].max())
    return ApiSystem(settings, clean, history, incoming, risk, scorer, version)


def start_server(settings: Settings, port: int, workers: int = 1, timeout_s: float = 90) -> subprocess.Popen:
    "Run `fraud_detection.api.serve` in a subprocess on `port`; return once /readyz answers 200."
    env = {**os.environ, "FRAUD_DATA_DIR": str(settings.data), "FRAUD_ONLINE_STORE": settings.online_store,
           "FRAUD_REDIS_URL": settings.redis_url}
    code = f"from fraud_detection.api import serve; serve('127.0.0.1', {port}, workers={workers}, log_level='warning')"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise TimeoutError("server not ready")


def stop_server(proc: subprocess.Popen) -> None:
    "SIGINT (uvicorn's graceful stop) to the server's process group, then wait (SIGKILL after 15 s)."
    stop_process_group(proc, signal.SIGINT, timeout=15)
