"""Train many small models at once as one batched computation.

The parameters of M models are stacked along a leading axis (torch.func.stack_module_state)
and one vmapped forward/backward step advances all of them.  Each model keeps its own
initialisation seed, its own training subset and its own data order, so a model trained in
a batch is the same model as one trained alone (tests/test_train.py checks it).  SGD with
momentum and weight decay is elementwise, so one optimizer over the stacked tensors is M
independent optimizers.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap


@dataclass(frozen=True)
class Recipe:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    schedule: str = "triangular"   # triangular | cosine | constant
    peak_epoch_frac: float = 0.25  # where the triangular schedule peaks


def lr_factor(recipe: Recipe, step: int, total: int) -> float:
    t = step / max(total, 1)
    if recipe.schedule == "constant":
        return 1.0
    if recipe.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if recipe.schedule == "triangular":
        p = recipe.peak_epoch_frac
        return t / p if t < p else max(0.0, (1 - t) / (1 - p))
    raise ValueError(f"unknown schedule {recipe.schedule!r}")


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
                  on_epoch: Callable[[int, float], None] | None = None) -> dict[str, torch.Tensor]:
    """Train one model per (subset, seed) in lockstep; returns stacked parameters [M, ...] on CPU.

    ``x``: model inputs [N, ...] already on the compute device; ``y``: labels [N].
    All subsets must have the same size (the masks of one experiment do).
    """
    if len(subsets) != len(seeds):
        raise ValueError(f"{len(subsets)} subsets but {len(seeds)} seeds")
    sizes = {len(s) for s in subsets}
    if len(sizes) != 1:
        raise ValueError(f"models trained in one batch need equal subset sizes, got {sorted(sizes)}")
    n_sub = sizes.pop()
    if n_sub == 0:
        raise ValueError("empty training subset")
    device = x.device
    base, params = init_stacked(make_model, seeds)
    params = {k: v.to(device).requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.SGD(params.values(), lr=recipe.lr, momentum=recipe.momentum,
                          nesterov=recipe.momentum > 0, weight_decay=recipe.weight_decay)

    def loss_one(p, xb, yb):
        logits = functional_call(base, p, (xb,))
        return nn.functional.cross_entropy(logits, yb, label_smoothing=recipe.label_smoothing)

    batched_loss = vmap(loss_one)
    subsets_t = [np.asarray(s, dtype=np.int64) for s in subsets]
    steps_per_epoch = math.ceil(n_sub / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    step = 0
    for epoch in range(recipe.epochs):
        order = np.stack([s[np.random.default_rng([int(seed), epoch]).permutation(n_sub)]
                          for s, seed in zip(subsets_t, seeds)])
        order = torch.from_numpy(order).to(device)
        running = 0.0
        for start in range(0, n_sub, recipe.batch_size):
            idx = order[:, start:start + recipe.batch_size]
            for g in opt.param_groups:
                g["lr"] = recipe.lr * lr_factor(recipe, step, total)
            losses = batched_loss(params, x[idx], y[idx])
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            opt.step()
            running += float(losses.detach().mean())
            step += 1
        if on_epoch is not None:
            on_epoch(epoch, running / steps_per_epoch)
    return {k: v.detach().cpu() for k, v in params.items()}


@torch.no_grad()
def predict_stacked(make_model: Callable[[], nn.Module], params: dict[str, torch.Tensor],
                    x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Logits of every stacked model on every input: [M, N, C] (on x's device)."""
    base = copy.deepcopy(make_model()).to("meta")
    p = {k: v.to(x.device) for k, v in params.items()}
    fn = vmap(lambda q, xb: functional_call(base, q, (xb,)), in_dims=(0, None))
    return torch.cat([fn(p, x[i:i + chunk]) for i in range(0, len(x), chunk)], dim=1)


def unstack(params: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {k: v[i] for k, v in params.items()}
