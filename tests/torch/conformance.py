#!/usr/bin/env python3
"""PyTorch conformance suite for the bnorm C API (driven through python/bnorm_ctypes.py).

Each random configuration (seeded; rerun one with --only SEED) builds a torch.nn.BatchNorm1d/2d/3d
module and the same state for the library, then runs several training steps and one eval step
with fresh inputs, comparing after each step:
  y, save_mean, save_invstd, running_mean, running_var, num_batches_tracked (exact),
  dx, dweight, dbias.
The oracle is PyTorch on the CPU: the module and autograd give y, the running statistics,
num_batches_tracked and the gradients; torch.ops.aten.native_batch_norm on clones of the
pre-step buffers gives save_mean / save_invstd (what the module's forward computed internally).
Inputs are x = offset_c + scale_c * randn with per-channel offsets up to 1e3, in both memory
layouts: channels_last is torch.channels_last (4-D), torch.channels_last_3d (5-D), and
x.transpose(1, 2).contiguous().transpose(1, 2) for 3-D (N, C, L); for (N, C) both are one memory.
The torch tensor's strides are checked to be those of the array given to the library.

Tolerances: derivation
======================
u = 2^-24 (fp32 unit roundoff).  Neither PyTorch nor the library is exact, so each output is
compared with  |lib - torch| <= 2 * B,  where B bounds |computed - exact| for ANY fp32
implementation of the same formulas whose reductions are no worse than a sequential fp32
summation (B for torch + B for the library; the exact values are computed here in float64 from
the same fp32 inputs).  PyTorch 1.13's channels-last and (N, C) statistics are such a
sequential fp32 sum (a per-thread float buffer), its other paths accumulate in double, so both
sides fit the model.  With the default 1000 seeds torch stays below 0.76 B on every output.
The suite also measures |torch - exact| / B and reports its maximum: a value > 1 means the model
itself is wrong and counts as a failure.

Per channel, n = N * prod(spatial) is the reduction length.
 (R) A sum of n fp32 terms t_i: worst case |err| <= (n-1) u sum|t_i|.  When the rounding
     errors behave as independent and uniform in [-u, u] relative to the partial sum (std
     u/sqrt(3)), the worst data (terms of one sign: partial sums grow linearly) give
     std ~ u sqrt(n)/3 * sum|t_i|.  They do when the terms' low-order bits are random at the
     scale of the accumulator's ulp, which we require as: spread of the terms (their std)
     > 4 u n mean|t| (two ulps of the largest partial sum).  Otherwise (e.g. a constant
     channel: the same rounding repeats, measured at ~9 sqrt(n) u for torch's channels-last
     sum) the errors are correlated and only the worst case holds.  So, per channel and sum:
        err <= K u sum|t_i|,  K = min(n - 1, 3 sqrt(n)) if the terms are noisy, else n - 1
     (3 sqrt(n): ~9 standard deviations).  K_x, K_v (max of K_x and that of (x - mu)^2),
     K_g (dy), K_d ((x - mu) dy) below are this K for the sums of x, (x - m~)^2, dy, (x - m~) dy.
 (M) mean:  E_m = u (K_x mean|x| + 2 |mu|)                     (sum, the division, the fp32 store)
 (V) biased variance from (x - m~)^2 with the computed mean m~ = mu + dm:
        sum (x - m~)^2 / n = var + dm^2 exactly, each term carries 3u (subtract, square),
        the sum K_v u, divide and store 2u:
        dV = E_m^2 + (K_v + 5) u (var + E_m^2)
 (I) invstd r = (var + eps)^-1/2:  with q = dV / (var + eps) (exact, not linearized),
        e_r = max(1 - (1 + q)^-1/2, min((1 - q)^-1/2 - 1, ((var + eps)/eps)^1/2 - 1)) + 3u
     (relative; the last 3u: add eps, sqrt, divide/store; the cap: a computed var is >= 0)
 (Y) y = gamma (x - mu) r + beta, computed e.g. as x*alpha + (beta - m~*alpha):
        B_y = |gamma| r (|x - mu| e_r + E_m (1 + e_r)) + u (3 (|x| + |mu|) |gamma| r
              + 2 (|beta| + |y|))
     the u |x| |gamma| r term is the cancellation of x*alpha against m~*alpha (offsets!).
 (S) save_mean: B = E_m;  save_invstd: B = r e_r.
 (U) running update with factor f (momentum, or 1/num_batches_tracked for momentum=None; f is
     rounded to fp32 by torch: u f) from a buffer value p:
        running_mean: B = f E_m + u f |mu - p| + 3u (|(1-f) p| + |f mu|)
        running_var (unbiased v' = var n/(n-1), dV' = dV n/(n-1) + 2u v'):
                      B = f dV' + u f |v' - p| + 3u (|(1-f) p| + |f v'|)
     Library and torch each keep their own buffers over the steps, so the allowed difference
     is carried:  T_t = (1 - f)(1 + 2u) T_{t-1} + 2 B  (T_0 = 0: both start bit-identical).
 (G) training backward with g = dy, Sg = sum g, D = sum (x - mu) g, xh-term t = (x - mu) r^2 D/n:
        dbias:    B = u (K_g sum|g| + |Sg|)
        rho = (K_d + 2) u (sum |x - mu||g| + E_m sum|g|)          (error of the computed D)
        dweight:  B = r (1 + e_r)(rho + E_m |Sg|) + |D| r (e_r + 2u)
        dx = gamma r (g - Sg/n - t):
          d(Sg/n) = u (K_g sum|g| / n + 2 |Sg/n|)
          dt = |x - mu| r^2 |D| ((1 + e_r)^2 - 1 + 3u) / n
               + r^2 (1 + e_r)^2 (|x - mu| E_m |Sg| + E_m |D| + |x - mu| rho + E_m rho
                                  + E_m^2 |Sg|) / n       (the computed mean enters twice)
          B = |gamma| r (1 + e_r) (d(Sg/n) + dt + 2u (|g| + |Sg/n| + |t|)) + |dx| (e_r + 2u)
 (E) eval (statistics constant: mu = running_mean, r = (running_var + eps)^-1/2, the same fp32
     buffers are given to both; the library gets torch's buffers for this step):
        y:  B = u (4 |x - mu| r |gamma| + 2 (|x| + |mu|) r |gamma| + 2 (|beta| + |y|))
        dx: B = 5u |dx|       dweight: B = (K_d + 2) u r sum|x - mu||g| + 4u |dweight|
        dbias as (G).  (track_running_stats=False: eval uses batch statistics, rules above.)
 num_batches_tracked must be equal.  A NaN where torch has a number (or the reverse) fails.

Output: one line per failing configuration (seed, config, worst ratio per output), then the
largest error against PyTorch per output (absolute, and relative to the tolerance), and the
closing line "N passed, M failed".  After the fp32 configurations, half_conformance.py's bf16
and fp16 configurations run (the *_dt entry points against float64 and, for bf16, torch's
native_batch_norm; --half-count, its docstring says how) and are counted in the same line.
Exit 0 iff all passed; 77 (skip) without numpy/torch; a library that cannot be loaded is a
failure (exit 1).
"""

import argparse
import math
import os
import sys
import time

try:
    import numpy as np
    import torch
except ImportError:
    print("skipped: python3-torch not installed")
    sys.exit(77)

# Find bnorm_ctypes when PYTHONPATH does not name <repo>/python (ctest sets it).
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
import bnorm_ctypes as bn  # noqa: E402

U = 2.0 ** -24
LAMBDA = 3.0
TINY = 1e-35  # a zero tolerance only admits a zero difference
OUTPUTS = ["y", "save_mean", "save_invstd", "running_mean", "running_var",
           "num_batches_tracked", "dx", "dweight", "dbias"]
NUMEL_CAP = 200_000


def K(terms):
    """Per-channel summation factor K for the terms (N, C, S) of a per-channel sum: see (R)."""
    n = terms.shape[0] * terms.shape[2]
    spread = terms.std(axis=(0, 2))
    noisy = spread > 4.0 * U * n * np.abs(terms).mean(axis=(0, 2))
    return np.where(noisy, min(n - 1.0, LAMBDA * math.sqrt(n)), n - 1.0)


# ----------------------------------------------------------------------------- layouts

def to_torch_layout(t, layout):
    """t: contiguous torch tensor (N, C, *spatial); the tensor in the layout's memory format."""
    if layout == bn.CHANNELS_FIRST or t.dim() == 2:
        return t.contiguous()
    if t.dim() == 3:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous(memory_format=torch.channels_last_3d)


def to_numpy_layout(a, layout):
    """a: C-contiguous float32 logical array; a logical view whose memory is in the layout."""
    if layout == bn.CHANNELS_FIRST:
        return np.ascontiguousarray(a)
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


def same_memory_order(t, a):
    """The torch tensor and the numpy array have the same strides (ignoring size-1 dims)."""
    ts = t.stride()
    ns = tuple(s // a.itemsize for s in a.strides)
    return all(d == 1 or x == y for d, x, y in zip(a.shape, ts, ns))


def same_strides(a, b):
    """Equal shapes and equal strides on every axis of extent > 1."""
    return a.shape == b.shape and all(d == 1 or x == y
                                      for d, x, y in zip(a.shape, a.strides, b.strides))


def logical64(a, n, c, s):
    """(N, C, S) float64 copy of an (N, C, *spatial) array or tensor."""
    if isinstance(a, torch.Tensor):
        a = a.detach().numpy()
    return np.asarray(a, dtype=np.float64).reshape(n, c, s)


# ----------------------------------------------------------------------------- configurations

class Config:
    def __init__(self, seed):
        self.seed = seed
        rng = np.random.default_rng(seed)
        self.rank = int(rng.integers(2, 6))
        self.layout = bn.CHANNELS_LAST if rng.random() < 0.5 else bn.CHANNELS_FIRST
        n = int(rng.integers(2, 65))
        c = int(rng.integers(1, 68)) if rng.random() < 0.7 else int(rng.integers(1, 5))
        max_sp = {3: 255, 4: 31, 5: 15}.get(self.rank, 1)
        sp = [int(2 * rng.integers(0, (max_sp + 1) // 2) + 1) for _ in range(self.rank - 2)]
        budget = int(math.exp(rng.uniform(math.log(256), math.log(NUMEL_CAP))))
        while n * c * int(np.prod(sp)) > budget:
            cands = [("n", n)] if n > 2 else []
            cands += [(i, d) for i, d in enumerate(sp) if d > 1]
            if not cands:
                if c == 1:
                    break
                c = max(1, int(c * 0.8))
                continue
            which, _ = max(cands, key=lambda kv: kv[1])
            if which == "n":
                n = max(2, int(n * 0.8))
            else:
                sp[which] -= 2
        self.shape = (n, c) + tuple(sp)
        self.n, self.c, self.s = n, c, int(np.prod(sp)) if sp else 1
        self.affine = bool(rng.random() < 0.7)
        self.track = bool(rng.random() < 0.7)
        self.momentum = 0.1 if rng.random() < 0.5 else None
        self.eps = float(rng.choice([1e-5, 1e-5, 1e-3, 0.1]))
        self.steps = int(rng.integers(1, 4))
        self.offset = float(rng.choice([0.0, 1.0, 10.0, 100.0, 1000.0]))
        self.inplace = bool(rng.random() < 0.2)
        self.offsets = rng.uniform(-self.offset, self.offset, c)
        self.scales = np.exp(rng.uniform(math.log(0.1), math.log(10.0), c))
        if c > 1 and rng.random() < 0.1:
            self.scales[int(rng.integers(0, c))] = 0.0  # a constant channel: var = 0
        self.gscale = float(np.exp(rng.uniform(math.log(0.01), math.log(100.0))))
        self.goffset = float(rng.choice([0.0, 0.0, 3.0])) * self.gscale
        self.weight = (rng.normal(1.0, 0.5, c)).astype(np.float32)
        self.bias = rng.normal(0.0, 1.0, c).astype(np.float32)
        self.rm0 = (rng.normal(0.0, 1.0, c) * max(self.offset, 1.0)).astype(np.float32)
        self.rv0 = rng.uniform(0.1, 3.0, c).astype(np.float32)
        self.nbt0 = int(rng.integers(0, 6))
        self.rng = rng  # continues: the batches

    def batch(self):
        """A fresh (x, dy) as C-contiguous float32 logical arrays."""
        rng = self.rng
        bshape = (1, self.c) + (1,) * (self.rank - 2)
        x = (self.offsets.reshape(bshape)
             + self.scales.reshape(bshape) * rng.standard_normal(self.shape))
        dy = self.goffset + self.gscale * rng.standard_normal(self.shape)
        return x.astype(np.float32), dy.astype(np.float32)

    def describe(self):
        return ("rank=%d layout=%s shape=%s affine=%d track=%d momentum=%s eps=%g steps=%d "
                "offset=%g inplace=%d" % (self.rank, self.layout, list(self.shape), self.affine,
                                          self.track, self.momentum, self.eps, self.steps,
                                          self.offset, self.inplace))


# ----------------------------------------------------------------------------- bounds

def train_bounds(X, G, gam, bet, eps):
    """Exact values and single-implementation bounds B for a batch-statistics step.
    X, G: (N, C, S) float64.  Returns dict name -> (exact, B)."""
    n = X.shape[0] * X.shape[2]
    kx = K(X)
    mu = X.mean(axis=(0, 2))
    d = X - mu[None, :, None]
    var = (d * d).mean(axis=(0, 2))
    kv = np.maximum(kx, K(d * d))
    r = 1.0 / np.sqrt(var + eps)
    Em = U * (kx * np.abs(X).mean(axis=(0, 2)) + 2.0 * np.abs(mu))
    dV = Em ** 2 + (kv + 5.0) * U * (var + Em ** 2)
    q = dV / (var + eps)
    # r~ in [r (1+q)^-1/2, r (1-q)^-1/2]; a computed var is >= 0, so r~ <= eps^-1/2 caps the
    # upward side even when dV >= var + eps.
    e_down = 1.0 - 1.0 / np.sqrt(1.0 + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        e_up = np.where(q < 1.0, 1.0 / np.sqrt(np.maximum(1.0 - q, 0.0)) - 1.0, np.inf)
    e_up = np.minimum(e_up, np.sqrt((var + eps) / eps) - 1.0)
    e_r = np.maximum(e_down, e_up) + 3 * U
    gc, bc, rc, Emc, erc = (v[None, :, None] for v in (gam, bet, r, Em, e_r))
    ad = np.abs(d)
    y = d * (rc * gc) + bc
    By = (np.abs(gc) * rc * (ad * erc + Emc * (1.0 + erc))
          + U * (3.0 * (np.abs(X) + np.abs(mu)[None, :, None]) * np.abs(gc) * rc
                 + 2.0 * (np.abs(bc) + np.abs(y))))
    out = {"y": (y, By), "save_mean": (mu, Em), "save_invstd": (r, r * e_r),
           "_stats": (mu, var, Em, dV, n)}
    if G is not None:
        Sg = G.sum(axis=(0, 2))
        D = (d * G).sum(axis=(0, 2))
        Ag = np.abs(G).sum(axis=(0, 2))
        Adg = (ad * np.abs(G)).sum(axis=(0, 2))
        kg, kd = K(G), K(d * G)
        rho = (kd + 2.0) * U * (Adg + Em * Ag)
        gm = Sg / n
        dgm = U * (kg * Ag / n + 2.0 * np.abs(gm))
        Sgc, Dc, rhoc, gmc, dgmc = (v[None, :, None] for v in (Sg, D, rho, gm, dgm))
        t = d * (rc ** 2 * Dc / n)
        er2 = (1.0 + erc) ** 2 - 1.0 + 3 * U
        dt = (ad * rc ** 2 * np.abs(Dc) * er2 / n
              + rc ** 2 * (1.0 + erc) ** 2 * (ad * Emc * np.abs(Sgc) + Emc * np.abs(Dc)
                                              + ad * rhoc + Emc * rhoc
                                              + Emc ** 2 * np.abs(Sgc)) / n)
        dx = (G - gmc - t) * (rc * gc)
        Bdx = (np.abs(gc) * rc * (1.0 + erc) * (dgmc + dt + 2 * U * (np.abs(G) + np.abs(gmc)
                                                                    + np.abs(t)))
               + np.abs(dx) * (erc + 2 * U))
        out["dx"] = (dx, Bdx)
        out["dweight"] = (D * r, r * (1.0 + e_r) * (rho + Em * np.abs(Sg))
                          + np.abs(D) * r * (e_r + 2 * U))
        out["dbias"] = (Sg, U * (kg * Ag + np.abs(Sg)))
    return out


def running_bounds(stats, f, p_mean, p_var):
    """Exact running update from previous buffers p_* (float64) and the single-implementation
    bounds.  Returns (exact_mean, B_mean, exact_var, B_var)."""
    mu, var, Em, dV, n = stats
    unb = var * n / (n - 1.0)
    dunb = dV * n / (n - 1.0) + 2 * U * unb
    em = (1.0 - f) * p_mean + f * mu
    ev = (1.0 - f) * p_var + f * unb
    bm = f * Em + U * f * np.abs(mu - p_mean) + 3 * U * (np.abs((1 - f) * p_mean) + np.abs(f * mu))
    bv = f * dunb + U * f * np.abs(unb - p_var) + 3 * U * (np.abs((1 - f) * p_var) + np.abs(f * unb))
    return em, bm, ev, bv


def eval_bounds(X, G, gam, bet, rm, rv, eps):
    r = 1.0 / np.sqrt(rv + eps)
    gc, bc, rc, mc = (v[None, :, None] for v in (gam, bet, r, rm))
    d = X - mc
    ad = np.abs(d)
    y = d * rc * gc + bc
    By = U * (4 * ad * rc * np.abs(gc) + 2 * (np.abs(X) + np.abs(mc)) * rc * np.abs(gc)
              + 2 * (np.abs(bc) + np.abs(y)))
    dx = G * rc * gc
    D = (d * G).sum(axis=(0, 2))
    Adg = (ad * np.abs(G)).sum(axis=(0, 2))
    Sg = G.sum(axis=(0, 2))
    Ag = np.abs(G).sum(axis=(0, 2))
    kd, kg = K(d * G), K(G)
    return {"y": (y, By), "dx": (dx, 5 * U * np.abs(dx)),
            "dweight": (D * r, (kd + 2) * U * r * Adg + 4 * U * np.abs(D * r)),
            "dbias": (Sg, U * (kg * Ag + np.abs(Sg)))}


# ----------------------------------------------------------------------------- comparison

class Stats:
    """Worst values per output over the run (or over one configuration)."""

    def __init__(self):
        self.abs = {k: 0.0 for k in OUTPUTS}     # max |lib - torch|
        self.ratio = {k: 0.0 for k in OUTPUTS}   # max |lib - torch| / (2B)
        self.t_ex = {k: 0.0 for k in OUTPUTS}    # max |torch - exact| / B
        self.l_ex = {k: 0.0 for k in OUTPUTS}    # max |lib - exact| / B
        self.where = {}

    def merge(self, other):
        for k in OUTPUTS:
            for name in ("abs", "ratio", "t_ex", "l_ex"):
                mine, theirs = getattr(self, name), getattr(other, name)
                if theirs[k] > mine[k] or (math.isnan(theirs[k]) and not math.isnan(mine[k])):
                    mine[k] = theirs[k]
                    if name == "ratio":
                        self.where[k] = other.where.get(k)


def _ratio(diff, tol):
    with np.errstate(divide="ignore", invalid="ignore"):
        r = diff / tol
    r = np.where(np.isnan(diff), np.inf, r)
    return float(np.max(r)) if r.size else 0.0


def compare(st, name, lib, tor, exact, B, tol=None, label="", lib_exact=None):
    """Record |lib - torch| against tol (default 2B) and both sides against exact with B
    (lib_exact: the library's own exact value when it differs from torch's, e.g. running
    stats updated from the library's own previous buffers)."""
    lib = np.asarray(lib, dtype=np.float64)
    tor = np.asarray(tor, dtype=np.float64)
    exact = np.asarray(exact, dtype=np.float64)
    lib_exact = exact if lib_exact is None else np.asarray(lib_exact, dtype=np.float64)
    if tol is None:
        tol = 2.0 * B
    both_nan = np.isnan(lib) & np.isnan(tor)
    diff = np.where(both_nan, 0.0, np.abs(lib - tor))
    ratio = _ratio(diff, tol + TINY)
    absd = float(np.max(np.where(np.isnan(diff), np.inf, diff))) if diff.size else 0.0
    if ratio > st.ratio[name] or math.isnan(st.ratio[name]):
        st.ratio[name] = ratio
        st.where[name] = label
    st.abs[name] = max(st.abs[name], absd)
    st.t_ex[name] = max(st.t_ex[name], _ratio(np.abs(tor - exact), B + TINY))
    st.l_ex[name] = max(st.l_ex[name], _ratio(np.abs(lib - lib_exact), B + TINY))


def copy_in_layout(a, layout):
    if layout == bn.CHANNELS_FIRST:
        return np.array(a, order="C", copy=True)
    return np.moveaxis(np.moveaxis(a, 1, -1).copy(order="C"), -1, 1)


# ----------------------------------------------------------------------------- one configuration

def run_config(cfg):
    """Returns (Stats, list of problems)."""
    st = Stats()
    problems = []
    C, n, s = cfg.c, cfg.n, cfg.s
    mod_cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
               5: torch.nn.BatchNorm3d}[cfg.rank]
    m = mod_cls(C, eps=cfg.eps, momentum=cfg.momentum, affine=cfg.affine,
                track_running_stats=cfg.track)
    w_np = cfg.weight if cfg.affine else None
    b_np = cfg.bias if cfg.affine else None
    gam = cfg.weight.astype(np.float64) if cfg.affine else np.ones(C)
    bet = cfg.bias.astype(np.float64) if cfg.affine else np.zeros(C)
    with torch.no_grad():
        if cfg.affine:
            m.weight.copy_(torch.from_numpy(cfg.weight))
            m.bias.copy_(torch.from_numpy(cfg.bias))
        if cfg.track:
            m.running_mean.copy_(torch.from_numpy(cfg.rm0))
            m.running_var.copy_(torch.from_numpy(cfg.rv0))
            m.num_batches_tracked.fill_(cfg.nbt0)
    if cfg.track:
        rm_l, rv_l = cfg.rm0.copy(), cfg.rv0.copy()
        nbt_l = np.array([cfg.nbt0], dtype=np.int64)
    else:
        rm_l = rv_l = nbt_l = None
    T_rm = np.zeros(C)
    T_rv = np.zeros(C)

    for step in range(cfg.steps + 1):
        training = step < cfg.steps
        label = ("train#%d" % (step + 1)) if training else "eval"
        x32, dy32 = cfg.batch()
        x_np = to_numpy_layout(x32, cfg.layout)
        dy_np = to_numpy_layout(dy32, cfg.layout)
        xt = to_torch_layout(torch.from_numpy(x32), cfg.layout).detach().requires_grad_(True)
        dyt = to_torch_layout(torch.from_numpy(dy32), cfg.layout)
        if not (same_memory_order(xt, x_np) and same_memory_order(dyt, dy_np)):
            problems.append("%s: torch strides %s != numpy strides %s"
                            % (label, xt.stride(), x_np.strides))
        X = x32.astype(np.float64).reshape(n, C, s)
        G = dy32.astype(np.float64).reshape(n, C, s)

        # --- torch
        m.train(training)
        if cfg.affine:
            m.weight.grad = None
            m.bias.grad = None
        batch_stats = training or not cfg.track
        if cfg.track:
            p_mean = m.running_mean.detach().clone()
            p_var = m.running_var.detach().clone()
            p_nbt = int(m.num_batches_tracked.item())
            lp_mean = rm_l.astype(np.float64)
            lp_var = rv_l.astype(np.float64)
        if batch_stats:
            if cfg.track and training:
                f = 1.0 / (p_nbt + 1) if cfg.momentum is None else cfg.momentum
                rmc, rvc = p_mean.clone(), p_var.clone()
            else:
                f, rmc, rvc = 0.0, None, None
            with torch.no_grad():
                wt = m.weight.detach() if cfg.affine else None
                bt = m.bias.detach() if cfg.affine else None
                _, t_smean, t_sinvstd = torch.ops.aten.native_batch_norm(
                    xt.detach(), wt, bt, rmc, rvc, True, f, cfg.eps)
        yt = m(xt)
        yt.backward(dyt)
        t_y = logical64(yt, n, C, s)
        t_dx = logical64(xt.grad, n, C, s)
        t_dw = m.weight.grad.numpy().astype(np.float64) if cfg.affine else None
        t_db = m.bias.grad.numpy().astype(np.float64) if cfg.affine else None

        # --- library
        x_in = copy_in_layout(x_np, cfg.layout) if cfg.inplace else x_np
        if batch_stats:
            y_l, sm_l, si_l = bn.forward_train(
                x_in, w_np, b_np, rm_l if training else None, rv_l if training else None,
                nbt_l if training else None, cfg.momentum, cfg.eps, layout=cfg.layout,
                out=x_in if cfg.inplace else None)
            dy_in = copy_in_layout(dy_np, cfg.layout) if cfg.inplace else dy_np
            dx_l, dw_l, db_l = bn.backward(dy_in, x_np, w_np, sm_l, si_l, eps=cfg.eps,
                                           training=True, layout=cfg.layout,
                                           out=dy_in if cfg.inplace else None)
        else:
            # eval with running statistics: the library gets torch's buffers (isolates this step)
            e_rm = p_mean.numpy().copy()
            e_rv = p_var.numpy().copy()
            y_l = bn.forward_eval(x_in, w_np, b_np, e_rm, e_rv, cfg.eps, layout=cfg.layout,
                                  out=x_in if cfg.inplace else None)
            dy_in = copy_in_layout(dy_np, cfg.layout) if cfg.inplace else dy_np
            dx_l, dw_l, db_l = bn.backward(dy_in, x_np, w_np, None, None, e_rm, e_rv,
                                           eps=cfg.eps, training=False, layout=cfg.layout,
                                           out=dy_in if cfg.inplace else None)
        if not (same_strides(y_l, x_np) and same_strides(dx_l, dy_np)):
            problems.append("%s: output strides differ from the input's" % label)
        L_y = logical64(y_l, n, C, s)
        L_dx = logical64(dx_l, n, C, s)

        # --- compare
        if batch_stats:
            ref = train_bounds(X, G, gam, bet, cfg.eps)
            compare(st, "y", L_y, t_y, *ref["y"], label=label)
            compare(st, "save_mean", sm_l, t_smean.numpy(), *ref["save_mean"], label=label)
            compare(st, "save_invstd", si_l, t_sinvstd.numpy(), *ref["save_invstd"], label=label)
        else:
            ref = eval_bounds(X, G, gam, bet, p_mean.numpy().astype(np.float64),
                              p_var.numpy().astype(np.float64), cfg.eps)
            compare(st, "y", L_y, t_y, *ref["y"], label=label)
        compare(st, "dx", L_dx, t_dx, *ref["dx"], label=label)
        if cfg.affine:
            compare(st, "dweight", dw_l, t_dw, *ref["dweight"], label=label)
            compare(st, "dbias", db_l, t_db, *ref["dbias"], label=label)

        if cfg.track:
            t_rm = m.running_mean.detach().numpy().astype(np.float64)
            t_rv = m.running_var.detach().numpy().astype(np.float64)
            t_nbt = int(m.num_batches_tracked.item())
            if training:
                pm = p_mean.numpy().astype(np.float64)
                pv = p_var.numpy().astype(np.float64)
                em_t, bm_t, ev_t, bv_t = running_bounds(ref["_stats"], f, pm, pv)
                em_l, _, ev_l, _ = running_bounds(ref["_stats"], f, lp_mean, lp_var)
                T_rm = (1.0 - f) * (1.0 + 2 * U) * T_rm + 2.0 * bm_t
                T_rv = (1.0 - f) * (1.0 + 2 * U) * T_rv + 2.0 * bv_t
                compare(st, "running_mean", rm_l, t_rm, em_t, bm_t, tol=T_rm, label=label,
                        lib_exact=em_l)
                compare(st, "running_var", rv_l, t_rv, ev_t, bv_t, tol=T_rv, label=label,
                        lib_exact=ev_l)
            else:
                # eval: nothing may change (the library was given copies; its own stay put)
                compare(st, "running_mean", rm_l, t_rm, t_rm, np.zeros(C), tol=T_rm, label=label,
                        lib_exact=lp_mean)
                compare(st, "running_var", rv_l, t_rv, t_rv, np.zeros(C), tol=T_rv, label=label,
                        lib_exact=lp_var)
                if not np.array_equal(t_rm, p_mean.numpy()) or not np.array_equal(t_rv, p_var.numpy()):
                    problems.append("eval: torch changed its running stats (test bug)")
            if int(nbt_l[0]) != t_nbt:
                st.ratio["num_batches_tracked"] = math.inf
                st.where["num_batches_tracked"] = label
                st.abs["num_batches_tracked"] = max(st.abs["num_batches_tracked"],
                                                    abs(int(nbt_l[0]) - t_nbt))
    return st, problems


# ----------------------------------------------------------------------------- bad inputs

def bad_input_checks():
    """Returns a list of (name, problem or None)."""
    results = []
    L = bn.lib()

    def ptr(a):
        return None if a is None else a.ctypes.data

    def sentinel(shape, start):
        return (np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) * 0.25 + start)

    def check(name, fn):
        try:
            problem = fn()
        except Exception as e:  # a check that raises is a failed check
            problem = "unexpected %s: %s" % (type(e).__name__, e)
        results.append((name, problem))

    def expect_error(call, buffers, needle):
        before = [b.tobytes() for b in buffers]
        status = call()
        if status == 0:
            return "returned 0, expected an error"
        msg = L.bnorm_last_error().decode("utf-8", "replace")
        if needle.lower() not in msg.lower():
            return "status %d, message %r does not contain %r" % (status, msg, needle)
        for i, (b, old) in enumerate(zip(buffers, before)):
            if b.tobytes() != old:
                return "buffer #%d changed after the error (message %r)" % (i, msg)
        return None

    # n = 1, s = 1 training: PyTorch's message.
    def n1():
        c = 16
        x = np.random.default_rng(1).standard_normal((1, c)).astype(np.float32)
        w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
        rm, rv = sentinel(c, 3.0), sentinel(c, 5.0)
        nbt = np.array([7], dtype=np.int64)
        y, sm, si = sentinel((1, c), 11.0), sentinel(c, 13.0), sentinel(c, 17.0)
        needle = "Expected more than 1 value per channel when training, got input size [1, 16]"
        try:
            torch.nn.BatchNorm1d(c)(torch.from_numpy(x))
            return "torch accepted n=1 (test premise wrong)"
        except ValueError as e:
            if not str(e).startswith(needle.split("[")[0]):
                return "torch's message %r differs in form" % str(e)
        for layout in (0, 1):
            p = expect_error(lambda: L.bnorm_forward_train(
                layout, 1, c, 1, ptr(x), ptr(w), ptr(b), ptr(rm), ptr(rv), ptr(nbt), 0.1, 1e-5,
                ptr(y), ptr(sm), ptr(si)), [rm, rv, nbt, y, sm, si], needle)
            if p:
                return "layout %d: %s" % (layout, p)
        # through the wrapper: BnormError with the code and the same text
        try:
            bn.forward_train(x, w, b, rm, rv, nbt, momentum=None)
            return "wrapper: no BnormError"
        except bn.BnormError as e:
            if e.code != 1 or needle not in e.message:
                return "wrapper: BnormError(%d, %r)" % (e.code, e.message)
        if int(nbt[0]) != 7:
            return "wrapper: num_batches_tracked changed"
        return None
    check("n=1,s=1 training is rejected with PyTorch's message, buffers unchanged", n1)

    def n1_ok():
        # n=1 with s>1 trains in PyTorch; n=1, s=1 evaluates.
        c = 5
        x = np.random.default_rng(2).standard_normal((1, c, 3)).astype(np.float32)
        y, sm, si = bn.forward_train(x, None, None)
        yt = torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, training=True)
        if np.max(np.abs(y - yt.numpy())) > 1e-5:
            return "n=1, s=3 training differs from torch by %g" % np.max(np.abs(y - yt.numpy()))
        x1 = x[:, :, 0].copy()
        rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
        y1 = bn.forward_eval(x1, None, None, rm, rv)
        ye = torch.nn.functional.batch_norm(torch.from_numpy(x1), torch.from_numpy(rm),
                                            torch.from_numpy(rv), training=False)
        if np.max(np.abs(y1 - ye.numpy())) > 1e-5:
            return "n=1, s=1 eval differs from torch"
        return None
    check("n=1 with s=3 trains; n=1, s=1 evaluates", n1_ok)

    def eps_bad():
        n, c, s = 4, 3, 5
        rng = np.random.default_rng(3)
        x = rng.standard_normal((n, c, s)).astype(np.float32)
        dy = rng.standard_normal((n, c, s)).astype(np.float32)
        w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
        for eps in (0.0, -1e-5, float("nan")):
            rm, rv = sentinel(c, 3.0), sentinel(c, 5.0)
            nbt = np.array([2], dtype=np.int64)
            y, sm, si = sentinel(x.shape, 1.0), sentinel(c, 2.0), sentinel(c, 4.0)
            dx, dw, db = sentinel(x.shape, 6.0), sentinel(c, 8.0), sentinel(c, 9.0)
            for layout in (0, 1):
                p = expect_error(lambda: L.bnorm_forward_train(
                    layout, n, c, s, ptr(x), ptr(w), ptr(b), ptr(rm), ptr(rv), ptr(nbt), 0.1,
                    eps, ptr(y), ptr(sm), ptr(si)), [rm, rv, nbt, y, sm, si], "eps")
                if p:
                    return "forward_train eps=%g: %s" % (eps, p)
                p = expect_error(lambda: L.bnorm_forward_eval(
                    layout, n, c, s, ptr(x), ptr(w), ptr(b), ptr(rm), ptr(rv), eps, ptr(y)),
                    [y], "eps")
                if p:
                    return "forward_eval eps=%g: %s" % (eps, p)
                for training in (0, 1):
                    p = expect_error(lambda: L.bnorm_backward(
                        layout, n, c, s, ptr(dy), ptr(x), ptr(w), ptr(sm), ptr(si), ptr(rm),
                        ptr(rv), eps, training, ptr(dx), ptr(dw), ptr(db)), [dx, dw, db], "eps")
                    if p:
                        return "backward training=%d eps=%g: %s" % (training, eps, p)
        return None
    check("eps <= 0 (and NaN) is rejected naming eps, buffers unchanged", eps_bad)

    def cumulative_needs_counter():
        c = 3
        x = np.random.default_rng(4).standard_normal((4, c)).astype(np.float32)
        rm, rv = sentinel(c, 3.0), sentinel(c, 5.0)
        y = sentinel(x.shape, 1.0)
        try:
            bn.forward_train(x, None, None, rm, rv, None, momentum=None, out=y)
            return "momentum=None with running stats but no num_batches_tracked was accepted"
        except bn.BnormError as e:
            if e.code != 1 or not e.message:
                return "BnormError(%d, %r)" % (e.code, e.message)
        if not (np.array_equal(rm, sentinel(c, 3.0)) and np.array_equal(rv, sentinel(c, 5.0))
                and np.array_equal(y, sentinel(x.shape, 1.0))):
            return "buffers changed after the error"
        return None
    check("momentum=None needs num_batches_tracked when tracking", cumulative_needs_counter)

    def wrapper_checks():
        c = 4
        x = np.zeros((3, c, 5, 5), np.float32)
        cases = [
            ("float64 x", lambda: bn.forward_train(x.astype(np.float64)), TypeError),
            ("channels_first array as channels_last",
             lambda: bn.forward_train(x, layout="channels_last"), ValueError),
            ("strided x", lambda: bn.forward_train(x[:, :, ::2]), ValueError),
            ("rank 1", lambda: bn.forward_train(np.zeros(4, np.float32)), ValueError),
            ("rank 6", lambda: bn.forward_train(np.zeros((2,) * 6, np.float32)), ValueError),
            ("weight length", lambda: bn.forward_train(x, np.ones(c + 1, np.float32)),
             ValueError),
            ("float64 running_mean", lambda: bn.forward_train(
                x, None, None, np.zeros(c), np.ones(c, np.float32)), TypeError),
            ("non-contiguous running_var", lambda: bn.forward_train(
                x, None, None, np.zeros(c, np.float32), np.ones(2 * c, np.float32)[::2]),
             ValueError),
            ("int32 num_batches_tracked", lambda: bn.forward_train(
                x, None, None, np.zeros(c, np.float32), np.ones(c, np.float32),
                np.zeros(1, np.int32)), TypeError),
            ("bad layout name", lambda: bn.forward_train(x, layout="NHWC"), ValueError),
            ("dy/x shape mismatch", lambda: bn.backward(
                x, x[:2].copy(), None, np.zeros(c, np.float32), np.ones(c, np.float32)),
             ValueError),
            ("dy/x layout mismatch", lambda: bn.backward(
                x, np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1), None,
                np.zeros(c, np.float32), np.ones(c, np.float32)), ValueError),
            ("training backward without save_*", lambda: bn.backward(x, x), ValueError),
        ]
        for what, fn, exc in cases:
            try:
                fn()
                return "%s: accepted" % what
            except exc:
                pass
            except Exception as e:
                return "%s: raised %s (%s), expected %s" % (what, type(e).__name__, e,
                                                           exc.__name__)
        # a channels_last view is taken as channels_last, and the result keeps its strides
        xl = np.moveaxis(np.ascontiguousarray(np.moveaxis(
            np.random.default_rng(5).standard_normal((3, c, 5, 5)).astype(np.float32), 1, -1)),
            -1, 1)
        if bn.layout_of(xl) != (bn.CHANNELS_LAST,):
            return "layout_of(channels_last view) = %r" % (bn.layout_of(xl),)
        y, _, _ = bn.forward_train(xl)
        if y.strides != xl.strides:
            return "y strides %s != x strides %s" % (y.strides, xl.strides)
        v = bn.version()
        if len(v.split(".")) != 3:
            return "version() = %r is not MAJOR.MINOR.PATCH" % v
        return None
    check("wrapper argument checks (TypeError/ValueError, layout from strides)", wrapper_checks)
    return results


# ----------------------------------------------------------------------------- main

def fmt_ratios(st, keys=None):
    keys = keys or OUTPUTS
    return " ".join("%s=%.3g(abs %.3g @%s)" % (k, st.ratio[k], st.abs[k], st.where.get(k, "-"))
                    for k in keys if st.ratio[k] > 0 or st.abs[k] > 0)


def main():
    try:
        sys.stdout.reconfigure(line_buffering=True)  # keep the lines printed before a crash
    except AttributeError:
        pass
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=1000, help="random configurations (default 1000)")
    ap.add_argument("--seed", type=int, default=1000, help="first seed (default 1000)")
    ap.add_argument("--only", type=int, action="append", help="run only this seed (repeatable)")
    ap.add_argument("--no-bad-input", action="store_true", help="skip the bad-input checks")
    ap.add_argument("--half-count", type=int, default=150,
                    help="bf16 and fp16 configurations each (half_conformance.py; 0: none)")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per configuration")
    args = ap.parse_args()

    t0 = time.time()
    try:
        bn.load_library()
        print("library: %s (version %s)" % (bn.library_path(), bn.version()))
    except Exception as e:
        print("FAIL cannot load the bnorm library: %s" % e)
        print("0 passed, 1 failed")
        return 1
    print("torch %s, numpy %s, torch threads %d" % (torch.__version__, np.__version__,
                                                   torch.get_num_threads()))
    torch.manual_seed(0)

    passed = failed = 0
    total = Stats()
    seeds = args.only if args.only else list(range(args.seed, args.seed + args.count))
    n_configs = 0
    for seed in seeds:
        cfg = Config(seed)
        n_configs += 1
        try:
            st, problems = run_config(cfg)
        except Exception as e:
            failed += 1
            print("FAIL seed=%d %s: %s: %s" % (seed, cfg.describe(), type(e).__name__, e))
            continue
        total.merge(st)
        bad = [k for k in OUTPUTS if not st.ratio[k] <= 1.0]
        model = [k for k in OUTPUTS if not st.t_ex[k] <= 1.0]
        if bad or model or problems:
            failed += 1
            msg = "FAIL seed=%d %s:" % (seed, cfg.describe())
            if bad:
                msg += " worst |lib-torch|/tol: " + fmt_ratios(st)
            if model:
                msg += " | torch outside the error model for %s (|torch-exact|/B: %s)" % (
                    ",".join(model), " ".join("%s=%.3g" % (k, st.t_ex[k]) for k in model))
            if problems:
                msg += " | " + "; ".join(problems)
            print(msg)
        else:
            passed += 1
            if args.verbose:
                print("ok   seed=%d %s: %s" % (seed, cfg.describe(), fmt_ratios(st)))

    n_bad = 0
    if not args.no_bad_input and not args.only:
        for name, problem in bad_input_checks():
            n_bad += 1
            if problem:
                failed += 1
                print("FAIL bad-input: %s: %s" % (name, problem))
            else:
                passed += 1
                if args.verbose:
                    print("ok   bad-input: %s" % name)

    # bf16 / fp16 through the *_dt entry points (half_conformance.py: against float64 and, for
    # bf16, torch's native_batch_norm).
    half = None
    if args.half_count > 0 and not args.only:
        import half_conformance
        h_passed, h_failed, half = half_conformance.run(args.half_count, args.verbose)
        passed += h_passed
        failed += h_failed

    print("")
    print("%d random configurations, %d bad-input checks, %.1f s" % (n_configs, n_bad,
                                                                    time.time() - t0))
    print("largest error against PyTorch per output (tolerance 2B, B = single-implementation "
          "bound; see the top of %s):" % os.path.basename(__file__))
    print("  %-20s %12s %12s %14s %14s" % ("output", "max |d|", "max |d|/tol", "torch-exact/B",
                                            "lib-exact/B"))
    for k in OUTPUTS:
        print("  %-20s %12.4g %12.4g %14.4g %14.4g" % (k, total.abs[k], total.ratio[k],
                                                       total.t_ex[k], total.l_ex[k]))
    if half is not None:
        half_conformance.report(half)
    print("%d passed, %d failed" % (passed, failed))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
