"""`fraud up` end to end: bootstrap, every service as a child, a real score over HTTP, clean SIGINT stop."""
from __future__ import annotations

import contextlib
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
from fraud_detection.launcher import port_free

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


FRAUD = str(Path(sys.executable).with_name("fraud"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    "One data folder for the module: the first `fraud up` bootstraps it, later ones start in seconds."
    return tmp_path_factory.mktemp("up")


def _env(root: Path, ports: dict[str, int]) -> dict[str, str]:
    env = {**os.environ, "FRAUD_DATA_DIR": str(root / "data"), "FRAUD_RUNS_DIR": str(root / "runs"),
           **{k: str(v) for k, v in ports.items()}}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    env.pop("FRAUD_KAFKA_BOOTSTRAP_SERVERS", None)
    return env


LISTENING = ("FRAUD_BROKER_PORT", "FRAUD_API_PORT", "FRAUD_APP_PORT", "FRAUD_SCHEDULER_METRICS_PORT",
             "FRAUD_WORKER_METRICS_PORT")


def _ports() -> dict[str, int]:
    return {"FRAUD_BROKER_PORT": free_port(), "FRAUD_API_PORT": free_port(), "FRAUD_APP_PORT": free_port(),
            "FRAUD_SCHEDULER_METRICS_PORT": free_port(), "FRAUD_WORKER_METRICS_PORT": free_port()}


def test_fraud_up_runs_scores_and_stops_cleanly(data_root: Path):
    tmp_path = data_root
    ports = _ports()
    env = _env(tmp_path, ports)
    fraud = FRAUD
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


def _descendants(pid: int) -> set[int]:
    try:
        return {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _running(pids: set[int]) -> list[str]:
    out = []
    for p in pids:
        try:
            proc = psutil.Process(p)
            if proc.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p} {' '.join(proc.cmdline())[:100]}")
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.slow  # 45-75 s; `make test` keeps the clean start, score and stop above
def test_kill_9_of_fraud_up_leaves_no_service(data_root: Path):
    "An OOM kill / hard kill of the supervisor: every service dies with it and its ports are free again."
    ports = _ports()
    env = {**_env(data_root, ports), "FRAUD_API_WORKERS": "2"}  # uvicorn workers are grandchildren: they must die too
    log = open(data_root / "up-kill.log", "wb")
    proc = subprocess.Popen([FRAUD, "up", "--scale", "small", "--services", "broker,worker,api,app,scheduler"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{ports['FRAUD_API_PORT']}"
    try:
        deadline = time.monotonic() + 300
        while _get(f"{api}/readyz")[0] != 200 or not all(not port_free(ports[k]) for k in LISTENING):
            assert proc.poll() is None, (data_root / "up-kill.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (data_root / "up-kill.log").read_text()[-3000:]
            time.sleep(1)
        time.sleep(2)  # the scheduler and worker are past their start-up
        family = _descendants(proc.pid)
        assert len(family) >= 5, _running(family)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 15
        while (alive := _running(family)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive, f"services survived kill -9 of fraud up: {alive}"
        for name, port in ports.items():
            assert port_free(port), f"{name} {port} still taken after kill -9"
    finally:
        for p in _descendants(proc.pid) | (family if "family" in locals() else set()):
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(p).kill()
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_busy_port_names_its_holder(data_root: Path):
    "A start that meets a port held by an earlier run says which process holds it, and starts nothing."
    ports = _ports()
    holder = subprocess.Popen([sys.executable, "-m", "http.server", str(ports["FRAUD_API_PORT"]), "--bind",
                               "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            if not port_free(ports["FRAUD_API_PORT"]):
                break
            time.sleep(0.1)
        out = subprocess.run([FRAUD, "up", "--scale", "small"], env=_env(data_root, ports), capture_output=True,
                             text=True, timeout=60)
        assert out.returncode != 0
        text = " ".join((out.stdout + out.stderr).split())
        assert f"port {ports['FRAUD_API_PORT']} is held by pid {holder.pid}" in text, text[-2000:]
        assert "Traceback" not in out.stdout + out.stderr, "one clear message, not a traceback"
        assert port_free(ports["FRAUD_BROKER_PORT"]), "nothing was started"
    finally:
        holder.kill()
        holder.wait()
