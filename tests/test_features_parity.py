"""Parity of the one feature definition across its three modes (batch, incremental, request), and point-in-time rules.

Data: a small deterministic generator with bursts, same-second ties and a customer silent for more than the state
horizon; plus the project's simulator through ingest when it is importable.
"""
from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fraud_detection.core import CATEGORIES, clean_schema
from fraud_detection.features import (
    FEATURE_GROUPS,
    FEATURES,
    LIST_WINDOWS,
    SPEC,
    STATE_HORIZON,
    STATE_SCHEMA,
    WINDOWS,
    assert_same_features,
    batch_features,
    empty_state,
    incremental_features,
    merchant_risk_slice,
    merchant_risk_table,
    merge_state,
    request_features,
    state_from_history,
)

T0 = datetime(2020, 3, 1)


def make_tx(n: int = 1500, customers: int = 12, days: int = 45, seed: int = 0) -> pl.DataFrame:
    "Clean transactions: 65 % spread over `days`; 20 % within 10 min after an earlier tx of the same customer,"
    " 5 % exactly one window length after one, 10 % at the same second as one."
    rng = np.random.default_rng(seed)
    cust = rng.integers(0, customers, n)
    secs = rng.integers(0, days * 86400, n)
    kind = rng.random(n)
    edges = [int(d.total_seconds()) for d in WINDOWS.values()]
    for i in range(1, n):  # copy an earlier row's customer for bursts, window edges and ties
        if kind[i] < 0.35:
            j = rng.integers(0, i)
            after = rng.integers(1, 600) if kind[i] < 0.2 else rng.choice(edges) if kind[i] < 0.25 else 0
            cust[i], secs[i] = cust[j], secs[j] + after
    gap = cust == 0  # customer 0 is silent from day 2 to day 35: its state's recent rows all fall out of the window
    secs[gap] = np.where(secs[gap] < 33 * 86400, secs[gap] % (2 * 86400), secs[gap] + 2 * 86400)
    merch = rng.integers(0, 15, n)
    amt = np.round(rng.lognormal(3.5, 1.2, n), 2)
    amt[rng.random(n) < 0.1] += 1 / 3  # some amounts that are not whole cents
    mlat, mlong = rng.uniform(30, 45, 15), rng.uniform(-120, -75, 15)
    df = pl.DataFrame({
        "trans_num": [f"{x:012x}" for x in rng.choice(2 ** 40, n, replace=False)],
        "ts": [T0 + timedelta(seconds=int(s)) for s in secs],
        "unix_time": (secs + int(T0.timestamp())).astype(np.int64),
        "customer_id": [f"c{c:02d}" for c in cust], "merchant": [f"m{m:02d}" for m in merch],
        "category": [CATEGORIES[m % len(CATEGORIES)] for m in merch], "amt": amt,
        "gender": np.where(cust % 2 == 0, "F", "M"), "city": "X", "state": "NY", "zip": 10001,
        "lat": 40.0 + cust / 10, "long": -74.0 - cust / 10, "city_pop": 1000 + cust,
        "job": "clerk", "dob": [datetime(1960 + int(c), 5, 17).date() for c in cust],
        "merch_lat": mlat[merch], "merch_long": mlong[merch], "is_fraud": (rng.random(n) < 0.05).astype(np.int8)})
    return df.cast(clean_schema()).sort("ts", "trans_num")


def in_batches(tx: pl.DataFrame, sizes: list[int], risk: pl.DataFrame | None = None,
               state: pl.DataFrame | None = None, sliced: bool = True) -> tuple[pl.DataFrame, pl.DataFrame]:
    "Run `tx` (in order) through incremental mode in micro-batches of the given sizes (cycled), carrying the state."
    state = empty_state() if state is None else state
    out, i, k = [], 0, 0
    while i < tx.height:
        size = sizes[k % len(sizes)]
        batch = tx[i:i + size].sample(fraction=1.0, shuffle=True, seed=k)  # order inside a batch must not matter
        rows = merchant_risk_slice(risk, batch) if sliced and risk is not None else risk
        feats, updated = incremental_features(state, batch, rows)
        assert updated.height == batch["customer_id"].n_unique()
        state, i, k = merge_state(state, updated), i + size, k + 1
        out.append(feats)
    return pl.concat(out), state


def check_state(state: pl.DataFrame) -> None:
    "State invariants: schema, one row per customer, recent lists in order, pruned to the horizon, ending at last_ts."
    assert state.schema == pl.Schema(STATE_SCHEMA)
    assert state["customer_id"].is_unique().all()
    for r in state.iter_rows(named=True):
        ts = r["recent_ts"]
        assert ts == sorted(ts) and ts[-1] == r["last_ts"] and ts[0] > r["last_ts"] - STATE_HORIZON
        assert len(r["recent_amt"]) == len(ts) and r["n_prior"] >= len(ts)


@pytest.fixture(scope="module")
def tx() -> pl.DataFrame:
    return make_tx()


@pytest.fixture(scope="module")
def risk(tx: pl.DataFrame) -> pl.DataFrame:
    return merchant_risk_table(tx, label_delay_days=3)


@pytest.fixture(scope="module")
def batch(tx: pl.DataFrame, risk: pl.DataFrame) -> pl.DataFrame:
    return batch_features(tx, risk)


def test_generator_has_the_hard_cases(tx: pl.DataFrame, batch: pl.DataFrame) -> None:
    assert tx.height == 1500 and tx["trans_num"].is_unique().all()
    assert tx.select(pl.struct("customer_id", "ts").is_duplicated().sum()).item() > 50  # same-second ties
    edge = pl.col("ts") - pl.col("ts").shift(1).over("customer_id", order_by=["ts", "trans_num"])
    assert tx.select(edge.is_in(list(WINDOWS.values())).sum()).item() > 10  # prior tx exactly a window length before
    assert (batch["n_10m"] >= 3).sum() > 10 and batch["amt_z"].is_not_null().sum() > 1000
    gaps = batch.filter(pl.col("customer_id") == "c00")["secs_since_prev"]
    assert gaps.max() > STATE_HORIZON.total_seconds()  # a customer silent for longer than the state keeps


def test_batch_matches_a_plain_python_oracle(tx: pl.DataFrame, batch: pl.DataFrame) -> None:
    "The history features recomputed row by row with plain Python from the documented definitions."
    seen: dict[str, list[dict]] = {}
    want = []
    for r in tx.iter_rows(named=True):  # tx is in (ts, trans_num) order: everything seen so far is prior
        prior = seen.setdefault(r["customer_id"], [])
        amts = [p["amt"] for p in prior]
        row = {f"n_{w}": sum(p["ts"] > r["ts"] - d for p in prior) for w, d in WINDOWS.items()}
        row |= {f"amt_{w}": sum(p["amt"] for p in prior if p["ts"] > r["ts"] - d) for w, d in WINDOWS.items()}
        mean = sum(amts) / len(amts) if amts else None
        sd = (sum((a - mean) ** 2 for a in amts) / (len(amts) - 1)) ** 0.5 if len(amts) > 1 else None
        for w, d in WINDOWS.items():
            inside = [p for p in prior if p["ts"] > r["ts"] - d]
            for c, pre in (("category", "cat_"), ("merchant", "merch_")):
                same = [p["amt"] for p in inside if p[c] == r[c]]
                row[f"{pre}n_{w}"], row[f"{pre}amt_{w}"] = len(same), sum(same)
            if w in LIST_WINDOWS:
                xs = [p["amt"] for p in inside]
                m = sum(xs) / len(xs) if xs else None
                row[f"amt_std_{w}"] = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else None
                row[f"amt_max_{w}"] = max(xs, default=None)
                row[f"n_merchants_{w}"] = len({p["merchant"] for p in inside})
            row[f"amt_mean_{w}"] = (sum(p["amt"] for p in inside) + r["amt"]) / (len(inside) + 1)
        for c, pre in (("category", "cat_"), ("merchant", "merch_")):
            last = [p["ts"] for p in prior if p[c] == r[c]]
            gap = (r["ts"] - last[-1]).total_seconds() if last else None
            row[f"{pre}secs_since_prev"] = gap if gap is not None and gap < 30 * 86400 else None
        row |= {"n_prior": len(prior), "amt_mean_prior": mean, "amt_z": (r["amt"] - mean) / sd if sd else None,
                "secs_since_prev": (r["ts"] - prior[-1]["ts"]).total_seconds() if prior else None,
                "new_merchant": int(all(p["merchant"] != r["merchant"] for p in prior)),
                "new_category": int(all(p["category"] != r["category"] for p in prior))}
        want.append(row)
        prior.append(r)
    names = [c for c in want[0] if c in FEATURES]
    want = pl.DataFrame(want).select(names).cast({c: batch.schema[c] for c in names}).with_columns(batch["trans_num"])
    assert_same_features(batch, want, features=names, rtol=1e-7)


def test_batch_ignores_input_order(tx: pl.DataFrame, risk: pl.DataFrame, batch: pl.DataFrame) -> None:
    assert batch_features(tx.sample(fraction=1.0, shuffle=True, seed=1), risk).equals(batch)
    assert batch.columns == tx.columns + [f for f in FEATURES if f not in tx.columns]


@pytest.mark.parametrize("sizes,sliced", [([1], True), ([7], False), ([100], True), ([10_000], False),
                                          ([3, 1, 250, 17, 64, 1, 1, 500], True)])
def test_incremental_equals_batch(tx: pl.DataFrame, risk: pl.DataFrame, batch: pl.DataFrame, sizes: list[int],
                                  sliced: bool) -> None:
    if sizes == [1]:
        tx = tx.head(400)  # one transaction per call: keep it short
        batch = batch.head(400)
    feats, state = in_batches(tx, sizes, risk, sliced=sliced)
    assert_same_features(feats, batch)
    assert feats.select(c for c in FEATURES if not batch.schema[c].is_float()).equals(
        batch.select(c for c in FEATURES if not batch.schema[c].is_float()))  # counts and flags exactly
    check_state(state)
    assert state.sort("customer_id").equals(state_from_history(tx))  # totals are the same sequential fold


def test_request_equals_batch(tx: pl.DataFrame, risk: pl.DataFrame, batch: pl.DataFrame) -> None:
    rng = np.random.default_rng(7)
    held = sorted(set(rng.integers(0, tx.height, 120).tolist()) | set(range(tx.height - 30, tx.height)))
    for i in held:
        row = tx.row(i, named=True)
        prior = tx[:i]
        state = state_from_history(prior) if prior.height else None
        got = request_features(row, state, risk)  # the whole state: request picks its customer's row
        mine = state.filter(pl.col("customer_id") == row["customer_id"]) if state is not None else None
        assert_same_features(got, batch[i])
        assert_same_features(request_features(tx[i], mine, risk), batch[i])


def test_customers_without_history(tx: pl.DataFrame, risk: pl.DataFrame, batch: pl.DataFrame) -> None:
    first = batch.filter(pl.col("trans_num").is_in(
        tx.group_by("customer_id").agg(pl.col("trans_num").first())["trans_num"].implode()))
    assert first.height == 12 and (first["n_prior"] == 0).all() and (first["new_merchant"] == 1).all()
    assert first["secs_since_prev"].is_null().all() and first["amt_mean_prior"].is_null().all()
    # request: None, an empty state and a state of other customers all mean "no history"
    others = state_from_history(tx.filter(pl.col("customer_id") != "c05"))
    c05 = first.filter(pl.col("customer_id") == "c05")
    raw = tx.filter(pl.col("trans_num") == c05["trans_num"])
    for state in (None, empty_state(), others):
        assert_same_features(request_features(raw.row(0, named=True), state, risk), c05)
    # incremental: a batch whose customers are all new to a non-empty state
    cut = tx.filter(pl.col("customer_id").is_in(["c03", "c04"]))
    feats, updated = incremental_features(state_from_history(tx.filter(~pl.col("customer_id").is_in(["c03", "c04"]))),
                                          cut, risk)
    assert_same_features(feats, batch_features(cut, risk))
    assert updated.sort("customer_id").equals(state_from_history(cut))


def test_spec_generates_every_feature() -> None:
    "FEATURES is exactly what the spec declares, each feature in one family, each family non-empty."
    declared = [f for fam in SPEC for f in fam.features()]
    assert sorted(declared) == sorted(FEATURES) and len(set(declared)) == len(declared)
    assert [f for fs in FEATURE_GROUPS.values() for f in fs] == FEATURES and all(FEATURE_GROUPS.values())


@pytest.fixture(scope="module")
def modes(tx: pl.DataFrame, risk: pl.DataFrame) -> dict[str, tuple[pl.DataFrame, list[int]]]:
    "Each mode's features of some rows → (features, their row numbers in `batch`)."
    inc, _ = in_batches(tx, [3, 1, 250, 17, 64], risk)
    firsts = set(tx.group_by("customer_id").agg(pl.col("trans_num").first())["trans_num"])
    held = sorted({i for i, t in enumerate(tx["trans_num"]) if t in firsts} | set(range(200, tx.height, 53)))
    req = pl.concat([request_features(tx.row(i, named=True), state_from_history(tx[:i]) if i else None, risk)
                     for i in held])
    cold = [i for i in held if tx["trans_num"][i] in firsts]
    def others(i: int) -> pl.DataFrame:  # a state of every other customer, over all of tx
        return state_from_history(tx.filter(pl.col("customer_id") != tx["customer_id"][i]))
    no_history = pl.concat([request_features(tx.row(i, named=True), None if k % 2 else others(i), risk)
                            for k, i in enumerate(cold)])
    return {"incremental": (inc, list(range(tx.height))), "request": (req, held),
            "request, no history": (no_history, cold)}


@pytest.mark.parametrize("group", list(FEATURE_GROUPS))
def test_family_parity(group: str, batch: pl.DataFrame, modes: dict) -> None:
    "Every family the spec generates: incremental = request = batch, for customers with and without history."
    feats = FEATURE_GROUPS[group]
    varied = [f for f in feats if batch[f].drop_nulls().n_unique() > 1]
    assert varied == feats, f"{group}: constant or all-null on the test data (the check would be vacuous): " \
        f"{sorted(set(feats) - set(varied))}"
    assert len(modes["request, no history"][1]) == 12  # every customer's first transaction
    for mode, (got, rows) in modes.items():
        try:
            assert_same_features(got, batch[rows], features=feats)
        except AssertionError as e:
            raise AssertionError(f"{mode} != batch: {e}") from None


def test_state_outside_window(tx: pl.DataFrame, risk: pl.DataFrame, batch: pl.DataFrame) -> None:
    "Customer c00 resumes after a gap longer than the horizon: its state's recent rows are all outside every window."
    c0 = tx.filter(pl.col("customer_id") == "c00")
    resume = c0.with_columns(dt=pl.col("ts").diff()).select(pl.col("dt").arg_max()).item()
    state = state_from_history(c0[:resume])
    feats, updated = incremental_features(state, c0[resume:resume + 1], risk)
    assert feats["n_30d"].item() == 0 and feats["n_prior"].item() == resume
    assert_same_features(feats, batch.filter(pl.col("trans_num") == c0["trans_num"][resume]))
    assert updated["recent_ts"].item().len() == 1


def test_simulator_through_ingest() -> None:
    "The project's simulator (train + test periods, cleaned by ingest): batch == incremental == request."
    simulate = pytest.importorskip("fraud_detection.simulate").simulate
    clean_frame = pytest.importorskip("fraud_detection.ingest").clean_frame
    train, test = (clean_frame(df, "test-key")[0] for df in simulate("small"))
    tx = pl.concat([train, test])
    risk = merchant_risk_table(tx, label_delay_days=7)
    batch = batch_features(tx, risk)
    head = batch.head(train.height)
    assert_same_features(batch_features(train, risk), head)  # point in time: the test period never leaks back
    state = state_from_history(train)
    feats, state = in_batches(test, [1, 7, 100, 10_000], risk, state=state)
    assert_same_features(feats, batch.tail(test.height))
    check_state(state)
    for i in range(0, test.height, 97):
        row = test.row(i, named=True)
        before = state_from_history(pl.concat([train, test[:i]]))
        assert_same_features(request_features(row, before, risk), batch[train.height + i])


def test_future_never_changes_features(tx: pl.DataFrame, risk: pl.DataFrame, batch: pl.DataFrame) -> None:
    cut = 900
    past, future = tx[:cut], tx[cut:]
    assert_same_features(batch_features(past, risk), batch[:cut])  # dropping the future
    changed = future.with_columns(amt=pl.col("amt") * 3 + 1, merchant=pl.lit("m99"), is_fraud=1 - pl.col("is_fraud"))
    assert_same_features(batch_features(pl.concat([past, changed]), risk)[:cut], batch[:cut])  # changing it
    # adding transactions right after the cut, including at the same second with a larger trans_num
    last = past.row(cut - 1, named=True)
    extra = pl.concat([past.tail(5).with_columns(ts=pl.lit(last["ts"]), trans_num=pl.format("zz{}", pl.int_range(5))),
                       past.tail(5).with_columns(ts=pl.lit(last["ts"]) + timedelta(seconds=1),
                                                 trans_num=pl.format("a{}", pl.int_range(5)))])
    assert_same_features(batch_features(pl.concat([tx, extra]), risk).filter(
        pl.col("trans_num").is_in(past["trans_num"].implode())), batch[:cut])


def test_labels_within_delay_never_change_merchant_risk(tx: pl.DataFrame) -> None:
    delay, day = 3, (T0 + timedelta(days=11)).date()
    base = merchant_risk_table(tx, delay)
    flip = tx.with_columns(is_fraud=pl.when(pl.col("ts").dt.date() >= day - timedelta(days=delay))
                           .then(1 - pl.col("is_fraud")).otherwise("is_fraud"))
    flipped = merchant_risk_table(flip, delay)
    upto = pl.col("day") <= day
    assert flipped.filter(upto).equals(base.filter(upto))
    assert not flipped.equals(base)  # the flip does matter once the labels have arrived
    early = pl.col("ts").dt.date() <= day
    assert_same_features(batch_features(flip, flipped).filter(early), batch_features(tx, base).filter(early))
    # the risk of day d counts exactly the merchant's transactions of [d - delay - window, d - delay)
    m = tx["merchant"][0]
    lo, hi = day - timedelta(days=delay + 7), day - timedelta(days=delay)
    win = tx.filter(pl.col("merchant") == m, pl.col("ts").dt.date() >= lo, pl.col("ts").dt.date() < hi)
    row = base.filter(pl.col("entity") == "merchant", pl.col("key") == m, pl.col("day") == day)
    assert row["n_7d"].item() == win.height
    assert row["fraud_rate_7d"].item() == pytest.approx((win["is_fraud"].sum() + 0.1) / (win.height + 20))


@st.composite
def histories(draw: st.DrawFn) -> tuple[pl.DataFrame, list[int]]:
    "A few customers' transactions on a coarse time grid (ties and window edges are likely) and split points."
    n = draw(st.integers(1, 25))
    rows = draw(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 3 * 288) .map(lambda k: k * 300),
                                   st.integers(1, 50_000), st.sampled_from(["m1", "m2", "m3"])),
                         min_size=n, max_size=n))
    df = pl.DataFrame({
        "trans_num": [f"t{i:03d}" for i in draw(st.permutations(range(n)))],
        "ts": [T0 + timedelta(seconds=s) for _, s, _, _ in rows], "customer_id": [c for c, _, _, _ in rows],
        "merchant": [m for *_, m in rows], "category": [CATEGORIES[int(m[1])] for *_, m in rows],
        "amt": [a / 100 for _, _, a, _ in rows], "gender": "F", "zip": 10001, "lat": 40.0, "long": -74.0, "city_pop": 10,
        "dob": datetime(1980, 1, 1).date(), "merch_lat": [40.0 + int(m[1]) for *_, m in rows], "merch_long": -74.0})
    df = df.cast({c: t for c, t in clean_schema().items() if c in df.columns}).sort("ts", "trans_num")
    cuts = sorted(set(draw(st.lists(st.integers(1, n), max_size=4))) | {n})
    return df, cuts


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories())
def test_property_incremental_equals_batch(case: tuple[pl.DataFrame, list[int]]) -> None:
    df, cuts = case
    batch = batch_features(df)
    sizes = [b - a for a, b in zip([0, *cuts[:-1]], cuts, strict=True)]
    state, out, i = empty_state(), [], 0
    for size in sizes:
        feats, updated = incremental_features(state, df[i:i + size])
        state, i = merge_state(state, updated), i + size
        out.append(feats)
    assert_same_features(pl.concat(out), batch)
    assert state.sort("customer_id").equals(state_from_history(df))
    last = df.row(df.height - 1, named=True)  # and the last one as a request against the state before it
    assert_same_features(request_features(last, state_from_history(df[:-1]) if df.height > 1 else None), batch[-1])
