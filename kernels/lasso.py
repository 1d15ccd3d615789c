"""LASSO for datamodels: every target is one column, solved in blocks of targets.

``fit_datamodels`` picks the solver by shape (``choose_solver``): coordinate descent below
(``lasso_cd``), the same on the Gram X'X/m for many more models than examples (``lasso_gram``:
O(n) per coordinate step instead of O(m)), or FISTA on the whole weight block (one matmul per
iteration for all targets) where active sets of hundreds of nearly dependent columns make
coordinate descent crawl.  Either way the returned weights carry their relative duality gap.

Objective per target t (the scikit-learn scaling, so its ``Lasso`` is our plain reference):

    min_w  P_t(w) = 1/(2m) ||X_std w - (y_t - mean(y_t))||^2 + lam_t ||w||_1

with X_std the masks standardized column-wise.  The fast solver (``lasso_cd``) is cyclic
coordinate descent with an active set, one target per thread (numba, targets in parallel): a
full sweep over all n features, then sweeps over the nonzero ones only until they settle, then
the duality gap; this repeats until the gap is at most ``tol`` times P_t.  The gap certifies the
answer: P_t(w) - min P_t <= gap, so a converged target is within ``tol`` (relative) of the optimum,
whatever the solver did.  The solutions have at most about m nonzeros (m = models), so with few
models and many examples the active sweeps cost O(m^2) instead of the O(m n) of a full sweep; this
is where it beats scikit-learn's per-target coordinate descent, which sweeps every feature every
time (docs/decisions.md, "Datamodels").  A regularization path is warm-started along geometric
lam (shared/reference/datamodels.md §3).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

try:  # numba is a hard dependency; the guard keeps import errors readable
    import numba
except ImportError as e:  # pragma: no cover
    raise ImportError("kernels.lasso needs numba (pip install numba)") from e


def standardize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float64)
    mean = x.mean(0)
    std = x.std(0)
    std[std == 0] = 1.0
    return (x - mean) / std, mean, std


@numba.njit(inline="always")
def _soft(v, t):
    if v > t:
        return v - t
    if v < -t:
        return v + t
    return 0.0


@numba.njit(inline="always")
def _update(xt, r, wt, j, nj, lt):
    """One coordinate step on weight j (residual r kept in step); returns |change|."""
    m = xt.shape[1]
    old = wt[j]
    rho = 0.0
    for i in range(m):
        rho += xt[j, i] * r[i]
    new = _soft(rho / m + old * nj, lt) / nj
    if new != old:
        d = new - old
        for i in range(m):
            r[i] -= d * xt[j, i]
        wt[j] = new
        return abs(d)
    return 0.0


@numba.njit(cache=True)
def _null_direction_step(v, wt, act, na):
    """Along a null direction ``v`` of the active columns the residual stays put and the l1 term is
    linear: move the active weights against sign(w)'v until the first one reaches zero, and set it
    to zero.  False where no move lowers the objective (v orthogonal to the signs, or no weight
    would reach zero).  Shared by the residual and the Gram coordinate descents."""
    sv = 0.0
    for a in range(na):
        sv += v[a] * (1.0 if wt[act[a]] > 0 else -1.0)
    if sv == 0.0:
        return False
    step = np.inf
    hit = -1
    for a in range(na):
        d = -v[a] if sv > 0 else v[a]
        old = wt[act[a]]
        if old * d < 0:
            t = -old / d
            if t < step:
                step, hit = t, a
    if hit < 0:
        return False
    for a in range(na):
        d = -v[a] if sv > 0 else v[a]
        wt[act[a]] += step * d
    wt[act[hit]] = 0.0
    return True


@numba.njit(cache=True)
def _active_step(xt, y, r, wt, act, na, lt):
    """One active-set step: inside the orthant of the current signs the objective is the smooth
    quadratic 1/(2m)||y - X_A w||^2 + lam s'w; move from w towards its minimizer (least squares on
    the active columns), stopping at the first weight that would change sign (set to zero).  The
    quadratic is convex and equals the objective on the closed orthant, so this never increases it;
    it fixes coordinate descent's slow crawl when the active columns are nearly dependent (few models)."""
    m = xt.shape[1]
    nz = 0
    for a in range(na):           # only the weights that are nonzero now: their signs are defined
        if wt[act[a]] != 0.0:
            act[nz] = act[a]
            nz += 1
    na = nz
    if na == 0:
        return 0, False
    xa = np.empty((m, na))
    for a in range(na):
        for i in range(m):
            xa[i, a] = xt[act[a], i]
    g = xa.T @ xa / m
    b = np.empty(na)
    for a in range(na):
        v = 0.0
        for i in range(m):
            v += xa[i, a] * y[i]
        b[a] = v / m - lt * (1.0 if wt[act[a]] > 0 else -1.0)
    vals, vecs = np.linalg.eigh(g)
    if vals[0] <= 1e-10 * max(vals[-1], 1e-300):
        # more active columns than their rank: along a null direction v of X_A the residual stays
        # put and the l1 term is linear, so move against s'v until a weight reaches zero (this is
        # how the solution keeps at most rank-many nonzeros)
        if not _null_direction_step(vecs[:, 0], wt, act, na):
            return na, False
        for i in range(m):   # the residual moved only by round-off; recompute it exactly
            e = y[i]
            for a in range(na):
                e -= xa[i, a] * wt[act[a]]
            r[i] = e
        return na, True
    sol = np.linalg.solve(g, b)
    step = 1.0
    hit = -1
    for a in range(na):
        old = wt[act[a]]
        if (sol[a] > 0) != (old > 0) or sol[a] == 0.0:
            t = old / (old - sol[a])
            if t < step:
                step, hit = t, a
    cand = np.empty(na)
    for a in range(na):
        cand[a] = wt[act[a]] + step * (sol[a] - wt[act[a]])
    if hit >= 0:
        cand[hit] = 0.0
    # keep the step only if it lowers the objective (guards against round-off in near-singular g)
    before = 0.0
    after = 0.0
    rn = np.empty(m)
    for i in range(m):
        v = y[i]
        for a in range(na):
            v -= xa[i, a] * cand[a]
        rn[i] = v
        before += r[i] * r[i]
        after += v * v
    before *= 0.5 / m
    after *= 0.5 / m
    for a in range(na):
        before += lt * abs(wt[act[a]])
        after += lt * abs(cand[a])
    if after < before:
        for a in range(na):
            wt[act[a]] = cand[a]
        for i in range(m):
            r[i] = rn[i]
    return na, False


@numba.njit(cache=True)
def _newton_on_active(xt, y, r, wt, act, na, lt):
    """Null-direction steps until the active columns are independent, then one Newton step."""
    for _ in range(na + 1):
        na, null_step = _active_step(xt, y, r, wt, act, na, lt)
        if not null_step:
            break
    return na


@numba.njit(parallel=True, cache=True)
def _cd_targets(xt, norms, yt, lam, w, tol, max_outer, max_inner, gaps, sweeps):
    """Coordinate descent for every target (row of ``yt`` / ``w``), in place; gap and sweep counts out."""
    n, m = xt.shape
    for t in numba.prange(yt.shape[0]):
        y = yt[t]
        wt = w[t]
        lt = lam[t]
        r = y.copy()
        for j in range(n):
            if wt[j] != 0.0:
                for i in range(m):
                    r[i] -= wt[j] * xt[j, i]
        yy = 0.0
        for i in range(m):
            yy += y[i] * y[i]
        gap = np.inf
        count = 0
        act = np.empty(n, np.int64)
        for outer in range(max_outer):
            # full sweep over every feature
            na = 0
            for j in range(n):
                if norms[j] == 0.0:
                    continue
                _update(xt, r, wt, j, norms[j], lt)
                if wt[j] != 0.0:
                    act[na] = j
                    na += 1
            count += 1
            # sweeps over the active set until its weights settle
            prev = np.inf
            for inner in range(max_inner):
                dmax = 0.0
                wmax = 0.0
                for a in range(na):
                    j = act[a]
                    d = _update(xt, r, wt, j, norms[j], lt)
                    if d > dmax:
                        dmax = d
                    if abs(wt[j]) > wmax:
                        wmax = abs(wt[j])
                count += 1
                if dmax <= 1e-3 * tol * max(wmax, 1e-12):
                    break
                if inner % 5 == 4:
                    # an exact step on the active set, then: stop once the objective has stopped moving
                    # (coordinate descent crawls, or drifts along a flat direction, when the active
                    # columns are nearly dependent: as many as the models, which few models make the
                    # rule); skipped for large active sets far from that, where it costs more than
                    # it saves
                    if na <= 64:
                        na = _newton_on_active(xt, y, r, wt, act, na, lt)
                    cur = 0.0
                    for i in range(m):
                        cur += r[i] * r[i]
                    cur *= 0.5 / m
                    for a in range(na):
                        cur += lt * abs(wt[act[a]])
                    if prev - cur <= 1e-2 * tol * cur:
                        break
                    prev = cur
            # duality gap: P(w) - D(s r), s scales the residual into the dual feasible set
            xr = 0.0
            for j in range(n):
                v = 0.0
                for i in range(m):
                    v += xt[j, i] * r[i]
                if abs(v) > xr:
                    xr = abs(v)
            xr /= m
            s = 1.0 if xr <= lt else lt / xr
            rr = 0.0
            dd = 0.0
            for i in range(m):
                rr += r[i] * r[i]
                e = y[i] - s * r[i]
                dd += e * e
            l1 = 0.0
            for j in range(n):
                l1 += abs(wt[j])
            primal = 0.5 * rr / m + lt * l1
            gap = primal - (0.5 * yy / m - 0.5 * dd / m)
            if gap <= tol * primal or primal == 0.0:
                break
        gaps[t] = gap / primal if primal > 0.0 else 0.0
        sweeps[t] = count


def lasso_cd(xs: np.ndarray, yc: np.ndarray, lam, w0: np.ndarray | None = None, tol: float = 1e-6,
             max_outer: int = 200, max_inner: int = 1000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Solve every column of ``yc`` (centered) at its ``lam``; returns (W n x T, relative gap, sweeps).

    A target has converged when its relative duality gap is at most ``tol``.
    """
    xs = np.asarray(xs, np.float64)
    m, n = xs.shape
    yt = np.ascontiguousarray(np.asarray(yc, np.float64).T)
    lam = np.ascontiguousarray(np.broadcast_to(np.asarray(lam, np.float64), (yt.shape[0],)))
    if np.any(lam <= 0) or not np.all(np.isfinite(lam)):
        raise ValueError("lasso_cd: every lam must be positive and finite")
    xt = np.ascontiguousarray(xs.T)
    norms = (xt * xt).sum(1) / m
    w = np.zeros((yt.shape[0], n)) if w0 is None else np.array(np.asarray(w0, np.float64).T, order="C")
    gaps = np.zeros(yt.shape[0])
    sweeps = np.zeros(yt.shape[0], np.int64)
    _cd_targets(xt, norms, yt, lam, w, float(tol), int(max_outer), int(max_inner), gaps, sweeps)
    return w.T, gaps, sweeps


# ---- Gram coordinate descent (many more models than examples) ------------------------------------
#
# With G = X'X/m (n x n, shared by every target), c = X'y/m and g = c - G w (= X'r/m, the negative
# gradient of the smooth part), a coordinate step reads g_j and, when w_j changes by d, updates
# g -= d G[:, j]: O(n) per change instead of the O(m) dot product and O(m) residual update per
# coordinate of ``lasso_cd``.  Everything the stopping rule needs follows from g, c and y'y:
#     ||r||^2 = y'y - 2m c'w + m w'Gw = y'y - m (c'w + w'g)          (Gw = c - g)
#     y'r     = ||r||^2 + m w'g                                        (y = r + Xw)
# and with s = min(1, lam / max|g|) the dual point s r gives
#     gap = P(w) - D(s r) = (1 - s)^2 ||r||^2 / (2m) + lam ||w||_1 - s w'g,
# which is exact algebra (``duality_gap`` evaluates the same quantity from the residual), and in this
# form only ||r||^2 carries the cancellation of y'y against the fit, multiplied by (1 - s)^2 -> 0.


@numba.njit(cache=True)
def _gram_gap(c, g, wt, yy, m, lt):
    """(primal, absolute duality gap) of one target from c = X'y/m, g = c - G w and y'y."""
    n = c.shape[0]
    cw = 0.0
    wg = 0.0
    l1 = 0.0
    gmax = 0.0
    for j in range(n):
        cw += c[j] * wt[j]
        wg += wt[j] * g[j]
        l1 += abs(wt[j])
        if abs(g[j]) > gmax:
            gmax = abs(g[j])
    rr = yy - m * (cw + wg)
    if rr < 0.0:
        rr = 0.0
    s = 1.0 if gmax <= lt else lt / gmax
    primal = 0.5 * rr / m + lt * l1
    gap = 0.5 * (1.0 - s) * (1.0 - s) * rr / m + lt * l1 - s * wg
    return primal, gap


@numba.njit(cache=True)
def _gram_refresh(gram, c, wt, g):
    """g = c - G w, from scratch (no drift from the incremental updates)."""
    n = c.shape[0]
    for i in range(n):
        g[i] = c[i]
    for j in range(n):
        d = wt[j]
        if d != 0.0:
            row = gram[j]          # G is symmetric: row j is column j, contiguous
            for i in range(n):
                g[i] -= d * row[i]


@numba.njit(cache=True)
def _chol_solve(a, b):
    """Solve a x = b by Cholesky (a symmetric); (False, b) when a pivot is not clearly positive."""
    k = a.shape[0]
    el = a.copy()
    top = 0.0
    for j in range(k):
        top = max(top, a[j, j])
    tiny = 1e-10 * max(top, 1e-300)
    for j in range(k):
        s = el[j, j]
        for p in range(j):
            s -= el[j, p] * el[j, p]
        if s <= tiny:
            return False, b
        s = np.sqrt(s)
        el[j, j] = s
        for i in range(j + 1, k):
            v = el[i, j]
            for p in range(j):
                v -= el[i, p] * el[j, p]
            el[i, j] = v / s
    x = b.copy()
    for i in range(k):
        v = x[i]
        for p in range(i):
            v -= el[i, p] * x[p]
        x[i] = v / el[i, i]
    for i in range(k - 1, -1, -1):
        v = x[i]
        for p in range(i + 1, k):
            v -= el[p, i] * x[p]
        x[i] = v / el[i, i]
    return True, x


@numba.njit(cache=True)
def _gram_active_step(gram, c, wt, act, na, ga, lt):
    """``_active_step`` on the Gram: the orthant's quadratic 1/2 w'G_AA w - c_A'w + lam s'w is read off
    G directly (no pass over the models).  Newton step (Cholesky) stopped at the first sign change and
    kept only if the objective falls, or, where G_AA is singular, a null-direction step; ``act`` and
    ``ga`` (g on the active set) are compacted to the nonzero weights and kept in step.
    Returns (na, took a null step)."""
    nz = 0
    for a in range(na):
        if wt[act[a]] != 0.0:
            act[nz] = act[a]
            ga[nz] = ga[a]
            nz += 1
    na = nz
    if na == 0:
        return 0, False
    gaa = np.empty((na, na))
    for a in range(na):
        row = gram[act[a]]
        for b in range(na):
            gaa[a, b] = row[act[b]]
    rhs = np.empty(na)
    for a in range(na):
        rhs[a] = c[act[a]] - lt * (1.0 if wt[act[a]] > 0 else -1.0)
    ok, sol = _chol_solve(gaa, rhs)
    if not ok:
        vals, vecs = np.linalg.eigh(gaa)
        if vals[0] > 1e-10 * max(vals[-1], 1e-300):
            sol = np.linalg.solve(gaa, rhs)
        else:
            if not _null_direction_step(vecs[:, 0], wt, act, na):
                return na, False
            for a in range(na):
                e = c[act[a]]
                for b in range(na):
                    e -= gaa[a, b] * wt[act[b]]
                ga[a] = e
            return na, True
    step = 1.0
    hit = -1
    for a in range(na):
        old = wt[act[a]]
        if (sol[a] > 0) != (old > 0) or sol[a] == 0.0:
            t = old / (old - sol[a])
            if t < step:
                step, hit = t, a
    cand = np.empty(na)
    for a in range(na):
        cand[a] = wt[act[a]] + step * (sol[a] - wt[act[a]])
    if hit >= 0:
        cand[hit] = 0.0
    # objective less y'y/(2m): -1/2 w'(c + g) + lam ||w||_1 on the active set
    gn = np.empty(na)
    before = 0.0
    after = 0.0
    for a in range(na):
        e = c[act[a]]
        for b in range(na):
            e -= gaa[a, b] * cand[b]
        gn[a] = e
        before += -0.5 * wt[act[a]] * (c[act[a]] + ga[a]) + lt * abs(wt[act[a]])
        after += -0.5 * cand[a] * (c[act[a]] + e) + lt * abs(cand[a])
    if after < before:
        for a in range(na):
            wt[act[a]] = cand[a]
            ga[a] = gn[a]
    return na, False


@numba.njit(cache=True)
def _gather(gram, act, na):
    """G_AA as a contiguous na x na block (the active sweeps' axpys then run over contiguous rows)."""
    gaa = np.empty((na, na))
    for a in range(na):
        row = gram[act[a]]
        for b in range(na):
            gaa[a, b] = row[act[b]]
    return gaa


@numba.njit(parallel=True, cache=True)
def _gram_targets(gram, diag, cs, yy, m, lam, w, tol, max_outer, max_inner, newton_max, gaps, sweeps):
    """``_cd_targets`` on the Gram: every target (row of ``cs`` = X'y/m, ``w``) in place."""
    n = gram.shape[0]
    for t in numba.prange(cs.shape[0]):
        c = cs[t]
        wt = w[t]
        lt = lam[t]
        g = np.empty(n)
        _gram_refresh(gram, c, wt, g)
        act = np.empty(n, np.int64)
        ga = np.empty(n)
        gap = np.inf
        primal = 0.0
        count = 0
        for outer in range(max_outer):
            # full sweep: O(1) per coordinate that stays put, O(n) per change
            na = 0
            for j in range(n):
                dj = diag[j]
                if dj == 0.0:
                    continue
                old = wt[j]
                new = _soft(g[j] + dj * old, lt) / dj
                if new != old:
                    d = new - old
                    row = gram[j]
                    for i in range(n):
                        g[i] -= d * row[i]
                    wt[j] = new
                if wt[j] != 0.0:
                    act[na] = j
                    na += 1
            count += 1
            # sweeps over the active set, g kept on it only (ga): O(na) per change
            for a in range(na):
                ga[a] = g[act[a]]
            gaa = _gather(gram, act, na)
            prev = np.inf
            for inner in range(max_inner):
                dmax = 0.0
                wmax = 0.0
                for a in range(na):
                    j = act[a]
                    dj = diag[j]
                    old = wt[j]
                    new = _soft(ga[a] + dj * old, lt) / dj
                    if new != old:
                        d = new - old
                        for b in range(na):
                            ga[b] -= d * gaa[a, b]
                        wt[j] = new
                        if abs(d) > dmax:
                            dmax = abs(d)
                    if abs(new) > wmax:
                        wmax = abs(new)
                count += 1
                if dmax <= 1e-3 * tol * max(wmax, 1e-12):
                    break
                if inner % 5 == 4:
                    if na <= newton_max:
                        before = na
                        for _ in range(na + 1):
                            na, null_step = _gram_active_step(gram, c, wt, act, na, ga, lt)
                            if not null_step:
                                break
                        if na != before:
                            gaa = _gather(gram, act, na)
                    cur = 0.5 * yy[t] / m
                    for a in range(na):
                        wj = wt[act[a]]
                        cur += -0.5 * wj * (c[act[a]] + ga[a]) + lt * abs(wj)
                    if prev - cur <= 1e-2 * tol * cur:
                        break
                    prev = cur
            _gram_refresh(gram, c, wt, g)
            primal, gap = _gram_gap(c, g, wt, yy[t], m, lt)
            if gap <= tol * primal or primal == 0.0:
                break
        gaps[t] = gap / primal if primal > 0.0 else 0.0
        sweeps[t] = count


def gram_matrix(xs: np.ndarray) -> np.ndarray:
    """G = X'X/m (n x n, float64, symmetric), what ``lasso_gram`` shares across targets."""
    xs = np.asarray(xs, np.float64)
    g = xs.T @ xs
    g /= xs.shape[0]
    return np.ascontiguousarray(g)


def lasso_gram(xs: np.ndarray, yc: np.ndarray, lam, w0: np.ndarray | None = None, tol: float = 1e-6,
               max_outer: int = 200, max_inner: int = 1000, gram: np.ndarray | None = None,
               xty: np.ndarray | None = None, newton_max: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``lasso_cd`` on the Gram G = X'X/m: the same objective, stopping rule (relative duality gap at
    most ``tol``, from G, X'y and y'y) and returns (W n x T, relative gap, sweeps), with every
    coordinate step O(n) instead of O(m).  Pays where m >> n (``choose_solver``).  ``gram``
    (``gram_matrix(xs)``) and ``xty`` (X'yc/m, T x n) may be passed in to share them across calls."""
    xs = np.asarray(xs, np.float64)
    m, n = xs.shape
    yc = np.asarray(yc, np.float64)
    T = yc.shape[1]
    lam = np.ascontiguousarray(np.broadcast_to(np.asarray(lam, np.float64), (T,)))
    if np.any(lam <= 0) or not np.all(np.isfinite(lam)):
        raise ValueError("lasso_gram: every lam must be positive and finite")
    gram = gram_matrix(xs) if gram is None else np.ascontiguousarray(gram, np.float64)
    cs = np.ascontiguousarray((yc.T @ xs) / m if xty is None else xty, np.float64)
    yy = np.ascontiguousarray((yc * yc).sum(0))
    diag = np.ascontiguousarray(np.diag(gram))
    w = np.zeros((T, n)) if w0 is None else np.array(np.asarray(w0, np.float64).T, order="C")
    gaps = np.zeros(T)
    sweeps = np.zeros(T, np.int64)
    _gram_targets(gram, diag, cs, yy, float(m), lam, w, float(tol), int(max_outer), int(max_inner),
                  int(newton_max), gaps, sweeps)
    return w.T, gaps, sweeps


def _lipschitz(x: np.ndarray, iters: int = 50) -> float:
    v = np.random.default_rng(0).standard_normal(x.shape[1])
    for _ in range(iters):
        v = x.T @ (x @ v)
        v /= np.linalg.norm(v) + 1e-300
    return float(np.linalg.norm(x @ v) ** 2 / x.shape[0]) * 1.01 + 1e-12


def lasso_fista(xs: np.ndarray, yc: np.ndarray, lam: np.ndarray, w0: np.ndarray | None = None,
                max_iter: int = 2000, tol: float = 1e-7, lipschitz: float | None = None) -> np.ndarray:
    """FISTA with adaptive restart for all columns of ``yc`` (centered) at per-column ``lam``
    (numpy: the plain reference of ``lasso_fista_torch``)."""
    m, n = xs.shape
    dt = xs.dtype
    yc = np.asarray(yc, dt)
    lam = np.broadcast_to(np.asarray(lam, dt), (yc.shape[1],))
    L = lipschitz or _lipschitz(xs)
    step = dt.type(1.0 / L)
    w = np.zeros((n, yc.shape[1]), dt) if w0 is None else w0.astype(dt)
    z, t = w.copy(), 1.0
    xty = xs.T @ yc / dt.type(m)
    thresh = lam * step
    for it in range(max_iter):
        g = xs.T @ (xs @ z) / dt.type(m) - xty
        u = z - step * g
        w_new = np.sign(u) * np.maximum(np.abs(u) - thresh, 0)
        delta = w_new - w
        t_new = 0.5 * (1 + np.sqrt(1 + 4 * t * t))
        # adaptive restart (O'Donoghue & Candes) when momentum points uphill
        if np.sum((z - w_new) * delta) > 0:
            t_new, z = 1.0, w_new
        else:
            z = w_new + dt.type((t - 1) / t_new) * delta
        w, t = w_new, t_new
        if it % 10 == 9 and np.max(np.abs(delta)) < tol * max(1.0, float(np.max(np.abs(w)))):
            break
    return w


def lasso_fista_torch(xs: np.ndarray, yc: np.ndarray, lam: np.ndarray, w0: np.ndarray | None = None,
                      max_iter: int = 2000, tol: float = 1e-7, lipschitz: float | None = None,
                      device="cpu") -> np.ndarray:
    """``lasso_fista`` in torch, on ``device`` (CPU or CUDA): the same iterations, float32."""
    import torch

    m, n = xs.shape
    dev = torch.device(device)
    x = torch.as_tensor(np.asarray(xs, np.float32), device=dev)
    y = torch.as_tensor(np.asarray(yc, np.float32), device=dev)
    lam_t = torch.as_tensor(np.broadcast_to(np.asarray(lam, np.float32), (yc.shape[1],)).copy(), device=dev)
    L = lipschitz or _lipschitz(np.asarray(xs, np.float32))
    step = 1.0 / L
    w = torch.zeros(n, yc.shape[1], device=dev) if w0 is None else torch.as_tensor(np.asarray(w0, np.float32),
                                                                                  device=dev).clone()
    z, t = w.clone(), 1.0
    xty = x.T @ y / m
    thresh = lam_t * step
    for it in range(max_iter):
        u = z - step * (x.T @ (x @ z) / m - xty)
        w_new = torch.sign(u) * torch.clamp(u.abs() - thresh, min=0)
        delta = w_new - w
        t_new = 0.5 * (1 + np.sqrt(1 + 4 * t * t))
        if float(((z - w_new) * delta).sum()) > 0:
            t_new, z = 1.0, w_new
        else:
            z = w_new + ((t - 1) / t_new) * delta
        w, t = w_new, t_new
        if it % 10 == 9 and float(delta.abs().max()) < tol * max(1.0, float(w.abs().max())):
            break
    return w.cpu().numpy()


def duality_gap(xs: np.ndarray, yc: np.ndarray, w: np.ndarray, lam) -> np.ndarray:
    """Relative duality gap per target (the certificate ``lasso_cd`` stops on), for any solver's W."""
    m = xs.shape[0]
    r = yc - xs @ w
    lam = np.broadcast_to(np.asarray(lam, np.float64), (yc.shape[1],))
    xr = np.abs(xs.T @ r).max(0) / m
    s = np.where(xr <= lam, 1.0, lam / np.maximum(xr, 1e-300))
    primal = 0.5 * (r * r).sum(0) / m + lam * np.abs(w).sum(0)
    dual = 0.5 * (yc * yc).sum(0) / m - 0.5 * ((yc - s * r) ** 2).sum(0) / m
    return np.where(primal > 0, (primal - dual) / np.maximum(primal, 1e-300), 0.0)


def lasso_reference(xs: np.ndarray, yc: np.ndarray, lam: np.ndarray, tol: float = 1e-10,
                    max_iter: int = 100_000) -> np.ndarray:
    """scikit-learn coordinate descent, one target at a time, same objective."""
    from sklearn.linear_model import Lasso

    lam = np.broadcast_to(np.asarray(lam, np.float64), (yc.shape[1],))
    out = np.zeros((xs.shape[1], yc.shape[1]))
    for t in range(yc.shape[1]):
        out[:, t] = Lasso(alpha=float(lam[t]), fit_intercept=False, tol=tol,
                          max_iter=max_iter).fit(xs, yc[:, t]).coef_
    return out


def objective(xs, yc, w, lam) -> np.ndarray:
    r = xs @ w - yc
    return 0.5 * (r * r).sum(0) / xs.shape[0] + np.asarray(lam) * np.abs(w).sum(0)


@dataclass
class DatamodelFit:
    weight: np.ndarray      # n x T, in the units of the raw 0/1 mask
    bias: np.ndarray        # T
    lam: np.ndarray         # T, chosen by validation
    val_mse: np.ndarray     # K x T, validation MSE along the path
    lambdas: np.ndarray     # K x T
    gap: np.ndarray = field(default=None)        # T, relative duality gap of the refit
    converged: np.ndarray = field(default=None)  # T, the refit (the weights returned) reached tol
    sweeps: np.ndarray = field(default=None)     # T, coordinate sweeps (full + active) in all


def _block_size(n: int, m: int, memory_mb: float) -> int:
    """Targets per block: the block's float64 weights, path state and targets within ``memory_mb``."""
    per_target = 8 * (3 * n + 4 * m)          # w, best w, refit w; y fit/val/all + residual
    return int(max(1, min(4096, memory_mb * 2**20 // per_target)))


def choose_solver(m: int, n: int) -> str:
    """``gram`` (``lasso_gram``) for many more models than examples (m >= 2n: well conditioned, and
    the n x n Gram is at most half the masks), where every coordinate step costs O(n) instead of
    O(m); ``cd`` for few models (every active set stays within the Newton step's reach, <= 64
    columns); ``fista`` in between, where active sets of hundreds of nearly dependent columns make
    coordinate descent crawl (measured: 340 s against a few for FISTA on the demo's 460 x 1438)."""
    if m >= 2 * n:
        return "gram"
    return "cd" if m <= 64 else "fista"


def _solve(xs, yc, lam, w0, tol, max_iter, solver, device="cpu", cache=None):
    """One lam per target for the block ``yc``; ``cache`` (a dict per block) keeps the Gram of ``xs``
    and X'yc/m across the path's calls."""
    if solver == "cd":
        return lasso_cd(xs, yc, lam, w0=w0, tol=tol)
    if solver == "gram":
        cache = {} if cache is None else cache
        if "gram" not in cache:
            cache["gram"] = gram_matrix(xs)
        if "xty" not in cache:
            cache["xty"] = (np.asarray(yc, np.float64).T @ xs) / xs.shape[0]
        return lasso_gram(xs, yc, lam, w0=w0, tol=tol, gram=cache["gram"], xty=cache["xty"])
    w = lasso_fista_torch(xs, yc, lam, w0=None if w0 is None else w0.astype(np.float32),
                          max_iter=max_iter, tol=1e-5, device=device).astype(np.float64)
    return w, duality_gap(xs, yc, w, lam), np.full(yc.shape[1], max_iter, np.int64)


def fit_datamodels(masks_fit: np.ndarray, y_fit: np.ndarray, masks_val: np.ndarray, y_val: np.ndarray,
                   n_lambdas: int = 20, eps: float = 1e-2, tol: float = 1e-6, memory_mb: float = 512,
                   on_step=None, solver: str = "auto",
                   max_iter: int = 300, device="cpu") -> DatamodelFit:
    """Regularization path on the fit models, lam per target by validation MSE, refit on both.

    Targets are fitted in blocks sized by ``memory_mb`` (the masks themselves are m x n and held
    once).
    ``on_step(done, total)`` is called after every lam of every block.  FISTA runs in torch on
    ``device`` (CPU or CUDA; ``solver: auto`` picks it on CUDA), coordinate descent in numba on the CPU.
    """
    y_fit, y_val = np.asarray(y_fit, np.float64), np.asarray(y_val, np.float64)
    T = y_fit.shape[1]
    xs, mean, std = standardize(masks_fit)
    xv = (np.asarray(masks_val, np.float64) - mean) / std
    x_all = np.concatenate([masks_fit, masks_val])
    xa, mean_a, std_a = standardize(x_all)
    y_all = np.concatenate([y_fit, y_val])
    m, n = xs.shape
    if solver == "auto":
        solver = "fista" if str(device).startswith("cuda") else choose_solver(len(x_all), n)
    if solver not in ("cd", "gram", "fista"):
        raise ValueError(f"unknown solver {solver!r}; choose auto, cd, gram or fista")
    factors = np.geomspace(1.0, eps, n_lambdas)
    weight = np.zeros((n, T), np.float32)
    bias = np.zeros(T)
    lam = np.zeros(T)
    lambdas = np.zeros((n_lambdas, T))
    val_mse = np.zeros((n_lambdas, T))
    gap = np.zeros(T)
    converged = np.ones(T, bool)
    sweeps = np.zeros(T, np.int64)
    bs = _block_size(n, len(x_all), memory_mb)
    blocks = [slice(b, min(T, b + bs)) for b in range(0, T, bs)]
    done, total = 0, len(blocks) * n_lambdas
    gram_fit, gram_all = {}, {}     # the Gram of each design, computed once for every block (solver gram)
    for blk in blocks:
        yf, yv = y_fit[:, blk], y_val[:, blk]
        ybar = yf.mean(0)
        yc = yf - ybar
        lam_max = np.abs(xs.T @ yc).max(0) / m + 1e-12
        lambdas[:, blk] = np.outer(factors, lam_max)
        w = None
        best_w = np.zeros((n, yc.shape[1]))
        gram_fit.pop("xty", None)     # X'yc/m is per block, the Gram is not
        for i, f in enumerate(factors):
            w, g, sw = _solve(xs, yc, lam_max * f, w, tol, max_iter, solver, device, gram_fit)
            sweeps[blk] += sw
            val_mse[i, blk] = ((xv @ w + ybar - yv) ** 2).mean(0)
            better = val_mse[i, blk] < val_mse[:i, blk].min(0) if i else np.ones(yc.shape[1], bool)
            best_w[:, better] = w[:, better]
            done += 1
            if on_step:
                on_step(done, total)
        best = val_mse[:, blk].argmin(0)
        lam[blk] = lam_max * factors[best]
        # refit on fit + validation models at the chosen lam (warm start: the chosen path solution)
        ya = y_all[:, blk]
        ybar_a = ya.mean(0)
        gram_all.pop("xty", None)
        wa, g, sw = _solve(xa, ya - ybar_a, lam[blk], best_w, tol, 2 * max_iter, solver, device, gram_all)
        gap[blk], sweeps[blk] = g, sweeps[blk] + sw
        converged[blk] &= g <= tol
        wr = wa / std_a[:, None]
        weight[:, blk] = wr
        bias[blk] = ybar_a - mean_a @ wr
    return DatamodelFit(weight=weight, bias=bias.astype(np.float32), lam=lam, val_mse=val_mse, lambdas=lambdas,
                        gap=gap, converged=converged, sweeps=sweeps)
