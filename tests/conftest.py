"""Shared pytest fixtures: real services, each failing loudly in CI when absent.

Outside CI a test whose service is missing is skipped with the reason; with CI=true it fails,
so a green CI run always means the real Redis / PostgreSQL / broker / Chromium were exercised.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from fraud_detection.broker import port_open
from fraud_detection.testing import require


@pytest.fixture(scope="session")
def redis_url() -> str:
    "URL of the local Redis (FRAUD_TEST_REDIS_URL overrides)."
    url = os.environ.get("FRAUD_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    host, port = url.split("//")[1].split("/")[0].split(":")
    require(port_open(host, int(port)), f"Redis at {host}:{port}")
    return url


@pytest.fixture(scope="session")
def postgres_url() -> str:
    "SQLAlchemy URL of the local PostgreSQL (FRAUD_TEST_POSTGRES_URL overrides)."
    url = os.environ.get("FRAUD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    require(port_open("127.0.0.1", 5432), "PostgreSQL at 127.0.0.1:5432")
    return url


@pytest.fixture(scope="session")
def chromium_path() -> str:
    "Path of Debian's Chromium for browser tests."
    path = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    require(bool(path), "Chromium (apt-get install chromium)")
    return path


@pytest.fixture
def fraud_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    "An isolated data/runs folder for one test, with settings rebuilt to use it."
    from fraud_detection.core import get_settings
    monkeypatch.setenv("FRAUD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FRAUD_RUNS_DIR", str(tmp_path / "runs"))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


# --- stream-worker tests (test_worker.py, test_worker_crash.py): one prepared data dir for the session ---

@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    "A data dir with clean data, batch features (state as of the end of train), champion and challenger."
    from worker_data import build_data_dir
    data = tmp_path_factory.mktemp("worker") / "data"
    build_data_dir(data)
    return data


@pytest.fixture(scope="session")
def truth(prepared: Path):
    "The batch path's features, scores and state for the prepared data dir."
    from worker_data import batch_truth
    return batch_truth(prepared)


@pytest.fixture
def data(prepared: Path, tmp_path: Path) -> Path:
    "This test's own copy of the prepared data dir."
    from worker_data import copy_data_dir
    return copy_data_dir(prepared, tmp_path / "data")
