"""`fraud train --engine external`: the bounded-memory path end to end through the CLI (demo data)."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from fraud_detection.cli import app


def test_train_engine_external(fraud_home):
    "simulate → ingest → training set in customer buckets → XGBoost from disk → registry + gate."
    from fraud_detection.core import get_settings
    from fraud_detection.registry import aliases, load
    run = CliRunner()
    for args in (["data", "simulate", "--scale", "demo"], ["data", "ingest"]):
        r = run.invoke(app, args)
        assert r.exit_code == 0, r.output
    r = run.invoke(app, ["train", "--engine", "external"])
    assert r.exit_code == 0, r.output
    assert "promoted" in r.output and "training set" in r.output
    data = get_settings().data
    manifest = json.loads((data / "training" / "_manifest.json").read_text())
    assert manifest["rows"] > 40_000 and manifest["buckets"] == 1
    champ = load("champion", data / "registry")
    assert aliases(data / "registry")["champion"] == champ.version
    assert "external memory" in champ.meta["training"] and champ.meta["metrics"]["test"]["roc_auc"] > 0.8
    assert (data / "registry" / champ.version / "reference.parquet").is_file()
    r = run.invoke(app, ["train", "--engine", "nope"])
    assert r.exit_code != 0
