#!/usr/bin/env python3
"""bf16/fp16 conformance of the bnorm C API's *_dt entry points, against float64 and PyTorch.

Run by conformance.py after its fp32 suite (the same ctest, torch_conformance), or alone.

Each configuration (seeded) draws a shape of rank 2..5, a memory layout (contiguous, or
channels_last: torch.channels_last / channels_last_3d, and for (N, C, L) the transpose of a
contiguous (N, L, C)), per-channel offsets and scales, weight, bias and running statistics
(fp32), and x and dy rounded to the dtype. Then:
  * the library (bnorm_forward_train_dt, bnorm_forward_eval_dt, bnorm_backward_dt in training
    and eval mode) on the 16-bit tensors and fp32 vectors;
  * the oracle: the same formulas in float64 on the same 16-bit-rounded inputs (exact values);
  * for bf16, PyTorch: torch.ops.aten.native_batch_norm and native_batch_norm_backward on the
    same bf16 tensors with fp32 parameters and buffers (torch 1.13's mixed CPU mode: y and dx
    bf16, save_mean / save_invstd / running statistics / dweight / dbias fp32). torch 1.13 has
    no float16 batch norm on the CPU, so fp16 is checked against float64 only.
Outputs: y (train), save_mean, save_invstd, running_mean, running_var, y (eval), dx, dweight,
dbias (training backward), dx, dweight, dbias (eval backward).

Tolerances. U = the dtype's unit roundoff, 2^-8 for bf16 and 2^-11 for fp16. The library
widens the 16-bit inputs exactly, computes in fp32 with fp64 accumulation, and rounds a 16-bit
output once, to nearest: |err| <= U/2 |ref| from that rounding, plus fp32 errors of order 2^-24
relative to the output's scale. Each output is checked as
    16-bit outputs (y, dx):          |lib - ref| <= U * (|ref| + scale)
    fp32 outputs (the others):       |lib - ref| <= 2^-16 * (|ref| + scale)
(2^-16 = (2^-8)^2: nothing of the 16-bit rounding enters them, the inputs being exact), with
scale per channel: y: |weight| + |bias|; save_mean: |mean| + std; save_invstd: invstd;
running_*: the magnitudes of the blend's two terms; dx: |weight| invstd rms(dy); dweight:
sum |dy| (|x - mean| + |mean|) invstd (the terms before the fp32 mean is subtracted);
dbias: sum |dy|. For bf16 the library is also checked against torch,
|lib - torch| <= 2 U (|ref| + scale) for every output element where torch is within
U (|ref| + scale) of the exact value (torch 1.13's bf16 dx is not everywhere: how often is
reported), and the dtypes of every output must be torch's.
The report gives, per output, the largest absolute and relative error vs float64 of the
library and (bf16) of torch: relative = |err| / |ref| over the elements with |ref| >= U scale
(and, for the 16-bit outputs, >= the dtype's smallest normal number), and the library's
largest error as a fraction of its tolerance (err/tol).
"""

import ctypes
import math
import os
import sys
import time

try:
    import torch
except ImportError:
    print("skipped: python3-torch not installed")
    sys.exit(77)

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
from bnorm import _lib  # noqa: E402

CF, CL = 0, 1
UNIT = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
FP32_TOL = 2.0 ** -16
CODE = {torch.bfloat16: _lib.BFLOAT16, torch.float16: _lib.FLOAT16}
OUTPUTS = ("y", "save_mean", "save_invstd", "running_mean", "running_var", "y_eval",
           "dx", "dweight", "dbias", "dx_eval", "dweight_eval", "dbias_eval")
SIXTEEN = ("y", "y_eval", "dx", "dx_eval")


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def in_layout(t, layout):
    """t (logical (N, C, ...)) with its memory in `layout`."""
    if layout == CF or t.dim() == 2:
        return t.contiguous()
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t.transpose(1, 2).contiguous().transpose(1, 2)


class Config:
    def __init__(self, seed, dtype):
        g = torch.Generator().manual_seed(seed)
        r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
        self.seed, self.dtype = seed, dtype
        self.rank = 2 + seed % 4
        self.layout = CL if (seed // 4) % 2 else CF
        self.c = r(1, 24)
        spatial = {2: [], 3: [r(1, 40)], 4: [r(1, 12), r(1, 12)],
                   5: [r(1, 6), r(1, 6), r(1, 6)]}[self.rank]
        self.n = r(2 if not spatial or math.prod(spatial) == 1 else 1, 24)
        self.shape = [self.n, self.c] + spatial
        self.momentum = [0.1, 0.5, 1.0][r(0, 2)]
        self.eps = [1e-5, 1e-3][r(0, 1)]
        c = self.c
        shape_c = [1, c] + [1] * len(spatial)
        offset = (torch.rand(c, generator=g, dtype=torch.float64) - 0.5) * 2 * \
            [0.0, 1.0, 10.0, 100.0][r(0, 3)]
        scale = torch.exp((torch.rand(c, generator=g, dtype=torch.float64) - 0.5) * 4)
        x = offset.view(shape_c) + scale.view(shape_c) * torch.randn(
            self.shape, generator=g, dtype=torch.float64)
        self.x = in_layout(x.to(dtype), self.layout)
        self.dy = in_layout(torch.randn(self.shape, generator=g, dtype=torch.float64).to(dtype),
                            self.layout)
        self.weight = (1 + 0.5 * torch.randn(c, generator=g)).float()
        self.bias = (0.5 * torch.randn(c, generator=g)).float()
        self.running_mean = (offset + 0.1 * torch.randn(c, generator=g,
                                                        dtype=torch.float64)).float()
        self.running_var = (scale ** 2 * (0.5 + torch.rand(c, generator=g,
                                                           dtype=torch.float64))).float()

    def describe(self):
        return "%s %s shape=%s momentum=%g eps=%g" % (
            str(self.dtype).replace("torch.", ""), "channels_last" if self.layout else
            "contiguous", self.shape, self.momentum, self.eps)


def nsc(shape):
    return shape[0], shape[1], math.prod(shape[2:]) if len(shape) > 2 else 1


def run_library(cfg):
    lib = _lib.lib()
    n, c, s = nsc(cfg.shape)
    dt = CODE[cfg.dtype]
    out = {}
    y = torch.empty_like(cfg.x)
    rm, rv = cfg.running_mean.clone(), cfg.running_var.clone()
    nbt = torch.zeros((), dtype=torch.int64)
    sm, si = torch.empty(c), torch.empty(c)
    _lib.check(lib.bnorm_forward_train_dt(cfg.layout, dt, n, c, s, _ptr(cfg.x), _ptr(cfg.weight),
                                          _ptr(cfg.bias), _ptr(rm), _ptr(rv), _ptr(nbt),
                                          cfg.momentum, cfg.eps, _ptr(y), _ptr(sm), _ptr(si)))
    out.update(y=y, save_mean=sm, save_invstd=si, running_mean=rm, running_var=rv)
    ye = torch.empty_like(cfg.x)
    _lib.check(lib.bnorm_forward_eval_dt(cfg.layout, dt, n, c, s, _ptr(cfg.x), _ptr(cfg.weight),
                                         _ptr(cfg.bias), _ptr(cfg.running_mean),
                                         _ptr(cfg.running_var), cfg.eps, _ptr(ye)))
    out["y_eval"] = ye
    for training, suffix in ((1, ""), (0, "_eval")):
        dx = torch.empty_like(cfg.x)
        dw, db = torch.empty(c), torch.empty(c)
        _lib.check(lib.bnorm_backward_dt(cfg.layout, dt, n, c, s, _ptr(cfg.dy), _ptr(cfg.x),
                                         _ptr(cfg.weight), _ptr(sm), _ptr(si),
                                         _ptr(cfg.running_mean), _ptr(cfg.running_var), cfg.eps,
                                         training, _ptr(dx), _ptr(dw), _ptr(db)))
        out.update({"dx" + suffix: dx, "dweight" + suffix: dw, "dbias" + suffix: db})
    return out


def run_torch(cfg):
    aten = torch.ops.aten
    rm, rv = cfg.running_mean.clone(), cfg.running_var.clone()
    y, sm, si = aten.native_batch_norm(cfg.x, cfg.weight, cfg.bias, rm, rv, True,
                                       cfg.momentum, cfg.eps)
    ye, _, _ = aten.native_batch_norm(cfg.x, cfg.weight, cfg.bias, cfg.running_mean.clone(),
                                      cfg.running_var.clone(), False, cfg.momentum, cfg.eps)
    dx, dw, db = aten.native_batch_norm_backward(cfg.dy, cfg.x, cfg.weight, rm, rv, sm, si,
                                                 True, cfg.eps, [True, True, True])
    dxe, dwe, dbe = aten.native_batch_norm_backward(cfg.dy, cfg.x, cfg.weight,
                                                    cfg.running_mean, cfg.running_var, None,
                                                    None, False, cfg.eps, [True, True, True])
    return dict(y=y, save_mean=sm, save_invstd=si, running_mean=rm, running_var=rv, y_eval=ye,
                dx=dx, dweight=dw, dbias=db, dx_eval=dxe, dweight_eval=dwe, dbias_eval=dbe)


def reference(cfg):
    """(exact values, scales), float64, of every output from the 16-bit-rounded inputs."""
    x, dy = cfg.x.double(), cfg.dy.double()
    dims = [0] + list(range(2, x.dim()))
    cs = [1, -1] + [1] * (x.dim() - 2)
    n = x.numel() // cfg.c
    w, b = cfg.weight.double(), cfg.bias.double()
    rm0, rv0 = cfg.running_mean.double(), cfg.running_var.double()
    m = cfg.momentum
    mean = x.mean(dims)
    var = x.var(dims, unbiased=False)
    invstd = 1.0 / torch.sqrt(var + cfg.eps)
    xhat = (x - mean.view(cs)) * invstd.view(cs)
    ref, scale = {}, {}
    ref["y"] = xhat * w.view(cs) + b.view(cs)
    scale["y"] = (w.abs() + b.abs()).view(cs)
    ref["save_mean"], scale["save_mean"] = mean, mean.abs() + var.sqrt()
    ref["save_invstd"], scale["save_invstd"] = invstd, invstd
    unbiased = var * n / (n - 1)
    ref["running_mean"] = (1 - m) * rm0 + m * mean
    scale["running_mean"] = (1 - m) * rm0.abs() + m * (mean.abs() + var.sqrt())
    ref["running_var"] = (1 - m) * rv0 + m * unbiased
    scale["running_var"] = (1 - m) * rv0 + m * unbiased
    inv_r = 1.0 / torch.sqrt(rv0 + cfg.eps)
    ref["y_eval"] = (x - rm0.view(cs)) * (inv_r * w).view(cs) + b.view(cs)
    scale["y_eval"] = scale["y"]
    rms_dy = torch.sqrt((dy * dy).mean(dims))
    db = dy.sum(dims)
    dw = (dy * xhat).sum(dims)
    ref["dx"] = (w * invstd).view(cs) * (dy - db.view(cs) / n - xhat * dw.view(cs) / n)
    scale["dx"] = (w.abs() * invstd * rms_dy).view(cs)
    # dweight from x and the fp32 save_mean: its terms before the mean is subtracted, |dy| (|x -
    # mean| + |mean|) invstd (an fp32 rounding of the mean, u |mean|, moves every term).
    ref["dweight"] = dw
    scale["dweight"] = (dy.abs() * ((x - mean.view(cs)).abs() + mean.abs().view(cs))).sum(dims) \
        * invstd
    ref["dbias"], scale["dbias"] = db, dy.abs().sum(dims)
    xhat_r = (x - rm0.view(cs)) * inv_r.view(cs)
    ref["dx_eval"] = dy * (w * inv_r).view(cs)
    scale["dx_eval"] = (w.abs() * inv_r * rms_dy).view(cs)
    ref["dweight_eval"] = (dy * xhat_r).sum(dims)
    scale["dweight_eval"] = (dy * xhat_r).abs().sum(dims)
    ref["dbias_eval"], scale["dbias_eval"] = db, scale["dbias"]
    return ref, scale


def errors(got, ref, scale, unit, tiny):
    """(max abs error, max relative error, max |err| / (|ref| + scale)) of got vs ref; the
    relative error over the elements with |ref| >= max(unit * scale, tiny)."""
    err = (got.double() - ref).abs()
    if err.numel() == 0:
        return 0.0, 0.0, 0.0
    sc = scale.expand_as(ref)
    big = (ref.abs() >= unit * sc) & (ref.abs() >= tiny)
    rel = float((err[big] / ref.abs()[big]).max()) if bool(big.any()) else 0.0
    return float(err.max()), rel, float((err / (ref.abs() + sc)).max())


class Figures:
    """The largest errors vs float64 per (who, dtype, output)."""

    def __init__(self):
        self.abs, self.rel, self.ratio = {}, {}, {}
        self.outside, self.elements = {}, {}

    def count(self, key, outside, elements):
        self.outside[key] = self.outside.get(key, 0) + outside
        self.elements[key] = self.elements.get(key, 0) + elements

    def add(self, key, a, r, ratio=0.0):
        self.abs[key] = max(self.abs.get(key, 0.0), a)
        self.rel[key] = max(self.rel.get(key, 0.0), r)
        self.ratio[key] = max(self.ratio.get(key, 0.0), ratio)


def run_config(cfg, figures):
    """The problems of one configuration (empty: it passed)."""
    unit = UNIT[cfg.dtype]
    dname = str(cfg.dtype).replace("torch.", "")
    lib = run_library(cfg)
    ref, scale = reference(cfg)
    tor = run_torch(cfg) if cfg.dtype == torch.bfloat16 else None
    problems = []
    for k in OUTPUTS:
        tol = unit if k in SIXTEEN else FP32_TOL
        want_dtype = cfg.dtype if k in SIXTEEN else torch.float32
        if lib[k].dtype != want_dtype:
            problems.append("%s: dtype %s, expected %s" % (k, lib[k].dtype, want_dtype))
        # Relative errors of 16-bit outputs only over their normal range (a subnormal fp16
        # result, below 2^-14, has fewer significant bits).
        tiny = torch.finfo(cfg.dtype).tiny if k in SIXTEEN else 0.0
        a, r, q = errors(lib[k], ref[k], scale[k], unit, tiny)
        figures.add(("bnorm", dname, k), a, r, q / tol)
        if not q <= tol:
            problems.append("%s: bnorm vs float64 %.3g x (|ref| + scale), tolerance %.3g "
                            "(max abs %.3g)" % (k, q, tol, a))
        if tor is not None:
            if tor[k].dtype != lib[k].dtype:
                problems.append("%s: dtype %s, torch's %s" % (k, lib[k].dtype, tor[k].dtype))
            ta, tr, _ = errors(tor[k], ref[k], scale[k], unit, tiny)
            figures.add(("torch", dname, k), ta, tr)
            # bnorm against torch where torch is itself within its bound (U (|ref| + scale) for
            # every output): torch 1.13's bf16 dx is not everywhere (counted, reported).
            bound = unit * (ref[k].abs() + scale[k].expand_as(ref[k]))
            torch_ok = (tor[k].double() - ref[k]).abs() <= bound
            figures.count(("torch", dname, k), int((~torch_ok).sum()), torch_ok.numel())
            d = (lib[k].double() - tor[k].double()).abs()
            bad = torch_ok & (d > 2 * bound)
            if bool(bad.any()):
                worst = float((d / (bound / unit))[bad].max())
                problems.append("%s: |bnorm - torch| %.3g x (|ref| + scale) above 2U where torch "
                                "is within U of float64" % (k, worst))
    if lib["y"].stride() != cfg.x.stride() or lib["dx"].stride() != cfg.x.stride():
        problems.append("outputs not in the input's layout")
    return problems


def run(count=150, verbose=False):
    """Runs `count` configurations per dtype; returns (passed, failed, figures)."""
    figures = Figures()
    passed = failed = 0
    for dtype in (torch.bfloat16, torch.float16):
        for seed in range(count):
            cfg = Config(seed, dtype)
            try:
                problems = run_config(cfg, figures)
            except Exception as e:  # a library error is a failure of the configuration
                problems = ["%s: %s" % (type(e).__name__, e)]
            if problems:
                failed += 1
                print("FAIL half seed=%d %s: %s" % (seed, cfg.describe(), "; ".join(problems)))
            else:
                passed += 1
                if verbose:
                    print("ok   half seed=%d %s" % (seed, cfg.describe()))
    return passed, failed, figures


def report(figures):
    print("bf16/fp16: largest error vs float64 on the same 16-bit inputs (abs / relative; "
          "torch: native_batch_norm, bf16 only):")
    print("  %-14s %-9s %11s %11s %9s %11s %11s %s" % ("output", "dtype", "bnorm abs",
                                                        "bnorm rel", "err/tol", "torch abs",
                                                        "torch rel", "torch > U bound"))
    for dname in ("bfloat16", "float16"):
        for k in OUTPUTS:
            key = ("bnorm", dname, k)
            if key not in figures.abs:
                continue
            t = ("torch", dname, k)
            ts = ("%11.3g %11.3g %d of %d" % (figures.abs[t], figures.rel[t],
                                               figures.outside[t], figures.elements[t])) \
                if t in figures.abs else "%11s %11s" % ("-", "-")
            print("  %-14s %-9s %11.3g %11.3g %9.3g %s" % (
                k, dname, figures.abs[key], figures.rel[key], figures.ratio[key], ts))


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=150, help="configurations per dtype")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    print("library: %s (version %s); torch %s" % (_lib.library_path(), _lib.version(),
                                                 torch.__version__))
    passed, failed, figures = run(args.count, args.verbose)
    report(figures)
    print("%.1f s" % (time.time() - t0))
    print("%d passed, %d failed" % (passed, failed))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
