"""Train the models of an experiment (one per subset mask, plus one on all data) and record
their outputs.  Models train in lockstep groups (kernels/train.py) reading the loader files."""
from __future__ import annotations

import hashlib
import json
import time
from functools import partial
from typing import Callable

import numpy as np
import polars as pl
import torch

from kernels.dataloader import Loader
from kernels.models import TORCHVISION, build_model, margin
from kernels.transforms import Normalize, Pipeline
from kernels.train import Recipe, predict_stacked, train_stacked, uses_bf16
from ops.data import MASKS, data_digest, open_loader
from ops.spec import Spec, SpecError
from ops.store import ArtifactError, ArtifactStore

CKPT = "checkpoints"
Log = Callable[[str], None]


# training settings that do not change what a model is (so not part of its recipe or key)
NOT_RECIPE = {"models_per_batch", "save_epochs"}


def recipe_of(spec: Spec) -> Recipe:
    t = spec.training.model_dump(exclude=NOT_RECIPE)
    t["step_milestones"] = tuple(t["step_milestones"])
    return Recipe(**t)


def recipe_hash(spec: Spec) -> str:
    body = {"model": spec.model.model_dump(),
            "training": spec.training.model_dump(exclude=NOT_RECIPE)}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]


def model_seed(spec: Spec, model_id: int) -> int:
    return (spec.seed * 1_000_003 + model_id * 7919 + 1) % (2**31 - 1)


class Data:
    """The three loader files, read through the Loader in resident mode: each split is normalized
    once on the compute device and training steps index it there (no per-step host copies)."""

    def __init__(self, store: ArtifactStore, exp: str, device: torch.device, norm: dict | None = None):
        files = {s: open_loader(store, exp, s) for s in ("train", "test", "triggered")}
        if norm is None:
            train_u8 = files["train"].array("image")
            px = np.asarray(train_u8, np.float64).reshape(-1, train_u8.shape[-1]) / 255.0
            norm = {"mean": px.mean(0).tolist(), "std": np.maximum(px.std(0), 1e-3).tolist()}
        self.norm = norm
        pipe = Pipeline([Normalize(tuple(norm["mean"]), tuple(norm["std"]))])

        def load(split, extra=()):
            f = files[split]
            if not len(f):
                return (None,) * (2 + len(extra))
            extra = tuple(e for e in extra if e in f.fields)
            loader = Loader(f, batch_size=len(f), order="sequential", pipelines={"image": pipe},
                            fields=("image", "label", *extra), resident=True, device=device)
            batch = loader.fetch(np.arange(len(f)))
            return batch["image"], batch["label"], *(batch[e] for e in extra)

        self.x, self.y = load("train")
        self.xt, self.yt = load("test")
        # the triggered test set, and the label the attack wants for each of its images (loader files
        # written before per-image targets have none: then meta.json's target_class applies)
        self.xg, self.yg, *target = load("triggered", ("target",))
        self.tg = target[0] if target else None
        self.in_shape = tuple(self.x.shape[1:])


def make_model_fn(spec: Spec, in_shape, num_classes):
    make = partial(build_model, spec.model.arch, tuple(in_shape), int(num_classes), spec.model.hidden)
    if spec.model.arch.startswith(TORCHVISION):     # some need larger inputs (ViTs: 224x224): say so now
        try:
            with torch.no_grad():
                make().eval()(torch.zeros(2, *in_shape))
        except Exception as e:  # noqa: BLE001 — any failure means the model cannot take these inputs
            raise SpecError(f"model.arch: {spec.model.arch} does not accept {'x'.join(map(str, in_shape))} "
                            f"inputs: {e}") from e
    return make


def evaluate(make_model, params, data: Data, target_class: int | None, tta_flip: bool = False) -> dict:
    """Test accuracy, margins on test and train, and attack success: the share of the triggered test
    images classified as the label the attack wants for each (``data.tg``; ``target_class`` for
    loader files without per-image targets)."""
    logits = predict_stacked(make_model, params, data.xt, tta_flip=tta_flip)
    out = {"accuracy": (logits.argmax(-1) == data.yt).float().mean(1).cpu().numpy(),
           "margins_test": margin(logits, data.yt.expand(logits.shape[0], -1)).cpu().numpy()}
    lt = predict_stacked(make_model, params, data.x, tta_flip=tta_flip)
    out["margins_train"] = margin(lt, data.y.expand(lt.shape[0], -1)).cpu().numpy()
    wanted = data.tg if data.tg is not None else (
        None if target_class is None or data.xg is None else torch.full_like(data.yg, target_class))
    if data.xg is not None and wanted is not None:
        lg = predict_stacked(make_model, params, data.xg, tta_flip=tta_flip)
        out["asr"] = (lg.argmax(-1) == wanted).float().mean(1).cpu().numpy()
    else:
        out["asr"] = np.full(logits.shape[0], np.nan)
    return out


# ------------------------------------------------------------------ the model store
#
# Every trained model is one safetensors file keyed by what determines it:
#     checkpoints/models/<recipe hash>/<data digest>/<mask digest>-<seed>.safetensors
# holding its parameters (and batch-norm statistics), its margins on the test and train
# examples, and its manifest row in the metadata.  The data digest covers the images and labels
# of every split (ops.data.data_digest): a change of dataset or attack makes new models, and the
# margins stored with a model always belong to the data it was evaluated on.  A model whose file
# exists is never trained again: a crashed or repeated run trains only what is missing.


def _jobs(spec: Spec, masks: np.ndarray, digest: str) -> list[dict]:
    """Every model of the experiment: one per mask row, then one on all training data."""
    m_all, n = masks.shape
    rows = list(masks) + [np.ones(n, bool)]
    roles = ["train"] * spec.subsets.num_models + ["heldout"] * spec.subsets.num_heldout + ["full"]
    rh = recipe_hash(spec)
    jobs = []
    for i, (row, role) in enumerate(zip(rows, roles)):
        mask = hashlib.sha256(np.packbits(row).tobytes()).hexdigest()[:16]
        seed = model_seed(spec, i)
        jobs.append({"model_id": i, "role": role, "mask_index": i if i < m_all else None, "seed": seed,
                     "size": int(row.sum()), "recipe_hash": rh, "data_digest": digest, "mask_digest": mask,
                     "file": f"models/{rh}/{digest}/{mask}-{seed}.safetensors"})
    return jobs


def _experiment_jobs(spec: Spec, store: ArtifactStore, exp: str) -> list[dict]:
    return _jobs(spec, np.asarray(store.load_npy(exp, MASKS, "masks.npy")), data_digest(store, exp))


def _check_key(path, meta: dict, job: dict) -> None:
    """A stored model must be the one its path names: the recipe, data, mask and seed of its key
    (a file copied or renamed into another key's place is never used: it is trained again)."""
    said = {"recipe_hash": meta.get("recipe_hash"), "data_digest": meta.get("data_digest"),
            "seed": meta.get("seed"), "n_train_examples": meta.get("n_train_examples")}
    want = {"recipe_hash": job["recipe_hash"], "data_digest": job["data_digest"], "seed": job["seed"],
            "n_train_examples": job["size"]}
    if "mask_digest" in meta:
        said["mask_digest"], want["mask_digest"] = meta["mask_digest"], job["mask_digest"]
    for key, value in want.items():
        if str(said[key]) != str(value):
            raise ArtifactError(f"{path}: its metadata says {key} {said[key]}, but the file is stored under "
                                f"{key} {value}: it is not the model of this key")


def _epoch_file(file: str, epoch: int) -> str:
    return file.replace(".safetensors", f"-e{epoch}.safetensors")


def _model_layout(spec: Spec, in_shape, num_classes, cache: dict) -> dict:
    """{tensor: shape} a stored model of this spec must hold (its margins aside)."""
    key = (tuple(in_shape), int(num_classes))
    if key not in cache:
        model = make_model_fn(spec, key[0], key[1])()
        cache[key] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return cache[key]


def _stored_problem(spec: Spec, store: ArtifactStore, exp: str, job: dict, cache: dict) -> str | None:
    """Why the job's stored model (or one of its intermediate checkpoints) cannot be used, or None.
    A model is used only if its file is readable, its metadata is its key's (recipe, data, mask,
    seed, architecture) and its tensors are the spec's model's; anything else is trained again."""
    from kernels.stacked import StackError, layout_of

    files = [job["file"], *(_epoch_file(job["file"], e) for e in spec.training.save_epochs)]
    if any(not store.path(exp, CKPT, f).exists() for f in files):
        return "missing"
    path = store.path(exp, CKPT, job["file"])
    try:
        meta = store.tensor_metadata(exp, CKPT, job["file"])    # the header only, not the weights
        _check_key(path, meta, job)
        if meta.get("arch") != spec.model.arch or str(meta.get("hidden")) != str(spec.model.hidden):
            raise ArtifactError(f"{path}: a {meta.get('arch')} (hidden={meta.get('hidden')}) model, the spec's is "
                                f"{spec.model.arch} (hidden={spec.model.hidden})")
        want = _model_layout(spec, json.loads(meta["in_shape"]), meta["num_classes"], cache)
        for f in files:
            got = {k: s for k, (_, s) in layout_of(store.path(exp, CKPT, f)).items() if not k.startswith("margins_")}
            if got != want:
                bad = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))[0]
                raise ArtifactError(f"{store.path(exp, CKPT, f)}: tensor {bad!r} is "
                                    f"{list(got[bad]) if bad in got else 'missing'}, the spec's model needs "
                                    f"{list(want[bad]) if bad in want else 'none'}")
    except (ArtifactError, StackError) as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 -- unreadable header or metadata: say which file, train it again
        return f"{path}: unreadable ({type(e).__name__}: {e})"
    return None


def plan_shards(spec: Spec, store: ArtifactStore, exp: str, log: Log) -> list[list[dict]]:
    """The models still missing, in shards of ``models_per_batch`` equal-size subsets; each shard
    is the list of its jobs (what to train and under which key), handed to ``train_shard``."""
    jobs = _experiment_jobs(spec, store, exp)
    missing, cache = [], {}
    for j in jobs:
        problem = _stored_problem(spec, store, exp, j, cache)
        if problem is not None:
            if problem != "missing":
                log(f"model {j['model_id']} will be trained again: {problem}")
            missing.append(j)
    per = spec.training.models_per_batch
    shards: list[list[dict]] = []
    for size in sorted({j["size"] for j in missing}):
        same = [j for j in missing if j["size"] == size]
        shards += [same[i:i + per] for i in range(0, len(same), per)]
    log(f"{len(jobs)} models: {len(jobs) - len(missing)} already trained, {len(missing)} to train "
        f"in {len(shards)} shard(s)")
    return shards


def train_shard(spec: Spec, store: ArtifactStore, exp: str, jobs: list[dict], device: torch.device, log: Log,
                name: str = "shard") -> int:
    """Train one shard of models (jobs from ``plan_shards``) and store each model under its key.
    Refuses when the spec's recipe or the data changed since the shard was planned: its models
    would be stored under keys that do not describe them."""
    rh, digest = recipe_hash(spec), data_digest(store, exp)
    if any(j["recipe_hash"] != rh or j["data_digest"] != digest for j in jobs):
        raise ArtifactError(f"{name}: the spec's recipe or the training data changed since this run planned its "
                            f"shards; run checkpoints again")
    masks = np.asarray(store.load_npy(exp, MASKS, "masks.npy"))
    data = Data(store, exp, device)
    if masks.shape[1] != len(data.y):
        raise ArtifactError(f"subset masks cover {masks.shape[1]} examples but the train loader file has "
                            f"{len(data.y)}: re-materialize subset_masks")
    meta = store.load_json(exp, "training_set", "meta.json")
    make_model = make_model_fn(spec, data.in_shape, len(meta["classes"]))
    subsets = [np.flatnonzero(masks[j["mask_index"]]) if j["mask_index"] is not None else np.arange(masks.shape[1])
               for j in jobs]
    t0 = time.perf_counter()
    recipe = recipe_of(spec)
    precision = "bf16" if uses_bf16(recipe, make_model(), device) else "fp32"
    snapshots = {e: None for e in spec.training.save_epochs}
    last = [t0]

    from ops.progress import advance_to, bar

    shown = bar(spec.training.epochs, f"{name}: training {len(jobs)} model{'' if len(jobs) == 1 else 's'}", "epoch")

    def progress(epoch: int, loss: float):   # at most every 15 s: models one per core report their own epochs
        now = time.perf_counter()
        advance_to(shown, epoch + 1)
        shown.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if now - last[0] >= 15:
            last[0] = now
            log(f"{name}: epoch {epoch + 1}/{spec.training.epochs}, loss {loss:.4f} ({now - t0:.0f}s)")

    with shown:
        params = train_stacked(make_model, data.x, data.y, subsets, [j["seed"] for j in jobs], recipe,
                               on_epoch=progress, snapshots=snapshots)
    for e, snap in snapshots.items():   # intermediate checkpoints first: the final file marks a model done
        for i, job in enumerate(jobs):
            store.save_tensors(exp, CKPT, _epoch_file(job["file"], e), {k: v[i].contiguous() for k, v in snap.items()},
                               {"arch": spec.model.arch, "seed": job["seed"], "epoch": e})
    ev = evaluate(make_model, params, data, meta["target_class"], spec.training.tta_flip)
    for i, job in enumerate(jobs):
        tensors = {k: v[i].contiguous() for k, v in params.items()}
        tensors["margins_test"] = torch.from_numpy(np.ascontiguousarray(ev["margins_test"][i], np.float32))
        tensors["margins_train"] = torch.from_numpy(np.ascontiguousarray(ev["margins_train"][i], np.float32))
        store.save_tensors(exp, CKPT, job["file"], tensors, {
            "arch": spec.model.arch, "hidden": spec.model.hidden, "in_shape": json.dumps(list(data.in_shape)),
            "num_classes": len(meta["classes"]), "recipe_hash": rh, "data_digest": digest, "seed": job["seed"],
            "mask_digest": job["mask_digest"], "mask_index": job["mask_index"], "role": job["role"],
            "n_train_examples": job["size"],
            "accuracy": float(ev["accuracy"][i]), "attack_success_rate": float(ev["asr"][i]),
            "norm": json.dumps(data.norm), "precision": precision})
    log(f"{name}: trained {len(jobs)} models ({precision}) in {time.perf_counter() - t0:.1f}s, "
        f"mean test accuracy {ev['accuracy'].mean():.3f}")
    return len(jobs)


def collect_models(spec: Spec, store: ArtifactStore, exp: str, log: Log) -> dict:
    """Gather the experiment's models from the store into the stacked checkpoint, the manifest and
    the model outputs that downstream stages read."""
    jobs = _experiment_jobs(spec, store, exp)
    cache: dict = {}
    problems = [(j["model_id"], _stored_problem(spec, store, exp, j, cache)) for j in jobs]
    missing = [i for i, p in problems if p == "missing"]
    if missing:
        raise ArtifactError(f"models {missing[:5]}{'...' if len(missing) > 5 else ''} are not trained; "
                            f"re-materialize checkpoints")
    bad = [p for _, p in problems if p is not None]
    if bad:
        raise ArtifactError(f"{bad[0]}{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}: re-materialize "
                            f"checkpoints to train {'it' if len(bad) == 1 else 'them'} again")
    rows, metas = [], None
    for j in jobs:
        meta = store.tensor_metadata(exp, CKPT, j["file"])
        metas = metas or meta
        rows.append({"experiment": exp, "model_id": j["model_id"], "role": j["role"], "mask_index": j["mask_index"],
                     "seed": j["seed"], "n_train_examples": j["size"], "accuracy": float(meta["accuracy"]),
                     "attack_success_rate": float(meta["attack_success_rate"]), "recipe_hash": meta["recipe_hash"],
                     "file": j["file"], "precision": meta.get("precision", "fp32")})
    # parameters were checked against the spec's model above; every file's layout (dtypes, and the
    # margins: one per test and training example) must be the first's, which must fit the data
    from kernels.stacked import layout_of

    first = store.path(exp, CKPT, jobs[0]["file"])
    layout = layout_of(first)
    want = {"margins_test": (len(store.load_json(exp, "training_set", "meta.json")["test_ids"]),),
            "margins_train": (jobs[-1]["size"],)}
    for k, shape in want.items():
        if k not in layout or layout[k][1] != shape:
            raise ArtifactError(f"{first}: {k} is {list(layout[k][1]) if k in layout else 'missing'}, the data "
                                f"needs {list(shape)}: delete the file and re-materialize checkpoints")
    margins_test = np.empty((len(jobs), *want["margins_test"]), np.float32)
    margins_train = np.empty((len(jobs), *want["margins_train"]), np.float32)

    def margins(i, f):
        margins_test[i] = f.get_tensor("margins_test").numpy()
        margins_train[i] = f.get_tensor("margins_train").numpy()
    # one model's tensor at a time: memory does not grow with the number of models
    store.stack_tensors(exp, CKPT, "models.safetensors", [j["file"] for j in jobs], {
        "arch": spec.model.arch, "hidden": spec.model.hidden, "in_shape": metas["in_shape"],
        "num_classes": metas["num_classes"], "recipe_hash": metas["recipe_hash"], "models": len(jobs),
        "norm": metas["norm"], "experiment": exp}, keys=[k for k in layout if not k.startswith("margins_")],
        expect=layout, on_source=margins)
    for e in spec.training.save_epochs:      # intermediate checkpoints, stacked like the final ones
        store.stack_tensors(exp, CKPT, f"models-epoch{e}.safetensors", [_epoch_file(j["file"], e) for j in jobs],
                            {"arch": spec.model.arch, "hidden": spec.model.hidden, "epoch": e, "models": len(jobs)})
    store.save_npy(exp, "model_outputs", "margins_test.npy", margins_test)
    store.save_npy(exp, "model_outputs", "margins_train.npy", margins_train)
    table = pl.DataFrame(rows, schema_overrides={"mask_index": pl.Int64}, infer_schema_length=None)
    store.save_table(exp, CKPT, "models.parquet", table)
    acc = table.filter(pl.col("role") != "full")["accuracy"]
    n_cls = int(metas["num_classes"])
    full = table.filter(pl.col("role") == "full").row(0, named=True)
    log(f"collected {len(jobs)} models")
    return {"models": len(jobs), "mean_subset_accuracy": float(acc.mean()),
            "min_subset_accuracy": float(acc.min()), "full_accuracy": float(full["accuracy"]),
            "full_attack_success": float(full["attack_success_rate"]), "chance": 1.0 / n_cls}


def model_factory(spec: Spec, store: ArtifactStore, exp: str):
    """(make_model, metadata) of the stacked checkpoint, its tensors' shapes checked against the
    model's without loading them; refuses checkpoints of another architecture."""
    from safetensors import safe_open

    path = store.require(exp, CKPT, "models.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if meta.get("arch") != spec.model.arch or int(meta.get("hidden", -1)) != spec.model.hidden:
        raise ArtifactError(f"{path} holds {meta.get('arch')} (hidden={meta.get('hidden')}) models but the spec asks "
                            f"for {spec.model.arch} (hidden={spec.model.hidden}): re-materialize checkpoints")
    make_model = make_model_fn(spec, json.loads(meta["in_shape"]), int(meta["num_classes"]))
    expected = {k: tuple(v.shape) for k, v in make_model().state_dict().items()}
    got = {k: s[1:] for k, s in shapes.items()}
    if expected != got:
        raise ArtifactError(f"{path}: checkpoint parameters {got} do not match the model {expected}")
    return make_model, meta


def load_member(spec: Spec, store: ArtifactStore, exp: str, index: int, epoch: int | None = None) -> dict:
    """One model's parameters and buffers out of the stacked checkpoint (or the snapshot after
    ``epoch``), read without loading the other models."""
    from safetensors import safe_open

    name = "models.safetensors" if epoch is None else f"models-epoch{epoch}.safetensors"
    if epoch is not None and not store.path(exp, CKPT, name).exists():
        raise ArtifactError(f"{store.path(exp, CKPT, name)} is missing: training.save_epochs must include {epoch} "
                            f"when the checkpoints are made; re-materialize checkpoints")
    with safe_open(str(store.require(exp, CKPT, name)), framework="pt") as f:
        out = {}
        for k in f.keys():
            sl = f.get_slice(k)
            if index >= sl.get_shape()[0]:
                raise ArtifactError(f"{store.path(exp, CKPT, name)} holds {sl.get_shape()[0]} models; model {index} "
                                    f"was asked for (trak.num_models larger than the models trained?)")
            out[k] = sl[index]
        return out
