"""Training and scoring benchmark at Sparkov size.

Data: the simulator at full scale (≈1.3 M training, ≈0.54 M test transactions) cleaned and turned into
features by the real feature code (`--source simulated`, default), or a synthetic feature frame of the
same size (`--source synthetic`, no simulator involved).

Figures (medians over `--runs`; noisy on a shared machine):
- training + evaluation time of the pipeline: full model (hyperparameter grid, early stopping) + the
  transaction-only baseline + test evaluation and report (target ≤ 5 min on 2 cores), and PR-AUC full vs baseline;
- one-row SHAP latency: XGBoost-native `pred_contribs` vs `shap.TreeExplainer` (p50/p99);
- `Scorer.score` latency for 1 row (with and without reasons) and 1000 rows, against the floor measured in
  the same run: a bare `booster.inplace_predict` of one row (ratio). Target: 1-row p99 ≤ 2 ms.

- with `--stopping`: why early stopping ends where it does. One model (depth 6) is trained for `--rounds`
  trees with validation PR-AUC and log-loss recorded every round, once with the old setting (positives
  weighted by negatives/positives) and once with the default (unweighted); printed: where each stopping rule
  (PR-AUC or log-loss, patience 30/50/100) would stop and the test PR-AUC there, test PR-AUC by tree count,
  and the validation PR-AUC's bootstrap standard deviation against its round-to-round changes.

Usage: python bench/bench_train.py [--source simulated|synthetic] [--runs 1] [--grid default|single]
       python bench/bench_train.py --stopping [--rounds 500] [--eta 0.1]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import polars as pl

import fraud_detection  # noqa: F401 - its __init__ sets OMP_WAIT_POLICY before xgboost loads below


def feature_frames(source: str, seed: int) -> tuple[pl.DataFrame, pl.DataFrame, list[str], list[str], dict, tuple]:
    "(train features, test features, features, baseline features, seconds per step, clean (train, test) or ())."
    t = time.perf_counter()
    if source == "synthetic":
        from fraud_detection.model import time_split
        from fraud_detection.testing import SYNTHETIC_BASELINE, SYNTHETIC_FEATURES, synthetic_features
        df = synthetic_features(1_835_000, seed=seed, days=730)
        train_f, test_f = time_split(df, valid_frac=0.293)  # Sparkov: 1.30 M train, 0.54 M test
        return train_f, test_f, SYNTHETIC_FEATURES, SYNTHETIC_BASELINE, {"synthetic": time.perf_counter() - t}, ()
    from fraud_detection.features import BASELINE_FEATURES, FEATURES
    from fraud_detection.ingest import clean_frame
    from fraud_detection.simulate import simulate
    from fraud_detection.train import build_datasets
    raw = simulate("full", seed=seed)
    t1 = time.perf_counter()
    clean = [clean_frame(f, "bench-key")[0] for f in raw]
    t2 = time.perf_counter()
    train_f, test_f = build_datasets(*clean, label_delay_days=7)
    t3 = time.perf_counter()
    return (train_f, test_f, FEATURES, BASELINE_FEATURES, {"simulate": t1 - t, "clean": t2 - t1, "features": t3 - t2},
            tuple(clean))


def request_latency(scorer, clean: tuple[pl.DataFrame, pl.DataFrame], n: int = 1000) -> dict:
    "features + model + reasons for one transaction, as the API does it: request_row(tx, state row, risk rows)."
    from fraud_detection.evaluate import time_calls
    from fraud_detection.features import merchant_risk_table, request_row, risk_keys, state_from_history
    train_tx, test_tx = clean
    state = state_from_history(train_tx)
    risk = merchant_risk_table(pl.concat([train_tx, test_tx]), label_delay_days=7)
    txs = test_tx.head(20_000).sample(300, seed=1)  # early test rows: the training-period state is their history
    reqs = []
    for tx in txs.iter_rows(named=True):
        st = state.filter(pl.col("customer_id") == tx["customer_id"])
        keys = [(pl.col("entity") == e) & (pl.col("key") == k) for e, k in risk_keys(tx).items() if k is not None]
        reqs.append((tx, st.row(0, named=True) if st.height else None,
                     risk.filter(pl.any_horizontal(keys) & (pl.col("day") <= tx["ts"].date())).to_dicts()))
    feats = time_calls(lambda i: request_row(*reqs[i % len(reqs)]), n)
    both = time_calls(lambda i: scorer.score_row(request_row(*reqs[i % len(reqs)])), n)
    return {"features": feats, "features_model_reasons": both}


def train_and_evaluate(train_f, test_f, features, baseline_features, grid, out: Path) -> dict:
    "One timed run of what `train_pipeline` does after the features: train full + baseline, evaluate, report."
    from fraud_detection.evaluate import evaluate_scorer, write_report
    from fraud_detection.model import time_split, train_model
    t0 = time.perf_counter()
    tr, va = time_split(train_f, valid_frac=0.2)
    full = train_model(tr, va, features, grid=grid, nthread=2)
    t1 = time.perf_counter()
    base = train_model(tr, va, baseline_features, grid=grid, nthread=2)
    t2 = time.perf_counter()
    full.meta["metrics"] = {"test": evaluate_scorer(full, test_f)}
    report = write_report({"full": full, "baseline": base}, test_f, out)
    t3 = time.perf_counter()
    return {"total": t3 - t0, "train_full": t1 - t0, "train_baseline": t2 - t1, "evaluate_report": t3 - t2,
            "full": full, "report": report}


def _stop_at(curve, patience: int, higher: bool) -> int:
    "Trees kept by early stopping on `curve` with `patience` (XGBoost's rule: the best round so far)."
    best, at = None, 0
    for i, v in enumerate(curve):
        if best is None or (v > best if higher else v < best):
            best, at = v, i
        elif i - at >= patience:
            break
    return at + 1


def stopping_study(train_f, test_f, features: list[str], eta: float, rounds: int) -> None:
    "Print where each stopping rule ends, weighted vs unweighted, with test PR-AUC there (see the module doc)."
    import numpy as np
    import xgboost as xgb
    from sklearn.metrics import average_precision_score as ap

    from fraud_detection.model import DEFAULT_PARAMS, time_split, to_matrix
    tr, va = time_split(train_f, valid_frac=0.2)
    ytr, yva, yte = (d["is_fraud"].to_numpy() for d in (tr, va, test_f))
    print(f"stopping study: train {len(tr):,} rows ({ytr.sum():,} fraud), valid {len(va):,} ({yva.sum():,}), "
          f"test {len(test_f):,} ({yte.sum():,}); eta {eta}, depth 6, {rounds} rounds")
    dtr = xgb.QuantileDMatrix(to_matrix(tr, features), ytr, missing=np.nan, max_bin=256)
    dva = xgb.QuantileDMatrix(to_matrix(va, features), yva, missing=np.nan, ref=dtr, max_bin=256)
    Xva, Xte = to_matrix(va, features), to_matrix(test_f, features)
    rng = np.random.default_rng(0)
    for name, w in (("weighted (old: scale_pos_weight = neg/pos)", (ytr == 0).sum() / ytr.sum()),
                    ("unweighted (default)", 1.0)):
        rate = ytr.mean()
        p = {**DEFAULT_PARAMS, "eta": eta, "scale_pos_weight": w, "base_score": w * rate / (w * rate + 1 - rate),
             "nthread": 2, "seed": 0, "eval_metric": ["aucpr", "logloss"]}
        ev: dict = {}
        t = time.perf_counter()
        b = xgb.train(p, dtr, rounds, evals=[(dva, "va")], evals_result=ev, verbose_eval=False)
        aucpr, ll = np.array(ev["va"]["aucpr"]), np.array(ev["va"]["logloss"])
        print(f"-- {name}: {time.perf_counter() - t:.0f} s for {rounds} trees")
        def test_at(n: int, b=b) -> float:
            return ap(yte, b.inplace_predict(Xte, iteration_range=(0, n)))
        for patience in (30, 50, 100):
            for metric, curve, higher in (("PR-AUC", aucpr, True), ("log-loss", ll, False)):
                n = _stop_at(curve, patience, higher)
                print(f"  stop on valid {metric:<8} patience {patience:>3}: {n:>4} trees, valid PR-AUC "
                      f"{aucpr[n - 1]:.4f}, test PR-AUC {test_at(n):.4f}")
        for n in (10, 25, 50, 100, 200, 300, 500, 800):
            if n <= rounds:
                print(f"  {n:>4} trees: valid PR-AUC {aucpr[n - 1]:.4f} log-loss {ll[n - 1]:.5f}  test PR-AUC {test_at(n):.4f}")
        n = _stop_at(ll, 50, False)
        pva = b.inplace_predict(Xva, iteration_range=(0, n))
        boots = [ap(yva[i], pva[i]) for i in (rng.integers(0, len(yva), len(yva)) for _ in range(50))]
        print(f"  valid PR-AUC noise at {n} trees: bootstrap sd {np.std(boots):.4f}; median |change| per round "
              f"(rounds 10-100) {np.median(np.abs(np.diff(aucpr[10:100]))):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", choices=["simulated", "synthetic"], default="simulated")
    ap.add_argument("--runs", type=int, default=1, help="training runs (median reported)")
    ap.add_argument("--grid", choices=["default", "single"], default="default")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--stopping", action="store_true", help="the early-stopping study instead of the timings")
    ap.add_argument("--rounds", type=int, default=500, help="trees per model in the stopping study")
    ap.add_argument("--eta", type=float, default=0.1, help="learning rate in the stopping study")
    args = ap.parse_args()

    import xgboost as xgb

    from fraud_detection.evaluate import shap_latency, time_calls
    from fraud_detection.model import DEFAULT_GRID

    train_f, test_f, features, baseline_features, prep, clean = feature_frames(args.source, args.seed)
    print(f"data ({args.source}): train {train_f.height:,} rows ({int(train_f['is_fraud'].sum()):,} fraud), "
          f"test {test_f.height:,} rows ({int(test_f['is_fraud'].sum()):,} fraud), {len(features)} features; "
          + ", ".join(f"{k} {v:.1f} s" for k, v in prep.items()))

    if args.stopping:
        stopping_study(train_f, test_f, features, args.eta, args.rounds)
        return
    grid = DEFAULT_GRID if args.grid == "default" else None
    runs = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.runs):
            r = train_and_evaluate(train_f, test_f, features, baseline_features, grid, Path(d) / f"run{i}")
            runs.append(r)
            print(f"run {i + 1}: training + evaluation {r['total']:.1f} s (full {r['train_full']:.1f} s, "
                  f"baseline {r['train_baseline']:.1f} s, evaluate + report {r['evaluate_report']:.1f} s)")
    med = statistics.median(r["total"] for r in runs)
    full, rep = runs[-1]["full"], runs[-1]["report"]["models"]
    print(f"training + evaluation: median {med:.1f} s over {len(runs)} run(s)  (target ≤ 300 s on 2 cores)")
    print("search:", [(s["params"], round(s["valid_aucpr"], 4), s["trees"], s["seconds"]) for s in full.meta["search"]],
          "chosen:", full.meta["chosen"])
    for name in ("full", "baseline"):
        m = rep[name]["metrics"]
        print(f"  {name:<8} PR-AUC {m['pr_auc']:.4f}  ROC-AUC {m['roc_auc']:.4f}  recall@1%FPR {m['recall_at_1pct_fpr']:.3f}  "
              f"review P/R {m['at_review']['precision']:.3f}/{m['at_review']['recall']:.3f}  "
              f"decline P/R {m['at_decline']['precision']:.3f}/{m['at_decline']['recall']:.3f}  "
              f"fraud amount caught {m['at_review'].get('fraud_amount_share', 0):.1%}  "
              f"expected/observed frauds {m['expected_vs_observed']:.2f}")

    # --- latency: explanations, Scorer, floor ---
    rows = test_f.sample(2000, seed=0)
    X = full.matrix(rows)
    lat = shap_latency(full, X, n=300)
    nat, te, tab = lat["native"], lat["tree_explainer"], lat.get("treeshap_tables")
    print(f"SHAP one row: native p50 {nat['p50_us']:.0f} µs p99 {nat['p99_us']:.0f} µs | TreeExplainer p50 "
          f"{te['p50_us']:.0f} µs p99 {te['p99_us']:.0f} µs  ({te['p50_us'] / nat['p50_us']:.1f}x native)"
          + (f" | TreeShap tables (the API's) p50 {tab['p50_us']:.0f} µs p99 {tab['p99_us']:.0f} µs "
             f"({tab['p50_us'] / nat['p50_us']:.2f}x native)" if tab else ""))

    one = [rows[i:i + 1] for i in range(rows.height)]
    booster: xgb.Booster = full.booster
    n = 2000
    floor = time_calls(lambda i: booster.inplace_predict(X[i % len(X)][None, :], predict_type="margin"), n)
    plain = time_calls(lambda i: full.score(one[i % len(one)], explain=False), n)
    expl = time_calls(lambda i: full.score(one[i % len(one)]), n)
    batch = rows.head(1000)
    b_plain = time_calls(lambda i: full.score(batch, explain=False), 30, warmup=3)
    b_flag = time_calls(lambda i: full.score(batch, explain="flagged"), 30, warmup=3)
    b_expl = time_calls(lambda i: full.score(batch), 5, warmup=1)
    f = floor["p50_us"]
    print(f"floor: booster.inplace_predict, 1 row: p50 {floor['p50_us']:.0f} µs p99 {floor['p99_us']:.0f} µs")
    for name, r in (("Scorer.score 1 row, no reasons", plain), ("Scorer.score 1 row + top-3 reasons", expl)):
        print(f"{name}: p50 {r['p50_us']:.0f} µs p99 {r['p99_us']:.0f} µs  ({r['p50_us'] / f:.1f}x floor p50)  "
              f"(target p99 ≤ 2000 µs)")
    for name, r in (("no reasons", b_plain), ("reasons for flagged rows", b_flag), ("reasons for all", b_expl)):
        print(f"Scorer.score 1000 rows, {name}: p50 {r['p50_us'] / 1e3:.1f} ms p99 {r['p99_us'] / 1e3:.1f} ms")
    if clean:
        rl = request_latency(full, clean)
        for name, r in (("request_row", rl["features"]), ("request_row + Scorer.score_row + reasons",
                                                           rl["features_model_reasons"])):
            print(f"{name}, 1 row: p50 {r['p50_us']:.0f} µs p99 {r['p99_us']:.0f} µs  "
                  f"({r['p50_us'] / f:.1f}x floor p50)")


if __name__ == "__main__":
    main()
