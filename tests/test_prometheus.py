"""A real Prometheus (Debian's `prometheus` package, installed by `make system-deps`) scrapes the services this test
starts: the API (`fraud serve --workers 2`, multiprocess metrics), a stream worker's exporter and the scheduler
(`fraud schedule`, its exporter and a drift check). Every target must be up, the key series present with sane values,
every alert rule loaded and evaluating, and every dashboard and alert expression valid PromQL on that server.
The alert rules are also checked with `promtool check rules` and unit-tested rule by rule (`promtool test rules`),
and the Grafana dashboards validated against the provisioning structure (no Grafana server here: see README)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from fraud_detection.broker import free_port
from fraud_detection.metrics import serve_worker_metrics
from fraud_detection.testing import require
from fraud_detection.worker import WorkerStats

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR, GRAFANA_DIR = ROOT / "deploy" / "prometheus", ROOT / "deploy" / "grafana"
FRAUD = str(Path(sys.executable).with_name("fraud"))


def _tool(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"{name} (apt-get install prometheus, or `make system-deps`)")
    return path


def test_alert_rules_check_and_unit_test_per_rule():
    promtool = _tool("promtool")
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"], ["check", "config", "prometheus.yml"]):
        out = subprocess.run([promtool, *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
    rules = {r["alert"] for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    tested = {t["alertname"] for case in yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())["tests"]
              for t in case["alert_rule_test"]}
    assert rules == tested, f"rules without a unit test: {rules - tested}"
    assert {"FraudNoTransactionsScored", "FraudConsumerLagGrowing", "FraudDeadLetterRateHigh", "FraudApiLatencyP99High",
            "FraudDegradedAnswers", "FraudNoSuccessfulRetrain", "FraudDriftNeedsReview"} <= rules


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((GRAFANA_DIR / "dashboards").glob("*.json"))}


def test_dashboards_match_the_provisioning_structure():
    ds = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["apiVersion"] == 1 and [d["type"] for d in ds["datasources"]] == ["prometheus"]
    uid = ds["datasources"][0]["uid"]
    prov = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "fraud.yml").read_text())
    assert prov["apiVersion"] == 1 and prov["providers"][0]["type"] == "file"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    mounts = dict(v.rsplit(":", 2)[:2] for v in compose["grafana"]["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/dashboards"] == prov["providers"][0]["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    boards = dashboards()
    assert set(boards) == {"stream.json", "api.json", "model.json"}
    assert len({b["uid"] for b in boards.values()}) == 3
    for name, b in boards.items():
        assert isinstance(b["title"], str) and b["title"] and isinstance(b["schemaVersion"], int), name
        assert "id" not in b or b["id"] is None, f"{name}: provisioned dashboards carry no database id"
        ids = [p["id"] for p in b["panels"]]
        assert len(ids) == len(set(ids)) >= 4, name
        for p in b["panels"]:
            g = p["gridPos"]
            assert p["type"] in ("timeseries", "stat", "gauge", "table") and p["title"], (name, p)
            assert all(isinstance(g[k], int) for k in "xywh") and 0 <= g["x"] and g["x"] + g["w"] <= 24, (name, p["title"])
            assert p["datasource"]["uid"] == uid and p["targets"], (name, p["title"])
            for t in p["targets"]:
                assert t["datasource"]["uid"] == uid and t["refId"] and t["expr"].strip(), (name, p["title"])


def _get_json(url: str, timeout: float = 5) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _query(prom: str, expr: str) -> dict:
    return _get_json(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))


def _value(prom: str, expr: str) -> float | None:
    res = _query(prom, expr)["data"]["result"]
    return float(res[0]["value"][1]) if res else None


def _wait(what: str, ok, timeout: float, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if got := ok():
                return got
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{what} not within {timeout:.0f} s" + (":\n" + log.read_text()[-3000:] if log and log.exists() else ""))


def _spawn(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def test_real_prometheus_scrapes_every_service(data: Path, tmp_path: Path):
    prometheus = _tool("prometheus")
    ports = {"api": free_port(), "worker": free_port(), "scheduler": free_port(), "prometheus": free_port()}
    env = {**os.environ, "FRAUD_DATA_DIR": str(data), "FRAUD_RUNS_DIR": str(tmp_path / "runs"),
           "FRAUD_API_PORT": str(ports["api"]), "FRAUD_SCHEDULER_METRICS_PORT": str(ports["scheduler"]),
           "FRAUD_DRIFT_EVERY_MIN": "0.05", "FRAUD_DRIFT_MIN_ROWS": "1"}  # a drift check 3 s after start
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    api = _spawn([FRAUD, "serve", "--workers", "2"], env, tmp_path / "api.log")
    sched = _spawn([FRAUD, "schedule"], env, tmp_path / "scheduler.log")
    stats = WorkerStats("w-prom")  # a worker's live stats behind the real exporter
    exporter, _ = serve_worker_metrics(stats, ports["worker"], lag=lambda: {0: 4, 1: 0},
                                       models=lambda: {"champion": "v0001"}, addr="127.0.0.1")
    stats.messages, stats.scored, stats.dlq, stats.batches = 1000, 990, 10, 3  # what three batches leave behind
    stats.dlq_reasons["bad_json"] = 10
    stats.stages.update(features=0.5, score=0.8); stats.last_batch = time.perf_counter()
    stats.freshness_ms.extend([120.0] * 990)
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(PROM_DIR / "alerts.yml")],
              "scrape_configs": [{"job_name": f"fraud-{name}", "static_configs": [{"targets": [f"127.0.0.1:{ports[name]}"]}]}
                                 for name in ("api", "worker", "scheduler")]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom_proc = _spawn([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                        f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{ports['prometheus']}"],
                       env, tmp_path / "prometheus.log")
    prom = f"http://127.0.0.1:{ports['prometheus']}"
    base = f"http://127.0.0.1:{ports['api']}"
    try:
        _wait("API healthy", lambda: urllib.request.urlopen(f"{base}/healthz", timeout=2).status == 200, 240,
              tmp_path / "api.log")
        import polars as pl
        tx = pl.read_parquet(data / "clean" / "test.parquet").head(20)
        for row in tx.iter_rows(named=True):  # real scores: latency, decisions
            body = json.dumps({k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()
                               if k != "is_fraud"}).encode()
            req = urllib.request.Request(f"{base}/v1/predict", data=body, headers={"Content-Type": "application/json"})
            assert urllib.request.urlopen(req, timeout=10).status == 200

        def all_up():
            targets = _get_json(f"{prom}/api/v1/targets")["data"]["activeTargets"]
            return len(targets) == 3 and all(t["health"] == "up" for t in targets)
        _wait("every target up", all_up, 120, tmp_path / "prometheus.log")
        _wait("a drift check scraped", lambda: _value(prom, "fraud_drift_rows") is not None, 120, tmp_path / "scheduler.log")
        _wait("the predictions scraped", lambda: (_value(prom, 'sum(fraud_api_predictions_total)') or 0) >= 20, 60)
        _wait("the worker's counters scraped", lambda: _value(prom, "fraud_worker_scored_total") == 990, 30)
        assert _value(prom, 'count(up{job=~"fraud-.*"} == 1)') == 3
        assert _value(prom, "fraud_worker_scored_total") == 990
        assert _value(prom, 'fraud_worker_dead_lettered_total{reason="bad_json"}') == 10
        assert _value(prom, 'histogram_quantile(0.99, sum by (le) (fraud_worker_freshness_seconds_bucket))') <= 0.25
        p99 = _value(prom, 'histogram_quantile(0.99, sum by (le) (fraud_api_request_duration_seconds_bucket{endpoint="/v1/predict"}))')
        assert 0 < p99 < 5, p99
        assert _value(prom, 'count(fraud_api_model_info == 1)') == 1, "one serving model version"
        assert _value(prom, "fraud_scheduler_state_up") == 1
        assert _value(prom, 'fraud_scheduler_next_due_timestamp_seconds{task="retrain"} - time()') > 0
        assert _value(prom, 'fraud_scheduler_runs_total{task="drift_check",outcome="ok"}') >= 1

        def rules_ok():
            rules = [r for g in _get_json(f"{prom}/api/v1/rules")["data"]["groups"] for r in g["rules"]]
            return rules if len(rules) == 9 and all(r["health"] == "ok" for r in rules) else None
        _wait("every alert rule loaded and evaluated", rules_ok, 30, tmp_path / "prometheus.log")
        exprs = [t["expr"] for b in dashboards().values() for p in b["panels"] for t in p["targets"]]
        exprs += [r["expr"] for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"] for r in g["rules"]]
        for e in exprs:
            assert _query(prom, e)["status"] == "success", e
        # the dashboards' key panels have data from these services
        for e in ("sum(rate(fraud_worker_messages_total[5m]))", "sum by (endpoint, status) (rate(fraud_api_responses_total[5m]))"):
            _wait(f"data for {e}", lambda e=e: _query(prom, e)["data"]["result"], 30)  # rate needs two scrapes
    finally:
        exporter.shutdown()
        for p in (prom_proc, sched, api):
            p.terminate()
        for p in (prom_proc, sched, api):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
