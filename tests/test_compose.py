"""The compose deployment's shared state: Feast's SQL registry on PostgreSQL (deploy/feature_store.compose.yaml,
mounted by docker-compose.yml), exercised against the real local PostgreSQL and Redis; and `docker-compose config`
validating the compose file when the tool is installed (there is no Docker engine here to run the services)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fraud_detection.core import Settings
from fraud_detection.feature_store import (
    CUSTOMER_VIEW,
    FEATURE_SERVICE,
    RISK_VIEWS,
    STORE_FILES,
    apply,
    get_store,
)
from fraud_detection.testing import fresh_pg_database, require

ROOT = Path(__file__).resolve().parents[1]


def _home(tmp_path: Path, pg_url: str) -> Path:
    "A project home whose redis store config is the compose one, with the registry URL pointed at `pg_url`."
    home = tmp_path / "home"
    shutil.copytree(ROOT / "feature_repo", home / "feature_repo")
    (home / "settings.ini").write_text((ROOT / "settings.ini").read_text())
    cfg = (ROOT / "deploy" / "feature_store.compose.yaml").read_text()
    assert "postgresql+psycopg://fraud:fraud@postgres:5432/fraud" in cfg
    (home / "feature_repo" / STORE_FILES["redis"]).write_text(
        cfg.replace("postgresql+psycopg://fraud:fraud@postgres:5432/fraud", pg_url))
    return home


def test_sql_registry_shared_between_hosts(tmp_path, postgres_url, redis_url):
    "Definitions applied by one container are read from PostgreSQL by another that never applied them."
    with fresh_pg_database(postgres_url, "fraud_registry") as url:
        home = _home(tmp_path, url)
        one = Settings(home=home, data_dir=tmp_path / "host1", online_store="redis", redis_url=redis_url)
        store = get_store(one)
        assert store.config.registry.registry_type == "sql"
        apply(store)
        other = get_store(Settings(home=home, data_dir=tmp_path / "host2", online_store="redis", redis_url=redis_url))
        svc = other.get_feature_service(FEATURE_SERVICE)
        assert {p.name for p in svc.feature_view_projections} == {CUSTOMER_VIEW, *RISK_VIEWS.values()}
        assert not any((tmp_path / "host2").glob("*registry*"))  # nothing of the registry on this host's disk


def test_compose_config_validates():
    "docker-compose config parses the file with its Spark services (needs the docker-compose tool)."
    exe = shutil.which("docker-compose")
    require(exe is not None, "docker-compose (apt-get install docker-compose)")
    p = subprocess.run([exe, "-f", str(ROOT / "docker-compose.yml"), "config", "--services"], capture_output=True,
                       text=True, env={"FRAUD_CUSTOMER_KEY": "x", "GRAFANA_ADMIN_PASSWORD": "x", "PATH": "/usr/bin:/bin"}, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    services = set(p.stdout.split())
    assert {"spark-master", "spark-worker", "spark-batch", "postgres", "worker", "api", "prometheus", "grafana"} <= services


@pytest.mark.parametrize("service", ["spark-batch", "spark-worker"])
def test_spark_services_share_data_and_master(service):
    "The Spark services mount the shared data volume and point at the compose master."
    import yaml
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svc = doc["services"][service]
    assert "fraud-data:/data" in svc["volumes"]
    assert "spark://spark-master:7077" in (str(svc.get("command")) + str(svc.get("environment")))
