"""Smallify (Leclerc, Vartak, Fernandez, Kraska & Madden 2018, arXiv 1806.03723): neuron- and
channel-level pruning during training, with the pruned units physically removed.

Written from the paper's published description (reference/seeds-part2.md §4); no third-party code.

* A ``SwitchLayer`` after every hidden Linear / Conv2d multiplies unit (neuron or channel) i by a
  learned scalar β_i.  The loss is task + ``penalty``: λ·Σ|β_i| (a sum over every switch of the
  model, see ``penalty``), with L2 weight decay on the other parameters but not on β.
* SGD drives the β of units the task does not need towards 0, where the L1 subgradient makes them
  oscillate around it.  ``SignVarianceTracker`` keeps an exponential moving mean and variance of
  sign(β_i); a unit whose sign variance passes a threshold is removed.
* ``prune`` removes units for real: the producing layer's output rows (weight rows, bias), the
  switch's β and the consuming layer's input columns (the next Linear's columns, the next Conv2d's
  input channels, or for conv -> flatten -> Linear the column group of each channel) are sliced to
  new, smaller ``nn.Parameter``s, and the optimizer is rebuilt over them with its state (SGD's
  momentum buffers, Adam's exp_avg / exp_avg_sq / step, ...) sliced the same way.  Training then
  goes on exactly as if the removed units had been masked.
* ``mask`` is the plain reference: the same model with the removed units' switches multiplied by
  zero.  tests/test_smallify_kernels.py checks that a pruned model equals the masked one, in its
  outputs and, after further optimizer steps, in every remaining parameter.

Models are ``nn.Sequential`` stacks of leaf modules (``smallify_mlp``, ``smallify_cnn``; ``static_mlp``
and ``static_cnn`` are the same families without switches, for the static-width baseline).  A model
pruned to widths w has exactly the shapes of ``smallify_*(..., w, ...)``, so its state dict loads
into a freshly built model of those widths; ``fold`` turns it into the switchless ``static_*`` model
of those widths with identical outputs, the model to deploy and time.

Nothing here knows about Dagster, the store or the training engine; ``train_smallify`` is a plain
PyTorch loop (constant learning rate, per-step pruning checks), deterministic for a seed.
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

# Modules allowed between a switch and the layer that consumes its units.  Each acts per unit
# (elementwise or per channel) and maps 0 to 0, so a unit whose switch is 0 contributes exactly
# nothing downstream; that is what makes removing it exact.  (Sigmoid, Softplus or BatchNorm would
# turn a zeroed unit into a constant and are refused.)
PASSTHROUGH = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.ELU, nn.Tanh, nn.Hardtanh, nn.Identity,
               nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)
PRODUCERS = (nn.Linear, nn.Conv2d)


class SwitchLayer(nn.Module):
    """One learned scalar β_i per unit, multiplying unit i of [B, n] or channel i of [B, n, H, W].

    β starts at ones (``init_std=0``, the default): the switch then starts as the identity, draws
    nothing from the random generator, so a smallify model and the static model of the same widths
    built from the same seed get the same weights.  ``init_std > 0`` draws β ~ N(1, init_std²) (the
    third-party reimplementation uses N(1, 1e-4)); W already breaks the symmetry between units.

    ``keep`` (None unless ``mask`` set it) is the masked reference's 0/1 vector: the switch then
    multiplies by β·keep.
    """

    def __init__(self, n: int, init_std: float = 0.0):
        super().__init__()
        self.n = int(n)
        beta = torch.ones(self.n)
        if init_std > 0:
            beta += init_std * torch.randn(self.n)
        self.beta = nn.Parameter(beta)
        self.register_buffer("keep", None)

    def effective(self) -> torch.Tensor:
        """β, times the mask where the model is masked."""
        return self.beta if self.keep is None else self.beta * self.keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.effective()
        if x.ndim == 4:
            return x * b.view(1, -1, 1, 1)
        if x.ndim == 2:
            return x * b
        raise ValueError(f"SwitchLayer takes [B, n] or [B, n, H, W], got shape {tuple(x.shape)}")

    def extra_repr(self) -> str:
        return f"{self.n}" + (", masked" if self.keep is not None else "")


# ------------------------------------------------------------------------------------------------
# models


def smallify_mlp(in_features: int, hidden: Sequence[int], num_classes: int, switches: bool = True,
                 init_std: float = 0.0) -> nn.Sequential:
    """Flatten, then Linear -> SwitchLayer -> ReLU per hidden width, then a Linear head (no switch
    after the output layer).  Inputs [B, in_features] or any [B, ...] of that many features."""
    layers: list[nn.Module] = [nn.Flatten()]
    prev = int(in_features)
    for h in hidden:
        layers.append(nn.Linear(prev, int(h)))
        if switches:
            layers.append(SwitchLayer(int(h), init_std))
        layers.append(nn.ReLU())
        prev = int(h)
    layers.append(nn.Linear(prev, int(num_classes)))
    return nn.Sequential(*layers)


def static_mlp(in_features: int, hidden: Sequence[int], num_classes: int) -> nn.Sequential:
    """``smallify_mlp`` without switches: the static-width baseline of the same family."""
    return smallify_mlp(in_features, hidden, num_classes, switches=False)


def smallify_cnn(in_channels: int, channels: Sequence[int], num_classes: int, image_size: int | tuple[int, int],
                 hidden: Sequence[int] = (), switches: bool = True, init_std: float = 0.0) -> nn.Sequential:
    """A small VGG-style stack: per entry of ``channels`` a block Conv2d 3x3 (padding 1) ->
    SwitchLayer -> ReLU -> MaxPool2d(2); then Flatten, optional hidden Linear -> SwitchLayer -> ReLU
    layers, and a Linear head.  No batch-norm (it would need its own slicing and running state).
    ``image_size``: H (square) or (H, W); each block halves it (floor)."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    layers: list[nn.Module] = []
    prev = int(in_channels)
    for c in channels:
        layers.append(nn.Conv2d(prev, int(c), 3, padding=1))
        if switches:
            layers.append(SwitchLayer(int(c), init_std))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        prev, h, w = int(c), h // 2, w // 2
    if h < 1 or w < 1:
        raise ValueError(f"image_size {image_size} is too small for {len(channels)} pooling blocks")
    layers.append(nn.Flatten())
    prev = prev * h * w
    for n in hidden:
        layers.append(nn.Linear(prev, int(n)))
        if switches:
            layers.append(SwitchLayer(int(n), init_std))
        layers.append(nn.ReLU())
        prev = int(n)
    layers.append(nn.Linear(prev, int(num_classes)))
    return nn.Sequential(*layers)


def static_cnn(in_channels: int, channels: Sequence[int], num_classes: int, image_size: int | tuple[int, int],
               hidden: Sequence[int] = ()) -> nn.Sequential:
    """``smallify_cnn`` without switches: the static-width baseline of the same family."""
    return smallify_cnn(in_channels, channels, num_classes, image_size, hidden, switches=False)


def switches(model: nn.Module) -> list[SwitchLayer]:
    """The model's switch layers, in forward order (the order of keep masks and tracker rows)."""
    return [m for m in model.modules() if isinstance(m, SwitchLayer)]


def widths(model: nn.Module) -> list[int]:
    """Live units per switch layer: the physical width, or where masked the number kept."""
    return [int(s.keep.sum()) if s.keep is not None else s.n for s in switches(model)]


def count_params(model: nn.Module) -> int:
    """Number of parameter elements, switches' β included (``fold`` drops them: the deployable count)."""
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# penalty and sign tracking


def penalty(model: nn.Module, lam: float) -> torch.Tensor:
    """λ·Σ|β| over every unit of every switch (the effective β where masked).

    A sum, not a mean: the pull on each β is λ·sign(β) whatever the layer's width, so removing
    units does not change the pressure on the others and a pruned model trains exactly like the
    masked one.  (A mean over the live units would, and the third-party ``mean(|β|)`` also makes λ
    depend on the width.)  With a sum, λ is per unit: the same λ means more total penalty for a
    wider model."""
    sw = switches(model)
    if not sw:
        return torch.zeros(())
    return lam * sum(s.effective().abs().sum() for s in sw)


class SignVarianceTracker:
    """Exponential moving mean and variance of sign(β_i), one row per switch layer.

    Per update, for each unit, with s = sign(β) ∈ {-1, 0, 1} and m the momentum:
        d = s - mean;  mean += (1 - m)·d;  var = m·(var + (1 - m)·d²)
    (the exponentially weighted mean and variance).  It starts at mean = sign(β), var = 0.  A
    unit whose β keeps its sign has var -> 0; one whose β oscillates around 0 (the L1 subgradient's
    signature of a unit the task does not need) has var -> about 1 (the variance of a fair ±1 coin).

    Defaults: momentum 0.99 (a window of about 100 steps, as in the published description) and a
    ``prunable`` threshold of 0.5.  Iterating the update from var = 0 at m = 0.99: a sign flipping
    every step passes 0.5 after 35 steps (random signs: 40, a square wave of period 100: 65) and
    stays near 1.  A β that crosses 0 once and stays on the other side also passes 0.5 (after 25
    steps, for about 175): for a while half its window is + and half -, so this estimator cannot
    tell one crossing from an oscillation, and the rule removes such a unit too (it was near 0 at
    the crossing).  A β that keeps its sign never passes any threshold above 0.
    """

    def __init__(self, model: nn.Module, momentum: float = 0.99):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        with torch.no_grad():
            self.mean = [torch.sign(s.effective().detach()).float().clone() for s in switches(model)]
        self.var = [torch.zeros_like(m) for m in self.mean]
        self.steps = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        sw = switches(model)
        if len(sw) != len(self.mean) or any(s.n != len(m) for s, m in zip(sw, self.mean)):
            raise ValueError("the tracker does not match the model's switches (slice it when pruning)")
        m = self.momentum
        for i, s in enumerate(sw):
            d = torch.sign(s.effective().detach()).float().to(self.mean[i].device) - self.mean[i]
            self.mean[i] += (1 - m) * d
            self.var[i] = m * (self.var[i] + (1 - m) * d * d)
        self.steps += 1

    def prunable(self, threshold: float = 0.5, model: nn.Module | None = None,
                 min_abs: float = 0.0) -> list[torch.Tensor]:
        """Boolean masks, True = remove: sign variance above ``threshold``, or (with ``model`` and
        ``min_abs > 0``) |β| below ``min_abs``.  The |β| test is off by default: the paper's
        criterion is the sign variance, and a small |β| alone also marks units that are only
        rescaled (their W grows to compensate)."""
        out = [v > threshold for v in self.var]
        if model is not None and min_abs > 0:
            out = [o | (s.effective().detach().abs().to(o.device) < min_abs) for o, s in zip(out, switches(model))]
        return out

    def slice(self, keep_masks: Sequence[torch.Tensor]) -> None:
        """Drop the removed units' rows (``prune`` calls this when given the tracker)."""
        keep = [torch.as_tensor(k, dtype=torch.bool) for k in keep_masks]
        self.mean = [m[k.to(m.device)] for m, k in zip(self.mean, keep)]
        self.var = [v[k.to(v.device)] for v, k in zip(self.var, keep)]


# ------------------------------------------------------------------------------------------------
# the reference (mask) and physical removal (prune)


def _keep_masks(model: nn.Module, keep_masks: Sequence) -> list[torch.Tensor]:
    """Validated boolean masks, one per switch, each keeping at least one unit (the one with the
    largest |β| where a mask would remove all)."""
    sw = switches(model)
    if len(keep_masks) != len(sw):
        raise ValueError(f"{len(keep_masks)} keep masks for {len(sw)} switch layers")
    out = []
    for s, k in zip(sw, keep_masks):
        k = torch.as_tensor(k, dtype=torch.bool, device=s.beta.device).clone()
        if k.shape != (s.n,):
            raise ValueError(f"keep mask of shape {tuple(k.shape)} for a switch of {s.n} units")
        if s.keep is not None:
            k &= s.keep.bool()
        if not k.any():
            k[int(s.effective().detach().abs().argmax())] = True
        out.append(k)
    return out


@torch.no_grad()
def mask(model: nn.Module, keep_masks: Sequence) -> nn.Module:
    """The plain reference of ``prune``: zero the removed units' switches, in place (the β
    parameters stay the same objects, so an optimizer over the model keeps working).  Masks
    combine with an earlier mask.  Returns the model."""
    for s, k in zip(switches(model), _keep_masks(model, keep_masks)):
        s.keep = k.to(s.beta.dtype)
    return model


def _chain(model: nn.Module) -> list[nn.Module]:
    if not isinstance(model, nn.Sequential) or any(isinstance(m, nn.Sequential) for m in model):
        raise TypeError("prune works on a flat nn.Sequential of leaf modules (smallify_mlp / smallify_cnn)")
    return list(model)


def _neighbours(layers: list[nn.Module], i: int) -> tuple[nn.Module, nn.Module, bool]:
    """The layer producing switch i's units, the one consuming them, and whether a Flatten lies
    between (conv -> flatten -> linear)."""
    j = i - 1
    while j >= 0 and isinstance(layers[j], PASSTHROUGH) and not isinstance(layers[j], nn.Flatten):
        j -= 1
    if j < 0 or not isinstance(layers[j], PRODUCERS):
        raise TypeError(f"switch at position {i} does not follow a Linear or Conv2d (only elementwise modules between)")
    flat = False
    k = i + 1
    while k < len(layers) and isinstance(layers[k], PASSTHROUGH):
        flat |= isinstance(layers[k], nn.Flatten)
        k += 1
    if k == len(layers) or not isinstance(layers[k], PRODUCERS):
        what = "nothing" if k == len(layers) else type(layers[k]).__name__
        raise TypeError(f"switch at position {i} is consumed by {what}; expected a Linear or Conv2d after "
                        f"elementwise modules that map 0 to 0 ({', '.join(t.__name__ for t in PASSTHROUGH)})")
    for m in (layers[j], layers[k]):
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise TypeError("grouped convolutions are not supported")
    return layers[j], layers[k], flat


@torch.no_grad()
def prune(model: nn.Module, optimizer: torch.optim.Optimizer | None, keep_masks: Sequence,
          tracker: SignVarianceTracker | None = None) -> tuple[nn.Module, torch.optim.Optimizer | None]:
    """Physically remove the units whose keep mask is False (one bool mask per switch, in
    ``switches`` order; at least one unit per layer is always kept, the largest |β|).

    The model is changed in place and returned: the producing Linear/Conv2d loses output rows (weight
    rows, bias), the switch loses β entries (and its mask, if masked), and the consuming layer loses
    input columns: Linear columns, Conv2d input channels, or after a Flatten the group of
    ``in_features // units`` columns of each channel (channel c owns columns c·HW .. (c+1)·HW - 1).
    Parameters are new ``nn.Parameter``s of the smaller shapes.

    The optimizer (any torch optimizer whose per-parameter state tensors have the parameter's
    shape: SGD, Adam, AdamW, RMSprop, ...) is rebuilt over the new parameters with the same groups
    and hyperparameters, and each state tensor of a parameter's shape sliced like the parameter;
    other state (Adam's step count) is copied.  Returns (model, new optimizer); the old optimizer
    refers to the old parameters and must not be used again (where nothing is removed, the model
    and optimizer come back as they were).  ``optimizer=None`` slices the model only.
    ``tracker``, if given, is sliced too.
    """
    layers = _chain(model)
    keep = _keep_masks(model, keep_masks)
    if tracker is not None and len(tracker.mean) != len(keep):
        raise ValueError("the tracker does not match the model's switches")
    rows: dict[int, torch.Tensor] = {}     # id(module) -> kept output rows
    cols: dict[int, torch.Tensor] = {}     # id(module) -> kept input columns
    sw_pos = [i for i, m in enumerate(layers) if isinstance(m, SwitchLayer)]
    changed = False
    for i, k in zip(sw_pos, keep):
        sw = layers[i]
        if bool(k.all()):
            continue
        changed = True
        producer, consumer, flat = _neighbours(layers, i)
        idx = k.nonzero().flatten()
        rows[id(producer)] = idx
        if flat and isinstance(consumer, nn.Linear):
            group, rem = divmod(consumer.in_features, sw.n)
            if rem:
                raise ValueError(f"flatten: {consumer.in_features} columns are not a multiple of {sw.n} channels")
            cols[id(consumer)] = (idx[:, None] * group + torch.arange(group, device=idx.device)).flatten()
        else:
            cols[id(consumer)] = idx
        rows[id(sw)] = idx
    if not changed:
        if tracker is not None:
            tracker.slice(keep)
        return model, optimizer

    slicers: dict[nn.Parameter, tuple[nn.Parameter, Callable]] = {}

    def slicer(r, c, is_weight):
        def f(t):
            if r is not None:
                t = t.index_select(0, r.to(t.device))
            if c is not None and is_weight:
                t = t.index_select(1, c.to(t.device))
            return t.clone(memory_format=torch.contiguous_format)
        return f

    for m in layers:
        r, c = rows.get(id(m)), cols.get(id(m))
        if r is None and c is None:
            continue
        if isinstance(m, SwitchLayer):
            f = slicer(r, None, False)
            old = m.beta
            m.beta = nn.Parameter(f(old.detach()), requires_grad=old.requires_grad)
            slicers[old] = (m.beta, f)
            if m.keep is not None:
                m.keep = f(m.keep)
            m.n = len(r)
            continue
        for name in ("weight", "bias"):
            old = getattr(m, name)
            if old is None or (name == "bias" and r is None):
                continue
            f = slicer(r, c, name == "weight")
            new = nn.Parameter(f(old.detach()), requires_grad=old.requires_grad)
            setattr(m, name, new)
            slicers[old] = (new, f)
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        else:
            m.out_channels, m.in_channels = m.weight.shape[:2]
    if tracker is not None:
        tracker.slice(keep)
    return model, (None if optimizer is None else _rebuild_optimizer(optimizer, slicers))


def _rebuild_optimizer(opt: torch.optim.Optimizer, slicers: dict) -> torch.optim.Optimizer:
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [slicers[p][0] if p in slicers else p for p in g["params"]]} for g in opt.param_groups]
    new = type(opt)(groups, **opt.defaults)
    for g_old in opt.param_groups:
        for p in g_old["params"]:
            if p not in opt.state:
                continue
            q, f = slicers.get(p, (p, None))
            new.state[q] = {k: (f(v) if f is not None and torch.is_tensor(v) and v.shape == p.shape
                                else (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)))
                            for k, v in opt.state[p].items()}
    return new


@torch.no_grad()
def fold(model: nn.Module) -> nn.Sequential:
    """A switchless copy with each β folded into its producer's rows (β·(Wx + b) = (βW)x + βb):
    the ``static_*`` model of the same widths, with the same outputs (to rounding).  Masked units are
    folded as zeros (prune them first for a smaller model)."""
    layers = [copy.deepcopy(m) for m in _chain(model)]
    out: list[nn.Module] = []
    for i, m in enumerate(layers):
        if not isinstance(m, SwitchLayer):
            out.append(m)
            continue
        producer, _, _ = _neighbours(layers, i)
        b = m.effective().detach()
        producer.weight.mul_(b.view(-1, *([1] * (producer.weight.ndim - 1))))
        if producer.bias is not None:
            producer.bias.mul_(b)
    return nn.Sequential(*out)


# ------------------------------------------------------------------------------------------------
# training


def make_optimizer(model: nn.Module, kind: str, lr: float, momentum: float, weight_decay: float):
    """Two groups: the weights with L2 weight decay, the switches' β without (their regulariser is
    the L1 penalty).  ``kind``: "sgd" (momentum, not Nesterov) or "adam"."""
    betas = {id(s.beta) for s in switches(model)}
    groups = [{"params": [p for p in model.parameters() if id(p) not in betas], "weight_decay": weight_decay},
              {"params": [s.beta for s in switches(model)], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr)
    raise ValueError(f"unknown optimizer {kind!r}; choose sgd or adam")


def train_smallify(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], epochs: int, batch_size: int = 64,
                   lr: float = 0.05, lam: float = 1e-2, momentum: float = 0.9, weight_decay: float = 5e-4,
                   prune_every: int = 50, threshold: float = 0.5, seed: int = 0,
                   progress: Callable[[int, float, list[int]], None] | None = None, optimizer: str = "sgd",
                   tracker_momentum: float = 0.99, min_abs: float = 0.0) -> tuple[nn.Module, list[dict]]:
    """Train ``model`` (built by the caller, e.g. ``smallify_mlp`` after ``torch.manual_seed``) on
    ``data`` = (x [N, ...], y [N]) with cross-entropy + ``penalty(model, lam)``, at a constant
    learning rate.  After every optimizer step the sign tracker is updated; every ``prune_every``
    steps the units with sign variance above ``threshold`` are removed (``prune``, with the
    optimizer state).  ``lam=0`` trains a plain model (no unit ever leaves: no oscillation to see).
    ``optimizer``: "sgd" (momentum, weight decay on all but β) or "adam" (``make_optimizer``).

    Choosing λ: under SGD with momentum μ the penalty alone moves β by about lr·λ/(1-μ) per step,
    so an unneeded unit's β goes from 1 to 0 in about (1-μ)/(lr·λ) steps (200 at the defaults
    lr 0.05, μ 0.9, λ 0.01), and only then starts to oscillate; λ must let that happen well within
    the training budget.  On scikit-learn's digits (MLP 64-256-256-10, 40 epochs of 22 steps) λ =
    0.003 kept about 150 + 130 units, 0.01 about 15 + 12 (accuracy within a point of the full
    model), 0.03 about 9 + 8 (2 points lower).  Adam normalises the gradient, so there λ acts
    through its share of β's gradient rather than its size.

    The data order of epoch e is ``np.random.default_rng([seed, e]).permutation(N)`` (as in the
    training engine): the same model and seed give the same result.  ``progress(epoch, mean loss,
    widths)`` after each epoch.  Returns (the model, pruned in place, and ``history``: one row
    per pruning check and one at the end, each {step, epoch, loss (mean task + penalty loss since
    the last row), task_loss, widths, params, removed (units removed at this row)}).
    """
    x, y = data
    n = len(x)
    if n == 0:
        raise ValueError("no training data")
    if prune_every < 1:
        raise ValueError("prune_every must be >= 1")
    opt = make_optimizer(model, optimizer, lr, momentum, weight_decay)
    tracker = SignVarianceTracker(model, tracker_momentum)
    history: list[dict] = []
    step = 0
    run_loss, run_task, run_n = 0.0, 0.0, 0

    def record(epoch, removed):
        nonlocal run_loss, run_task, run_n
        history.append({"step": step, "epoch": epoch, "loss": run_loss / max(run_n, 1),
                        "task_loss": run_task / max(run_n, 1), "widths": widths(model),
                        "params": count_params(model), "removed": removed})
        run_loss, run_task, run_n = 0.0, 0.0, 0

    model.train()
    for epoch in range(epochs):
        order = torch.from_numpy(np.random.default_rng([int(seed), epoch]).permutation(n)).to(x.device)
        ep_loss, ep_n = 0.0, 0
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            task = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss = task + penalty(model, lam) if lam else task
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tracker.update(model)
            step += 1
            lv = float(loss.detach())
            run_loss += lv
            run_task += float(task.detach())
            run_n += 1
            ep_loss += lv
            ep_n += 1
            if step % prune_every == 0:
                before = sum(widths(model))
                drop = tracker.prunable(threshold, model, min_abs)
                if any(bool(d.any()) for d in drop):
                    model, opt = prune(model, opt, [~d for d in drop], tracker)
                record(epoch, before - sum(widths(model)))
        if progress is not None:
            progress(epoch, ep_loss / max(ep_n, 1), widths(model))
    if not history or history[-1]["step"] != step:
        record(epochs - 1, 0)
    return model, history


# ------------------------------------------------------------------------------------------------
# evaluation helpers


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> float:
    """Top-1 accuracy in eval mode (the model's mode is restored)."""
    was = model.training
    model.eval()
    try:
        hits = sum(int((model(x[i:i + chunk]).argmax(-1) == y[i:i + chunk]).sum()) for i in range(0, len(x), chunk))
    finally:
        model.train(was)
    return hits / max(len(x), 1)


def latency(model: nn.Module, input_shape: Sequence[int], batch: int = 1, repeats: int = 50,
            warmup: int = 5) -> float:
    """Median wall-clock seconds of one forward pass on the CPU of a random [batch, *input_shape]
    input, under ``torch.inference_mode`` in eval mode, after ``warmup`` untimed passes.  Thread
    count is the caller's (torch.set_num_threads)."""
    was = model.training
    model.eval()
    x = torch.randn(int(batch), *input_shape, device=next(model.parameters()).device)
    times = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
    finally:
        model.train(was)
    return statistics.median(times)


__all__ = ["SwitchLayer", "SignVarianceTracker", "smallify_mlp", "static_mlp", "smallify_cnn", "static_cnn",
           "switches", "widths", "count_params", "penalty", "mask", "prune", "fold", "make_optimizer",
           "train_smallify", "accuracy", "latency", "PASSTHROUGH"]

