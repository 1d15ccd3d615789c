"""Datamodels solver: provenance's LASSO against scikit-learn's Lasso, same data, same lam.

Two cases, masks of random halves and margins from a sparse linear datamodel plus noise:
- ``few-models``: 20 models x 10,000 examples x 2,000 targets (issue 12: the whole path, 16 lam and
  the refit, in under a minute on 2 cores);
- ``many-models``: 2,000 models x 1,000 examples x 200 targets (the datamodels paper's regime,
  more models than examples).

Per case: the full ``fit_datamodels`` (path + validation + refit) for every target, then one lam
per target (the one the path chose) solved by the solver ``fit_datamodels`` picks for the shape
(``choose_solver``: ``lasso_cd`` for few models, ``lasso_gram`` for many, its Gram X'X/m computed
inside the timing) and by scikit-learn's ``Lasso`` (one fit per target, its default tol, as a user
would run it) on the same ``--compare`` targets, alternating A B A B; the objective of both against
a tight scikit-learn solve (tol 1e-10).  Where ours is ``lasso_gram``, scikit-learn's own Gram
option (``precompute`` with X'X passed in, computed inside its timing) is timed too, as a row of
its own (system ``sklearn_lasso_precompute``; the ratio stays over the default ``Lasso``).

    python bench/datamodels.py                        # both cases (a few minutes on 2 cores)
    python bench/datamodels.py --case many-models     # one case, to datamodels-many-models.json
    python bench/datamodels.py --quick                # small shapes, seconds
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results_file import write_results  # noqa: E402
from kernels.lasso import (choose_solver, fit_datamodels, lasso_cd, lasso_gram, lasso_reference,  # noqa: E402
                           objective, standardize)

CASES = {"few-models": (20, 10_000, 2_000), "many-models": (2_000, 1_000, 200)}
QUICK = {"few-models": (20, 1_000, 200), "many-models": (400, 200, 40)}


def make_data(m: int, n: int, t: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    masks = rng.random((m, n)) < 0.5
    w = np.zeros((n, t), np.float32)
    for c in range(t):                       # each target: 30 examples that matter
        w[rng.choice(n, size=min(n, 30), replace=False), c] = rng.normal(0, 0.3, min(n, 30))
    y = masks @ w + rng.normal(0, 0.5, (m, t))
    return masks, y


def sklearn_precompute(xs: np.ndarray, yc: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """scikit-learn's Gram coordinate descent: ``Lasso(precompute=X'X)``, default tol, one fit per target."""
    from sklearn.linear_model import Lasso

    gram = xs.T @ xs
    out = np.zeros((xs.shape[1], yc.shape[1]))
    for t in range(yc.shape[1]):
        out[:, t] = Lasso(alpha=float(lam[t]), fit_intercept=False, precompute=gram,
                          max_iter=1000).fit(xs, yc[:, t]).coef_
    return out


def run_case(name: str, shape, compare: int, reps: int, log) -> list:
    m, n, t = shape
    masks, y = make_data(m, n, t)
    n_val = max(1, round(0.1 * m))
    fit, val = slice(n_val, None), slice(0, n_val)
    lasso_cd(standardize(masks[:5, :10])[0], y[:5, :2] - y[:5, :2].mean(0), 0.1)     # compile (cached)
    lasso_gram(standardize(masks[:20, :5])[0], y[:20, :2] - y[:20, :2].mean(0), 0.1)
    t0 = time.perf_counter()
    res = fit_datamodels(masks[fit], y[fit], masks[val], y[val], n_lambdas=16, eps=1e-2,
                         on_step=lambda i, k: log(f"  [{name}] path step {i}/{k} ({time.perf_counter() - t0:.1f}s)"))
    full_s = time.perf_counter() - t0
    log(f"  [{name}] full path + refit: {full_s:.1f}s, {int((~res.converged).sum())} of {t} targets not converged, "
        f"mean nonzeros {float((res.weight != 0).sum(0).mean()):.1f}")
    # one lam per target (the chosen one, on the fit models), ours vs scikit-learn's Lasso
    xs, _, _ = standardize(masks[fit])
    yc = y[fit] - y[fit].mean(0)
    cols = np.arange(min(compare, t))
    lam = res.lam[cols]
    solver = choose_solver(m, n)         # what fit_datamodels ran (it sees all m models)
    ours = lasso_gram if solver == "gram" else lasso_cd
    ours_s, sk_s, pre_s = [], [], []
    for _ in range(reps):
        a = time.perf_counter()
        w_ours, gap, _ = ours(xs, yc[:, cols], lam, tol=1e-6)
        ours_s.append(time.perf_counter() - a)
        a = time.perf_counter()
        w_sk = lasso_reference(xs, yc[:, cols], lam, tol=1e-4, max_iter=1000)
        sk_s.append(time.perf_counter() - a)
        if solver == "gram":
            a = time.perf_counter()
            sklearn_precompute(xs, yc[:, cols], lam)
            pre_s.append(time.perf_counter() - a)
    w_tight = lasso_reference(xs, yc[:, cols], lam, tol=1e-10, max_iter=100_000)
    best = objective(xs, yc[:, cols], w_tight, lam)
    rel_ours = (objective(xs, yc[:, cols], w_ours, lam) - best) / best
    rel_sk = (objective(xs, yc[:, cols], w_sk, lam) - best) / best
    o, s = float(np.median(ours_s)), float(np.median(sk_s))
    log(f"  [{name}] one lam, {len(cols)} targets: ours ({solver}) {o:.3f}s, scikit-learn {s:.2f}s ({s / o:.1f}x)"
        + (f", scikit-learn precompute {float(np.median(pre_s)):.2f}s" if pre_s else "")
        + f"; objective above the tight optimum: ours max {rel_ours.max():.1e}, scikit-learn max {rel_sk.max():.1e}")
    c = f"{name}/{m}x{n}x{t}"
    extra = [{"case": f"{c}/one-lam-{len(cols)}", "system": "sklearn_lasso_precompute", "metric": "seconds",
              "value": float(np.median(pre_s)), "runs": reps,
              "note": "Lasso(precompute=X'X), the Gram computed inside the timing"}] if pre_s else []
    return [
        {"case": c, "system": "provenance", "metric": "seconds", "value": full_s, "runs": 1,
         "note": f"fit_datamodels: 16-lam path, validation, refit, all {t} targets"},
        {"case": c, "system": "provenance", "metric": "not_converged_targets", "value": int((~res.converged).sum()),
         "runs": 1},
        {"case": f"{c}/one-lam-{len(cols)}", "system": "provenance", "metric": "seconds", "value": o, "runs": reps,
         "note": f"solver {solver}"},
        {"case": f"{c}/one-lam-{len(cols)}", "system": "sklearn_lasso", "metric": "seconds", "value": s, "runs": reps},
        {"case": f"{c}/one-lam-{len(cols)}", "system": "provenance", "metric": "rel_objective_gap",
         "value": float(rel_ours.max()), "runs": 1},
        {"case": f"{c}/one-lam-{len(cols)}", "system": "sklearn_lasso", "metric": "rel_objective_gap",
         "value": float(rel_sk.max()), "runs": 1},
    ] + extra, {"case": f"{c}/one-lam-{len(cols)}", "metric": "seconds", "of": "provenance", "over": "sklearn_lasso",
                "value": round(s / o, 3)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compare", type=int, default=200, help="targets solved by both at one lam")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--case", choices=sorted(CASES), help="only this case (results to datamodels-<case>.json)")
    args = ap.parse_args()
    cases = QUICK if args.quick else CASES
    if args.case:
        cases = {args.case: cases[args.case]}
    results, ratios, rows = [], [], []
    for name, shape in cases.items():
        print(f"{name} {shape}", flush=True)
        res, ratio = run_case(name, shape, args.compare if not args.quick else 40, 1 if args.quick else args.reps,
                              lambda msg: print(msg, flush=True))
        results += res
        ratios.append(ratio)
        rows.append((name, shape, res, ratio))
    print(f"\n{'case':14s} {'m x n x T':>20s} {'path+refit s':>12s} {'one-lam ours s':>14s} {'sklearn s':>9s} "
          f"{'speed-up':>8s} {'ours gap':>9s} {'sk gap':>9s}")
    for name, (m, n, t), res, ratio in rows:
        print(f"{name:14s} {f'{m}x{n}x{t}':>20s} {res[0]['value']:12.1f} {res[2]['value']:14.2f} "
              f"{res[3]['value']:9.2f} {ratio['value']:7.1f}x {res[4]['value']:9.1e} {res[5]['value']:9.1e}")
    write_results("datamodels", {"cases": {k: list(v) for k, v in cases.items()}, "n_lambdas": 16, "eps": 1e-2,
                                 "tol": 1e-6, "sklearn_tol": 1e-4, "compare_targets": args.compare},
                  results, ratios, quick=args.quick, tag=f"-{args.case}" if args.case else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
