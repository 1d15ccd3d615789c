"""The robustness study (docs/studies.md): PGD adversarial training on the training engine, robust
ensembles (Saligrama & Leclerc 2020) and attacks on a neural-response proxy (Guo et al. 2022).

Everything reads the experiment's loader files through ``ops.training.Data`` and trains with
``kernels.train.train_stacked`` (``Recipe.adversarial``); attacks are ``kernels.adversarial``'s PGD,
always through a whole model or ensemble (``robust_correct`` on the combined logits).  Budgets are in
pixel units ([0, 1] images).  Nothing here knows Dagster (assets/robustness.py).

Stages:
- ``robust_models``: for ε_train = 0 (standard) and every ``eps_train`` multiple of ε, K = max
  ``ensemble_sizes`` models on the whole training split, each from its own seed (the same K seeds
  at every budget, so budgets differ only in the attack).
- ``robustness_eval``: natural and robust accuracy (PGD with ``eval_steps`` > training's steps and
  ``eval_restarts`` restarts) of (a) the averaged logits of the first K models, (b) the fusion of a
  robust and a standard model's penultimate features under a trained linear head; robust accuracy
  against ε for single models; and whether "ensembles of small-ε models withstand larger attacks"
  held here.
- ``neural_response``: the CPU proxy of seeds-part2.md §1 (see ``neural_response``).
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import torch
from torch import nn

from kernels.adversarial import Threat, pgd, robust_correct
from ops.spec import Spec
from ops.store import ArtifactStore

MODELS, EVAL, NEURAL = "robust_models", "robustness_eval", "neural_response"
Log = Callable[[str], None]

# the study's warehouse tables (docs/tables.md)
TABLES = {
    "robustness": """experiment VARCHAR, scheme VARCHAR, eps_train DOUBLE, k INTEGER, eps_test DOUBLE,
        natural_accuracy DOUBLE, robust_accuracy DOUBLE, examples INTEGER""",
    "robustness_curve": "experiment VARCHAR, eps_train DOUBLE, eps DOUBLE, robust_accuracy DOUBLE",
    "neural_attacks": """experiment VARCHAR, surrogate VARCHAR, budget DOUBLE, readout_ev DOUBLE,
        predicted_change DOUBLE, brain_change DOUBLE, noise_change DOUBLE, self_change DOUBLE""",
}


def _threat(spec: Spec, factor: float, norm: dict, steps: int | None = None, norm_kind: str | None = None) -> Threat:
    r = spec.robustness
    eps = r.eps * factor
    steps = steps or r.steps
    step = (r.step_size * factor) if (r.step_size and steps == r.steps) else 2.5 * eps / steps
    return Threat(norm_kind or r.norm, eps, max(step, 1e-8), steps, r.random_start,
                  tuple(norm["mean"]), tuple(norm["std"]))


def _setup(spec: Spec, store: ArtifactStore, exp: str, device):
    from ops.training import Data, make_model_fn

    data = Data(store, exp, torch.device(device))
    classes = store.load_json(exp, "training_set", "meta.json")["classes"]
    return data, make_model_fn(spec, data.in_shape, len(classes)), len(classes)


def _budgets(spec: Spec) -> list[float]:
    return [0.0] + list(spec.robustness.eps_train)


def _file(factor: float) -> str:
    return f"eps_{factor:g}.safetensors"


def robust_models(spec: Spec, store: ArtifactStore, exp: str, device, log: Log = lambda _: None) -> dict:
    from kernels.train import train_stacked
    from ops.training import model_seed, recipe_of

    r = spec.robustness
    data, make_model, _ = _setup(spec, store, exp, device)
    k = max(r.ensemble_sizes)
    n = len(data.y)
    base = replace(recipe_of(spec), epochs=r.epochs or spec.training.epochs)
    seeds = [model_seed(spec, 900_000 + i) for i in range(k)]
    seconds = {}
    # one short warm-up of both paths, so neither timing below carries one-time start-up costs
    train_stacked(make_model, data.x, data.y, [np.arange(min(n, 64))], seeds[:1], replace(
        base, epochs=1, adversarial=_threat(spec, 1.0, data.norm)))
    for f in _budgets(spec):
        recipe = base if f == 0 else replace(base, adversarial=_threat(spec, f, data.norm))
        t0 = time.perf_counter()
        params = train_stacked(make_model, data.x, data.y, [np.arange(n)] * k, seeds, recipe,
                               on_epoch=lambda e, loss, f=f: log(f"eps_train {f:g}·ε: epoch {e + 1}/{recipe.epochs} "
                                                                f"loss {loss:.4f}"))
        seconds[f] = time.perf_counter() - t0
        store.save_tensors(exp, MODELS, _file(f), params, {
            "eps_train": f"{f * r.eps:g}", "factor": f"{f:g}", "norm": r.norm, "models": str(k),
            "seeds": json.dumps(seeds), "arch": spec.model.arch, "hidden": str(spec.model.hidden)})
        log(f"eps_train {f:g}·ε: {k} models in {seconds[f]:.1f}s")
    store.save_json(exp, MODELS, "norm.json", data.norm)
    std_rate = k / seconds[0.0] * 3600
    adv_rate = k * (len(seconds) - 1) / sum(v for f, v in seconds.items() if f) * 3600
    return {"models": k * len(seconds), "examples": n, "epochs": base.epochs,
            "seconds": {f"{f:g}": round(v, 1) for f, v in seconds.items()},
            "models_per_hour_standard": round(std_rate, 1), "models_per_hour_adversarial": round(adv_rate, 1),
            "adversarial_cost": round(std_rate / adv_rate, 2)}


def _members(spec: Spec, store: ArtifactStore, exp: str, make_model, factor: float, device) -> list[nn.Module]:
    params, _ = store.load_tensors(exp, MODELS, _file(factor))
    k = next(iter(params.values())).shape[0]
    out = []
    for i in range(k):
        m = make_model().to(device)
        m.load_state_dict({n: v[i].to(device) for n, v in params.items()})
        out.append(m.eval().requires_grad_(False))
    return out


def ensemble(models: list[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Averaged logits: the ensemble as one model (attacked through its combined output)."""
    return lambda z: torch.stack([m(z) for m in models]).mean(0)


class Fused(nn.Module):
    """Scheme (b): a robust and a standard model's penultimate features, concatenated, under a
    linear head; the two backbones frozen."""

    def __init__(self, robust: nn.Module, standard: nn.Module, dim: int, classes: int):
        super().__init__()
        self.robust, self.standard = robust, standard
        self.head = nn.Linear(dim, classes)

    def features(self, z):
        return torch.cat([self.robust.embed(z).flatten(1), self.standard.embed(z).flatten(1)], 1)

    def forward(self, z):
        return self.head(self.features(z))


def _fit_head(fused: Fused, x, y, epochs: int, seed: int, threat: Threat | None = None) -> Fused:
    """The head on the frozen backbones' features: on clean inputs, or (``threat``) on PGD inputs
    attacked through the whole fused model at each step (adversarial training of the head only)."""
    feats = None
    if threat is None:
        with torch.no_grad():
            feats = torch.cat([fused.features(x[i:i + 1024]) for i in range(0, len(x), 1024)])
    torch.manual_seed(seed)
    fused.head.reset_parameters()
    opt = torch.optim.Adam(fused.head.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for step, idx in enumerate(torch.randperm(len(x), generator=g).split(128)):
            if threat is None:
                f = feats[idx]
            else:
                xa = pgd(lambda z, yb=y[idx]: nn.functional.cross_entropy(fused(z), yb, reduction="none"), x[idx],
                         threat, torch.Generator().manual_seed(seed * 7919 + epoch * 1009 + step))
                with torch.no_grad():
                    f = fused.features(xa)
            loss = nn.functional.cross_entropy(fused.head(f), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    fused.eval().requires_grad_(False)
    return fused


def _accuracy(fn, x, y) -> float:
    with torch.no_grad():
        return float(torch.cat([(fn(x[i:i + 1024]).argmax(-1) == y[i:i + 1024]) for i in range(0, len(x), 1024)])
                     .float().mean())


def robustness_eval(spec: Spec, store: ArtifactStore, exp: str, device, log: Log = lambda _: None) -> dict:
    r = spec.robustness
    data, make_model, classes = _setup(spec, store, exp, device)
    rng = np.random.default_rng(spec.seed)
    pick = np.sort(rng.choice(len(data.yt), min(r.eval_examples, len(data.yt)), replace=False))
    x, y = data.xt[pick], data.yt[pick]
    members = {f: _members(spec, store, exp, make_model, f, data.x.device) for f in _budgets(spec)}
    attack = {t: _threat(spec, t, data.norm, steps=r.eval_steps) for t in r.eps_test}

    def robust(fn, t):
        return float(robust_correct(fn, x, y, attack[t], restarts=r.eval_restarts, seed=spec.seed).float().mean())

    rows = []
    t0 = time.perf_counter()
    for f, models in members.items():
        for k in r.ensemble_sizes:
            fn = ensemble(models[:k])
            nat = _accuracy(fn, x, y)
            for t in r.eps_test:
                rows.append(("ensemble", f * r.eps, k, t * r.eps, nat, robust(fn, t)))
            log(f"ensemble eps_train {f:g}·ε K={k}: natural {nat:.3f}, robust "
                + ", ".join(f"{row[-1]:.3f}" for row in rows[-len(r.eps_test):]) + f" ({time.perf_counter() - t0:.0f}s)")
    if r.fusion:
        standard = members[0.0][0]
        dim = standard.embed(x[:2]).flatten(1).shape[1]
        for f in r.eps_train:
            rob = members[f][0]
            # the head trained on clean features, and by PGD at the robust model's budget through the
            # whole fused model (the scheme's fusion layer is not published: both readings)
            for scheme, threat in (("fusion", None), ("fusion_at", _threat(spec, f, data.norm))):
                fused = _fit_head(Fused(rob, standard, dim + rob.embed(x[:2]).flatten(1).shape[1], classes),
                                  data.x, data.y, r.fusion_epochs, spec.seed, threat)
                nat = _accuracy(fused, x, y)
                for t in r.eps_test:
                    rows.append((scheme, f * r.eps, 2, t * r.eps, nat, robust(fused, t)))
                log(f"{scheme} eps_train {f:g}·ε: natural {nat:.3f} ({time.perf_counter() - t0:.0f}s)")
    table = pl.DataFrame(rows, schema=["scheme", "eps_train", "k", "eps_test", "natural_accuracy",
                                       "robust_accuracy"], orient="row", infer_schema_length=None)
    table = table.select(pl.lit(exp).alias("experiment"), pl.all(), pl.lit(len(y)).alias("examples"))
    # robust accuracy against ε, single models
    grid = sorted({0.0, 0.25, 0.5, 1.0, 1.5, 2.0} | set(r.eps_test))
    curve = []
    for f, models in members.items():
        for e in grid:
            acc = _accuracy(models[0], x, y) if e == 0 else float(robust_correct(
                models[0], x, y, _threat(spec, e, data.norm, steps=r.eval_steps), restarts=1,
                seed=spec.seed).float().mean())
            curve.append((exp, f * r.eps, e * r.eps, acc))
    curve = pl.DataFrame(curve, schema=["experiment", "eps_train", "eps", "robust_accuracy"], orient="row", infer_schema_length=None)
    store.save_table(exp, EVAL, "robustness.parquet", table)
    store.save_table(exp, EVAL, "robustness_curve.parquet", curve)
    claim = ensemble_claim(table, r)
    store.save_json(exp, EVAL, "claim.json", claim)
    plot_curve(curve, store.path(exp, EVAL, "robustness_curve.png"))
    return {"examples": len(y), "rows": len(table), "claim": claim, "seconds": round(time.perf_counter() - t0, 1)}


def ensemble_claim(table: pl.DataFrame, r) -> dict:
    """The paper's claim, checked: an ensemble of the largest size trained at the smallest ε_train is
    more robust than one such model at every ε_test above that ε_train (larger attacks than it was
    trained for).  Returns the comparison and whether it held."""
    e = table.filter(pl.col("scheme") == "ensemble")
    small = e.filter(pl.col("eps_train") > 0)["eps_train"].min()
    kmax, kmin = e["k"].max(), e["k"].min()
    out = {"eps_train": float(small), "k": [int(kmin), int(kmax)], "by_eps_test": {}}
    if kmax == kmin:
        out["held"] = None
        out["why"] = "only one ensemble size"
        return out
    held, beyond = [], []
    n = int(e["examples"][0]) if "examples" in e.columns else 0

    def acc(frame, k, col="robust_accuracy"):
        return float(frame.filter(pl.col("k") == k)[col][0])

    for (t,), g in e.filter(pl.col("eps_train") == small).group_by("eps_test", maintain_order=True):
        one, many = acc(g, kmin), acc(g, kmax)
        # two standard errors of the difference as if the two were independent samples of n
        # examples (they are the same examples, so this overstates the noise: a conservative bar)
        bar = 2 * np.sqrt((one * (1 - one) + many * (1 - many)) / max(n, 1))
        out["by_eps_test"][f"{t:g}"] = {"single": one, "ensemble": many, "gain": round(many - one, 4),
                                        "two_se": round(float(bar), 4)}
        if t > small:
            held.append(many > one)
            beyond.append(many - one > bar)
    at_small = e.filter(pl.col("eps_train") == small)
    out["natural"] = {"single": acc(at_small, kmin, "natural_accuracy"),
                      "ensemble": acc(at_small, kmax, "natural_accuracy")}
    out["held"] = bool(held) and all(held)
    out["beyond_noise"] = bool(beyond) and all(beyond)
    # and against one model trained at the largest budget: the trade the paper proposes (as robust,
    # more accurate on clean data?)
    large = e["eps_train"].max()
    if large > small:
        one_large = e.filter((pl.col("eps_train") == large) & (pl.col("k") == kmin))
        many_small = e.filter((pl.col("eps_train") == small) & (pl.col("k") == kmax))
        at = lambda frame, t: float(frame.filter(pl.col("eps_test") == t)["robust_accuracy"][0])  # noqa: E731
        out["vs_one_large_eps_model"] = {
            "eps_train_large": float(large),
            "natural": {"one_large": float(one_large["natural_accuracy"][0]),
                        "ensemble_small": float(many_small["natural_accuracy"][0])},
            "robust": {f"{t:g}": {"one_large": at(one_large, t), "ensemble_small": at(many_small, t)}
                       for t in one_large["eps_test"].to_list()}}
    return out


def plot_curve(curve: pl.DataFrame, dest) -> Path:
    from ops.plots import figure, save

    fig, ax = figure()
    for (f,), g in curve.group_by("eps_train", maintain_order=True):
        ax.plot(g["eps"].to_numpy(), g["robust_accuracy"].to_numpy(), marker="o", label="standard" if f == 0 else f"PGD-AT ε={f:g}")
    ax.set_xlabel("attack budget ε")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, dest)


# ------------------------------------------------------------------ neural-response proxy


def _embed(model, x, batch: int = 1024):
    with torch.no_grad():
        return torch.cat([model.embed(x[i:i + batch]).flatten(1) for i in range(0, len(x), batch)])


def neural_response(spec: Spec, store: ArtifactStore, exp: str, device, log: Log = lambda _: None) -> dict:
    """Guo et al.'s experiment on a CPU proxy (no recordings can be downloaded here):

    - the "brain": the penultimate layer of a robust model (the last member at the largest ε_train,
      never a surrogate), ``sites`` of its units with the largest response variance, recorded on
      ``images`` training images ``repeats`` times with Gaussian trial noise (``noise`` × each
      site's response sd);
    - surrogates: ridge readouts from a standard and a robust network's penultimate features to the
      trial-averaged responses, fitted on 80% of the recorded images (held-out explained variance,
      reported against the split-half noise ceiling);
    - attacks: ℓ2 PGD through each surrogate on held-out test images, maximizing the change of the
      predicted site responses, at every budget; the realized change of the brain's (noise-free)
      responses, against norm-matched random noise and against each network's own sensitivity (the
      change of its own features under the same attack on them).  Changes are root-mean-square over
      sites, in units of each site's response sd."""
    r, nr = spec.robustness, spec.robustness.neural
    data, make_model, _ = _setup(spec, store, exp, device)
    dev = data.x.device
    big = max(r.eps_train)
    teacher = _members(spec, store, exp, make_model, big, dev)[-1]
    surrogates = {"standard": _members(spec, store, exp, make_model, 0.0, dev)[0],
                  "robust": _members(spec, store, exp, make_model, big, dev)[0]}
    rng = np.random.default_rng(spec.seed + 17)
    rec = np.sort(rng.choice(len(data.x), min(nr.images, len(data.x)), replace=False))
    xr = data.x[rec]
    clean = _embed(teacher, xr)
    order = torch.argsort(clean.var(0), descending=True)
    sites = order[:min(nr.sites, clean.shape[1])]
    mu = clean[:, sites]
    sd = mu.std(0).clamp_min(1e-6)
    g = torch.Generator().manual_seed(spec.seed + 23)
    trials = mu[:, None, :] + nr.noise * sd * torch.randn(len(rec), nr.repeats, len(sites), generator=g).to(dev)
    resp = trials.mean(1)
    half = nr.repeats // 2
    a, b = trials[:, :half].mean(1), trials[:, half:].mean(1)
    rel = torch.stack([torch.corrcoef(torch.stack([a[:, s], b[:, s]]))[0, 1] for s in range(len(sites))])
    ceiling = float(torch.nan_to_num(2 * rel / (1 + rel)).mean())       # Spearman-Brown
    split = int(0.8 * len(rec))
    ta = np.sort(rng.choice(len(data.xt), min(nr.attack_images, len(data.xt)), replace=False))
    xa = data.xt[ta]
    norm = data.norm
    rows = []
    teacher_sites = lambda z: teacher.embed(z).flatten(1)[:, sites]      # noqa: E731
    for name, net in surrogates.items():
        f = _embed(net, xr)
        fm, fs = f[:split].mean(0), f[:split].std(0).clamp_min(1e-6)
        z = (f - fm) / fs
        lam = 1e-2 * len(z)
        w = torch.linalg.solve(z[:split].T @ z[:split] + lam * torch.eye(z.shape[1], device=dev),
                               z[:split].T @ (resp[:split] - resp[:split].mean(0)))
        pred = z[split:] @ w + resp[:split].mean(0)
        ev = float((1 - ((pred - resp[split:]) ** 2).mean(0) / resp[split:].var(0).clamp_min(1e-9)).mean())
        readout = lambda q, net=net, w=w, fm=fm, fs=fs: ((net.embed(q).flatten(1) - fm) / fs) @ w   # noqa: E731
        # the network's own "sites": as many of its units as the brain has, those with the most variance
        own_units = torch.argsort(f.var(0), descending=True)[:len(sites)]
        own = lambda q, net=net, u=own_units: net.embed(q).flatten(1)[:, u]                         # noqa: E731
        own_sd = f[:, own_units].std(0).clamp_min(1e-6)
        with torch.no_grad():
            base_pred, base_brain, base_own = readout(xa), teacher_sites(xa), own(xa)
        for budget in nr.budgets:
            threat = Threat("l2", budget, 2.5 * budget / nr.steps, nr.steps, True, tuple(norm["mean"]), tuple(norm["std"]))
            gen = torch.Generator().manual_seed(spec.seed)
            adv = pgd(lambda q: ((readout(q) - base_pred) ** 2).sum(1), xa, threat, gen)
            self_adv = pgd(lambda q: (((own(q) - base_own) / own_sd) ** 2).sum(1), xa, threat, gen)
            noise = _noise_like(xa, threat, spec.seed)
            with torch.no_grad():
                rms = lambda d, s: float((((d / s) ** 2).mean(1)).sqrt().mean())   # noqa: E731
                rows.append((exp, name, budget, ev,
                             rms(readout(adv) - base_pred, sd), rms(teacher_sites(adv) - base_brain, sd),
                             rms(teacher_sites(noise) - base_brain, sd), rms(own(self_adv) - base_own, own_sd)))
            log(f"{name} surrogate, l2 budget {budget:g}: brain change {rows[-1][5]:.3f} vs noise {rows[-1][6]:.3f}")
    table = pl.DataFrame(rows, schema=["experiment", "surrogate", "budget", "readout_ev", "predicted_change",
                                       "brain_change", "noise_change", "self_change"], orient="row", infer_schema_length=None)
    store.save_table(exp, NEURAL, "neural_attacks.parquet", table)
    plot_neural(table, store.path(exp, NEURAL, "neural_attacks.png"))
    return {"sites": len(sites), "images": len(rec), "repeats": nr.repeats, "attack_images": len(ta),
            "noise_ceiling": round(ceiling, 3),
            "readout_ev": {n: round(float(g["readout_ev"][0]), 3)
                           for (n,), g in table.group_by("surrogate", maintain_order=True)}}


def _noise_like(x: torch.Tensor, threat: Threat, seed: int) -> torch.Tensor:
    """Random perturbations of exactly the budget's ℓ2 norm (in pixels), kept in the image box."""
    from kernels.adversarial import from_pixels, project, to_pixels

    g = torch.Generator().manual_seed(seed + 99)
    d = torch.randn(x.shape, generator=g).to(x.device, x.dtype)
    d = d / d.flatten(1).norm(dim=1).reshape(-1, *([1] * (x.ndim - 1))) * threat.eps
    p = to_pixels(x, threat)
    return from_pixels(p + project(d, p, threat, 1), threat)


def plot_neural(table: pl.DataFrame, dest) -> Path:
    from ops.plots import figure, save

    fig, ax = figure((5.4, 3.4))
    for (name,), g in table.group_by("surrogate", maintain_order=True):
        ax.plot(g["budget"].to_numpy(), g["brain_change"].to_numpy(), marker="o",
                label=f"brain, attack via {name} surrogate")
        ax.plot(g["budget"].to_numpy(), g["self_change"].to_numpy(), ls="--", label=f"{name} network's own units")
    g = table.filter(pl.col("surrogate") == table["surrogate"][0])
    ax.plot(g["budget"].to_numpy(), g["noise_change"].to_numpy(), color="gray", ls=":", label="brain, random noise")
    ax.set_xlabel("ℓ2 budget (pixels)")
    ax.set_ylabel("response change (site sd)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, dest)
