"""Detection benchmark: the regression set for catching fraud, one table per simulator profile.

For each profile (`simulate.PROFILES`): simulate to files → `ingest_files` (validation, hashing, PII removal) →
`train_pipeline` (point-in-time features by the real feature code, full + reference + transaction-only models
trained the same way, test-period evaluation, registry and gate in a temporary folder) → one table:
PR-AUC, ROC-AUC, recall at 1 % FPR and card precision@100 per day of the full model, the reference model (the
Fraud Detection Handbook's public baseline feature set) and the transaction-only baseline, the full model's
margin over the reference per metric, which model the gate registered, and a feature-group ablation
(each `FEATURE_GROUPS` family dropped in turn; validation PR-AUC change).

Done-when (issue #13): on every profile the full model beats the reference by ≥ 0.03 PR-AUC and on CP@100.
The script prints PASS/FAIL per profile; it exits 0 either way (it is a measurement, not a test).

Usage: python bench/bench_detection.py [--scale full] [--profiles default literature] [--ablation-days 120]
       [--no-ablation] [--grid default|single] [--seed 42] [--json out.json]
`--scale` takes simulate's scales (small | demo | full = Sparkov size ≈ 1.8 M rows) or a number of customers.
CP@100 needs more than 100 active cards a day to tell models apart: below ~300 customers every card is in the
top 100 each day and all models get the same CP@100 (the day's fraud cards / 100).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

METRICS = {"pr_auc": "PR-AUC", "roc_auc": "ROC-AUC", "recall_at_1pct_fpr": "rec@1%FPR",
           "card_precision_at_100": "CP@100"}
MODELS = ("full", "reference", "transaction_only")
PR_AUC_MARGIN = 0.03  # issue #13: the full model must beat the reference by at least this PR-AUC


def run_profile(profile: str, scale: str, seed: int, grid, ablation_days: float | None, work: Path) -> dict:
    "simulate → ingest → features → train (+ ablation) for one profile; the report and seconds per stage."
    from fraud_detection.ingest import ingest_files
    from fraud_detection.simulate import simulate_to_files
    from fraud_detection.train import train_pipeline
    t0 = time.perf_counter()
    raw = simulate_to_files(scale, work / "raw", seed=seed, profile=profile, progress=False)
    t1 = time.perf_counter()
    ing = ingest_files(raw, work / "clean", key="bench-key", progress=False)
    if ing.failed:
        raise RuntimeError(f"ingest failed: {ing}")
    t2 = time.perf_counter()
    res = train_pipeline(clean_dir=work / "clean", grid=grid, ablation_days=ablation_days,
                         registry_root=work / "registry", reports_dir=work / "reports")
    t3 = time.perf_counter()
    return {"report": res.report, "served": res.served, "gate": res.decision,
            "seconds": {"simulate": t1 - t0, "ingest": t2 - t1, "features_train_evaluate": t3 - t2,
                        **{f"pipeline_{k}": v for k, v in res.timings.items()}}}


def table(profile: str, out: dict) -> list[str]:
    "The printed lines of one profile: models × metrics, margins, verdict, ablation."
    models = out["report"]["models"]
    test = out["report"]["test"]
    lines = [f"\n== profile {profile}: test {test['rows']:,} rows, {test['positives']:,} fraud; "
             f"registered: {out['served']} ({out['gate']['candidate_choice']['reason']})",
             f"{'model':<18}{'features':>9}" + "".join(f"{v:>11}" for v in METRICS.values()) + f"{'trees':>7}"]
    for name in MODELS:
        m = models[name]
        trees = m.get("trees") or ""
        lines.append(f"{name:<18}{m['features']:>9}" + "".join(f"{m['metrics'][k]:>11.4f}" for k in METRICS)
                     + f"{trees:>7}")
    cmp = out["report"]["comparisons"]["reference"]
    lines.append(f"{'full - reference':<27}" + "".join(f"{cmp[k]['delta']:>+11.4f}" for k in METRICS))
    ok = cmp["pr_auc"]["delta"] >= PR_AUC_MARGIN and cmp["card_precision_at_100"]["delta"] > 0
    lines.append(f"done-when (full beats reference by >= {PR_AUC_MARGIN} PR-AUC and on CP@100): "
                 f"{'PASS' if ok else 'FAIL'}")
    if "ablation" in out["report"]:
        ab = out["report"]["ablation"]
        lines.append(f"ablation (validation PR-AUC; full model's parameters; last {ab['train_days']:g} training days):")
        for r in sorted(ab["rows"], key=lambda r: r["delta"]):
            what = f"add {r['dropped'][1:]}" if r["dropped"].startswith("+") else f"drop {r['dropped']}"
            lines.append(f"  {what:<33}{r['features']:>4} features  PR-AUC {r['valid_pr_auc']:.4f} "
                         f"({r['delta']:+.4f})  {r['trees']} trees")
    s = out["seconds"]
    lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in s.items()))
    return lines


def main() -> None:
    from fraud_detection.simulate import PROFILES
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="full", help="simulate scale: small | demo | full | a number of customers")
    ap.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--grid", choices=["default", "single"], default="default")
    ap.add_argument("--ablation-days", type=float, default=120.0,
                    help="train the ablation models on the last N days of the training period")
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--keep", type=Path, help="copy each profile's model registry to KEEP/<profile> (for bench_api --model)")
    args = ap.parse_args()

    from fraud_detection.model import DEFAULT_GRID
    grid = DEFAULT_GRID if args.grid == "default" else None
    results = {}
    for profile in args.profiles:
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            print(f"profile {profile}: simulate ({args.scale}) → ingest → features → train ...", flush=True)
            out = run_profile(profile, args.scale, args.seed, grid, None if args.no_ablation else args.ablation_days,
                              Path(d))
            if args.keep:
                shutil.copytree(Path(d) / "registry", args.keep / profile, dirs_exist_ok=True)
            print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)
        results[profile] = out
    print(f"\nscale {args.scale}, seed {args.seed}, grid {args.grid} (machine shared: seconds are noisy)")
    for profile, out in results.items():
        print("\n".join(table(profile, out)))
    if args.json:
        args.json.write_text(json.dumps({p: {"models": {m: o["report"]["models"][m]["metrics"] for m in MODELS},
                                             "comparisons": o["report"]["comparisons"], "served": o["served"],
                                             "ablation": o["report"].get("ablation"), "seconds": o["seconds"]}
                                         for p, o in results.items()}, indent=1, default=str))
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
