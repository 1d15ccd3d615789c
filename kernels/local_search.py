"""Backdoor detection as "strongest feature" search (shared/reference/backdoor.md).

Given a train x train influence matrix A (row i = how every training example moves target i),
find, for each subset size k, sets S of size k maximizing

    f(S) = sum_{i != j in S} A_ij  -  (k/n) sum_{i in S} r_i,      r_i = sum_{j != i} A_ij

i.e. within-set influence in excess of what a random set of the same size would get.  The
solver is a variable-depth local search (Kernighan-Lin style): in each pass, up to ``swaps``
tabu swaps (worst member out, best non-member in) are made, and the best prefix of them is kept;
passes repeat until no prefix improves f.  Unlike the paper's released code, the swap gains are
exact (the diagonal penalty enters with the right sign for members and non-members, and the
cross term A_oa + A_ao is included), f is tracked exactly, sizes adapt to n, every restart is
seeded, and scores are normalized by the number of restarts.

    m_i = sum_k k^(-e) * (fraction of restarts at size k whose solution contains i)

with e = 1 in the paper's code; e = 0.5 is the default here (docs/decisions.md: it ranks weakly
connected poisons better, because small sizes no longer drown out the sizes that contain them).
That membership m is the paper's score (``score="membership"``); the default score is each
example's support from the found sets within its label, s_i = sum_{j: y_j = y_i} B_ij m_j
(``same_label_support``): the local search's own swap gain, continuous where membership saturates.
The matrix itself is prepared from TRAK's scores by ``influence_matrix`` (Q divided out, labels
centred at reference means).

``search_fast`` (numba, restarts in parallel) and ``search_reference`` (numpy) run the same
algorithm on the same initial sets and return the same solutions.
"""
from __future__ import annotations

import numpy as np

try:  # numba is a hard dependency; the guard keeps import errors readable
    import numba
except ImportError as e:  # pragma: no cover
    raise ImportError("kernels.local_search needs numba (pip install numba)") from e


PREPARATIONS = ("paper", "divide_q_center", "divide_q_double_center", "divide_q_test_center", "row_scale",
                "row_scale_center")
SCORES = ("membership", "support")


def real_matrix(a) -> np.ndarray:
    """``a`` as an array of its own float32/float64 precision (anything else as float64).  The
    detector's n x n matrices are float32 (at n = 50,000 one is 10 GB; float64 would be 20 GB);
    every sum over a row or a set is accumulated in float64."""
    a = np.asarray(a)
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float64)


def q_free(tau_train: np.ndarray, q_mean: np.ndarray) -> np.ndarray:
    """TRAK's train x train scores with the out-to-loss weight Q divided back out (float32, n x n).

    tau[i, j] = K_ij * q_j with K the (symmetric) kernel of the gradient features, so the result
    is K.  A column whose Q is 0 (the model fits that example to float precision: the column is
    all zeros) is taken from the transpose, where K_ji = K_ij survives (a pair of two such examples
    stays 0); the diagonal is zeroed.
    """
    q = np.asarray(q_mean, np.float64)
    k = np.array(tau_train, np.float32)
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] != len(q):
        raise ValueError(f"the influence matrix must be n x n for the {len(q)} values of Q, got shape {k.shape}")
    zero = q <= 0
    k /= np.where(zero, 1.0, q)[None, :]
    if zero.any():
        k[:, zero] = k[zero, :].T
    np.fill_diagonal(k, 0.0)
    return k


def center_at_references(k: np.ndarray, labels: np.ndarray, effects: np.ndarray, block: np.ndarray,
                         rows: int = 1024) -> np.ndarray:
    """k_ij - R[i, y_j] - R[j, y_i] + B[y_i, y_j], in place, diagonal left at zero.

    With k the kernel of features ψ, R[i, c] = ψ_i · μ_c and B[c, d] = μ_c · μ_d for reference
    means μ_c of every label, this is the kernel of the features centred at their label's
    reference mean: (ψ_i − μ_{y_i}) · (ψ_j − μ_{y_j}).  ``effects`` is R (n x C), ``block`` B (C x C),
    classes in the order of ``np.unique(labels)``.
    """
    classes, y = np.unique(np.asarray(labels), return_inverse=True)
    r = np.asarray(effects, np.float64)
    b = np.asarray(block, np.float64)
    if r.shape != (len(y), len(classes)) or b.shape != (len(classes), len(classes)):
        raise ValueError(f"label effects must be {len(y)} x {len(classes)} and {len(classes)} x {len(classes)}, "
                         f"got {r.shape} and {b.shape}")
    for i0 in range(0, len(y), rows):              # row blocks: no n x n temporary
        i1 = min(len(y), i0 + rows)
        k[i0:i1] -= r[i0:i1][:, y]                 # R[i, y_j]
        k[i0:i1] -= r[:, y[i0:i1]].T               # R[j, y_i]
        k[i0:i1] += b[y[i0:i1]][:, y]              # B[y_i, y_j]
    np.fill_diagonal(k, 0.0)
    return k


def center_at_references_reference(k, labels, effects, block) -> np.ndarray:
    """Plain-loop version of :func:`center_at_references` (tests compare the two)."""
    classes = list(np.unique(labels))
    out = np.array(k, np.float64)
    for i in range(len(out)):
        for j in range(len(out)):
            ci, cj = classes.index(labels[i]), classes.index(labels[j])
            out[i, j] = 0.0 if i == j else out[i, j] - effects[i][cj] - effects[j][ci] + block[ci][cj]
    return out


def _center_label_blocks(a: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Every (label of target, label of source) block shifted to mean zero, diagonal excluded."""
    a = a.copy()
    np.fill_diagonal(a, np.nan)
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for ia in members:
        for ic in members:
            block = a[np.ix_(ia, ic)]
            a[np.ix_(ia, ic)] = block - np.nanmean(block)
    np.fill_diagonal(a, 0.0)
    return a


def double_center_label_blocks(a: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Every (label of target, label of source) block double-centred, diagonal excluded, in place.

    a_ij -= mean of row i over sources of label y_j + mean of column j over targets of label y_i
            - mean of the block
    On a Gram matrix this is the Gram of the features centred at their label's mean: what is left
    is how two examples resemble each other beyond what each shares with its label (a natural
    sub-cluster shares much with its label; poisons, whose content belongs to other classes,
    share little with it and much with each other).  O(n^2 C) with C labels; the diagonal
    (excluded from every mean) is left at zero.
    """
    labels = np.asarray(labels)
    classes, y = np.unique(labels, return_inverse=True)
    onehot = np.zeros((len(y), len(classes)))
    onehot[np.arange(len(y)), y] = 1.0
    np.fill_diagonal(a, 0.0)
    counts = onehot.sum(0)
    same = onehot                                      # [i, c] = 1 if i has label c
    row_cnt = counts[None, :] - same                   # sources of label c other than i
    a_h, h_a = np.zeros((len(y), len(classes))), np.zeros((len(classes), len(y)))
    for i0 in range(0, len(y), 1024):                  # in float64, a row block at a time
        blk = a[i0:i0 + 1024].astype(np.float64)
        a_h[i0:i0 + 1024] = blk @ onehot
        h_a += onehot[i0:i0 + 1024].T @ blk
    row_mean = a_h / np.maximum(row_cnt, 1)            # [i, c]
    col_mean = h_a / np.maximum(row_cnt.T, 1)          # [c, j]
    blk_cnt = counts[:, None] * counts[None, :] - np.diag(counts)
    blk_mean = (onehot.T @ a_h) / np.maximum(blk_cnt, 1)
    for i0 in range(0, len(y), 1024):                 # row blocks: no n x n temporary
        i1 = min(len(y), i0 + 1024)
        a[i0:i1] -= row_mean[i0:i1][:, y]
        a[i0:i1] -= col_mean[y[i0:i1], :]
        a[i0:i1] += blk_mean[y[i0:i1]][:, y]
    np.fill_diagonal(a, 0.0)
    return a


def double_center_reference(a: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Plain-loop version of :func:`double_center_label_blocks` (tests compare the two)."""
    a = np.array(a, np.float64)
    np.fill_diagonal(a, np.nan)
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for ia in members:
        for ic in members:
            block = a[np.ix_(ia, ic)]
            a[np.ix_(ia, ic)] = (block - np.nanmean(block, 1, keepdims=True) - np.nanmean(block, 0, keepdims=True)
                                 + np.nanmean(block))
    np.fill_diagonal(a, 0.0)
    return a


def influence_matrix(tau_train: np.ndarray, q_mean: np.ndarray, labels: np.ndarray,
                     how: str = "divide_q_test_center", references=None) -> np.ndarray:
    """The matrix the search runs on, from TRAK's train x train scores (row = target).

    - ``paper``: TRAK's scores as they are (diagonal zeroed by the search).
    - ``divide_q_center``: TRAK's out-to-loss weight Q divided back out of every column (it shrinks
      the examples a backdoor fits well), then every (label, label) block centred at zero, so that
      the search looks for the strongest feature beyond the labels (docs/decisions.md).
    - ``divide_q_double_center``: Q divided out, then every label block double-centred (the
      kernel between label-centred gradient features; :func:`double_center_label_blocks`).
    - ``divide_q_test_center`` (the default): Q divided out, then the kernel re-centred at each
      label's mean over *reference* examples (:func:`center_at_references`; ``references`` = (R, B),
      computed from the gradient features by ``kernels.trak.label_mean_effects``): the clean test
      split's examples of that label.  Poisons are centred at where clean examples of their label
      lie, not at a mean they pull toward themselves (docs/decisions.md: at 10% BadNets or a
      clean-label attack the poisons are half their label, and centring at the label's own mean
      makes them and the clean half mirror images).
    - ``row_scale``: every row (target) divided by its root mean square off the diagonal, so each
      target's influence is measured in units of its own sensitivity: hard, high-gradient
      examples no longer make the strongest "feature" by magnitude alone.
    - ``row_scale_center``: row_scale, then the label blocks centred.
    """
    labels = np.asarray(labels)
    shape = np.shape(tau_train)
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] != len(labels):
        raise ValueError(f"the influence matrix must be n x n for the {len(labels)} training labels, "
                         f"got shape {shape}")
    if how not in PREPARATIONS:
        raise ValueError(f"unknown preparation {how!r}; choose one of {', '.join(PREPARATIONS)}")
    if how.startswith("divide_q"):
        a = q_free(tau_train, q_mean)
        if how == "divide_q_center":
            return _center_label_blocks(a, labels)
        if how == "divide_q_double_center":
            return double_center_label_blocks(a, labels)
        if references is None:
            raise ValueError("divide_q_test_center needs the label means' effects (references=(R, B))")
        return center_at_references(a, labels, *references)
    a = np.array(tau_train, np.float32)
    np.fill_diagonal(a, 0.0)
    if how == "paper":
        return a
    rms = np.sqrt((a * a).sum(1, keepdims=True) / max(1, len(a) - 1))
    a /= np.where(rms > 0, rms, 1.0)
    return _center_label_blocks(a, labels) if how == "row_scale_center" else a


def default_sizes(n: int) -> list[int]:
    sizes = []
    k = 10
    while k <= n // 2:
        sizes.append(k)
        k *= 2
    return sizes or [max(1, n // 4)]


def prepare(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """B = A + Aᵀ with zero diagonal, and r = row sums of A without its diagonal (A is not changed)."""
    a = real_matrix(a)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"the influence matrix must be square, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("the influence matrix has non-finite entries")
    r = a.sum(1, dtype=np.float64) - np.diag(a)
    b = a + a.T
    np.fill_diagonal(b, 0.0)
    return b, r


def same_label_support(b: np.ndarray, weights: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """s_i = sum over j of i's label, j != i, of B_ij w_j: the swap gain of i with respect to the
    found sets (w = how often, size-weighted, each example is in them), counted within its label.

    Restricting to the label keeps one poison group from being cancelled by another: in an
    all-to-all attack every label holds its own group, and groups aimed at neighbouring labels
    oppose each other (docs/decisions.md).  One label block at a time (memory: the largest block).
    """
    labels = np.asarray(labels)
    w = np.asarray(weights, np.float64)
    out = np.zeros(len(labels))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        blk = b[np.ix_(idx, idx)]
        np.fill_diagonal(blk, 0.0)
        out[idx] = blk @ w[idx]
    return out


def same_label_support_reference(b, weights, labels) -> np.ndarray:
    n = len(labels)
    return np.array([sum(b[i][j] * weights[j] for j in range(n) if j != i and labels[j] == labels[i])
                     for i in range(n)])


@numba.njit(cache=True)
def _search_one(b, d, sel0, swaps, max_passes):
    n = b.shape[0]
    ins = sel0.copy()
    c = np.zeros(n)
    for j in range(n):
        if ins[j]:
            for i in range(n):
                c[i] += b[j, i]
    moves_o = np.empty(swaps, np.int64)
    moves_a = np.empty(swaps, np.int64)
    for _ in range(max_passes):
        s = ins.copy()
        cc = c.copy()
        tabu = np.zeros(n, np.bool_)
        cum = 0.0
        best = 0.0
        best_t = 0
        for t in range(swaps):
            o = -1
            a = -1
            lo = np.inf
            hi = -np.inf
            for i in range(n):
                if tabu[i]:
                    continue
                v = cc[i] + d[i]
                if s[i]:
                    if v < lo:
                        lo = v
                        o = i
                elif v > hi:
                    hi = v
                    a = i
            if o < 0 or a < 0:
                break
            cum += hi - lo - b[o, a]
            s[o] = False
            s[a] = True
            tabu[o] = True
            tabu[a] = True
            for i in range(n):
                cc[i] += b[a, i] - b[o, i]
            moves_o[t] = o
            moves_a[t] = a
            if cum > best + 1e-12:
                best = cum
                best_t = t + 1
        if best_t == 0:
            break
        for t in range(best_t):
            o = moves_o[t]
            a = moves_a[t]
            ins[o] = False
            ins[a] = True
            for i in range(n):
                c[i] += b[a, i] - b[o, i]
    return ins


@numba.njit(parallel=True, cache=True)
def _search_many(b, d, init, swaps, max_passes):
    out = np.empty_like(init)
    for r in numba.prange(init.shape[0]):
        out[r] = _search_one(b, d, init[r], swaps, max_passes)
    return out


def search_fast(b, d, init, swaps=100, max_passes=100) -> np.ndarray:
    return _search_many(b, d, init, swaps, max_passes)


def search_reference(b, d, init, swaps=100, max_passes=100) -> np.ndarray:
    """Plain numpy version of the same search, one restart at a time."""
    out = []
    for sel0 in init:
        ins = sel0.copy()
        for _ in range(max_passes):
            s = ins.copy()
            cc = b[s].sum(0, dtype=np.float64) if s.any() else np.zeros(len(b))
            tabu = np.zeros(len(b), bool)
            cum, best, moves = 0.0, 0.0, []
            best_t = 0
            for t in range(swaps):
                v = cc + d
                members = np.flatnonzero(s & ~tabu)
                others = np.flatnonzero(~s & ~tabu)
                if not len(members) or not len(others):
                    break
                o = members[np.argmin(v[members])]
                a = others[np.argmax(v[others])]
                cum += v[a] - v[o] - b[o, a]
                s[o], s[a] = False, True
                tabu[[o, a]] = True
                cc = cc + (b[a] - b[o])
                moves.append((o, a))
                if cum > best + 1e-12:
                    best, best_t = cum, t + 1
            if best_t == 0:
                break
            for o, a in moves[:best_t]:
                ins[o], ins[a] = False, True
        out.append(ins)
    return np.array(out)


def objective(b: np.ndarray, d: np.ndarray, sel: np.ndarray) -> float:
    """f(S) = sum_{i<j in S} B_ij + sum_{i in S} d_i  (= sum_{i!=j} A_ij - (k/n) sum r_i)."""
    idx = np.flatnonzero(sel)
    return float(b[np.ix_(idx, idx)].sum(dtype=np.float64) / 2 + d[idx].sum())


def initial_sets(n: int, k: int, restarts: int, rng: np.random.Generator) -> np.ndarray:
    init = np.zeros((restarts, n), bool)
    for r in range(restarts):
        init[r, rng.choice(n, size=k, replace=False)] = True
    return init


SEARCHES = ("global", "per_label", "both")


def search_membership(a: np.ndarray, sizes: list[int] | None = None, restarts: int = 20, swaps: int = 100,
                      max_passes: int = 100, rng: np.random.Generator | None = None, size_exponent: float = 0.5,
                      fast: bool = True, on_size=None) -> np.ndarray:
    """The paper's aggregation over one matrix: m_i = sum over sizes k of k^-e times the share of
    the restarts' solutions that hold i (sizes above n are skipped; None: :func:`default_sizes`)."""
    b, r = prepare(a)
    n = len(b)
    sizes = [k for k in (sizes or default_sizes(n)) if 0 < k < n]
    if not sizes:
        raise ValueError(f"no valid subset size for n={n}")
    rng = rng if rng is not None else np.random.default_rng(0)
    member = np.zeros(n)
    search = search_fast if fast else search_reference
    for i, k in enumerate(sizes):
        sols = search(b, -(k / n) * r, initial_sets(n, k, restarts, rng), swaps, max_passes)
        member += sols.mean(0) * float(k) ** -size_exponent
        if on_size:
            on_size(i, len(sizes), k)
    return member


def strongest_feature_membership(a: np.ndarray, sizes: list[int] | None = None, restarts: int = 20,
                                 swaps: int = 100, max_passes: int = 100, seed: int = 0,
                                 size_exponent: float = 0.5, fast: bool = True, on_size=None,
                                 search: str = "global", labels: np.ndarray | None = None,
                                 parts: bool = False):
    """Membership of every example in the strongest features found by the local search.

    ``search="global"``: the paper's search over the whole matrix.  ``"per_label"``: one search
    per label block (sizes from :func:`default_sizes` of the block unless given), each label's
    membership scaled to sum to 1, then the whole to 1: every label's strongest feature is found,
    not only the strongest of all (an all-to-all attack plants one group per label;
    docs/decisions.md).  ``"both"``: the two, each scaled to sum to 1, added.  With ``parts=True``
    the result is a dict of the parts ({"global": ..., "per_label": ...}, the ones searched; the
    global part unscaled for ``search="global"``).
    """
    if search not in SEARCHES:
        raise ValueError(f"unknown search {search!r}; choose one of {', '.join(SEARCHES)}")
    if search != "global" and (labels is None or len(labels) != len(a)):
        raise ValueError(f"search={search!r} needs one label per example")
    rng = np.random.default_rng(seed)
    kw = dict(restarts=restarts, swaps=swaps, max_passes=max_passes, rng=rng, size_exponent=size_exponent,
              fast=fast)
    if search == "global":
        g = search_membership(a, sizes, on_size=on_size, **kw)
        return {"global": g} if parts else g
    labels = np.asarray(labels)
    a = real_matrix(a)
    out = {}
    member = np.zeros(len(a))
    classes = np.unique(labels)
    for step, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 3:                 # nothing to search: a group needs two members and an outsider
            continue
        m = search_membership(a[np.ix_(idx, idx)], sizes if sizes is None else [k for k in sizes if k < len(idx)]
                              or None, **kw)
        member[idx] = m / m.sum() if m.sum() > 0 else m
        if on_size:
            on_size(step, len(classes) + (search == "both"), f"label {c.item() if hasattr(c, 'item') else c}")
    out["per_label"] = member / max(member.sum(), 1e-300)
    if search == "both":
        g = search_membership(a, sizes, **kw)
        out["global"] = g / max(g.sum(), 1e-300)
        if on_size:
            on_size(len(classes), len(classes) + 1, "all labels")
    return out if parts else sum(out.values())


def strongest_feature_scores(a: np.ndarray, sizes: list[int] | None = None, restarts: int = 20,
                             swaps: int = 100, max_passes: int = 100, seed: int = 0,
                             size_exponent: float = 0.5, fast: bool = True, on_size=None,
                             score: str = "membership", labels: np.ndarray | None = None,
                             search: str = "global") -> np.ndarray:
    """Per-example detector score (higher = more likely part of the strongest feature).

    ``score="membership"``: the paper's aggregation (:func:`strongest_feature_membership`).
    ``score="support"``: each example's support from those solutions within its label
    (:func:`same_label_support` of the membership; needs ``labels``): continuous where membership
    saturates, so the poisons the search leaves out at small sizes, or that lie in a group found
    by few restarts, still score by how strongly the found poisons support them.
    """
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    if score == "support" and (labels is None or len(labels) != len(a)):
        raise ValueError("score='support' needs one label per example")
    member = strongest_feature_membership(a, sizes, restarts, swaps, max_passes, seed, size_exponent, fast,
                                          on_size, search, labels)
    if score == "membership":
        return member
    b, _ = prepare(a)
    return same_label_support(b, member, labels)


def null_support(rows: np.ndarray, row_labels: np.ndarray, weights: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The support score of examples outside the matrix: s_t = sum over j of t's label of
    2 rows[t, j] w_j, with rows[t, j] their kernel with the training examples (for a symmetric
    kernel B = A + Aᵀ = 2A, so a training example gets the same number from :func:`same_label_support`).
    Used with the clean test split's rows as the null of the support score."""
    rows = np.asarray(rows, np.float64)
    row_labels, labels = np.asarray(row_labels), np.asarray(labels)
    w = np.asarray(weights, np.float64)
    if rows.shape != (len(row_labels), len(labels)):
        raise ValueError(f"null rows must be {len(row_labels)} x {len(labels)}, got {rows.shape}")
    out = np.zeros(len(row_labels))
    for c in np.unique(row_labels):
        it = np.flatnonzero(row_labels == c)
        ij = np.flatnonzero(labels == c)
        out[it] = 2.0 * (rows[np.ix_(it, ij)] @ w[ij])
    return out


def auto_flag(scores: np.ndarray, min_separation: float = 4.5) -> np.ndarray:
    """Flag the upper group of a two-group split of the scores, if it stands out.

    The split point maximizes the between-group variance (Otsu on sorted scores).  The upper
    group is flagged only when it is the smaller one and its median lies more than
    ``min_separation`` robust standard deviations (1.4826 MAD) above the lower group's median;
    otherwise nothing is flagged.  Measured (docs/decisions.md): planted poisons give 6-9 on
    digits and 21-125 on Fashion-MNIST at 1-10%, an all-to-all attack 4.7, a clean Fashion-MNIST
    set 2.6 and a pure-noise matrix 2-3.5.  Known failure: poisons at 2% or fewer in a right-skewed
    clean bulk (3.0-3.4, nothing flagged although they rank first).
    """
    s = np.asarray(scores, np.float64)
    n = len(s)
    if n < 3:
        return np.zeros(n, bool)
    order = np.argsort(s, kind="stable")
    ss = s[order]
    csum = np.cumsum(ss)
    k = np.arange(1, n)                    # size of the lower group
    mean_lo = csum[:-1] / k
    mean_hi = (csum[-1] - csum[:-1]) / (n - k)
    split = int(np.argmax(k * (n - k) * (mean_hi - mean_lo) ** 2)) + 1   # lower group = ss[:split]
    lower = ss[:split]
    med = np.median(lower)
    mad = 1.4826 * np.median(np.abs(lower - med)) + 1e-12
    flags = np.zeros(n, bool)
    if n - split < split and (np.median(ss[split:]) - med) / mad > min_separation:
        flags[order[split:]] = True
    return flags
