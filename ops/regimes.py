"""The two-regimes study (docs/studies.md): "The Two Regimes of Deep Network Training" (Leclerc &
Madry, arXiv 2002.10376) on the training engine.

Every schedule trains ``regimes.seeds`` models (one per seed, on the whole training split, in
lockstep through ``kernels.train.train_stacked``) for the same number of epochs:

- ``step``: momentum SGD at ``lr``, multiplied by ``step_gamma`` at the milestones (the classic
  multi-drop schedule);
- ``triangular``: one-cycle (linear warm-up to ``lr`` then linear decay to 0, FFCV's schedule);
- ``two_regime``: plain SGD (no momentum) at a constant large ``lr`` for ``switch_frac`` of the
  budget, then one switch to momentum SGD at ``small_lr`` decaying to 0 (the paper's proposal);
- ``small_only``: momentum SGD at ``small_lr`` for the whole budget (the small-step regime alone).

and a momentum/learning-rate equivalence sweep in the large-step phase: constant-rate SGD for
``equivalence_epochs`` with momentum μ at η(1 − μ) ("corrected") and at η ("uncorrected"), each
against plain SGD at η.  The paper's claim is that the corrected runs follow plain SGD's loss
curve.  Nothing here knows Dagster (assets/regimes.py).
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import torch

from ops.spec import Spec
from ops.store import ArtifactStore

RUNS = "regimes_runs"
Log = Callable[[str], None]

TABLES = {
    "regimes": """experiment VARCHAR, schedule VARCHAR, seed INTEGER, epochs INTEGER, lr DOUBLE,
        small_lr DOUBLE, test_accuracy DOUBLE, final_train_loss DOUBLE""",
    "regimes_curve": "experiment VARCHAR, run VARCHAR, epoch INTEGER, train_loss DOUBLE",
    "momentum_equivalence": """experiment VARCHAR, momentum DOUBLE, lr DOUBLE, corrected BOOLEAN,
        test_accuracy DOUBLE, final_train_loss DOUBLE, curve_gap DOUBLE""",
}


def _recipe(spec: Spec, schedule: str):
    from ops.training import recipe_of

    r = spec.regimes
    base = replace(recipe_of(spec), epochs=r.epochs or spec.training.epochs, lr=r.lr or spec.training.lr,
                   small_lr=r.small_lr, switch_frac=r.switch_frac, momentum=r.momentum, optimizer="sgd")
    if schedule == "small_only":
        return replace(base, schedule="constant", lr=r.small_lr)
    return replace(base, schedule=schedule)


def _train(make_model, data, recipe, seeds, log: Log, label: str):
    """(stacked params, per-epoch mean training loss over the seeds' models)."""
    from kernels.train import train_stacked

    curve = []

    def on_epoch(e, loss):
        curve.append(float(loss))
        log(f"{label}: epoch {e + 1}/{recipe.epochs} loss {loss:.4f}")

    params = train_stacked(make_model, data.x, data.y, [np.arange(len(data.y))] * len(seeds), seeds, recipe,
                           on_epoch=on_epoch)
    return params, curve


def _accuracies(make_model, params, data) -> np.ndarray:
    from kernels.train import predict_stacked

    with torch.no_grad():
        logits = predict_stacked(make_model, params, data.xt)
    return (logits.argmax(-1) == data.yt[None]).float().mean(1).cpu().numpy()


def regimes_runs(spec: Spec, store: ArtifactStore, exp: str, device, log: Log = lambda _: None) -> dict:
    from ops.training import Data, make_model_fn, model_seed

    r = spec.regimes
    data = Data(store, exp, torch.device(device))
    classes = store.load_json(exp, "training_set", "meta.json")["classes"]
    make_model = make_model_fn(spec, data.in_shape, len(classes))
    seeds = [model_seed(spec, 700_000 + i) for i in range(r.seeds)]
    rows, curves, seconds = [], [], {}
    for schedule in r.schedules:
        recipe = _recipe(spec, schedule)
        t0 = time.perf_counter()
        params, curve = _train(make_model, data, recipe, seeds, log, schedule)
        seconds[schedule] = round(time.perf_counter() - t0, 1)
        acc = _accuracies(make_model, params, data)
        # the per-model final loss is not returned by the engine; the mean of the last epoch is
        rows += [(exp, schedule, i, recipe.epochs, recipe.lr, r.small_lr, float(a), curve[-1])
                 for i, a in enumerate(acc)]
        curves += [(exp, schedule, e + 1, v) for e, v in enumerate(curve)]
        log(f"{schedule}: test accuracy {acc.mean():.4f} ± {acc.std(ddof=1) if len(acc) > 1 else 0:.4f} "
            f"over {len(acc)} seeds ({seconds[schedule]:.0f}s)")
    # momentum / learning-rate equivalence in the large-step phase (constant rate)
    eq_rows = []
    eta = r.lr or spec.training.lr
    base = replace(_recipe(spec, "constant"), epochs=r.equivalence_epochs)
    plain, plain_curve = _train(make_model, data, replace(base, momentum=0.0, lr=eta), seeds, log, "sgd")
    curves += [(exp, f"sgd lr={eta:g}", e + 1, v) for e, v in enumerate(plain_curve)]
    eq_rows.append((exp, 0.0, eta, True, float(_accuracies(make_model, plain, data).mean()), plain_curve[-1], 0.0))
    for mu in (m for m in r.momenta if m > 0):
        for corrected in (True, False):
            lr = eta * (1 - mu) if corrected else eta
            params, curve = _train(make_model, data, replace(base, momentum=mu, lr=lr), seeds, log,
                                   f"momentum {mu:g} lr {lr:g}")
            gap = float(np.mean(np.abs(np.log(np.maximum(curve, 1e-12)) - np.log(np.maximum(plain_curve, 1e-12)))))
            eq_rows.append((exp, mu, lr, corrected, float(_accuracies(make_model, params, data).mean()), curve[-1],
                            gap))
            label = f"momentum={mu:g} lr={lr:g}" + ("" if corrected else " (uncorrected)")
            curves += [(exp, label, e + 1, v) for e, v in enumerate(curve)]
    table = pl.DataFrame(rows, schema=["experiment", "schedule", "seed", "epochs", "lr", "small_lr",
                                       "test_accuracy", "final_train_loss"], orient="row", infer_schema_length=None)
    curve_t = pl.DataFrame(curves, schema=["experiment", "run", "epoch", "train_loss"], orient="row",
                           infer_schema_length=None)
    eq = pl.DataFrame(eq_rows, schema=["experiment", "momentum", "lr", "corrected", "test_accuracy",
                                       "final_train_loss", "curve_gap"], orient="row", infer_schema_length=None)
    store.save_table(exp, RUNS, "regimes.parquet", table)
    store.save_table(exp, RUNS, "regimes_curve.parquet", curve_t)
    store.save_table(exp, RUNS, "momentum_equivalence.parquet", eq)
    claims = check_claims(table, curve_t, eq, r)
    store.save_json(exp, RUNS, "claims.json", claims)
    plot_curves(curve_t, r.schedules, store.path(exp, RUNS, "loss_curves.png"))
    return {"seeds": r.seeds, "epochs": table["epochs"][0], "schedules": list(r.schedules),
            "seconds": seconds, "claims": claims,
            "accuracy": {s: {"mean": round(float(g["test_accuracy"].mean()), 4),
                             "std": round(float(g["test_accuracy"].std() or 0.0), 4)}
                         for (s,), g in table.group_by("schedule", maintain_order=True)}}


def check_claims(table: pl.DataFrame, curves: pl.DataFrame, eq: pl.DataFrame, r) -> dict:
    """Which of the paper's claims held on this run (each with the numbers it rests on)."""
    acc = {s: g["test_accuracy"].to_numpy() for (s,), g in table.group_by("schedule", maintain_order=True)}

    def se(a):
        return float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else 0.0

    out = {}
    if "two_regime" in acc and "step" in acc:
        a, b = acc["two_regime"], acc["step"]
        diff, bar = float(a.mean() - b.mean()), 2 * float(np.hypot(se(a), se(b)))
        out["two_regime_matches_step"] = {"two_regime": float(a.mean()), "step": float(b.mean()), "difference": diff,
                                          "two_se": bar, "held": bool(diff > -bar)}
    if "two_regime" in acc and "small_only" in acc:
        a, b = acc["two_regime"], acc["small_only"]
        out["small_steps_alone_generalize_worse"] = {"two_regime": float(a.mean()), "small_only": float(b.mean()),
                                                     "held": bool(b.mean() < a.mean())}
    if "two_regime" in acc:
        # the large-step phase: its loss stays well above where the small-step phase takes it
        c = curves.filter(pl.col("run") == "two_regime")["train_loss"].to_numpy()
        k = max(1, int(round(r.switch_frac * len(c))))
        out["large_step_loss_plateaus_then_drops"] = {
            "loss_before_switch": float(c[k - 1]), "final_loss": float(c[-1]),
            "held": bool(c[-1] < 0.7 * c[k - 1])}
    corr = eq.filter(pl.col("corrected") & (pl.col("momentum") > 0))
    unc = eq.filter(~pl.col("corrected"))
    if len(corr) and len(unc):
        out["momentum_equivalent_with_lr_correction"] = {
            "mean_gap_corrected": float(corr["curve_gap"].mean()), "mean_gap_uncorrected": float(unc["curve_gap"].mean()),
            "held": bool(corr["curve_gap"].mean() < unc["curve_gap"].mean())}
    return out


def plot_curves(curves: pl.DataFrame, schedules, dest) -> Path:
    """Training loss per epoch: the schedules (left) and the momentum sweep (right)."""
    from ops.plots import figure, save

    fig, (a, b) = figure((9.5, 3.4), ncols=2)
    for (run,), g in curves.group_by("run", maintain_order=True):
        ax = a if run in schedules else b
        ax.plot(g["epoch"].to_numpy(), g["train_loss"].to_numpy(), marker="o", ms=2.5, label=run,
                ls="--" if "uncorrected" in run else "-")
    for ax, title in ((a, "schedules, same epoch budget"), (b, "large-step phase: momentum vs lr")):
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return save(fig, dest)
