"""The scheduler on real notebooks: a forced drift in scored traffic triggers a retraining run whose
executed notebook exists and whose gate outcome (promoted or kept as challenger) is recorded.
State that survives a restart (next due times, cooldown) and one runner per job across two schedulers
on a real PostgreSQL."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import polars as pl
import pytest
from test_drift import write_scored

from fraud_detection import drift, registry
from fraud_detection.core import Settings, get_settings
from fraud_detection.ingest import ingest_files, raw_inputs
from fraud_detection.notebook_runs import RunRecord, list_runs, run_notebook
from fraud_detection.results_store import get_engine
from fraud_detection.scheduler import JobSpec, Scheduler, check_drift, next_due
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


def _scored_traffic(s, n: int, shift: bool, tag: str = "") -> None:
    "Write `n` scored rows drawn from the champion's validation period, optionally drifted (amounts ×8, rescored)."
    rows = pl.read_parquet(drift.champion_reference(s)).sample(n, with_replacement=True, seed=int(shift))
    rows = rows.with_columns(trans_num=pl.format("t{}{}-{}", pl.lit(tag), pl.lit(int(shift)), pl.int_range(n)),
                             customer_id=pl.lit("c"))
    champion = registry.load("champion")
    if shift:
        rows = rows.with_columns(amt=pl.col("amt") * 8, log_amt=(pl.col("amt") * 8).log1p())
        rows = rows.with_columns(champion.score(rows, explain=False).select("fraud_probability", "decision"))
    write_scored(s, rows, champion.version)


def test_no_drift_means_no_retrain(trained):
    s = trained
    _scored_traffic(s, 400, shift=False)
    verdict, report = check_drift(s)
    assert verdict.action == "none" and not verdict.drifted, (verdict, report)


def test_forced_drift_triggers_recorded_retrain(trained):
    s = trained
    _scored_traffic(s, 1500, shift=True)  # the most recent rows are now drifted
    before = {r.output for r in list_runs("retrain")}
    decisions_before = len(registry.decisions())
    t = [time.time()]
    sch = Scheduler(s, clock=lambda: t[0], jobs=[JobSpec("retrain", "", "once", "retrain"),
                                                  JobSpec("drift_check", "every 15 min", "skip")])
    t[0] = sch.store.get("drift_check")["next_due"]
    ran = sch.tick()
    assert ran == ["drift_check", "retrain"], ran
    assert sch.last_verdict.drifted and sch.last_verdict.action == "retrain", sch.last_verdict
    assert "score" in sch.last_verdict.triggered or "amt" in sch.last_verdict.triggered
    new = [r for r in list_runs("retrain") if r.output not in before]
    assert len(new) == 1 and new[0].status == "ok" and new[0].trigger == "drift"
    assert Path(new[0].output).is_file(), "the executed notebook is kept as the audit trail"
    decisions = registry.decisions()
    assert len(decisions) == decisions_before + 1
    assert decisions[-1]["decision"] in ("promoted", "challenger"), decisions[-1]
    state = json.loads((s.runs / "scheduler.json").read_text())
    assert state["drift"]["action"] == "retrain" and state["jobs"]["retrain"]["last_status"] == "ok"
    # a second drifted check right away (the new champion's traffic drifted too) is held back by the cooldown
    _scored_traffic(s, 1500, shift=True, tag="after")
    t[0] = sch.store.get("drift_check")["next_due"]
    assert sch.tick() == ["drift_check"] and sch.last_verdict.action == "cooldown"


class _Runner:
    "A stand-in notebook runner that records its calls and can block until released."
    def __init__(self, hold: bool = False):
        self.calls: list[tuple[str, str]] = []
        self.started, self.release = threading.Event(), threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, name, params, trigger, progress):
        self.calls.append((name, trigger))
        self.started.set()
        assert self.release.wait(30)
        return RunRecord(name=name, parameters=params, output=f"/runs/{name}.ipynb", status="ok", trigger=trigger)


JOBS = [JobSpec("batch_features", "0 * * * *", "once", "batch_features"), JobSpec("retrain", "0 2 * * *", "once", "retrain")]


def test_restart_keeps_next_due_times_and_cooldown(tmp_path: Path):
    s = Settings(runs_dir=tmp_path / "runs", data_dir=tmp_path / "data", drift_cooldown_min=360)
    url = f"sqlite:///{tmp_path / 'results.db'}"
    t = [1_772_370_000.0]  # 2026-03-01 13:00 UTC
    run = _Runner()
    first = Scheduler(s, run=run, clock=lambda: t[0], jobs=JOBS, engine=get_engine(url))
    planned = {n: r["next_due"] for n, r in first.store.all().items()}
    assert planned == {"batch_features": next_due("0 * * * *", t[0]), "retrain": next_due("0 2 * * *", t[0])}
    t[0] = planned["retrain"] + 1  # 02:00:01 next day: both due
    assert first.tick() == ["batch_features", "retrain"]
    after = first.store.all()
    assert after["retrain"]["cooldown_until"] == pytest.approx(t[0] + 360 * 60)
    del first  # "restart": a new process, an hour later, sees the same plan and cooldown
    t[0] += 3600
    second = Scheduler(s, run=run, clock=lambda: t[0], jobs=JOBS, engine=get_engine(url))
    again = second.store.all()
    for n in ("batch_features", "retrain"):
        assert again[n]["next_due"] == after[n]["next_due"], n
        assert again[n]["last_status"] == "ok" and again[n]["last_success"] == after[n]["last_success"]
    assert again["retrain"]["cooldown_until"] == after["retrain"]["cooldown_until"]
    assert again["retrain"]["next_due"] - t[0] == pytest.approx(23 * 3600 - 1), "not pushed back a day by the restart"
    assert second.tick() == ["batch_features"] and len(run.calls) == 3  # the hourly job, due again at 03:00


def test_second_scheduler_does_not_run_a_held_job(postgres_url: str, tmp_path: Path):
    "Two schedulers on one PostgreSQL: while the first runs the retrain (lease renewed), the second does not."
    from fraud_detection.testing import fresh_pg_database
    with fresh_pg_database(postgres_url) as url:
        s = Settings(runs_dir=tmp_path / "runs", data_dir=tmp_path / "data", db_url=url, scheduler_lease_s=1.0)
        due = next_due("0 2 * * *", time.time() - 86400)  # a retrain due in the past (missed: policy once)
        jobs = [JobSpec("retrain", "0 2 * * *", "once", "retrain")]
        a_run, b_run = _Runner(hold=True), _Runner()
        a = Scheduler(s, run=a_run, jobs=jobs, engine=get_engine(url), owner="scheduler-a")
        a.store.update("retrain", next_due=due)
        b = Scheduler(s, run=b_run, jobs=jobs, engine=get_engine(url), owner="scheduler-b")
        result: list = []
        th = threading.Thread(target=lambda: result.append(a.tick()), daemon=True)
        th.start()
        try:
            assert a_run.started.wait(30), "the first scheduler started the retrain"
            for _ in range(3):  # past the 1 s lease: the running holder renews it
                time.sleep(0.8)
                assert b.tick() == [] and b_run.calls == []
                assert b.store.get("retrain")["lock_owner"] == "scheduler-a"
        finally:
            a_run.release.set()
            th.join(30)
        assert result == [["retrain"]] and a_run.calls == [("retrain", "schedule")]
        row = b.store.get("retrain")
        assert row["lock_owner"] is None and row["next_due"] > time.time()
        assert b.tick() == [] and b_run.calls == [], "the job the first ran is not due again for the second"
        # a holder that died: its lease expires and the other scheduler takes the job over
        b.store.update("retrain", next_due=due)
        assert a.store.acquire("retrain", time.time(), 1.0)  # a's lease, never renewed (a "died")
        assert b.tick() == []
        time.sleep(1.2)
        assert b.tick() == ["retrain"] and b_run.calls == [("retrain", "schedule")]
        get_engine(url).dispose()
