"""Projected gradient descent (Madry et al. 2018) in ℓ∞ and ℓ2, for adversarial training and for
evaluating robustness.

Budgets are in pixel units ([0, 1] images), whatever normalization the model applies: a
``Threat`` carries the per-channel mean and std the model's inputs were normalized with, the
attack perturbs ``pixels = x * std + mean`` and keeps them in [0, 1].  Inputs may carry several
leading batch dimensions (``batch_dims``: 2 for [models, examples, ...] in the lockstep trainer),
each (model, example) pair with its own perturbation and its own norm ball.

``pgd_reference`` is the plain version: one example at a time, written out from the algorithm;
``pgd`` is the batched one, tested against it.  Random starts draw from a generator seeded by the
caller, so a model trained in a batch sees the same perturbations as one trained alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

NORMS = ("linf", "l2")


@dataclass(frozen=True)
class Threat:
    norm: str = "linf"           # linf | l2
    eps: float = 0.1             # radius, pixel units
    step: float = 0.025          # step size, pixel units
    steps: int = 5
    random_start: bool = True
    mean: tuple = ()             # per-channel normalization of the model's inputs (empty: none)
    std: tuple = ()

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"norm: {self.norm!r} is not one of {NORMS}")
        if self.eps < 0 or self.step <= 0 or self.steps < 0:
            raise ValueError(f"eps, step and steps must be >= 0, > 0, >= 0 (got {self.eps}, {self.step}, {self.steps})")


def _stats(threat: Threat, x: torch.Tensor):
    if not threat.mean:
        return None, None
    shape = [1] * x.ndim
    shape[-3] = len(threat.mean)      # channels: [..., C, H, W]
    mean = torch.tensor(threat.mean, dtype=x.dtype, device=x.device).reshape(shape)
    std = torch.tensor(threat.std, dtype=x.dtype, device=x.device).reshape(shape)
    return mean, std


def to_pixels(x: torch.Tensor, threat: Threat) -> torch.Tensor:
    mean, std = _stats(threat, x)
    return x if mean is None else x * std + mean


def from_pixels(p: torch.Tensor, threat: Threat) -> torch.Tensor:
    mean, std = _stats(threat, p)
    return p if mean is None else (p - mean) / std


def _norms(d: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """ℓ2 norm of each perturbation, shaped to broadcast against ``d``."""
    n = d.flatten(batch_dims).norm(dim=-1)
    return n.reshape(*n.shape, *([1] * (d.ndim - batch_dims)))


def project(delta: torch.Tensor, pixels: torch.Tensor, threat: Threat, batch_dims: int) -> torch.Tensor:
    """The nearest perturbation within the ball (ℓ∞: clip; ℓ2: rescale), then within the image box."""
    if threat.norm == "linf":
        delta = delta.clamp(-threat.eps, threat.eps)
    else:
        delta = delta * torch.clamp(threat.eps / (_norms(delta, batch_dims) + 1e-12), max=1.0)
    return (pixels + delta).clamp(0.0, 1.0) - pixels


def random_start(shape, threat: Threat, generator: torch.Generator | None, batch_dims: int,
                 device, dtype) -> torch.Tensor:
    """Uniform in the ℓ∞ cube; for ℓ2 a uniform direction at a radius uniform in [0, ε]."""
    if threat.norm == "linf":
        d = (torch.rand(shape, generator=generator) * 2 - 1) * threat.eps
    else:
        g = torch.randn(shape, generator=generator)
        r = torch.rand(shape[:batch_dims], generator=generator).reshape(*shape[:batch_dims], *([1] * (len(shape) - batch_dims)))
        d = g / (_norms(g, batch_dims) + 1e-12) * r * threat.eps
    return d.to(device=device, dtype=dtype)


def pgd(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, threat: Threat,
        generator: torch.Generator | None = None, batch_dims: int = 1,
        starts: torch.Tensor | None = None) -> torch.Tensor:
    """Adversarial inputs (in the model's input space, like ``x``) that maximize ``loss_fn``.

    ``loss_fn(inputs)`` returns one loss per perturbed example (shape ``x.shape[:batch_dims]``);
    every example ascends its own loss (the gradient of the sum).  Steps: ℓ∞ the gradient's sign,
    ℓ2 the gradient over its norm, each times ``threat.step``, projected back onto the ball and the
    [0, 1] box.  ``starts`` (pixel units, like ``x``) replaces the random draw."""
    pixels = to_pixels(x.detach(), threat)
    if threat.eps == 0 or threat.steps == 0:
        return x.detach()
    if starts is not None:
        delta = project(starts.to(x.device, x.dtype), pixels, threat, batch_dims)
    elif threat.random_start:
        delta = project(random_start(x.shape, threat, generator, batch_dims, x.device, x.dtype), pixels, threat,
                        batch_dims)
    else:
        delta = torch.zeros_like(x)
    for _ in range(threat.steps):
        delta.requires_grad_(True)
        loss = loss_fn(from_pixels(pixels + delta, threat))
        (grad,) = torch.autograd.grad(loss.sum(), delta)
        with torch.no_grad():
            if threat.norm == "linf":
                direction = grad.sign()
            else:
                direction = grad / (_norms(grad, batch_dims) + 1e-12)
            delta = project(delta + threat.step * direction, pixels, threat, batch_dims)
    return from_pixels(pixels + delta.detach(), threat)


def pgd_reference(loss_one: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, threat: Threat,
                  starts: torch.Tensor | None = None) -> torch.Tensor:
    """The plain algorithm, one example at a time: ``loss_one(input)`` is the loss of one example,
    ``starts`` the random starts (pixel units, one per example) ``pgd`` would draw."""
    out = []
    for i in range(len(x)):
        p = to_pixels(x[i:i + 1].detach(), threat)[0]
        d = torch.zeros_like(p) if starts is None else starts[i].clone()
        d = _project_one(d, p, threat)
        for _ in range(threat.steps):
            d = d.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(loss_one(from_pixels((p + d)[None], threat)[0]), d)
            step = g.sign() if threat.norm == "linf" else g / (g.norm() + 1e-12)
            d = _project_one(d.detach() + threat.step * step, p, threat)
        out.append(from_pixels((p + d)[None], threat)[0])
    return torch.stack(out)


def _project_one(d, p, threat):
    if threat.norm == "linf":
        d = torch.clamp(d, -threat.eps, threat.eps)
    elif d.norm() > threat.eps:
        d = d * (threat.eps / (d.norm() + 1e-12))
    return torch.clamp(p + d, 0, 1) - p


def attack_seed(seed: int, epoch: int, step: int) -> int:
    """The random start's generator seed for one model's batch: the same batch of the same model
    gets the same start whether the model trains alone or in a lockstep group."""
    return (int(seed) * 1_000_003 + epoch * 10_007 + step) % (2**63 - 1)


def per_example_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.float().flatten(0, -2), y.flatten(), reduction="none").reshape(y.shape)


def robust_correct(logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                   threat: Threat, restarts: int = 1, seed: int = 0, chunk: int = 512) -> torch.Tensor:
    """Whether each example stays correctly classified under PGD with ``restarts`` random starts
    (an example counts as robust only if every restart fails), through ``logits_fn`` as a whole:
    an ensemble is attacked through its combined output, never model by model."""
    out = []
    for r0 in range(0, len(x), chunk):
        xb, yb = x[r0:r0 + chunk], y[r0:r0 + chunk]
        with torch.no_grad():
            ok = logits_fn(xb).argmax(-1) == yb
        for r in range(max(1, restarts)):
            g = torch.Generator().manual_seed(seed * 1_000_003 + r0 * 101 + r)
            xa = pgd(lambda z: per_example_ce(logits_fn(z), yb), xb, threat, g)
            with torch.no_grad():
                ok &= logits_fn(xa).argmax(-1) == yb
        out.append(ok)
    return torch.cat(out)
