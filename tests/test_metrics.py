"""Metrics scraped for real over HTTP: the stream worker's exporter over a live `WorkerStats`, and the API with two
uvicorn workers in multiprocess mode (every request counted, whichever process answered it)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fraud_detection.broker import free_port
from fraud_detection.metrics import serve_worker_metrics
from fraud_detection.worker import WorkerStats


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    "{(sample name, sorted labels): value} of a /metrics page, as Prometheus parses it."
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_worker_exporter_reads_live_stats():
    st = WorkerStats("w-test")
    server, _ = serve_worker_metrics(st, 0, lag=lambda: {0: 3, 2: 11}, models=lambda: {"champion": "v0007"},
                                     addr="127.0.0.1")
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    try:
        assert scrape(url)[("fraud_worker_messages_total", ())] == 0
        # what StreamWorker.process does after a batch
        st.messages += 500; st.scored += 480; st.dlq += 15; st.stale += 5; st.duplicates += 5; st.batches += 1
        st.dlq_reasons.update(bad_json=10, stale=5)
        st.stages.update(parse=0.01, features=0.2, score=0.3); st.stages_cpu.update(score=0.25)
        st.seconds += 0.6; st.last_batch = time.perf_counter()
        st.freshness_ms.extend([40.0] * 470 + [700.0] * 10)
        got = scrape(url)
    finally:
        server.shutdown()
    assert got[("fraud_worker_messages_total", ())] == 500 and got[("fraud_worker_scored_total", ())] == 480
    assert got[("fraud_worker_dead_lettered_total", (("reason", "bad_json"),))] == 10
    assert got[("fraud_worker_dead_lettered_total", (("reason", "stale"),))] == 5
    assert got[("fraud_worker_freshness_seconds_count", ())] == 480
    assert got[("fraud_worker_freshness_seconds_bucket", (("le", "0.05"),))] == 470
    assert got[("fraud_worker_freshness_seconds_sum", ())] == pytest.approx(470 * 0.04 + 10 * 0.7)
    assert got[("fraud_worker_step_seconds_total", (("step", "score"),))] == pytest.approx(0.3)
    assert got[("fraud_worker_step_cpu_seconds_total", (("step", "score"),))] == pytest.approx(0.25)
    assert got[("fraud_worker_consumer_lag", (("partition", "2"),))] == 11
    assert got[("fraud_worker_model_info", (("role", "champion"), ("version", "v0007")))] == 1
    assert abs(got[("fraud_worker_last_batch_timestamp_seconds", ())] - time.time()) < 60
    assert st.freshness(50) == 40.0, "the worker's own percentiles still work on the swapped window"


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> int:
    "Wait for /healthz 200; returns how many 200s the wait itself got (they are counted too)."
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return 1
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail("API not healthy in time:\n" + log.read_text()[-3000:])


@pytest.mark.slow
def test_api_with_two_workers_counts_every_request(data: Path, tmp_path: Path):
    "`fraud serve --workers 2`: the /metrics answer sums both processes (PROMETHEUS_MULTIPROC_DIR)."
    port = free_port()
    env = {**os.environ, "FRAUD_DATA_DIR": str(data), "FRAUD_RUNS_DIR": str(tmp_path / "runs"),
           "FRAUD_API_PORT": str(port)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = tmp_path / "api.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("fraud")), "serve", "--workers", "2"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        n = _wait_healthy(f"{base}/healthz", proc, log)
        time.sleep(3)  # the second worker finishes its start-up too
        for _ in range(60):
            with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
                assert r.status == 200
        n += 60
        files = sorted(p.name for p in (tmp_path / "runs" / "prometheus-api").glob("counter_*.db"))
        assert len(files) == 2, f"one metrics file per uvicorn worker: {files}"
        got = scrape(f"{base}/metrics")
        assert got[("fraud_api_responses_total", (("endpoint", "/healthz"), ("status", "200")))] == n
        assert got[("fraud_api_request_duration_seconds_count", (("decision", ""), ("endpoint", "/healthz")))] == n
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
