"""TRAK's gradient features within a memory budget: two projectors of the margin's gradient.

``dense``     φ(z) = Pᵀ ∇_θ f(z) with P a P x k Rademacher matrix (±1/√k) generated on the compute
              device in blocks of rows, block b from the generator seeded by (seed, b): never whole
              in memory unless it fits the budget (then it is generated once per checkpoint and
              kept on the device), never copied from the host.  Per-example gradients come from
              vmap in chunks sized from the budget.
``factored``  for every Linear and Conv2d layer, ∇_W f = Δᵀ A (A: the layer's input patches, Δ: the
              gradient at its output, summed over positions) is projected by P_out ⊗ P_in as
              (P_outᵀ Δᵀ)(A P_in): the input is projected by a convolution with k_in random filters,
              the output gradient by a k_out-column matrix, and the per-example outer products are
              summed over positions.  The full per-example gradient is never formed; Δ of every
              example comes out of one batched backward of Σ_i f(z_i) (eval mode: examples do not
              mix).  Biases and batch-norm scales/shifts are projected densely.
              (shared/reference/factored-projection.md; the LoGra idea.)

Both return [B, k] float32 and have a plain reference (``dense_reference``, ``factored_reference``)
built from the per-example gradient and the explicit matrices; tests check they agree.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kernels.conv_pool import unfused
from kernels.models import margin
from kernels.trak import _split, per_example_grads, per_example_grads_reference

PROJECTORS = ("dense", "factored")
BLOCK_ROWS = 8192


# ---------------------------------------------------------------- random matrices


def rademacher(rows: int, cols: int, seed: int, device) -> torch.Tensor:
    """A rows x cols matrix of ±1/√cols from a generator on ``device`` seeded by ``seed``."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(int(seed) % (2**63 - 1))
    signs = torch.randint(0, 2, (rows, cols), generator=gen, dtype=torch.int8, device=device)
    return (signs.to(torch.float32) * 2 - 1) / math.sqrt(cols)


def _block_seed(seed: int, block: int) -> int:
    return int(seed) * 1_000_003 + block


def dense_matrix_reference(p: int, k: int, seed: int, device="cpu", block_rows: int = BLOCK_ROWS) -> torch.Tensor:
    """The whole P x k matrix the dense projector applies (for tests and small models)."""
    return torch.cat([rademacher(min(p, s + block_rows) - s, k, _block_seed(seed, b), device)
                      for b, s in enumerate(range(0, p, block_rows))])


class DenseMatrix:
    """Pᵀ g for gradients g [B, P], P generated block by block on g's device; the blocks are kept
    (generated once) when P x k float32 fits ``cache_bytes``."""

    def __init__(self, p: int, k: int, seed: int, device, cache_bytes: float = 0, block_rows: int = BLOCK_ROWS):
        self.p, self.k, self.seed, self.device, self.block_rows = p, k, seed, torch.device(device), block_rows
        self.cache = [] if p * k * 4 <= cache_bytes else None

    def _block(self, b: int, start: int) -> torch.Tensor:
        rows = min(self.p, start + self.block_rows) - start
        if self.cache is None:
            return rademacher(rows, self.k, _block_seed(self.seed, b), self.device)
        if b == len(self.cache):
            self.cache.append(rademacher(rows, self.k, _block_seed(self.seed, b), self.device))
        return self.cache[b]

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(g.shape[0], self.k, dtype=torch.float32, device=g.device)
        for b, start in enumerate(range(0, self.p, self.block_rows)):
            out += g[:, start:start + self.block_rows].float() @ self._block(b, start)
        return out


# ---------------------------------------------------------------- chunk sizes from the budget


def _activation_numel(model: nn.Module, x1: torch.Tensor) -> int:
    """Elements of every leaf module's output for one example (a probe forward)."""
    total = [0]

    def hook(_m, _i, out):
        if torch.is_tensor(out):
            total[0] += out[0].numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model.eval()(x1[:1])
    finally:
        for h in handles:
            h.remove()
    return total[0] + x1[0].numel()


def chunk_size(bytes_per_example: float, memory_bytes: float, cap: int = 8192) -> int:
    return int(max(1, min(cap, memory_bytes // max(1.0, bytes_per_example))))


# ---------------------------------------------------------------- dense


class DenseProjector:
    """φ = Pᵀ ∇_θ f per example, in chunks whose per-example gradients fit half the budget."""

    kind = "dense"

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor], k: int, seed: int,
                 memory_bytes: float, device):
        self.model, self.params, self.k = model, params, k
        weights, _ = _split(model, params)
        self.p = sum(v.numel() for v in weights.values())
        self.matrix = DenseMatrix(self.p, k, seed, device, cache_bytes=memory_bytes / 4)
        self.memory_bytes = memory_bytes
        self._chunk = None

    def chunk(self, x: torch.Tensor) -> int:
        if self._chunk is None:
            acts = _activation_numel(copy.deepcopy(self.model), x)
            cached = self.p * self.k * 4 if self.matrix.cache is not None else 0
            per = 4 * (3 * self.p + 4 * acts + self.k)
            self._chunk = chunk_size(per, max(self.memory_bytes / 4, self.memory_bytes - cached) / 2)
        return self._chunk

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.chunk(x)
        return torch.cat([self.matrix(per_example_grads(self.model, self.params, x[i:i + c], y[i:i + c], chunk=c))
                          for i in range(0, len(x), c)]) if len(x) else torch.zeros(0, self.k)


def dense_reference(model, params, x, y, k: int, seed: int) -> torch.Tensor:
    g = per_example_grads_reference(model, params, x, y)
    return g @ dense_matrix_reference(g.shape[1], k, seed, g.device)


# ---------------------------------------------------------------- factored


FACTORED = (nn.Linear, nn.Conv2d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class LayerPlan:
    name: str          # module name in the model
    d_in: int          # Linear: in_features; Conv2d: c_in * kh * kw
    d_out: int
    k_in: int          # == d_in: identity (the input is not projected)
    k_out: int


@dataclass
class Plan:
    layers: list[LayerPlan]
    rest: list[str]        # parameter names projected densely (biases, norm parameters)
    p_rest: int
    k_rest: int            # columns of the dense part
    k: int

    @property
    def k_factored(self) -> int:
        return sum(lp.k_in * lp.k_out for lp in self.layers)


def plan_factored(model: nn.Module, k: int, allocation: str = "params") -> Plan:
    """Split k between the layers and a dense projection of the remaining parameters (at least
    min(P_rest, k/8) columns, plus whatever the layers leave over).  ``params``: each layer's
    k_in·k_out in proportion to its weight count (k_out ≈ √share, capped at d_out, k_in the rest,
    capped at d_in); ``uniform``: k_in = min(d_in, s), k_out = min(d_out, s) with the largest s that
    fits.  On Fashion-MNIST's small CNN at k = 1,024 (5 models) LDS was 0.314 with ``params`` and
    0.278 with ``uniform`` (dense 0.320, traker 0.310): the linear head, with d_out = 10, got only
    s·10 dims under ``uniform``.  Refuses modules whose parameters it cannot project."""
    layers, rest = [], []
    for name, m in model.named_modules():
        own = [n for n, _ in m.named_parameters(recurse=False)]
        if not own:
            continue
        if isinstance(m, FACTORED):
            if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
                raise ValueError(f"trak.projector: factored: layer {name!r} is a grouped or non-zero-padded "
                                 f"convolution; use trak.projector: dense")
            d_in = m.in_features if isinstance(m, nn.Linear) else m.in_channels * math.prod(m.kernel_size)
            d_out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            layers.append(LayerPlan(name, d_in, d_out, 0, 0))
            if m.bias is not None:
                rest.append(f"{name}.bias" if name else "bias")
        elif isinstance(m, NORMS) and m.affine and m.track_running_stats and set(own) <= {"weight", "bias"}:
            rest += [f"{name}.{n}" if name else n for n in own]
        else:
            raise ValueError(f"trak.projector: factored: module {name!r} ({type(m).__name__}) has parameters "
                             f"{own} that only Linear, Conv2d and batch-norm layers are projected for; "
                             f"use trak.projector: dense")
    params = dict(model.named_parameters())
    rest = [n for n in rest if params[n].requires_grad]
    p_rest = sum(params[n].numel() for n in rest)
    k_rest = min(p_rest, k // 8) if layers else min(p_rest, k)
    budget = k - k_rest

    def used(s):
        return sum(min(lp.d_in, s) * min(lp.d_out, s) for lp in layers)

    if layers and budget < len(layers):
        raise ValueError(f"trak.proj_dim: {k} is too small for the factored projector's {len(layers)} layers "
                         f"(needs at least {len(layers) + k_rest})")
    if allocation == "params":       # each layer's k_in * k_out in proportion to its weight count
        sizes = np.array([lp.d_in * lp.d_out for lp in layers], np.float64)
        shares = np.maximum(1, np.floor(budget * sizes / sizes.sum())).astype(int) if layers else []
        for lp, b in zip(layers, shares):
            lp.k_out = int(min(lp.d_out, max(1, round(np.sqrt(b)))))
            lp.k_in = int(min(lp.d_in, max(1, b // lp.k_out)))
        while sum(lp.k_in * lp.k_out for lp in layers) > budget:    # the floor of 1 per layer overshot
            big = max(layers, key=lambda lp: lp.k_in * lp.k_out)
            if big.k_in >= big.k_out:
                big.k_in -= 1
            else:
                big.k_out -= 1
        total = sum(lp.k_in * lp.k_out for lp in layers)
    else:                            # uniform: k_in = min(d_in, s), k_out = min(d_out, s), the largest s
        s = 0
        while layers and used(s + 1) <= budget and s < max(max(lp.d_in, lp.d_out) for lp in layers):
            s += 1
        for lp in layers:
            lp.k_in, lp.k_out = min(lp.d_in, s), min(lp.d_out, s)
        total = used(s)
    k_rest = min(p_rest, k - total)
    return Plan(layers, rest, p_rest, k_rest, k)


class FactoredProjector:
    """Kronecker-factored projection of the margin's gradient through layer hooks (see module doc)."""

    kind = "factored"

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor], k: int, seed: int,
                 memory_bytes: float, device, allocation: str = "params"):
        self.device = torch.device(device)
        self.plan = plan_factored(model, k, allocation)
        self.model = copy.deepcopy(model).to(self.device).eval()
        for m in self.model.modules():           # hooks read outputs that an in-place ReLU would overwrite
            if hasattr(m, "inplace"):
                m.inplace = False
        self.model.load_state_dict({kk: v.to(self.device) for kk, v in params.items()}, strict=False)
        for p in self.model.parameters():
            p.requires_grad_(False)
        if self.device.type == "cpu":            # oneDNN's channels-last convolutions and pooling are faster
            self.model = self.model.to(memory_format=torch.channels_last)
        self.k, self.seed, self.memory_bytes = k, seed, memory_bytes
        self.modules = dict(self.model.named_modules())
        self.p_in, self.p_out = {}, {}
        for i, lp in enumerate(self.plan.layers):
            if lp.k_in < lp.d_in:
                self.p_in[lp.name] = rademacher(lp.d_in, lp.k_in, _block_seed(seed, 2 * i + 1) + 7, self.device)
            if lp.k_out < lp.d_out:
                self.p_out[lp.name] = rademacher(lp.d_out, lp.k_out, _block_seed(seed, 2 * i + 2) + 7, self.device)
        self.rest_matrix = DenseMatrix(self.plan.p_rest, self.plan.k_rest, _block_seed(seed, 0) + 7, self.device,
                                       cache_bytes=float("inf")) if self.plan.k_rest else None
        self._chunk = None

    # per-layer pieces
    def _project_input(self, lp: LayerPlan, m: nn.Module, a: torch.Tensor) -> torch.Tensor:
        """(A P_in)ᵀ with positions last: [B, k_in, T]."""
        if isinstance(m, nn.Linear):
            a = a.reshape(a.shape[0], -1, lp.d_in)                            # [B, T, d_in]
            return (a @ self.p_in[lp.name] if lp.name in self.p_in else a).transpose(1, 2)
        # a convolution with k_in filters (identity filters where the input is not projected:
        # oneDNN's convolution is faster than unfolding the patches)
        p_in = self.p_in[lp.name] if lp.name in self.p_in else torch.eye(lp.d_in, device=a.device)
        w = p_in.T.reshape(lp.k_in, m.in_channels, *m.kernel_size)
        out = F.conv2d(a, w, None, m.stride, m.padding, m.dilation)            # [B, k_in, H', W']
        return out.flatten(2)

    def _project_output(self, lp: LayerPlan, m: nn.Module, d: torch.Tensor) -> torch.Tensor:
        """(Δ P_out)ᵀ with positions last: [B, k_out, T].  For a convolution, a 1x1 convolution with
        k_out filters: no copy of the output gradient into positions-major order."""
        if isinstance(m, nn.Linear):
            d = d.reshape(d.shape[0], -1, lp.d_out)
            return (d @ self.p_out[lp.name] if lp.name in self.p_out else d).transpose(1, 2)
        if lp.name in self.p_out:
            d = F.conv2d(d, self.p_out[lp.name].T.reshape(lp.k_out, lp.d_out, 1, 1))
        return d.flatten(2)                                                    # [B, k_out, T]

    def chunk(self, x: torch.Tensor) -> int:
        if self._chunk is None:
            acts = _activation_numel(self.model, x)
            extra = 0
            with torch.no_grad():       # positions per layer, for the projected factors
                pos = {}
                hs = [self.modules[lp.name].register_forward_hook(
                    lambda m, i, o, name=lp.name: pos.__setitem__(name, o[0].numel() // o.shape[1]))
                    for lp in self.plan.layers]
                try:
                    self.model(x[:1])
                finally:
                    for h in hs:
                        h.remove()
            for lp in self.plan.layers:
                extra += pos.get(lp.name, 1) * (lp.k_in + lp.k_out + (lp.d_in if lp.k_in == lp.d_in else 0))
            per = 4 * (4 * acts + 2 * extra + self.plan.p_rest + self.k)
            self._chunk = chunk_size(per, self.memory_bytes / 2)
        return self._chunk

    def _features(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        saved, grads, calls = {}, {}, {}
        handles = []

        def fwd(name):
            def hook(m, inputs, out):
                calls[name] = calls.get(name, 0) + 1
                key = (name, calls[name])
                saved[key] = inputs[0].detach()
                if not out.requires_grad:      # the first hooked layer: its output has no history (a
                    out.requires_grad_(True)   # leaf), so the graph starts there and the backward stops
                out.register_hook(lambda g, key=key: grads.__setitem__(key, g.detach()))   # at it, no copy
                return out
            return hook

        names = [lp.name for lp in self.plan.layers] + sorted({r.rsplit(".", 1)[0] for r in self.plan.rest
                                                              if isinstance(self.modules[r.rsplit(".", 1)[0]], NORMS)})
        order = {n: i for i, n in enumerate(nm for nm, _ in self.model.named_modules())}
        for name in sorted(names, key=order.get):
            handles.append(self.modules[name].register_forward_hook(fwd(name)))
        if self.device.type == "cpu" and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            with torch.enable_grad(), unfused():
                out = margin(self.model(x), y)
                out.sum().backward()
        finally:
            for h in handles:
                h.remove()
        parts = []
        for lp in self.plan.layers:
            m = self.modules[lp.name]
            keys = [kk for kk in saved if kk[0] == lp.name]
            if not keys:
                raise RuntimeError(f"factored projector: layer {lp.name!r} was not called in the forward pass")
            acc = None
            for kk in keys:
                a = self._project_input(lp, m, saved[kk])                 # [B, k_in, T]
                d = self._project_output(lp, m, grads[kk])                # [B, k_out, T]
                phi = torch.bmm(d, a.transpose(1, 2)).reshape(b, -1)     # [B, k_out * k_in]
                acc = phi if acc is None else acc + phi
            parts.append(acc)
        if self.rest_matrix is not None:
            parts.append(self.rest_matrix(self._rest_grads(saved, grads, b)))
        feats = torch.cat(parts, 1) if parts else torch.zeros(b, 0, device=x.device)
        if feats.shape[1] < self.k:              # the plan left columns no parameter fills
            feats = F.pad(feats, (0, self.k - feats.shape[1]))
        return feats

    def _rest_grads(self, saved, grads, b) -> torch.Tensor:
        """Per-example gradients of biases and batch-norm parameters, in ``plan.rest`` order."""
        cols = []
        for name in self.plan.rest:
            mod_name, pname = name.rsplit(".", 1) if "." in name else ("", name)
            m = self.modules[mod_name]
            g = 0
            for kk in [kk for kk in saved if kk[0] == mod_name]:
                d = grads[kk]
                if isinstance(m, FACTORED):                           # bias: Δ summed over positions
                    g = g + (d.reshape(b, -1, m.out_features).sum(1) if isinstance(m, nn.Linear)
                             else d.flatten(2).sum(2))
                else:                                                 # batch norm in eval mode
                    x = saved[kk]
                    shape = (1, -1) + (1,) * (x.ndim - 2)
                    xhat = (x - m.running_mean.reshape(shape)) / torch.sqrt(m.running_var.reshape(shape) + m.eps)
                    red = tuple(range(2, x.ndim))
                    g = g + ((d * xhat).sum(red) if pname == "weight" else d.sum(red))
            cols.append(g)
        return torch.cat(cols, 1)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.chunk(x)
        return torch.cat([self._features(x[i:i + c], y[i:i + c]) for i in range(0, len(x), c)]) \
            if len(x) else torch.zeros(0, self.k)


def factored_reference(model: nn.Module, params: dict[str, torch.Tensor], x, y, k: int, seed: int) -> torch.Tensor:
    """Per-example gradients by an autograd loop, each layer's weight gradient (reshaped to
    d_out x d_in) multiplied by the explicit Kronecker product P_out ⊗ P_in, the rest by the
    explicit dense matrix; the same plan and seeds as FactoredProjector."""
    fp = FactoredProjector(model, params, k, seed, memory_bytes=1e9, device="cpu")
    m = copy.deepcopy(model).eval()
    for mod in m.modules():
        if hasattr(mod, "inplace"):
            mod.inplace = False
    m.load_state_dict({kk: v.clone() for kk, v in params.items()}, strict=False)
    named = dict(m.named_parameters())
    rows = []
    for xi, yi in zip(x, y):
        m.zero_grad()
        margin(m(xi.unsqueeze(0)), yi.unsqueeze(0)).sum().backward()
        parts = []
        for lp in fp.plan.layers:
            g = named[f"{lp.name}.weight" if lp.name else "weight"].grad.reshape(lp.d_out, lp.d_in).double()
            p_in = fp.p_in[lp.name].double() if lp.name in fp.p_in else torch.eye(lp.d_in, dtype=torch.float64)
            p_out = fp.p_out[lp.name].double() if lp.name in fp.p_out else torch.eye(lp.d_out, dtype=torch.float64)
            kron = torch.kron(p_out, p_in)                     # (d_out d_in) x (k_out k_in)
            parts.append(g.reshape(-1) @ kron)
        if fp.plan.k_rest:
            g = torch.cat([named[n].grad.reshape(-1) for n in fp.plan.rest]).double()
            parts.append(g @ dense_matrix_reference(fp.plan.p_rest, fp.plan.k_rest, _block_seed(seed, 0) + 7).double())
        v = torch.cat(parts)
        rows.append(F.pad(v, (0, k - len(v))))
    return torch.stack(rows).float()


def make_projector(kind: str, model: nn.Module, params: dict[str, torch.Tensor], k: int, seed: int,
                   memory_bytes: float, device, allocation: str = "params"):
    if kind == "dense":
        return DenseProjector(model, params, k, seed, memory_bytes, device)
    if kind == "factored":
        return FactoredProjector(model, params, k, seed, memory_bytes, device, allocation)
    raise ValueError(f"trak.projector: {kind!r} is not one of {PROJECTORS}")


@torch.no_grad()
def batched_out_to_loss(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                        batch: int) -> torch.Tensor:
    """Q = sigmoid(-margin) per example, forward passes of ``batch`` examples at a time."""
    m = copy.deepcopy(model).to(x.device).eval()
    m.load_state_dict(params, strict=False)
    return torch.cat([torch.sigmoid(-margin(m(x[i:i + batch]), y[i:i + batch])) for i in range(0, len(x), batch)]) \
        if len(x) else torch.zeros(0)

