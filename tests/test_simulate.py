"""Simulator checks that a notebook holds badly: the CLI end to end, properties over many seeds and rates,
and the full Sparkov scale (slow)."""
from __future__ import annotations

import hashlib
import time

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fraud_detection.core import CATEGORIES, RAW_COLUMNS
from fraud_detection.simulate import PROFILES, RAW_SCHEMA, SCALES, simulate, simulate_to_files


def check_contract(train: pl.DataFrame, test: pl.DataFrame, split=None, profile: str = "default") -> None:
    "The raw-data contract every simulation keeps."
    for part in (train, test):
        assert part.columns[: len(RAW_COLUMNS)] == RAW_COLUMNS
        assert dict(part.select(RAW_COLUMNS).schema) == RAW_SCHEMA
        assert part["unix_time"].is_sorted() and part["trans_date_trans_time"].is_sorted()
        assert part.null_count().sum_horizontal().item() == 0
        assert part["category"].is_in(CATEGORIES).all() and part["is_fraud"].is_in([0, 1]).all()
        assert (part["amt"] >= 1).all() and (part["amt"] == part["amt"].round(2)).all()
        if "scenario" in part.columns:  # every scenario in each period
            assert set(part.filter(pl.col("is_fraud") == 1)["scenario"]) == set(PROFILES[profile])
    assert train["unix_time"].max() < test["unix_time"].min()
    if split is not None:
        assert train["trans_date_trans_time"].max() < str(split) <= test["trans_date_trans_time"].min()
    both = pl.concat([train.select(RAW_COLUMNS), test.select(RAW_COLUMNS)])
    assert both["trans_num"].is_unique().all() and both["trans_num"].str.contains("^[0-9a-f]{32}$").all()
    ts = both["trans_date_trans_time"].str.to_datetime("%Y-%m-%d %H:%M:%S")
    assert (ts.dt.epoch("s") == both["unix_time"]).all(), "unix_time is the epoch of trans_date_trans_time"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), fraud_rate=st.floats(0.002, 0.1), profile=st.sampled_from(list(PROFILES)))
def test_small_contract_any_seed_and_rate(seed, fraud_rate, profile):
    train, test = simulate("small", seed=seed, fraud_rate=fraud_rate, scenarios=True, profile=profile)
    check_contract(train, test, SCALES["small"].split, profile)
    rate = pl.concat([train, test])["is_fraud"].mean()
    # whole episodes round up at this tiny scale (≈8 k rows), so allow generous slack above the target
    assert 0.5 * fraud_rate < rate < 2.5 * fraud_rate + 0.004, (rate, fraud_rate)


def test_customer_count_scale_uses_full_calendar():
    train, test = simulate(30, seed=5, scenarios=True)
    check_contract(train, test, SCALES["full"].split)
    assert pl.concat([train, test])["cc_num"].n_unique() == 30
    assert train["trans_date_trans_time"].min() < "2019-01-03" and test["trans_date_trans_time"].max() > "2020-12-29"


def test_cli_writes_kaggle_files(tmp_path, fraud_home):
    "`fraud data simulate` writes parquet and Kaggle-layout CSVs that read back equal."
    from typer.testing import CliRunner

    from fraud_detection.cli import app
    out = tmp_path / "raw"
    r = CliRunner().invoke(app, ["data", "simulate", "--scale", "small", "--out", str(out), "--seed", "3", "--csv"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["fraudTest.csv", "fraudTrain.csv", "test.parquet", "train.parquet"]
    for pq, csv in (("train.parquet", "fraudTrain.csv"), ("test.parquet", "fraudTest.csv")):
        a, b = pl.read_parquet(out / pq), pl.read_csv(out / csv)
        assert b.columns == ["", *RAW_COLUMNS] and b[""].to_list() == list(range(len(b)))
        assert a.equals(b.drop("")) and a.equals(simulate("small", seed=3)[pq == "test.parquet"])


def test_cli_profile(tmp_path, fraud_home):
    "`--profile literature` writes that profile's data (same legit stream); an unknown profile is a clear error."
    from typer.testing import CliRunner

    from fraud_detection.cli import app
    r = CliRunner().invoke(app, ["data", "simulate", "--scale", "small", "--out", str(tmp_path), "--seed", "3",
                                 "--profile", "literature"])
    assert r.exit_code == 0 and "literature" in r.output, r.output
    assert pl.read_parquet(tmp_path / "train.parquet").equals(simulate("small", seed=3, profile="literature")[0])
    default = simulate("small", seed=3, scenarios=True)[0]
    lit = simulate("small", seed=3, scenarios=True, profile="literature")[0]
    assert not default.equals(lit)
    legit = lit.filter(pl.col("scenario") == "legit")["trans_date_trans_time"].is_in(
        default.filter(pl.col("scenario") == "legit")["trans_date_trans_time"].implode()).mean()
    assert legit > 0.97, legit  # the same customers and legitimate stream
    bad = CliRunner().invoke(app, ["data", "simulate", "--scale", "small", "--out", str(tmp_path), "--profile", "nope"])
    assert bad.exit_code != 0 and "unknown profile" in bad.output


def test_default_out_dir_is_data_raw(fraud_home):
    from fraud_detection.core import get_settings
    paths = simulate_to_files("small", seed=1, progress=False)
    assert [p.parent for p in paths] == [get_settings().data / "raw"] * 2


@pytest.mark.slow
def test_full_scale_size_speed_and_determinism(tmp_path):
    "Sparkov size (≈1.30 M + 0.56 M rows) within 60 s, identical files for the same seed."
    t = time.perf_counter()
    a = simulate_to_files("full", tmp_path / "a", seed=11, progress=False)
    took = time.perf_counter() - t
    train, test = pl.read_parquet(a[0]), pl.read_parquet(a[1])
    check_contract(train, test, SCALES["full"].split)
    assert 1.1e6 < len(train) < 1.5e6 and 0.45e6 < len(test) < 0.65e6, (len(train), len(test))
    for part in (train, test):
        assert abs(part["is_fraud"].mean() / 0.005 - 1) < 0.05
    assert took < 60, f"full scale took {took:.1f} s"
    b = simulate_to_files("full", tmp_path / "b", seed=11, progress=False)
    digest = [[hashlib.sha256(p.read_bytes()).hexdigest() for p in paths] for paths in (a, b)]
    assert digest[0] == digest[1]


@pytest.mark.slow
@pytest.mark.parametrize("profile", [p for p in PROFILES if p != "default"])
def test_full_scale_other_profiles(profile):
    "Every profile at Sparkov size: the contract, the fraud rate per period, within 60 s."
    t = time.perf_counter()
    train, test = simulate("full", seed=11, scenarios=True, profile=profile)
    assert time.perf_counter() - t < 60
    check_contract(train, test, SCALES["full"].split, profile)
    for part in (train, test):
        assert abs(part["is_fraud"].mean() / 0.005 - 1) < 0.1, part["is_fraud"].mean()
