"""A corrupt or unreadable champion at hot reload: the API keeps serving the model it has, logs the failure once,
and shows it in /readyz; a mended registry is picked up again."""
from __future__ import annotations

import json
import logging
import shutil
import time

import pytest
from fastapi.testclient import TestClient

from fraud_detection.api import ApiConfig, create_app
from fraud_detection.core import Settings
from fraud_detection.features import batch_features
from fraud_detection.registry import register, set_alias
from fraud_detection.testing import build_system, train_tiny


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    "One prepared API system for the module (each test copies its data dir)."
    return build_system(tmp_path_factory.mktemp("api-reload"))


def _until(cond, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (v := cond()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return v


@pytest.mark.parametrize("damage", ["corrupt_model", "missing_meta", "model_is_a_folder", "broken_aliases"])
def test_bad_champion_at_reload_keeps_the_model(system, tmp_path, caplog, damage):
    "Each kind of damage: predictions keep coming from the old model, /readyz says why, one log line; then mended."
    settings = Settings(data_dir=tmp_path / "data")
    shutil.copytree(system.settings.data, settings.data)
    reg = settings.data / "registry"
    body = system.bodies()[0]
    with TestClient(create_app(settings, config=ApiConfig(reload_interval_s=0.05))) as c:
        assert c.get("/readyz").json()["model_version"] == system.version
        caplog.set_level(logging.ERROR, logger="fraud_detection.api")
        if damage == "broken_aliases":
            (reg / "aliases.json").write_text("{ not json")
        else:
            bad = register(train_tiny(batch_features(system.history, system.risk), rounds=3, seed=2), root=reg)
            if damage == "corrupt_model":
                (reg / bad / "model.ubj").write_bytes(b"\x00 not a model")
            elif damage == "missing_meta":
                (reg / bad / "meta.json").unlink()
            else:
                (reg / bad / "model.ubj").unlink()
                (reg / bad / "model.ubj").mkdir()
            if damage == "missing_meta":  # set_alias refuses a version without meta: write the alias file by hand
                (reg / "aliases.json").write_text(json.dumps({"champion": bad, "challenger": None}))
            else:
                set_alias("champion", bad, root=reg)
        ready = _until(lambda: (r := c.get("/readyz").json())["model_error"] and r)
        assert ready["ready"] is True and ready["model_version"] == system.version  # still serving the old model
        time.sleep(0.3)  # several more checks: still one log line
        errors = [r for r in caplog.records if "champion not loaded" in r.getMessage()]
        assert len(errors) == 1 and system.version in errors[0].getMessage()
        r = c.post("/v1/predict", json=body)
        assert r.status_code == 200 and r.json()["model_version"] == system.version
        good = register(train_tiny(batch_features(system.history, system.risk), rounds=5, seed=3), root=reg)
        (reg / "aliases.json").write_text(json.dumps({"champion": good, "challenger": None}))  # mended
        _until(lambda: c.get("/readyz").json()["model_version"] == good)
        assert c.get("/readyz").json()["model_error"] is None
        assert c.post("/v1/predict", json=body).json()["model_version"] == good

