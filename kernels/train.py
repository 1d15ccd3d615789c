"""Train many small models at once as one batched computation.

The parameters of M models are stacked along a leading axis (torch.func.stack_module_state)
and one vmapped forward/backward step advances all of them.  Each model keeps its own
initialisation seed, its own training subset and its own data order, so a model trained in
a batch is the same model as one trained alone (tests/test_train.py checks it).  SGD with
momentum and weight decay is elementwise, so one optimizer over the stacked tensors is M
independent optimizers.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from kernels import workers as worker_pool
from kernels.adversarial import Threat, attack_seed, pgd, random_start


@dataclass(frozen=True)
class Recipe:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    optimizer: str = "sgd"          # sgd | adam
    schedule: str = "triangular"    # triangular | cosine | step | constant | two_regime
    peak_epoch_frac: float = 0.25   # triangular: where the learning rate peaks
    step_milestones: tuple = (0.5, 0.75)   # step: fractions of training where lr *= step_gamma
    step_gamma: float = 0.1
    switch_frac: float = 0.75       # two_regime: large-step phase share of the budget
    small_lr: float = 0.005         # two_regime: learning rate of the small-step phase
    flip: bool = False              # augmentation: random horizontal flip
    translate: int = 0              # augmentation: random translate by up to this many pixels
    cutout: int = 0                 # augmentation: cutout square size
    amp: bool | str = "auto"        # bfloat16 autocast: True, False, or "auto" (see ``uses_bf16``)
    channels_last: bool = False     # channels-last activations on CUDA (always on for CPU convolutions)
    tta_flip: bool = False          # evaluate on the image and its mirror, average the logits
    adversarial: Threat | None = None   # PGD adversarial training (kernels/adversarial.py): each batch attacked first


SCHEDULES = ("triangular", "cosine", "step", "constant", "two_regime")


def lr_factor(recipe: Recipe, step: int, total: int) -> float:
    """Multiplier of ``recipe.lr`` at ``step`` of ``total`` (two_regime: see ``phase``)."""
    t = step / max(total, 1)
    if recipe.schedule in ("constant", "two_regime"):
        return 1.0
    if recipe.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if recipe.schedule == "triangular":
        p = recipe.peak_epoch_frac
        return t / p if t < p else max(0.0, (1 - t) / (1 - p))
    if recipe.schedule == "step":
        return recipe.step_gamma ** sum(t >= m for m in recipe.step_milestones)
    raise ValueError(f"unknown schedule {recipe.schedule!r}; choose one of {SCHEDULES}")


def make_optimizers(recipe: Recipe, params) -> list:
    """One optimizer, or for the two-regime schedule (Leclerc & Madry, arXiv 2002.10376) two:
    plain SGD at a large constant rate, then momentum SGD (or Adam) at a small rate."""
    params = list(params)
    # one fused kernel per step instead of a chain of foreach ops: 24 vs 64-82 us per small-CNN step
    fused = {"fused": True} if all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params) \
        else {}
    if recipe.optimizer == "adam":
        main = torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay, **fused)
    elif recipe.optimizer == "sgd":
        mom = 0.0 if recipe.schedule == "two_regime" else recipe.momentum
        main = torch.optim.SGD(params, lr=recipe.lr, momentum=mom, nesterov=mom > 0,
                               weight_decay=recipe.weight_decay, **fused)
    else:
        raise ValueError(f"unknown optimizer {recipe.optimizer!r}; choose sgd or adam")
    if recipe.schedule != "two_regime":
        return [main]
    small = torch.optim.SGD(params, lr=recipe.small_lr, momentum=recipe.momentum or 0.9, nesterov=True,
                            weight_decay=recipe.weight_decay, **fused)
    return [main, small]


def current_optimizer(recipe: Recipe, opts: list, step: int, total: int):
    if len(opts) == 2 and step >= recipe.switch_frac * total:
        return opts[1], recipe.small_lr * (1 - (step - recipe.switch_frac * total) / max(1, (1 - recipe.switch_frac) * total))
    return opts[0], recipe.lr * lr_factor(recipe, step, total)


def augment(x: torch.Tensor, flip: torch.Tensor, ty: torch.Tensor, tx: torch.Tensor, cy: torch.Tensor,
            cx: torch.Tensor, cut: int) -> torch.Tensor:
    """Flip, translate (zero fill) and cutout (zero) a batch [N, C, H, W] of model inputs, with the
    semantics of kernels/transforms.py (zero is the mean pixel after normalization)."""
    from kernels.dataloader import source_coords

    n, _, h, w = x.shape
    sy, sx, ok = source_coords(h, w, flip, ty, tx, cy, cx, cut)
    bidx = torch.arange(n, device=x.device)[:, None, None]
    out = x.permute(0, 2, 3, 1)[bidx, sy, sx]     # n, h, w, c
    return (out * ok[..., None]).permute(0, 3, 1, 2)


def _draws(recipe: Recipe, seed: int, epoch: int, n: int, h: int, w: int, device) -> dict:
    """One model's augmentation draws for one epoch (n = examples it sees), seeded per model."""
    rng = np.random.default_rng([int(seed), epoch, 7])
    t = recipe.translate
    d = {"flip": rng.random(n) < (0.5 if recipe.flip else 0.0),
         "ty": rng.integers(-t, t + 1, n), "tx": rng.integers(-t, t + 1, n),
         "cy": rng.integers(0, h, n), "cx": rng.integers(0, w, n)}
    return {k: torch.as_tensor(v, device=device) for k, v in d.items()}


def _augmenting(recipe: Recipe) -> bool:
    return recipe.flip or recipe.translate > 0 or recipe.cutout > 0


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); elsewhere oneDNN
    emulates bfloat16 and it runs slower than float32.  Linux only (reads /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    A CPU training step allocates and frees the same few megabytes of activations and gradients
    every step.  With glibc's defaults part of that goes back to the kernel (trimmed heap tops,
    mmap'd blocks) and comes back as page faults on first touch: 60 per small-CNN step, each
    costly in a VM and, with models on threads of one process, serialised on the process's
    memory map.  Keeping it (mmap threshold 32 MiB, the most glibc takes; trim threshold 1 GiB;
    64 MiB top pad) gave 4-12% more models per hour on the 2-core machine (docs/decisions.md).
    The process then holds its peak heap until it exits.  Once per process; skipped where the
    C library is not glibc or the user set any of glibc's MALLOC_*_ variables.  Returns whether
    the settings are in effect."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc" or any(k in os.environ for k in
                                                  ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)
                and libc.mallopt(m_top_pad, 64 << 20))


def uses_bf16(recipe: Recipe, model: nn.Module, device: torch.device) -> bool:
    """The precision a recipe trains at on this device.  ``amp=True``: bfloat16 autocast
    (float32 master weights) everywhere; ``False``: float32; ``"auto"``: bfloat16 for
    convolutional models where the hardware has native bfloat16 (CUDA GPUs that support it,
    CPUs with AVX512-BF16/AMX), float32 for the rest (MLPs and logistic regression are too small
    to gain).  The precision used is recorded with every checkpoint."""
    if recipe.amp is True or recipe.amp is False:
        return recipe.amp
    if recipe.amp != "auto":
        raise ValueError(f"amp: expected true, false or 'auto', got {recipe.amp!r}")
    if not has_conv(model):
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def lockstep_pays(model: nn.Module, device: torch.device) -> bool:
    """Whether to train a group of these models as one vmapped computation.

    Not for models with running statistics (batch-norm buffers cannot be updated under vmap),
    and not for convolutional models on the CPU: vmapped convolutions run as grouped
    convolutions there, measured 0.3-0.9x the speed of one model after another (docs/decisions.md).
    """
    if any(True for _ in model.buffers()):
        return False
    return not (has_conv(model) and device.type == "cpu")


def init_stacked(make_model: Callable[[], nn.Module], seeds: Sequence[int]):
    models = []
    for s in seeds:
        torch.manual_seed(int(s))
        models.append(make_model())
    params, _ = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    return base, {k: v.detach() for k, v in params.items()}


def train_stacked(make_model: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor,
                  subsets: Sequence[np.ndarray], seeds: Sequence[int], recipe: Recipe,
                  on_epoch: Callable[[int, float], None] | None = None,
                  lockstep: bool | None = None, snapshots: dict | None = None) -> dict[str, torch.Tensor]:
    """Train one model per (subset, seed) in lockstep; returns stacked parameters [M, ...] on CPU.

    ``x``: model inputs [N, ...] already on the compute device; ``y``: labels [N].
    All subsets must have the same size (the masks of one experiment do).  ``lockstep`` forces
    (True) or avoids (False) the vmapped path; by default ``lockstep_pays`` decides.
    ``snapshots``: a dict whose keys are epoch numbers (1-based); after each of those epochs the
    stacked parameters are stored under the key (intermediate checkpoints, e.g. for TRAK).
    """
    if len(subsets) != len(seeds):
        raise ValueError(f"{len(subsets)} subsets but {len(seeds)} seeds")
    if x.device.type == "cpu":
        keep_freed_memory()
    probe = make_model()
    if lockstep is None:
        lockstep = lockstep_pays(probe, x.device)
    if not lockstep or any(True for _ in probe.buffers()):
        return _train_sequential(make_model, probe, x, y, subsets, seeds, recipe, on_epoch, snapshots)
    sizes = {len(s) for s in subsets}
    if len(sizes) != 1:
        raise ValueError(f"models trained in one batch need equal subset sizes, got {sorted(sizes)}")
    n_sub = sizes.pop()
    if n_sub == 0:
        raise ValueError("empty training subset")
    device = x.device
    base, params = init_stacked(make_model, seeds)
    params = {k: v.to(device).requires_grad_(True) for k, v in params.items()}
    opts = make_optimizers(recipe, params.values())
    amp = uses_bf16(recipe, probe, device)

    def loss_one(p, xb, yb):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = functional_call(base, p, (xb,))
        return nn.functional.cross_entropy(logits.float(), yb, label_smoothing=recipe.label_smoothing)

    batched_loss = vmap(loss_one)
    threat = recipe.adversarial

    def loss_vec(p, xb, yb):     # per example, for the attack
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = functional_call(base, p, (xb,))
        return nn.functional.cross_entropy(logits.float(), yb, reduction="none")

    batched_vec = vmap(loss_vec)
    aug = _augmenting(recipe) and x.ndim == 4
    subsets_t = [np.asarray(s, dtype=np.int64) for s in subsets]
    steps_per_epoch = math.ceil(n_sub / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    step = 0
    for epoch in range(recipe.epochs):
        order = np.stack([s[np.random.default_rng([int(seed), epoch]).permutation(n_sub)]
                          for s, seed in zip(subsets_t, seeds)])
        order = torch.from_numpy(order).to(device)
        if aug:   # per model, stacked: {name: [M, n_sub]}
            per_model = [_draws(recipe, seed, epoch, n_sub, x.shape[2], x.shape[3], device) for seed in seeds]
            draws = {k: torch.stack([d[k] for d in per_model]) for k in per_model[0]}
        running = 0.0
        for start in range(0, n_sub, recipe.batch_size):
            idx = order[:, start:start + recipe.batch_size]
            opt, lr = current_optimizer(recipe, opts, step, total)
            for g in opt.param_groups:
                g["lr"] = lr
            xb = x[idx]
            if aug:   # all models' batches in one call
                sl = slice(start, start + idx.shape[1])
                flat = augment(xb.flatten(0, 1), *(draws[k][:, sl].reshape(-1) for k in ("flip", "ty", "tx", "cy", "cx")),
                               recipe.cutout)
                xb = flat.reshape(xb.shape)
            if threat is not None:    # every model attacks its own batch, through its own parameters
                frozen = {k: v.detach() for k, v in params.items()}
                starts = _adversarial_starts(threat, seeds, epoch, step, xb.shape[1:], xb) if threat.random_start \
                    else None
                xb = pgd(lambda z, yb=y[idx]: batched_vec(frozen, z, yb), xb, threat, batch_dims=2, starts=starts)
            losses = batched_loss(params, xb, y[idx])
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            opt.step()
            running += float(losses.detach().mean())
            step += 1
        if on_epoch is not None:
            on_epoch(epoch, running / steps_per_epoch)
        if snapshots is not None and epoch + 1 in snapshots:
            snapshots[epoch + 1] = {k: v.detach().cpu().clone() for k, v in params.items()}
    return {k: v.detach().cpu() for k, v in params.items()}


def _adversarial_starts(threat: Threat, seeds, epoch: int, step: int, shape, like: torch.Tensor) -> torch.Tensor:
    """Random starts of one batch, per model from the model's own generator: [M, *shape]."""
    return torch.stack([random_start(tuple(shape), threat, torch.Generator().manual_seed(attack_seed(s, epoch, step)),
                                     1, like.device, like.dtype) for s in seeds])


def _train_sequential(make_model, probe, x, y, subsets, seeds, recipe, on_epoch, snapshots=None):
    """Models one after another (batch-norm models; CNNs on the CPU), with the same recipe, seeds,
    orders and draws as the lockstep path; parameters and buffers are stacked like its output.

    ``probe`` is one model from ``make_model``, for its structure.  Convolutional models on the
    CPU run channels-last (so the small CNN takes its numba kernels, kernels/conv_pool.py and
    kernels/pool.py), and one model per core: each model on one intra-op thread, as many models
    at a time as torch has threads, in worker processes (kernels/workers.py; on threads where
    ``cpu_workers()`` says so, with the same results bit for bit).  One thread per model always,
    also for a lone model, so a model's bits do not depend on how many models share its shard or
    on the machine's core count (oneDNN's results change with the thread count).  Models draw
    their initialisation from the global torch generator (under a lock on threads); models with
    random layers (dropout, stochastic depth) would also draw while training, so they train one
    at a time."""
    device = x.device
    per_core = device.type == "cpu" and has_conv(probe)
    amp = uses_bf16(recipe, probe, device)
    lock = threading.Lock()
    init_lock = threading.Lock()

    def report(epoch, loss):
        if on_epoch is not None:
            with lock:
                on_epoch(epoch, loss)

    def one(job):
        subset, seed = job
        return _train_one(make_model, x, y, subset, seed, recipe, amp, per_core, report, snapshots or {}, init_lock)

    jobs = list(zip(subsets, seeds))
    threads = torch.get_num_threads()
    workers = 1 if has_random_layers(probe) else max(1, min(threads, len(jobs)))
    results = None
    if per_core and workers > 1 and cpu_workers() == "processes":
        snap_epochs = tuple(snapshots or {})
        try:
            out = worker_pool.run(functools.partial(_train_job, make_model), (x, y, recipe, amp, snap_epochs), jobs,
                                  workers, on_progress=lambda i, epoch, loss: report(epoch, loss))
            results = [(o["state"], {e: o[f"epoch{e}"] for e in snap_epochs}) for o in out]
        except worker_pool.WorkerStartError as e:     # same models on threads, a little slower
            warnings.warn(f"{e} Training on threads instead.", RuntimeWarning, stacklevel=2)
    if results is None and per_core:
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="train") as pool:
                results = list(pool.map(one, jobs))
        finally:
            torch.set_num_threads(threads)
    elif results is None:
        results = [one(j) for j in jobs]
    for e in snapshots or {}:
        snapshots[e] = {k: torch.stack([snaps[e][k] for _, snaps in results]) for k in results[0][0]}
    return {k: torch.stack([state[k] for state, _ in results]) for k in results[0][0]}


def cpu_workers() -> str:
    """Where CPU convolutional models train one per core: "processes" (the default, where the
    forkserver start method exists: kernels/workers.py) or "threads" (environment variable
    PROVENANCE_CPU_WORKERS=threads)."""
    want = os.environ.get("PROVENANCE_CPU_WORKERS", "processes")
    if want not in ("processes", "threads"):
        raise ValueError(f"PROVENANCE_CPU_WORKERS: expected 'processes' or 'threads', got {want!r}")
    return want if worker_pool.available() else "threads"


def _train_job(make_model, x, y, recipe, amp, snapshot_epochs, job, progress) -> dict:
    """One model in a worker process (kernels/workers.py), on its one thread: {"state": ...,
    "epoch<e>": ...}; progress(epoch, mean loss) after each epoch."""
    keep_freed_memory()
    subset, seed = job
    state, snaps = _train_one(make_model, x, y, subset, seed, recipe, amp, True, progress, set(snapshot_epochs))
    return {"state": state, **{f"epoch{e}": v for e, v in snaps.items()}}


def has_random_layers(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) or type(m).__name__ == "StochasticDepth"
               for m in model.modules())


def _train_one(make_model, x, y, subset, seed, recipe, amp, channels_last_cpu, report, snapshot_epochs,
               init_lock=None):
    """One model: returns its final state and {epoch: state} for the snapshot epochs."""
    device = x.device
    channels_last = channels_last_cpu or (recipe.channels_last and device.type == "cuda")
    with init_lock or contextlib.nullcontext():     # the global generator: seed and draw atomically
        torch.manual_seed(int(seed))
        model = make_model().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opts = make_optimizers(recipe, model.parameters())
    subset = np.asarray(subset, np.int64)
    n_sub = len(subset)
    steps_per_epoch = math.ceil(n_sub / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    step = 0
    snaps = {}
    for epoch in range(recipe.epochs):
        model.train()
        order = torch.from_numpy(subset[np.random.default_rng([int(seed), epoch]).permutation(n_sub)]).to(device)
        draws = _draws(recipe, seed, epoch, n_sub, x.shape[2], x.shape[3], device) \
            if _augmenting(recipe) and x.ndim == 4 else None
        running = 0.0
        for start in range(0, n_sub, recipe.batch_size):
            idx = order[start:start + recipe.batch_size]
            opt, lr = current_optimizer(recipe, opts, step, total)
            for g in opt.param_groups:
                g["lr"] = lr
            xb = x[idx]
            if draws is not None:
                sl = slice(start, start + len(idx))
                xb = augment(xb, *(draws[k][sl] for k in ("flip", "ty", "tx", "cy", "cx")), recipe.cutout)
            if channels_last and xb.ndim == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            if recipe.adversarial is not None:      # attack in eval mode (batch-norm statistics untouched)
                threat = recipe.adversarial
                starts = _adversarial_starts(threat, [seed], epoch, step, xb.shape, xb)[0] if threat.random_start \
                    else None
                model.eval()
                for p_ in model.parameters():
                    p_.requires_grad_(False)

                def attack_loss(z, yb=y[idx]):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        return nn.functional.cross_entropy(model(z).float(), yb, reduction="none")

                xb = pgd(attack_loss, xb, threat, starts=starts)
                for p_ in model.parameters():
                    p_.requires_grad_(True)
                model.train()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(xb)
            loss = nn.functional.cross_entropy(logits.float(), y[idx], label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += float(loss.detach())
            step += 1
        report(epoch, running / steps_per_epoch)
        if epoch + 1 in snapshot_epochs:
            snaps[epoch + 1] = _plain_state(model)
    return _plain_state(model), snaps


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the parameters and buffers, on the CPU, in the default (contiguous) layout."""
    return {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            for k, v in model.state_dict().items()}


@torch.no_grad()
def predict_stacked(make_model: Callable[[], nn.Module], params: dict[str, torch.Tensor],
                    x: torch.Tensor, chunk: int = 4096, tta_flip: bool = False) -> torch.Tensor:
    """Logits of every stacked model on every input: [M, N, C] (on x's device).

    ``params`` holds parameters and buffers (batch-norm statistics) stacked on a leading axis;
    ``tta_flip`` averages the logits of each image and its mirror image.  Convolutional models on
    the CPU run one after another in channels-last layout (vmapped, their convolutions become
    grouped ones: 6.5x slower for the small CNN), other models without buffers run vmapped."""
    model = make_model().to(x.device)
    p = {k: v.to(x.device) for k, v in params.items()}
    m = next(iter(p.values())).shape[0]
    if x.device.type == "cpu" and has_conv(model):
        model = model.eval().to(memory_format=torch.channels_last)
        chunk = min(chunk, 512)

        def fn(q, xb):
            xb = xb.contiguous(memory_format=torch.channels_last)
            outs = []
            for i in range(m):
                model.load_state_dict({k: v[i] for k, v in q.items()})
                outs.append(model(xb))
            return torch.stack(outs)
    elif any(True for _ in model.buffers()):
        model.eval()
        fn = lambda q, xb: torch.stack([torch.func.functional_call(model, {k: v[i] for k, v in q.items()}, (xb,))  # noqa: E731
                                        for i in range(m)])
    else:
        base = copy.deepcopy(model).to("meta")
        fn = vmap(lambda q, xb: functional_call(base, q, (xb,)), in_dims=(0, None))
    out = []
    for i in range(0, len(x), chunk):
        xb = x[i:i + chunk]
        logits = fn(p, xb)
        if tta_flip and xb.ndim == 4:
            logits = (logits + fn(p, xb.flip(-1))) / 2
        out.append(logits)
    return torch.cat(out, dim=1)


def unstack(params: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {k: v[i] for k, v in params.items()}
