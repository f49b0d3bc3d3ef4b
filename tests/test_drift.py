"""Drift that means something, on the simulator's own test period scored by a real champion.

Replaying the test period as it is (no injected drift) must not trigger, in any window along the replay; amounts ×3 in
one merchant category from the middle of the test period on must trigger within `DETECT_WITHIN` transactions of the
shift's start. Windows are what the live check reads: the latest `drift_window_rows` transactions scored by the
champion, judged from `drift_min_rows` on. The features are the batch path's (identical to the stream's: the parity
tests prove it); one end-to-end `check` per case reads them back from the results database like the scheduler does.
"""
from __future__ import annotations

from datetime import datetime

import polars as pl
import pytest

from fraud_detection import drift
from fraud_detection.core import Settings
from fraud_detection.features import FEATURES
from fraud_detection.ingest import clean_frame
from fraud_detection.model import time_split, train_model
from fraud_detection.registry import load, register, set_alias
from fraud_detection.results_store import create_tables, get_engine, write_predictions
from fraud_detection.scheduler import check_drift
from fraud_detection.simulate import simulate
from fraud_detection.train import build_datasets

SHIFT_CATEGORY = "grocery_pos"  # ≈ 9 % of the simulator's traffic
DETECT_WITHIN = 1500  # transactions after the shift starts (stated in nbs/61_drift.ipynb)
STEP = 250  # a drift check every 250 transactions along the replay


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    "Demo-scale simulation, a champion trained on it, its test-period features with and without the shift."
    data = tmp_path_factory.mktemp("drift") / "data"
    s = Settings(data_dir=data, runs_dir=data.parent / "runs")
    raw_train, raw_test = simulate("demo", seed=11)
    train, _ = clean_frame(raw_train, "drift-test-key")
    test, _ = clean_frame(raw_test, "drift-test-key")
    (data / "clean").mkdir(parents=True)
    train.write_parquet(data / "clean" / "train.parquet")
    test.write_parquet(data / "clean" / "test.parquet")
    train_f, test_f = build_datasets(train, test, 7)
    tr, va = time_split(train_f)
    model = train_model(tr, va, FEATURES, num_boost_round=80, early_stopping_rounds=15)
    model.meta["pipeline"] = {"label_delay_days": 7}
    reg = data / "registry"
    set_alias("champion", register(model, root=reg), root=reg)
    champion = load("champion", reg)
    start = test["ts"].min() + (test["ts"].max() - test["ts"].min()) / 2
    shifted_tx = test.with_columns(amt=pl.when((pl.col("category") == SHIFT_CATEGORY) & (pl.col("ts") >= start))
                                   .then(pl.col("amt") * 3).otherwise(pl.col("amt")))
    _, shifted_f = build_datasets(train, shifted_tx, 7)

    def scored(f: pl.DataFrame) -> pl.DataFrame:
        f = f.sort("ts")
        sc = champion.score(f, explain=False)
        return f.with_columns(sc["fraud_probability"], sc["decision"])
    return s, champion, scored(test_f), scored(shifted_f), start


def _replay(s: Settings, reference: pl.DataFrame, scored: pl.DataFrame, start_at: int = 0) -> list[tuple[int, list[str]]]:
    "(position, triggered signals) of a drift check every STEP transactions from `start_at` on."
    cfg = drift.DriftConfig.from_settings(s)
    out = []
    for i in range(max(cfg.min_rows, start_at), scored.height + 1, STEP):
        window = scored.slice(max(0, i - s.drift_window_rows), min(i, s.drift_window_rows))
        rep = drift.assess(reference, window, FEATURES, cfg)
        out.append((i, rep.filter("triggered")["signal"].to_list()))
    return out


def write_scored(s: Settings, scored: pl.DataFrame, version: str) -> None:
    "Scored feature rows (features, ts, fraud_probability, decision) into the results database, as the worker does."
    engine = get_engine(s.database_url)
    create_tables(engine)
    now = datetime.now()
    rows = [{"trans_num": r["trans_num"], "customer_id": r["customer_id"], "ts": r["ts"], "amt": r["amt"],
             "category": None, "fraud_probability": r["fraud_probability"], "decision": r["decision"],
             "model_version": version, "scored_at": now, "features": {f: r[f] for f in FEATURES}}
            for r in scored.iter_rows(named=True)]
    write_predictions(engine, rows)


def test_replay_without_drift_does_not_trigger(world):
    s, champion, clean, _, _ = world
    reference = pl.read_parquet(drift.champion_reference(s))
    assert reference.height > 1000 and {"fraud_probability", "decision"} <= set(reference.columns)
    checks = _replay(s, reference, clean)
    assert len(checks) >= 15, "the test period gives many windows"
    fired = [(i, sig) for i, sig in checks if sig]
    assert not fired, f"false alarms on an undrifted replay: {fired}"
    write_scored(s, clean, champion.version)
    verdict, report = check_drift(s)
    assert verdict.action == "none" and verdict.rows == min(s.drift_window_rows, clean.height), verdict
    why = dict(zip(report["signal"], report["monitored"], strict=True))
    assert why["n_prior"] is False and why["merchant_n_30d"] is False and why["score"] is True


def test_amounts_x3_in_one_category_trigger_within_stated_transactions(world):
    s, champion, _, shifted, start = world
    reference = pl.read_parquet(drift.champion_reference(s))
    first = shifted.filter(pl.col("ts") < start).height  # position of the first shifted transaction
    checks = _replay(s, reference, shifted)
    before = [(i, sig) for i, sig in checks if i <= first and sig]
    assert not before, f"fired before the shift: {before}"
    hit = next(((i, sig) for i, sig in checks if i > first and sig), None)
    assert hit is not None, "the shift was never detected"
    delay = hit[0] - first
    print(f"amounts x3 in {SHIFT_CATEGORY}: detected {delay} transactions after the shift began by {hit[1]}")
    assert delay <= DETECT_WITHIN, (delay, hit)
    assert f"amount in {SHIFT_CATEGORY}" in hit[1]
    s = s.model_copy(update={"db_url": f"sqlite:///{s.data / 'shifted.db'}"})  # its own results database
    write_scored(s, shifted.head(first + DETECT_WITHIN), champion.version)
    verdict, _ = check_drift(s)
    assert verdict.drifted and verdict.action == "retrain" and f"amount in {SHIFT_CATEGORY}" in verdict.triggered
