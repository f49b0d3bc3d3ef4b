"""The scheduler on real notebooks: a forced drift in scored traffic triggers a retraining run whose
executed notebook exists and whose gate outcome (promoted or kept as challenger) is recorded."""
from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from fraud_detection import app, registry
from fraud_detection.core import get_settings
from fraud_detection.ingest import ingest_files, raw_inputs
from fraud_detection.results import create_tables, fake_predictions, get_engine, write_predictions
from fraud_detection.runs import list_runs, run_notebook
from fraud_detection.scheduler import Scheduler, check_drift
from fraud_detection.simulate import simulate_to_files


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    "Small simulated data, batch features and a champion, in an isolated data folder."
    root = tmp_path_factory.mktemp("sched")
    mp = pytest.MonkeyPatch()
    mp.setenv("FRAUD_DATA_DIR", str(root / "data"))
    mp.setenv("FRAUD_RUNS_DIR", str(root / "runs"))
    mp.setenv("FRAUD_DRIFT_MIN_ROWS", "300")
    get_settings.cache_clear()
    s = get_settings()
    simulate_to_files("small", s.data / "raw", seed=7)
    assert not ingest_files(raw_inputs(s.data / "raw"), s.data / "clean").failed
    run_notebook("batch_features", {}, progress=False)
    run_notebook("retrain", {"grid": None}, progress=False)
    assert registry.aliases()["champion"]
    yield s
    mp.undo()
    get_settings.cache_clear()


def _scored_traffic(s, reference: pl.DataFrame, n: int, shift: bool) -> None:
    "Write `n` scored rows whose model inputs are reference rows, optionally drifted (amounts ×8, all at night)."
    rows = reference.sample(n, with_replacement=True, seed=1)
    if shift:
        rows = rows.with_columns(amt=pl.col("amt") * 8, log_amt=(pl.col("amt") * 8).log1p(), hour=pl.lit(3, pl.Int32),
                                 is_night=pl.lit(1, pl.Int8))
    preds = fake_predictions(n, seed=int(shift)).to_dicts()
    for p, feats in zip(preds, rows.iter_rows(named=True), strict=True):
        p["features"] = feats
    engine = get_engine(s.database_url)
    create_tables(engine)
    write_predictions(engine, preds)


def test_no_drift_means_no_retrain(trained):
    s = trained
    ref = app.load_reference(app.find_reference(s.data))
    assert ref.height > 0, "the champion's training reference is stored for drift checks"
    _scored_traffic(s, ref, 400, shift=False)
    verdict, report = check_drift(s)
    assert verdict.action == "none" and not verdict.drifted, (verdict, report)


def test_forced_drift_triggers_recorded_retrain(trained):
    s = trained
    ref = app.load_reference(app.find_reference(s.data))
    _scored_traffic(s, ref, 1500, shift=True)  # the most recent rows are now drifted
    before = {r.output for r in list_runs("retrain")}
    decisions_before = len(registry.decisions())
    t = [0.0]
    sch = Scheduler(s, clock=lambda: t[0])
    for job in sch.jobs.values():
        job.every_min = 0  # only the drift check runs
    t[0] = sch.next_drift
    ran = sch.tick()
    assert ran == ["drift-check", "retrain"], ran
    assert sch.last_verdict.drifted and sch.last_verdict.action == "retrain"
    assert sch.last_verdict.max_psi >= s.drift_psi_threshold
    new = [r for r in list_runs("retrain") if r.output not in before]
    assert len(new) == 1 and new[0].status == "ok" and new[0].trigger == "drift"
    assert Path(new[0].output).is_file(), "the executed notebook is kept as the audit trail"
    decisions = registry.decisions()
    assert len(decisions) == decisions_before + 1
    assert decisions[-1]["decision"] in ("promoted", "challenger"), decisions[-1]
    state = json.loads((s.runs / "scheduler.json").read_text())
    assert state["drift"]["action"] == "retrain" and state["jobs"]["retrain"]["last_status"] == "ok"
    # a second drifted check right away is held back by the cooldown
    t[0] = sch.next_drift
    assert sch.tick() == ["drift-check"] and sch.last_verdict.action == "cooldown"
