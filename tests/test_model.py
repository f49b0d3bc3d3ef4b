"""Model tests on simulated data with the real feature code: time split, promotion gate, reproducibility,
SHAP additivity, and behavioural tests (invariance, direction, minimum functionality).

One demo-scale simulation (≈50 k transactions) is trained once per module with a small grid; every test
reuses it. A last test runs the scheduled retrain notebook through papermill on the same scale.
"""
from __future__ import annotations

from datetime import timedelta

import numpy as np
import polars as pl
import pytest

from fraud_detection import registry
from fraud_detection.evaluate import evaluate_scorer
from fraud_detection.features import FEATURES, batch_features, merchant_risk_table
from fraud_detection.ingest import clean_frame
from fraud_detection.model import LABEL, contributions, time_split, train_model
from fraud_detection.simulate import simulate
from fraud_detection.train import build_datasets, train_pipeline

KEY = "test-key"
DELAY = 7
QUICK = dict(grid=[{"max_depth": 4}], num_boost_round=300, early_stopping_rounds=30, nthread=1)


@pytest.fixture(scope="module")
def clean() -> tuple[pl.DataFrame, pl.DataFrame]:
    "Clean (train, test) transactions of a demo-scale simulation."
    tr, te = simulate("demo", seed=11)
    return clean_frame(tr, KEY)[0], clean_frame(te, KEY)[0]


@pytest.fixture(scope="module")
def trained(clean, tmp_path_factory):
    "The pipeline's result on the demo data, in a private registry."
    root = tmp_path_factory.mktemp("fraud")
    res = train_pipeline(frames=clean, label_delay_days=DELAY, registry_root=root / "registry",
                         reports_dir=root / "reports", **QUICK)
    return res, root / "registry"


@pytest.fixture(scope="module")
def datasets(clean) -> tuple[pl.DataFrame, pl.DataFrame]:
    "Feature frames (train period, test period)."
    return build_datasets(*clean, label_delay_days=DELAY)


def score_rows(scorer, clean_train: pl.DataFrame, clean_test: pl.DataFrame, trans_nums) -> pl.DataFrame:
    "Features of all of history (train + test), scored; the rows of `trans_nums` in their order."
    tx = pl.concat([clean_train, clean_test], how="vertical_relaxed")
    feats = batch_features(tx, merchant_risk_table(tx, label_delay_days=DELAY))
    rows = pl.DataFrame({"trans_num": list(trans_nums)}).join(feats, on="trans_num", how="left", maintain_order="left")
    return rows.hstack(scorer.score(rows, explain=False).drop("trans_num"))


# --- time split ---------------------------------------------------------------------------------------

def test_time_split_never_leaks(trained, datasets):
    res, _ = trained
    train_f, test_f = datasets
    for kw in ({"valid_frac": 0.2}, {"valid_days": 10}, {"valid_days": 10, "train_days": 20}):
        tr, va = time_split(train_f, **kw)
        assert tr["ts"].max() < va["ts"].min() <= va["ts"].max() < test_f["ts"].min(), kw
        assert tr.join(va, on="trans_num").is_empty() and va.join(test_f, on="trans_num").is_empty()
    w = res.model.meta
    assert w["train"]["end"] < w["valid"]["start"] <= w["valid"]["end"] < w["test"]["start"]
    assert w["train"]["rows"] + w["valid"]["rows"] == train_f.height


# --- registry and gate ---------------------------------------------------------------------------------

def test_gate_refuses_worse_and_promotes_better(datasets, tmp_path):
    train_f, test_f = datasets
    tr, va = time_split(train_f, valid_frac=0.2)
    kw = dict(QUICK, grid=None)
    shuffled = lambda seed: tr.with_columns(pl.col(LABEL).shuffle(seed=seed))  # noqa: E731
    root = tmp_path / "registry"
    v1 = registry.register(train_model(shuffled(1), va, FEATURES, **kw), root=root)
    first = registry.promote_if_better(v1, test_f, margin=0.01, root=root)
    assert first["decision"] == "promoted" and first["reason"] == "first model"
    v2 = registry.register(train_model(tr, va, FEATURES, **kw), root=root)
    better = registry.promote_if_better(v2, test_f, margin=0.01, root=root)
    assert better["decision"] == "promoted", better
    assert better["candidate_score"] > better["champion_score"] + 0.01
    v3 = registry.register(train_model(shuffled(2), va, FEATURES, **kw), root=root)
    worse = registry.promote_if_better(v3, test_f, margin=0.01, root=root)
    assert worse["decision"] == "challenger" and worse["candidate_score"] < worse["champion_score"]
    assert registry.aliases(root) == {"champion": v2, "challenger": v3}
    assert [d["decision"] for d in registry.decisions(root)] == ["promoted", "promoted", "challenger"]


def test_aliases_survive_a_crash_mid_write(trained, monkeypatch):
    "A failure between writing the temporary file and the rename leaves the old aliases intact."
    _, root = trained
    before = registry.aliases(root)
    def crash(*_):
        raise OSError("simulated crash before rename")
    monkeypatch.setattr(registry.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        registry.set_alias("challenger", before["champion"], root=root)
    monkeypatch.undo()
    assert registry.aliases(root) == before
    assert registry.load("champion", root).version == before["champion"]


def test_loaded_model_reproduces_stored_test_metrics(trained, datasets):
    res, root = trained
    _, test_f = datasets
    loaded = registry.load(res.version, root)
    stored = registry.read_meta(res.version, root)["metrics"]["test"]
    assert evaluate_scorer(loaded, test_f) == stored  # exactly: same floats
    served = res.model if res.served == "full" else res.reference
    assert loaded.features == served.features and loaded.thresholds == served.thresholds


def test_full_model_beats_transaction_only_baseline(trained):
    res, _ = trained
    m = res.report["models"]
    assert list(m) == ["full", "reference", "transaction_only"]
    assert m["full"]["metrics"]["pr_auc"] > m["transaction_only"]["metrics"]["pr_auc"]
    cmp = res.report["comparisons"]["reference"]
    assert set(cmp) == {"pr_auc", "roc_auc", "recall_at_1pct_fpr", "card_precision_at_100"}
    assert all(("full beats reference" in c["text"]) == c["beats"] for c in cmp.values())
    assert "card precision@100" in res.text() and res.decision["candidate_choice"]["chosen"] == res.served


def test_gate_serves_the_reference_when_it_is_better(trained, datasets, tmp_path):
    "A full model worse than the reference on the hold-out is not registered: the reference is, and says why."
    res, _ = trained
    tr_f, test_f = datasets
    tr, va = time_split(tr_f, valid_frac=0.2)
    weak = train_model(tr, va, ["gender_m", "city_pop"], **{k: v for k, v in QUICK.items() if k != "grid"})
    name, why = registry.better_of({"full": weak, "reference": res.reference}, test_f)
    assert name == "reference" and "never worse than the public baseline" in why["reason"]


def test_reference_model_serves_like_a_full_one(trained, clean, tmp_path):
    "A registered reference-feature model scores through the API's one-row path and the worker's batch path."
    from fraud_detection.features import (
        REFERENCE_FEATURES,
        incremental_features,
        request_row,
        risk_keys,
        state_from_history,
    )
    res, _ = trained
    ctrain, ctest = clean
    root = tmp_path / "registry"
    v = registry.register(res.reference, root=root)
    sc = registry.load(v, root)
    assert sc.features == REFERENCE_FEATURES
    tx = ctest.head(50)
    state = state_from_history(ctrain)
    risk = merchant_risk_table(pl.concat([ctrain, ctest]), label_delay_days=DELAY)
    batch, _ = incremental_features(state, tx, risk)  # the worker's path
    scored = sc.score(batch, explain="flagged")
    assert scored.height == 50 and scored["model_version"].unique().to_list() == [v]
    row = tx.row(0, named=True)  # the API's path: one row from the state and risk rows
    st = state.filter(pl.col("customer_id") == row["customer_id"])
    keys = [(pl.col("entity") == e) & (pl.col("key") == k) for e, k in risk_keys(row).items() if k is not None]
    rk = risk.filter(pl.any_horizontal(keys) & (pl.col("day") <= row["ts"].date())).to_dicts()
    one = sc.score_row(request_row(row, st.row(0, named=True) if st.height else None, rk))
    same = scored.filter(pl.col("trans_num") == row["trans_num"])["fraud_probability"][0]
    assert abs(one["fraud_probability"] - same) < 1e-9 and one["reasons"]


# --- explanations ----------------------------------------------------------------------------------------

def test_shap_contributions_sum_to_margin(trained, datasets):
    res, _ = trained
    _, test_f = datasets
    rows = pl.concat([test_f.filter(pl.col(LABEL) == 1).head(20), test_f.head(200)])
    sc = res.model
    X = sc.matrix(rows)
    c = contributions(sc.booster, X)
    assert c.shape == (rows.height, len(sc.features) + 1)
    np.testing.assert_allclose(c.sum(1), sc.margin(X), rtol=0, atol=1e-4)
    out = sc.score(rows, top_k=len(sc.features))
    full = np.array([sum(r["contribution"] for r in rs) for rs in out["reasons"].to_list()])
    np.testing.assert_allclose(full + c[:, -1], sc.margin(X), rtol=0, atol=1e-4)
    top = out["reasons"][0].to_list()
    assert [abs(r["contribution"]) for r in top] == sorted((abs(r["contribution"]) for r in top), reverse=True)


# --- behavioural tests -------------------------------------------------------------------------------------

def test_invariance_renaming_a_merchant(trained, clean):
    "Renaming a merchant everywhere (same history, hence the same risk) does not move any score."
    res, _ = trained
    ctrain, ctest = clean
    busiest = ctest.group_by("merchant").len().sort("len", "merchant", descending=True)["merchant"][0]
    renamed = [f.with_columns(pl.col("merchant").replace(busiest, "fraud_Renamed Merchant LLC")) for f in clean]
    ids = ctest.filter(pl.col("merchant") == busiest)["trans_num"]
    before = score_rows(res.model, ctrain, ctest, ids)
    after = score_rows(res.model, *renamed, ids)
    assert before.height > 10
    assert np.array_equal(before["fraud_probability"].to_numpy(), after["fraud_probability"].to_numpy())
    assert before["decision"].to_list() == after["decision"].to_list()


def test_direction_20x_amount_raises_the_score(trained, clean, datasets):
    "A legitimate test transaction at 20× its amount is riskier (one per customer, so histories stay apart)."
    res, _ = trained
    ctrain, ctest = clean
    _, test_f = datasets
    picks = (test_f.filter((pl.col(LABEL) == 0) & (pl.col("n_prior") >= 20))
                   .unique("customer_id", keep="first", maintain_order=True).head(60)["trans_num"])
    bumped = ctest.with_columns(pl.when(pl.col("trans_num").is_in(picks.implode())).then(pl.col("amt") * 20)
                                  .otherwise("amt").alias("amt"))
    before = score_rows(res.model, ctrain, ctest, picks)["fraud_probability"].to_numpy()
    after = score_rows(res.model, ctrain, bumped, picks)["fraud_probability"].to_numpy()
    assert len(picks) >= 30
    assert (after > before).mean() >= 0.9, (after > before).mean()
    assert np.median(after / before) > 2


def test_minimum_functionality_takeover_burst_is_flagged(trained, clean):
    "Five large online purchases within ~10 minutes at 3 a.m., far from home, on an established card."
    res, _ = trained
    ctrain, ctest = clean
    cust = ctrain.group_by("customer_id").len().sort("len", "customer_id", descending=True)["customer_id"][0]
    last = ctrain.filter(pl.col("customer_id") == cust).tail(1)
    mean_amt = ctrain.filter(pl.col("customer_id") == cust)["amt"].mean()
    t0 = ctest["ts"].min().replace(hour=3, minute=0, second=0, microsecond=0) + timedelta(days=2)
    burst = pl.concat([last.with_columns(
        trans_num=pl.lit(f"burst{i:027d}"), ts=pl.lit(t0 + timedelta(minutes=2 * i)),
        unix_time=pl.lit(int((t0 + timedelta(minutes=2 * i)).timestamp()), pl.Int64),
        merchant=pl.lit(f"fraud_Unknown Shop {i}"), category=pl.lit(["shopping_net", "misc_net"][i % 2]),
        amt=pl.lit(round(max(20 * mean_amt, 900.0) + 37 * i, 2)), is_fraud=pl.lit(0, pl.Int8),
        merch_lat=pl.col("lat") + 6.0, merch_long=pl.col("long") + 8.0) for i in range(5)])
    ids = burst["trans_num"]
    scored = score_rows(res.model, ctrain, pl.concat([ctest, burst]).sort("ts", "trans_num"), ids)
    assert scored["n_10m"].to_list()[-1] >= 4
    assert (scored["decision"] != "approve").sum() >= 4, scored.select("amt", "fraud_probability", "decision")
    assert scored["fraud_probability"].max() > 20 * ctrain[LABEL].mean()  # far above the base rate


# --- the scheduled notebook --------------------------------------------------------------------------------

def test_retrain_notebook_runs_on_demo_data(fraud_home):
    "scheduled/retrain.ipynb with its CI defaults: simulate in memory, train, register, gate, report."
    import json

    from fraud_detection.notebook_runs import run_notebook
    rec = run_notebook("retrain", {"num_boost_round": 200, "grid": None}, progress=False)
    assert rec.status == "ok", rec.error
    reg = fraud_home / "data" / "registry"
    assert registry.aliases(reg)["champion"] == "v0001"
    report = json.loads((fraud_home / "data" / "reports" / "v0001" / "report.json").read_text())
    assert report["gate"]["decision"] == "promoted"
    assert set(report["models"]) == {"full", "reference", "transaction_only"} and "reference" in report["comparisons"]
