"""TRAK: per-example gradients of the margin, the kernel inverse and the score estimator.

    phi_m(z)  = P_m^T grad_theta f(z; theta_m)                    (projected gradient, k dims)
    Phi_m     = [phi_m(x_1); ...; phi_m(x_n)]                      (n x k, training examples)
    Q_m       = diag(1 - p_m(y_i | x_i))                            (out-to-loss term)
    tau(z)    = (1/M sum_m Q_m) (1/M sum_m Phi_m (Phi_m^T Phi_m + lam I)^{-1} phi_m(z))

(shared/reference/trak.md §1-2.)  The projections φ are in kernels/projectors.py; the scores are
computed out of core by ``finalize_member`` and ``score_tiles`` (written out literally in
``trak_scores_reference``).  Each function has a plain reference version used by the tests.  The kernel inverse is always computed in float64: fp16/fp32 XᵀX is too ill-conditioned
at these sizes (reference notes, "measured pitfalls").
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from kernels.models import margin

# ---------------------------------------------------------------- per-example gradients


def _split(model: nn.Module, state: dict[str, torch.Tensor]):
    """Trainable parameters (differentiated) and the rest (batch-norm statistics, held fixed)."""
    names = {k for k, _ in model.named_parameters()}
    return ({k: v for k, v in state.items() if k in names}, {k: v for k, v in state.items() if k not in names})


def per_example_grads(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                      y: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Gradient of the margin w.r.t. all parameters for every example: [N, P] (vmap, fast).

    ``params`` may hold buffers too (batch-norm statistics): the model is evaluated in eval mode
    with them fixed, and only parameters are differentiated."""
    base = copy.deepcopy(model).to("meta").eval()
    weights, fixed = _split(model, params)

    def f(p, xi, yi):
        return margin(functional_call(base, {**p, **fixed}, (xi.unsqueeze(0),)), yi.unsqueeze(0)).squeeze(0)

    g = vmap(grad(f), in_dims=(None, 0, 0))
    out = []
    for i in range(0, len(x), chunk):
        gi = g(weights, x[i:i + chunk], y[i:i + chunk])
        out.append(torch.cat([gi[k].flatten(1) for k in weights], dim=1))
    return torch.cat(out)


def per_example_grads_reference(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                                y: torch.Tensor) -> torch.Tensor:
    """Same as per_example_grads, one autograd backward per example."""
    m = copy.deepcopy(model).eval()
    m.load_state_dict({k: v.clone() for k, v in params.items()}, strict=False)
    weights, _ = _split(model, params)
    params = weights
    rows = []
    for xi, yi in zip(x, y):
        m.zero_grad()
        margin(m(xi.unsqueeze(0)), yi.unsqueeze(0)).sum().backward()
        rows.append(torch.cat([dict(m.named_parameters())[k].grad.flatten() for k in params]))
    return torch.stack(rows)


@torch.no_grad()
def out_to_loss(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
    """Q term: 1 - softmax(logits)[y] per example, computed as sigmoid(-margin) (the same number),
    which stays accurate where the model is confident: ``1 - p`` in float32 rounds to 0 once p is
    within 6e-8 of 1, and a zero Q erases the example's column of TRAK's scores (the backdoor
    detector divides Q back out of them)."""
    base = copy.deepcopy(model).to("meta").eval()
    logits = functional_call(base, params, (x,))
    return torch.sigmoid(-margin(logits, y))


# ---------------------------------------------------------------- scores


def kernel_inverse(phi: np.ndarray, lam_rel: float) -> np.ndarray:
    """(ΦᵀΦ + λI)^{-1} in float64, with λ = lam_rel * mean eigenvalue of ΦᵀΦ."""
    phi64 = np.asarray(phi, dtype=np.float64)
    xtx = phi64.T @ phi64
    k = xtx.shape[0]
    lam = lam_rel * np.trace(xtx) / k
    return np.linalg.solve(xtx + lam * np.eye(k), np.eye(k))


def trak_scores_reference(phis: list[np.ndarray], targets: list[np.ndarray], qs: list[np.ndarray],
                          lam_rel: float) -> np.ndarray:
    """The estimator written out literally with an explicit inverse (targets x train)."""
    m = len(phis)
    q_mean = sum(np.asarray(q, np.float64) for q in qs) / m
    total = 0
    for phi, tgt in zip(phis, targets):
        phi = np.asarray(phi, np.float64)
        xtx = phi.T @ phi
        lam = lam_rel * np.trace(xtx) / xtx.shape[0]
        total = total + phi @ np.linalg.inv(xtx + lam * np.eye(xtx.shape[0])) @ np.asarray(tgt, np.float64).T
    return ((total / m) * q_mean[:, None]).T.astype(np.float32)


def label_mean_effects(members, lam_rel: float) -> tuple[np.ndarray, np.ndarray]:
    """How every training example's gradient feature meets its label's reference mean, in TRAK's kernel.

    ``members`` yields, per ensemble member m, (Φ_m [n x k] training features, M_m [C x k]
    reference means, one row per label).  With K_m = (Φ_mᵀΦ_m + λI)^{-1} (:func:`kernel_inverse`):

        R[i, c] = mean_m  φ_m(x_i)ᵀ K_m μ_m,c          (n x C)
        B[c, d] = mean_m  μ_m,cᵀ K_m μ_m,d             (C x C)

    the cross terms of the train x train kernel (the one TRAK's scores hold, Q aside) once every
    feature is centred at its label's mean (kernels.local_search.center_at_references).  Memory:
    one member's features at a time.
    """
    r = b = None
    count = 0
    for phi, mu in members:
        phi64 = np.asarray(phi, np.float64)
        mu64 = np.asarray(mu, np.float64)
        v = kernel_inverse(phi64, lam_rel) @ mu64.T            # k x C
        r = phi64 @ v if r is None else r + phi64 @ v
        b = mu64 @ v if b is None else b + mu64 @ v
        count += 1
    if not count:
        raise ValueError("no ensemble member was given")
    return r / count, b / count


def label_mean_effects_reference(phis, mus, lam_rel: float) -> tuple[np.ndarray, np.ndarray]:
    """Same, with the kernel between training features and reference means written out in full."""
    r = b = 0
    for phi, mu in zip(phis, mus):
        phi = np.asarray(phi, np.float64)
        mu = np.asarray(mu, np.float64)
        xtx = phi.T @ phi
        inv = np.linalg.inv(xtx + lam_rel * np.trace(xtx) / xtx.shape[0] * np.eye(xtx.shape[0]))
        both = np.vstack([phi, mu])
        kern = both @ inv @ both.T
        r = r + kern[: len(phi), len(phi):]
        b = b + kern[len(phi):, len(phi):]
    return r / len(phis), b / len(phis)


def clean_whitened_kernel(members, labels: np.ndarray, test_labels: np.ndarray, lam_rel: float,
                          rows: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Train x train and test x train kernels of the gradient features, whitened by the clean split.

    ``members`` yields, per ensemble member m, (Φ_m [n x k] training features, Φ'_m [t x k] test
    features).  With μ_m,c the mean test feature of label c, every feature centred at its label's
    test mean (ψ_i = φ_i − μ_{y_i}), C_m = (n/t) Σ_s ψ'_s ψ'_sᵀ the test split's within-label
    covariance scaled to n examples and W_m = (C_m + λI)^{-1}, λ = lam_rel · tr(C_m)/k:

        A[i, j] = mean_m ψ_i W_m ψ_j     (n x n, diagonal zero)
        T[s, j] = mean_m ψ'_s W_m ψ_j    (t x n)

    TRAK's kernel whitens by the *training* features, poisons included, so a direction many
    poisons share is scaled down by their own variance; whitened by the clean split instead, a
    direction that clean examples do not vary along (a trigger) stands out (docs/decisions.md).
    Every label needs at least one test example.  Memory: A and T, stored in float32 (each term
    is computed in float64), plus one member's features; both are accumulated ``rows`` rows at a
    time (no second n x n temporary, and nothing n x n in float64).
    """
    labels = np.asarray(labels)
    test_labels = np.asarray(test_labels)
    classes = np.unique(labels)
    missing = sorted(set(classes.tolist()) - set(np.unique(test_labels).tolist()))
    if missing:
        raise ValueError(f"labels {missing} have no test example to centre and whiten at")
    y = np.searchsorted(classes, labels)
    yt = np.searchsorted(classes, test_labels)
    if not np.array_equal(classes[np.minimum(yt, len(classes) - 1)], test_labels):
        raise ValueError("the test split has labels the training split does not")
    onehot = (yt[None, :] == np.arange(len(classes))[:, None]).astype(np.float64)
    means = onehot / onehot.sum(1, keepdims=True)                       # C x t
    n, t = len(labels), len(test_labels)
    a = np.zeros((n, n), np.float32)       # float32 storage; every product is taken in float64
    tk = np.zeros((t, n), np.float32)
    rows = max(1, min(rows, 2**25 // max(1, n)))     # the float64 row block stays within 256 MB
    count = 0
    for phi, phi_t in members:
        phi_t = np.asarray(phi_t, np.float64)
        if len(phi) != n or len(phi_t) != t:
            raise ValueError(f"member {count}: features for {len(phi)} training and {len(phi_t)} test examples, "
                             f"labels for {n} and {t}")
        mu = means @ phi_t                                              # C x k
        pt = phi_t - mu[yt]
        cov = pt.T @ pt * (n / t)
        k = cov.shape[0]
        w = np.linalg.solve(cov + lam_rel * np.trace(cov) / k * np.eye(k), np.eye(k))
        p = np.asarray(phi, np.float64) - mu[y]
        pw = p @ w
        for i0 in range(0, n, rows):
            a[i0:i0 + rows] += pw[i0:i0 + rows] @ p.T
        for s0 in range(0, t, rows):
            tk[s0:s0 + rows] += (pt[s0:s0 + rows] @ w) @ p.T
        count += 1
    if not count:
        raise ValueError("no ensemble member was given")
    a /= count
    tk /= count
    np.fill_diagonal(a, 0.0)
    return a, tk


def clean_whitened_kernel_reference(phis, tests, labels, test_labels, lam_rel: float):
    """Same, written out: explicit means, covariance and inverse, one pair of examples at a time."""
    labels, test_labels = list(labels), list(test_labels)
    n, t = len(labels), len(test_labels)
    a, tk = np.zeros((n, n)), np.zeros((t, n))
    for phi, phi_t in zip(phis, tests):
        phi, phi_t = np.asarray(phi, np.float64), np.asarray(phi_t, np.float64)
        mu = {c: phi_t[[s for s in range(t) if test_labels[s] == c]].mean(0) for c in set(labels)}
        pt = np.array([phi_t[s] - mu[test_labels[s]] for s in range(t)])
        p = np.array([phi[i] - mu[labels[i]] for i in range(n)])
        cov = sum(np.outer(v, v) for v in pt) * n / t
        w = np.linalg.inv(cov + lam_rel * np.trace(cov) / len(cov) * np.eye(len(cov)))
        a += np.array([[0.0 if i == j else p[i] @ w @ p[j] for j in range(n)] for i in range(n)])
        tk += np.array([[pt[s] @ w @ p[j] for j in range(n)] for s in range(t)])
    return a / len(phis), tk / len(phis)


# ---------------------------------------------------------------- out-of-core scoring
#
# At the papers' scale (n = 50,000, k = 2,048, 10,000 targets, tens of checkpoints) nothing below
# holds more than a block: features are read by row blocks from .npy files (kernels/npyio.py),
# XᵀX and its inverse are float64 k x k, and scores are computed tile by tile on the compute
# device in float32 and written to a .npy file.


def finalize_member(phi, member: int, lam_rel: float, out, device, rows: int = 8192, cols: int | None = None) -> float:
    """Training features of one checkpoint, Φ (rows of ``phi[member]``, a kernels.npyio.NpyFile of
    shape [M, n, k]; only its first ``cols`` columns if given), turned into TRAK's
    F = Φ (ΦᵀΦ + λI)^{-1} (written to ``out[member]``, float32).  ΦᵀΦ and the inverse are float64;
    λ = lam_rel · tr(ΦᵀΦ)/k.  Returns λ."""
    device = torch.device(device)
    f64 = torch.float64 if device.type != "mps" else torch.float32
    n, k = phi.shape[1], cols or phi.shape[2]
    xtx = torch.zeros(k, k, dtype=f64, device=device)
    for i in range(0, n, rows):
        b = torch.from_numpy(phi.rows(member, i, i + rows)[:, :k]).to(device, f64)
        xtx += b.T @ b
    lam = lam_rel * float(torch.trace(xtx)) / k
    kinv = torch.linalg.solve(xtx + lam * torch.eye(k, dtype=f64, device=device),
                              torch.eye(k, dtype=f64, device=device))
    for i in range(0, n, rows):
        b = torch.from_numpy(phi.rows(member, i, i + rows)[:, :k]).to(device, f64)
        out.write_rows(member, i, (b @ kinv).float().cpu().numpy())
    return lam


def score_tiles(targets, features, q_mean: np.ndarray, out, device, memory_bytes: float,
                members: list[int] | None = None, on_block=None) -> None:
    """τ = (1/M Σ_m X_m F_mᵀ) ⊙ q̄ (targets x train, float32) tile by tile.

    ``targets`` [M, t, k] target features and ``features`` [M, n, k] finalized training features
    (:func:`finalize_member`) are NpyFiles (targets may be wider: their first k columns are used);
    ``out`` is an NpyFile [t, n].  A block of target rows
    is accumulated over every member on ``device`` (bt x n float32 within half the budget; the
    training features stream through in column blocks), multiplied by q̄ and written."""
    device = torch.device(device)
    m_all = list(range(features.shape[0])) if members is None else list(members)
    t, n, k = targets.shape[1], features.shape[1], features.shape[2]
    bt = int(max(1, min(t, memory_bytes / 2 / (4 * n + 4 * k))))
    bn = int(max(1, min(n, memory_bytes / 4 / (4 * k + 4 * bt))))
    q = torch.from_numpy(np.asarray(q_mean, np.float32) / len(m_all)).to(device)
    for t0 in range(0, t, bt):
        acc = torch.zeros(min(bt, t - t0), n, dtype=torch.float32, device=device)
        for m in m_all:
            x = torch.from_numpy(np.ascontiguousarray(targets.rows(m, t0, t0 + bt)[:, :k])).to(device, torch.float32)
            for j0 in range(0, n, bn):
                f = torch.from_numpy(features.rows(m, j0, j0 + bn)).to(device, torch.float32)
                acc[:, j0:j0 + bn] += x @ f.T
        acc *= q
        out.write(t0, acc.cpu().numpy())
        if on_block is not None:
            on_block(min(t, t0 + bt), t)


def grid_scores(train, targets, target_rows: np.ndarray, q_mean: np.ndarray, ks: list[int], lams: list[float],
                device, rows: int = 8192):
    """τ for a grid of projection dimensions and ridges, restricted to ``target_rows``.

    ``train`` [M, n, K] and ``targets`` [M, t, K] are NpyFiles of dense-projected features; the
    first k columns of a dense projection are themselves a dense projection (to a global scale,
    which τ ignores: λ is relative), so every k in ``ks`` (<= K) reuses them.  One eigendecomposition
    ΦᵀΦ = V diag(w) Vᵀ per member and k gives every λ: (ΦᵀΦ + λI)^{-1} = V diag(1/(w + λ)) Vᵀ.
    Yields ((k, lam_rel), scores [len(target_rows), n] float32) -- the same numbers
    finalize_member + score_tiles give at that k and λ."""
    device = torch.device(device)
    m_all, n = train.shape[0], train.shape[1]
    q = torch.from_numpy(np.asarray(q_mean, np.float64) / m_all).to(device, torch.float32)
    for k in ks:
        accs = [torch.zeros(len(target_rows), n, dtype=torch.float32, device=device) for _ in lams]
        for m in range(m_all):
            xtx = torch.zeros(k, k, dtype=torch.float64, device=device)
            for i in range(0, n, rows):
                b = torch.from_numpy(train.rows(m, i, i + rows)[:, :k]).to(device, torch.float64)
                xtx += b.T @ b
            w, v = torch.linalg.eigh(xtx)
            trace = float(w.sum())
            a = torch.cat([(torch.from_numpy(train.rows(m, i, i + rows)[:, :k]).to(device, torch.float64) @ v).float()
                           for i in range(0, n, rows)])                                   # n x k, eigenbasis
            bt = (torch.from_numpy(np.ascontiguousarray(targets.rows(m, 0, targets.shape[1])[target_rows, :k]))
                  .to(device, torch.float64) @ v)                                          # t' x k
            for j, lam in enumerate(lams):
                d = 1.0 / (w + lam * trace / k)
                accs[j] += (bt * d).float() @ a.T
        for j, lam in enumerate(lams):
            yield (k, lam), (accs[j] * q).cpu().numpy()
