"""TRAK featurization and scoring, provenance (dense and factored projectors) against traker 0.3.2.

One experiment -- by default experiments/fmnist_lds.yaml (Fashion-MNIST, 10,000 training examples,
the small CNN, 20 subset models for the ensemble, 64 held-out subset models for the LDS), whose
models ``./provenance run fmnist_lds`` trains (or this script, through the same stages, when they
are not there) -- and on its trained models, the same k and the same CPU:

- provenance ``dense`` and ``factored``: featurize train and test with every model (examples/s per
  model, median), finalize and score (seconds), LDS on the held-out models;
- traker 0.3.2 (``pip install traker==0.3.2``; a bench-only dependency) in float32
  (``use_half_precision=False``): the same, on the same models, alternating with provenance model
  by model;
- traker with its default float16, which is much slower on a CPU: featurization throughput on
  ``--fp16-examples`` examples of one model, and the LDS of a one-model ensemble beside the other
  systems' one-model LDS.

LDS = mean Spearman over targets between the held-out models' margins and the summed scores of
their training subsets (kernels/stats.lds; shared/reference/trak.md §3).

    python bench/attribution.py            # the full run
    python bench/attribution.py --quick    # digits, a smoke run in about a minute
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results_file import write_results  # noqa: E402

QUICK = {"name": "attribution-bench-quick", "seed": 0,
         "dataset": {"source": "digits", "limit_train": 600, "limit_test": 150},
         "model": {"arch": "mlp", "hidden": 32}, "training": {"epochs": 10, "batch_size": 32},
         "subsets": {"alpha": 0.5, "num_models": 8, "num_heldout": 30}, "trak": {"num_models": 8}}


def build(spec, store, exp, log):
    """Data, masks and every model through provenance's stages, unless the experiment's models are
    collected already (by ``./provenance run``) for this spec's data, masks and recipe."""
    from ops import data as D
    from ops import training as T

    if store.path(exp, "checkpoints", "models.parquet").exists():
        try:
            D.loader_files(spec, store, exp)   # rewritten in the current format (same digest: models stay)
            T._experiment_jobs(spec, store, exp)
            table = store.load_table(exp, "checkpoints", "models.parquet")
            if len(table) == spec.subsets.num_models + spec.subsets.num_heldout + 1:
                return
        except Exception:  # noqa: BLE001 -- anything off: rebuild through the stages
            pass
    for stage in (D.raw_dataset, D.training_set, D.loader_files, D.subset_masks):
        stage(spec, store, exp)
    for jobs in T.plan_shards(spec, store, exp, log):
        T.train_shard(spec, store, exp, jobs, torch.device("cpu"), log)
    T.collect_models(spec, store, exp, log)


def interleave(gens: dict) -> dict:
    """Run generators round-robin, one model each per turn (A B C A B C: the machine's drift falls on
    every system alike); returns each one's return value."""
    out, live = {}, dict(gens)
    while live:
        for name, g in list(live.items()):
            try:
                next(g)
            except StopIteration as stop:
                out[name] = stop.value
                del live[name]
    return out


def run_one(gen):
    return interleave({"one": gen})["one"]


def traker_scores(make_model, members, data, k, half, work, lam, log, time_limit_examples=None):
    """traker's scores (targets x train) and per-model featurization rates; ``members`` is a list of
    state dicts.  With ``time_limit_examples`` only that many training examples of the first model
    are featurized (throughput only; no scores)."""
    from trak import TRAKer

    model = make_model().eval()
    save = Path(tempfile.mkdtemp(dir=work, prefix="traker-"))
    n = len(data.y) if time_limit_examples is None else time_limit_examples
    tr = TRAKer(model=model, task="image_classification", train_set_size=n, save_dir=str(save), device="cpu",
                proj_dim=k, use_half_precision=half, lambda_reg=lam, logging_level=40)
    rates = []
    batch = 100
    for mid, state in enumerate(members):
        tr.load_checkpoint(state, model_id=mid)
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            xb, yb = data.x[i:min(n, i + batch)], data.y[i:min(n, i + batch)]
            tr.featurize(batch=(xb, yb), num_samples=len(yb))
        rates.append(n / (time.perf_counter() - t0))
        log(f"traker {'fp16' if half else 'fp32'}: model {mid} featurized at {rates[-1]:.0f} examples/s")
        yield
        if time_limit_examples is not None:
            shutil.rmtree(save, ignore_errors=True)
            return None, rates, None
    t0 = time.perf_counter()
    tr.finalize_features()
    t_test = len(data.yt)
    for mid, state in enumerate(members):
        tr.start_scoring_checkpoint("bench", state, model_id=mid, num_targets=t_test)
        for i in range(0, t_test, batch):
            tr.score(batch=(data.xt[i:i + batch], data.yt[i:i + batch]), num_samples=len(data.yt[i:i + batch]))
    scores = np.asarray(tr.finalize_scores("bench"), np.float64).T       # targets x train
    score_s = time.perf_counter() - t0
    shutil.rmtree(save, ignore_errors=True)
    return scores, rates, score_s


def ours(kind, make_model, members, data, k, seed, lam, work, memory_gb, log, allocation="params"):
    """provenance's features through kernels/projectors.py and scores through the tiled kernels."""
    from kernels.npyio import NpyFile
    from kernels.projectors import batched_out_to_loss, make_projector
    from kernels.trak import finalize_member, score_tiles

    model = make_model()
    n, t, m = len(data.y), len(data.yt), len(members)
    d = Path(tempfile.mkdtemp(dir=work, prefix=f"{kind}-"))
    train = NpyFile.create(d / "train.npy", (m, n, k), np.float32)
    test = NpyFile.create(d / "test.npy", (m, t, k), np.float32)
    qs = []
    rates = []
    for i, state in enumerate(members):
        t0 = time.perf_counter()
        proj = make_projector(kind, model, state, k, seed * 100_003 + i, memory_gb * 2**30, "cpu", allocation)
        c = proj.chunk(data.x)
        for r in range(0, n, c):
            train.write_rows(i, r, proj(data.x[r:r + c], data.y[r:r + c]).numpy())
        rates.append(n / (time.perf_counter() - t0))
        for r in range(0, t, c):
            test.write_rows(i, r, proj(data.xt[r:r + c], data.yt[r:r + c]).numpy())
        qs.append(batched_out_to_loss(model, state, data.x, data.y, 1024).numpy().astype(np.float64))
        log(f"provenance {kind}: model {i} featurized at {rates[-1]:.0f} examples/s")
        yield
    t0 = time.perf_counter()
    feats = NpyFile.create(d / "features.npy", (m, n, k), np.float32)
    for i in range(m):
        finalize_member(train, i, lam, feats, "cpu")
    out = {}
    for mm in sorted({1, m}):
        o = NpyFile.create(d / f"scores{mm}.npy", (t, n), np.float32)
        score_tiles(test, feats, np.mean(qs[:mm], 0), o, "cpu", memory_gb * 2**30, members=list(range(mm)))
        o.close()
        out[mm] = np.load(d / f"scores{mm}.npy").astype(np.float64)
    score_s = time.perf_counter() - t0
    shutil.rmtree(d, ignore_errors=True)
    return out, rates, score_s


def throughput(args) -> None:
    """Featurization examples/s only, on the trained models of an existing experiment (any home):
    ``--models`` models x ``--examples`` training examples per system, interleaved model by model."""
    from ops.spec import parse_spec
    from ops.store import ArtifactStore
    from ops.training import Data, load_member, model_factory
    from trak import TRAKer

    spec = parse_spec({"name": args.experiment, "model": {"arch": args.arch, "hidden": args.hidden}})
    store = ArtifactStore(args.home)
    make_model, meta = model_factory(spec, store, args.experiment)
    data = Data(store, args.experiment, torch.device("cpu"), norm=json.loads(meta["norm"]))
    x, y = data.x[:args.examples], data.y[:args.examples]
    members = [load_member(spec, store, args.experiment, i) for i in range(args.models)]
    work = Path(tempfile.mkdtemp(prefix="attr-throughput-"))
    from kernels.projectors import make_projector

    def ours_rate(kind, i, state):
        t0 = time.perf_counter()
        proj = make_projector(kind, make_model(), state, args.k, i, args.memory_gb * 2**30, "cpu")
        c = proj.chunk(x)
        for r in range(0, len(x), c):
            proj(x[r:r + c], y[r:r + c])
        return len(x) / (time.perf_counter() - t0)

    def traker_rate(tr, i, state, count):
        tr.load_checkpoint(state, model_id=i)
        t0 = time.perf_counter()
        for r in range(0, count, 100):
            tr.featurize(batch=(x[r:min(count, r + 100)], y[r:min(count, r + 100)]), num_samples=len(y[r:min(count, r + 100)]))
        return count / (time.perf_counter() - t0)

    tr32 = TRAKer(model=make_model().eval(), task="image_classification", train_set_size=len(x),
                  save_dir=str(work / "fp32"), device="cpu", proj_dim=args.k, use_half_precision=False, logging_level=40)
    rates = {"provenance_dense": [], "provenance_factored": [], "traker_fp32": []}
    for i, state in enumerate(members):
        rates["provenance_dense"].append(ours_rate("dense", i, state))
        rates["provenance_factored"].append(ours_rate("factored", i, state))
        rates["traker_fp32"].append(traker_rate(tr32, i, state, len(x)))
        print("  model", i, {k: round(v[-1]) for k, v in rates.items()}, flush=True)
    n16 = min(len(x), args.fp16_examples)
    tr16 = TRAKer(model=make_model().eval(), task="image_classification", train_set_size=n16,
                  save_dir=str(work / "fp16"), device="cpu", proj_dim=args.k, use_half_precision=True, logging_level=40)
    rates["traker_fp16"] = [traker_rate(tr16, 0, members[0], n16)]
    shutil.rmtree(work, ignore_errors=True)
    case = f"{args.experiment}-{args.arch}{args.hidden}-k{args.k}-throughput"
    rows = [{"case": case, "system": k, "metric": "featurize_ex_per_s", "value": statistics.median(v), "runs": len(v)}
            for k, v in rates.items()]
    ratios = [{"case": case, "metric": "featurize_ex_per_s", "of": a, "over": b,
               "value": round(statistics.median(rates[a]) / statistics.median(rates[b]), 2)}
              for a in ("provenance_dense", "provenance_factored") for b in ("traker_fp32", "traker_fp16")]
    print(f"\n{case}: {args.models} models x {len(x)} examples (traker fp16: 1 model x {n16})")
    for r in rows:
        print(f"{r['system']:<22}{r['value']:>10.0f} examples/s")
    for r in ratios:
        print(f"  {r['of']} / {r['over']}: {r['value']}")
    write_results("attribution", {"experiment": args.experiment, "home": str(args.home), "k": args.k,
                                  "models": args.models, "examples": len(x), "memory_gb": args.memory_gb},
                  rows, ratios, tag="-throughput")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--lam", type=float, default=0.01, help="provenance's trak.lam (relative ridge)")
    ap.add_argument("--spec", default=str(ROOT / "experiments" / "fmnist_lds.yaml"))
    ap.add_argument("--home", default=None, help="artifact store (default: provenance's home, where "
                    "./provenance run keeps the experiment; --quick: bench/.attribution-work)")
    ap.add_argument("--fp16-examples", type=int, default=500)
    ap.add_argument("--memory-gb", type=float, default=2.0)
    ap.add_argument("--skip-traker", action="store_true")
    ap.add_argument("--systems", nargs="+", default=["dense", "factored", "traker"])
    ap.add_argument("--allocation", default="params", choices=["params", "uniform"],
                    help="how the factored projector splits k between layers")
    ap.add_argument("--fp16-lds", action="store_true",
                    help="also featurize one model's whole training set with traker's fp16 for its LDS "
                         "(slow on a CPU; always done with --quick)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tag", default="", help="suffix of the results file (bench/results/attribution<tag>.json)")
    ap.add_argument("--throughput-only", action="store_true",
                    help="featurization examples/s only, on an existing experiment's models (--experiment, --home, "
                         "--arch, --hidden, --models, --examples); writes bench/results/attribution-throughput.json")
    ap.add_argument("--experiment", default="clean-s0")
    ap.add_argument("--arch", default="small_cnn")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--models", type=int, default=3, help="--throughput-only: models timed")
    ap.add_argument("--members", type=int, default=None,
                    help="ensemble size (default: the spec's trak.num_models)")
    ap.add_argument("--examples", type=int, default=2000)
    args = ap.parse_args()
    if args.throughput_only:
        args.home = args.home or str(ROOT / "bench" / ".backdoor-work")
        return throughput(args)
    from kernels.stats import lds_bootstrap

    def lds(pred, actual):       # (LDS, bootstrap low, high) over held-out models and targets
        return lds_bootstrap(pred, actual, n_boot=200, seed=0)
    from ops.attribution import _roles
    from definitions import home
    from ops.spec import load_spec_file, parse_spec
    from ops.store import ArtifactStore
    from ops.training import Data, load_member, model_factory

    if args.quick:
        spec = parse_spec(copy.deepcopy(QUICK))
        store = ArtifactStore(args.home or ROOT / "bench" / ".attribution-work")
    else:
        spec = load_spec_file(args.spec)
        store = ArtifactStore(args.home or home() / "artifacts")
    base = spec.model_dump(mode="json")
    k = min(args.k, 256) if args.quick else args.k
    exp = spec.name
    log = lambda s: print(f"  {s}", flush=True)  # noqa: E731
    build(spec, store, exp, log)
    make_model, meta = model_factory(spec, store, exp)
    data = Data(store, exp, torch.device("cpu"), norm=json.loads(meta["norm"]))
    members = [load_member(spec, store, exp, i) for i in range(args.members or spec.trak.num_models)]
    masks, roles, margins = _roles(store, exp)
    held = np.flatnonzero(roles == "heldout")
    hx, actual = masks[held].astype(np.float64), margins[held]
    work = store.path(exp, "bench-tmp")
    work.mkdir(parents=True, exist_ok=True)
    n, t, m = len(data.y), len(data.yt), len(members)
    case = f"{spec.dataset.source}-n{n}-{spec.model.arch}-k{k}-M{m}"
    rows, ratios, table = [], [], []

    def record(system, rates, score_s, lds_m, lds_1):
        rate = statistics.median(rates)
        rows.append({"case": case, "system": system, "metric": "featurize_ex_per_s", "value": rate, "runs": len(rates)})
        if score_s is not None:
            rows.append({"case": case, "system": system, "metric": "score_seconds", "value": score_s, "runs": 1})
        for mm, v in ((m, lds_m), (1, lds_1)):
            if v is not None:
                rows.append({"case": f"{case}/lds-M{mm}", "system": system, "metric": "lds", "value": v[0],
                             "ci95": [v[1], v[2]], "runs": 1, "n_heldout": len(held), "n_targets": t})
        table.append((system, rate, score_s, lds_m, lds_1))

    try:
        import trak  # noqa: F401
        have_traker = not args.skip_traker and "traker" in args.systems
    except ImportError:
        have_traker = False
    kinds = [s for s in args.systems if s in ("dense", "factored")]
    gens = {kind: ours(kind, make_model, members, data, k, spec.seed, args.lam, work, args.memory_gb, log,
                       args.allocation) for kind in kinds}
    if have_traker:
        gens["traker_fp32"] = traker_scores(make_model, members, data, k, False, work, 0.0, log)
    done = interleave(gens)
    results = {}
    for kind in kinds:
        scores, rates, score_s = done[kind]
        results[kind] = (rates, score_s, lds(hx @ scores[m].T, actual)[:3], lds(hx @ scores[1].T, actual)[:3])
        record(f"provenance_{kind}", *results[kind])
    if not have_traker:
        rows.append({"case": case, "system": "traker_fp32", "metric": "featurize_ex_per_s", "value": None,
                     "note": "--skip-traker" if args.skip_traker else "traker is not installed (pip install traker==0.3.2)"})
    else:
        sc, rates, score_s = done["traker_fp32"]
        sc1, _, _ = run_one(traker_scores(make_model, members[:1], data, k, False, work, 0.0, lambda s: None))
        record("traker_fp32", rates, score_s, lds(hx @ sc.T, actual)[:3], lds(hx @ sc1.T, actual)[:3])
        _, rates16, _ = run_one(traker_scores(make_model, members[:1], data, k, True, work, 0.0, log,
                                              time_limit_examples=min(n, args.fp16_examples)))
        sc16 = run_one(traker_scores(make_model, members[:1], data, k, True, work, 0.0, log))[0] \
            if args.quick or args.fp16_lds else None
        record("traker_fp16", rates16, None, None, lds(hx @ sc16.T, actual)[:3] if sc16 is not None else None)
        base_rate = statistics.median(rates)
        for kind in kinds:
            ratios.append({"case": case, "metric": "featurize_ex_per_s", "of": f"provenance_{kind}",
                           "over": "traker_fp32", "value": round(statistics.median(results[kind][0]) / base_rate, 2)})
            ratios.append({"case": case, "metric": "featurize_ex_per_s", "of": f"provenance_{kind}",
                           "over": "traker_fp16", "value": round(statistics.median(results[kind][0])
                                                                 / statistics.median(rates16), 2)})
            if score_s:
                ratios.append({"case": case, "metric": "score_seconds", "of": f"provenance_{kind}",
                               "over": "traker_fp32", "value": round(score_s / results[kind][1], 2)})
    shutil.rmtree(work, ignore_errors=True)
    print(f"\n{case}: {len(held)} held-out models, {t} targets")
    print(f"{'system':<22}{'featurize ex/s':>16}{'score s':>10}{f'LDS (M={m})':>22}{'LDS (M=1)':>22}")
    for system, rate, score_s, l_m, l_1 in table:
        fmt = lambda v: f"{v[0]:.3f} [{v[1]:.2f},{v[2]:.2f}]" if v else "-"  # noqa: E731
        print(f"{system:<22}{rate:>16.0f}{(f'{score_s:.1f}' if score_s else '-'):>10}{fmt(l_m):>22}{fmt(l_1):>22}")
    for r in ratios:
        print(f"  {r['of']} / {r['over']} ({r['metric']}): {r['value']}")
    write_results("attribution", {"spec": base, "k": k, "members": m, "lam_provenance": args.lam, "lambda_reg_traker": 0.0,
                                  "fp16_examples": args.fp16_examples, "memory_gb": args.memory_gb},
                  rows, ratios, quick=args.quick, tag=args.tag)


if __name__ == "__main__":
    main()
