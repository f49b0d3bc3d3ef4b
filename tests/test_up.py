"""`fraud up` end to end: bootstrap, every service as a child, a real score over HTTP, clean SIGINT stop."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from fraud_detection.broker import free_port
from fraud_detection.up import port_free

pytestmark = [pytest.mark.kafka]


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except Exception:
        return 0, b""


def _scored(db: Path) -> int:
    import sqlite3
    try:
        with sqlite3.connect(db) as c:
            return c.execute("select count(*) from predictions").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_fraud_up_runs_scores_and_stops_cleanly(tmp_path: Path):
    ports = {"FRAUD_BROKER_PORT": free_port(), "FRAUD_API_PORT": free_port(), "FRAUD_APP_PORT": free_port()}
    env = {**os.environ, "FRAUD_DATA_DIR": str(tmp_path / "data"), "FRAUD_RUNS_DIR": str(tmp_path / "runs"),
           **{k: str(v) for k, v in ports.items()}}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    env.pop("FRAUD_KAFKA_BOOTSTRAP_SERVERS", None)
    fraud = str(Path(sys.executable).with_name("fraud"))
    log = open(tmp_path / "up.log", "wb")
    t0 = time.monotonic()
    proc = subprocess.Popen([fraud, "up", "--scale", "small", "--rate", "300", "--limit", "2000"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{ports['FRAUD_API_PORT']}"
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            children |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
            if _get(f"{api}/readyz")[0] == 200 and _scored(tmp_path / "data" / "fraud.db") > 0:
                break
            time.sleep(1)
        else:
            pytest.fail("no ready API and scored transaction within 300 s:\n" + (tmp_path / "up.log").read_text()[-3000:])
        first_scored_s = time.monotonic() - t0
        # a real score over HTTP for a held-out transaction
        import polars as pl
        tx = pl.read_parquet(tmp_path / "data" / "clean" / "test.parquet").row(-1, named=True)
        body = json.dumps({k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in tx.items()
                           if k != "is_fraud"}).encode()
        req = urllib.request.Request(f"{api}/v1/predict", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            out = json.loads(r.read())
        assert 0.0 <= out["fraud_probability"] <= 1.0 and out["decision"] in ("approve", "review", "decline")
        assert out["trans_num"] == tx["trans_num"] and out["model_version"]
        children |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        assert len(children) >= 5, "broker, worker, api, app, scheduler (and producer) run as children"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("fraud up did not stop within 90 s of SIGINT")
        log.close()
    text = (tmp_path / "up.log").read_text()
    assert rc == 0, text[-3000:]
    assert "all services stopped" in text
    alive = [p for p in children if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"children still running after SIGINT: {alive}"
    for name, port in ports.items():
        assert port_free(port), f"{name} {port} still taken"
    print(f"fraud up (small): first scored transaction after {first_scored_s:.0f} s")
