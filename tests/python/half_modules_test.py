"""bnorm.torch and bnorm.numpy with bfloat16 and float16 tensors.

1. Modules (BatchNorm1d (N, C) and (N, C, L), BatchNorm2d, BatchNorm3d, BatchNorm), contiguous
   and channels_last, train (a few steps) and eval, with fp32 parameters: y and x.grad have the
   input's dtype and strides, every value is bit for bit bnorm's fp32 module on the widened
   input rounded once to the dtype (y, dx), or equal to it (running statistics,
   num_batches_tracked, weight.grad, bias.grad: fp32), and the library was called with the
   16-bit tensors (no fp32 copy). Against float64 on the same inputs: |y - ref| <= U (|ref| +
   |weight| + |bias|) with U = 2^-8 (bf16), 2^-11 (fp16). bf16 also against torch's module.
2. A module converted with .to(dtype) (parameters and buffers 16-bit): y, x.grad, weight.grad,
   bias.grad and the running statistics have the dtype (as torch gives them for bf16), and are
   the fp32 computation from the same 16-bit values rounded once; bf16 against torch's
   converted module within 2U.
3. Functional batch_norm with 16-bit running statistics (updated in place, rounded); the fused
   module (BatchNormReLU2d with a residual: y, dx, dz of the input's dtype, the fp32 pass
   rounded once); a residual of another dtype falls back, naming it; a bf16 conv net with
   torch.nn.ReLU(inplace=True) converted with fuse_relu=True against torch's.
4. The extensions (ghost batch, batch renorm, frozen switches) on 16-bit input, plain and
   converted modules: the fp32 pass rounded once; update_bn_stats and fold_batch_norm on a
   bf16 model.
5. float64 falls back to torch with a warning saying the library does not support float64.
6. bnorm.numpy: float16 arrays in, float16 out, the fp32 computation rounded once; float64
   rejected naming it.
Exit 0 on success, 1 on a failure, 77 without torch.
"""

import sys
import time
import warnings

try:
    import numpy as np
    import torch
except ImportError:
    print("skipped: python3-torch not installed")
    sys.exit(77)

import bnorm._lib  # noqa: E402
import bnorm.numpy as bnp  # noqa: E402
import bnorm.torch as bt  # noqa: E402

UNIT = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
failures = []
checks = [0]


def check(cond, what):
    checks[0] += 1
    if not cond:
        failures.append(what)
        print("FAIL " + what, flush=True)
    return cond


def same_bits(a, b):
    if a is None or b is None:
        return a is None and b is None
    a, b = a.detach(), b.detach()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    view = {4: torch.int32, 2: torch.int16, 8: torch.int64}[a.element_size()]
    return bool(torch.equal(a.contiguous().view(view), b.contiguous().view(view)))


def max_diff(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def same_strides(a, b):
    return a.shape == b.shape and all(d == 1 or x == y
                                      for d, x, y in zip(a.shape, a.stride(), b.stride()))


class Spy:
    """The dtype codes and x pointers of the library's forward calls."""

    NAMES = ("bnorm_forward_train_dt", "bnorm_forward_eval_dt", "bnorm_backward_dt",
             "bnorm_forward_train_relu_dt", "bnorm_forward_eval_relu_dt",
             "bnorm_backward_relu_dt")

    def __enter__(self):
        self.lib = bnorm._lib.lib()
        self.calls = []
        self.saved = {n: getattr(self.lib, n) for n in self.NAMES}
        for n, fn in self.saved.items():
            setattr(self.lib, n, self._wrap(n, fn))
        return self

    def _wrap(self, name, fn):
        def call(*args):
            self.calls.append((name, args))
            return fn(*args)
        return call

    def __exit__(self, *exc):
        for n, fn in self.saved.items():
            setattr(self.lib, n, fn)


def in_format(t, fmt):
    if fmt == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if fmt == "channels_last" and t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    if fmt == "channels_last" and t.dim() == 3:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    return t.contiguous()


def reference_y(x, w, b, eps):
    """Training-mode y in float64 from the 16-bit values."""
    xd = x.detach().double()
    dims = [0] + list(range(2, x.dim()))
    cs = [1, -1] + [1] * (x.dim() - 2)
    mean, var = xd.mean(dims), xd.var(dims, unbiased=False)
    return (xd - mean.view(cs)) / torch.sqrt(var.view(cs) + eps) * w.double().view(cs) + \
        b.double().view(cs)


MODULES = [
    ("BatchNorm1d (N, C)", bt.BatchNorm1d, (16, 6)),
    ("BatchNorm1d (N, C, L)", bt.BatchNorm1d, (5, 6, 11)),
    ("BatchNorm2d", bt.BatchNorm2d, (4, 5, 6, 7)),
    ("BatchNorm3d", bt.BatchNorm3d, (3, 4, 3, 5, 4)),
    ("BatchNorm (rank 4)", bt.BatchNorm, (4, 3, 5, 5)),
]


def modules_fp32_parameters():
    for dtype in (torch.bfloat16, torch.float16):
        u = UNIT[dtype]
        for name, cls, shape in MODULES:
            for fmt in ("contiguous", "channels_last"):
                label = "%s %s %s" % (str(dtype)[6:], name, fmt)
                gen = torch.Generator().manual_seed(len(label))
                c = shape[1]
                m16 = cls(c, momentum=0.2)
                with torch.no_grad():
                    m16.weight.copy_(1 + 0.3 * torch.randn(c, generator=gen))
                    m16.bias.copy_(0.5 * torch.randn(c, generator=gen))
                m32 = cls(c, momentum=0.2)
                m32.load_state_dict(m16.state_dict())
                tm = None
                if dtype == torch.bfloat16:
                    tm = getattr(torch.nn, cls.__name__, None)
                    tm = tm(c, momentum=0.2) if tm is not None and cls is not bt.BatchNorm \
                        else None
                    if tm is not None:
                        tm.load_state_dict(m16.state_dict())
                for step in range(3):
                    x = in_format((2 * torch.randn(shape, generator=gen) + step).to(dtype), fmt)
                    dy = in_format(torch.randn(shape, generator=gen).to(dtype), fmt)
                    x.requires_grad_(True)
                    x32 = x.detach().float().requires_grad_(True)
                    with Spy() as spy:
                        y = m16(x)
                        y.backward(dy)
                    y32 = m32(x32)
                    y32.backward(dy.float())
                    tag = "%s step %d" % (label, step)
                    codes = {args[1] for _, args in spy.calls}
                    want_code = bnorm._lib.BFLOAT16 if dtype == torch.bfloat16 else \
                        bnorm._lib.FLOAT16
                    check(codes == {want_code} and spy.calls[0][1][5] == x.data_ptr(),
                          "%s: the library was not called on x's 16-bit memory (%s)"
                          % (tag, [(n, a[1]) for n, a in spy.calls]))
                    check(y.dtype == dtype and x.grad.dtype == dtype,
                          "%s: y %s, x.grad %s" % (tag, y.dtype, x.grad.dtype))
                    check(same_strides(y, x) and same_strides(x.grad, x),
                          "%s: y or x.grad not in x's layout" % tag)
                    check(same_bits(y, y32.detach().to(dtype)),
                          "%s: y is not the fp32 module's rounded once (largest %.3g)"
                          % (tag, max_diff(y, y32)))
                    check(same_bits(x.grad, x32.grad.to(dtype)),
                          "%s: x.grad is not the fp32 module's rounded once" % tag)
                    for k in ("running_mean", "running_var", "num_batches_tracked"):
                        check(same_bits(getattr(m16, k), getattr(m32, k)),
                              "%s: %s differs from the fp32 module's" % (tag, k))
                    for p in ("weight", "bias"):
                        g16, g32 = getattr(m16, p).grad, getattr(m32, p).grad
                        check(g16.dtype == torch.float32 and same_bits(g16, g32),
                              "%s: %s.grad differs from the fp32 module's" % (tag, p))
                    ref = reference_y(x, m16.weight, m16.bias, m16.eps)
                    scale = (m16.weight.detach().abs() + m16.bias.detach().abs()).double().view(
                        [1, -1] + [1] * (x.dim() - 2))
                    err = float(((y.double() - ref).abs() / (ref.abs() + scale)).max())
                    check(err <= u, "%s: y vs float64 %.3g x (|ref| + scale) > U" % (tag, err))
                    if tm is not None:
                        xt = x.detach().clone().requires_grad_(True)
                        yt = tm(xt)
                        yt.backward(dy)
                        lim = 2 * u * (ref.abs() + scale)
                        check(yt.dtype == y.dtype and
                              bool(((y.double() - yt.double()).abs() <= lim).all()),
                              "%s: y vs torch's module %.3g" % (tag, max_diff(y, yt)))
                        for k in ("running_mean", "running_var"):
                            a, b = getattr(m16, k), getattr(tm, k)
                            check(a.dtype == b.dtype and max_diff(a, b) <=
                                  1e-5 * (1 + float(b.abs().max())),
                                  "%s: %s vs torch's %.3g" % (tag, k, max_diff(a, b)))
                        check(tm.weight.grad.dtype == m16.weight.grad.dtype,
                              "%s: weight.grad dtype %s, torch's %s" % (
                                  tag, m16.weight.grad.dtype, tm.weight.grad.dtype))
                        tm.weight.grad = tm.bias.grad = None
                    for mm in (m16, m32):
                        mm.weight.grad = mm.bias.grad = None
                m16.eval()
                m32.eval()
                xe = in_format(torch.randn(shape, generator=gen).to(dtype), fmt)
                with torch.no_grad():
                    ye = m16(xe)
                    check(ye.dtype == dtype and same_bits(ye, m32(xe.float()).to(dtype)),
                          "%s eval: not the fp32 module's rounded once" % label)


def modules_converted():
    """model.to(dtype): 16-bit parameters and buffers."""
    for dtype in (torch.bfloat16, torch.float16):
        u = UNIT[dtype]
        for fmt in ("contiguous", "channels_last"):
            label = "%s BatchNorm2d.to(%s) %s" % (str(dtype)[6:], str(dtype)[6:], fmt)
            gen = torch.Generator().manual_seed(7)
            m = bt.BatchNorm2d(5, momentum=0.3)
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(5, generator=gen))
                m.bias.copy_(0.5 * torch.randn(5, generator=gen))
                m.running_mean.copy_(torch.randn(5, generator=gen))
            m.to(dtype)
            # The fp32 computation from the same 16-bit values.
            m32 = bt.BatchNorm2d(5, momentum=0.3)
            m32.load_state_dict({k: v.float() if v.is_floating_point() else v
                                 for k, v in m.state_dict().items()})
            tm = None
            if dtype == torch.bfloat16:
                tm = torch.nn.BatchNorm2d(5, momentum=0.3).to(dtype)
                tm.load_state_dict(m.state_dict())
            for step in range(2):
                x = in_format((3 * torch.randn(6, 5, 4, 4, generator=gen) - 1).to(dtype), fmt)
                dy = in_format(torch.randn(6, 5, 4, 4, generator=gen).to(dtype), fmt)
                x.requires_grad_(True)
                y = m(x)
                y.backward(dy)
                x32 = x.detach().float().requires_grad_(True)
                y32 = m32(x32)
                y32.backward(dy.float())
                tag = "%s step %d" % (label, step)
                check(all(t.dtype == dtype for t in (y, x.grad, m.weight.grad, m.bias.grad,
                                                     m.running_mean, m.running_var)),
                      "%s: dtypes %s" % (tag, [t.dtype for t in (y, x.grad, m.weight.grad,
                                                                 m.bias.grad, m.running_mean)]))
                check(same_bits(y, y32.detach().to(dtype)) and
                      same_bits(x.grad, x32.grad.to(dtype)),
                      "%s: y or x.grad not the fp32 computation rounded once" % tag)
                check(same_bits(m.weight.grad, m32.weight.grad.to(dtype)) and
                      same_bits(m.bias.grad, m32.bias.grad.to(dtype)),
                      "%s: weight/bias grads not the fp32 ones rounded" % tag)
                check(same_bits(m.running_mean, m32.running_mean.to(dtype)) and
                      same_bits(m.running_var, m32.running_var.to(dtype)),
                      "%s: running statistics not the fp32 update rounded" % tag)
                check(int(m.num_batches_tracked) == step + 1, "%s: num_batches_tracked" % tag)
                # The next step of the fp32 computation starts from the rounded buffers, as
                # the converted module does.
                with torch.no_grad():
                    m32.running_mean.copy_(m.running_mean.float())
                    m32.running_var.copy_(m.running_var.float())
                if tm is not None:
                    xt = x.detach().clone().requires_grad_(True)
                    yt = tm(xt)
                    yt.backward(dy)
                    d = max_diff(y, yt)
                    check(yt.dtype == y.dtype and d <= 4 * u * (1 + float(yt.abs().max())),
                          "%s: y vs torch's bf16 module %.3g" % (tag, d))
                    for k in ("running_mean", "running_var"):
                        a, b = getattr(m, k), getattr(tm, k)
                        check(a.dtype == b.dtype and max_diff(a, b) <=
                              2 * u * float(b.abs().max() + 1),
                              "%s: %s vs torch's %.3g" % (tag, k, max_diff(a, b)))
                    for p in ("weight", "bias"):
                        a, b = getattr(m, p).grad, getattr(tm, p).grad
                        check(a.dtype == b.dtype and max_diff(a, b) <=
                              4 * u * float(b.abs().max() + 1),
                              "%s: %s.grad vs torch's %.3g" % (tag, p, max_diff(a, b)))
                    tm.zero_grad()
                m.zero_grad()
                m32.zero_grad()
            m.eval()
            with torch.no_grad():
                xe = torch.randn(6, 5, 4, 4, generator=gen).to(dtype)
                check(m(xe).dtype == dtype, "%s eval: dtype" % label)


def functional_fused_inplace():
    for dtype in (torch.bfloat16, torch.float16):
        lab = str(dtype)[6:]
        gen = torch.Generator().manual_seed(3)
        x = (torch.randn(8, 4, 5, generator=gen) + 1).to(dtype)
        rm, rv = torch.zeros(4, dtype=dtype), torch.ones(4, dtype=dtype)
        rm32, rv32 = torch.zeros(4), torch.ones(4)
        y = bt.batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5)
        y32 = bt.batch_norm(x.float(), rm32, rv32, None, None, True, 0.1, 1e-5)
        check(same_bits(y, y32.to(dtype)) and same_bits(rm, rm32.to(dtype)) and
              same_bits(rv, rv32.to(dtype)),
              "%s functional batch_norm with 16-bit running statistics" % lab)
        # The fused module with a residual of the input's dtype; relu in place after it.
        m = bt.BatchNormReLU2d(4)
        m32 = bt.BatchNormReLU2d(4)
        x = (torch.randn(3, 4, 5, 5, generator=gen)).to(dtype).requires_grad_(True)
        z = (0.5 * torch.randn(3, 4, 5, 5, generator=gen)).to(dtype).requires_grad_(True)
        dy = torch.randn(3, 4, 5, 5, generator=gen).to(dtype)
        with Spy() as spy:
            y = m(x, z)
            y.backward(dy)
        x32 = x.detach().float().requires_grad_(True)
        z32 = z.detach().float().requires_grad_(True)
        y32 = m32(x32, z32)
        y32.backward(dy.float())
        check([n for n, _ in spy.calls] == ["bnorm_forward_train_relu_dt",
                                            "bnorm_backward_relu_dt"],
              "%s fused: calls %s" % (lab, [n for n, _ in spy.calls]))
        check(y.dtype == dtype and x.grad.dtype == dtype and z.grad.dtype == dtype,
              "%s fused: dtypes" % lab)
        check(same_bits(y, y32.detach().to(dtype)), "%s fused: y not fp32's rounded" % lab)
        # The fp32 forward's y > 0 mask and the rounded one agree except where y32 rounds to
        # 0 (none here: y32 > 0 rounds to > 0); dx and dz: the fp32 gradients rounded once.
        check(same_bits(z.grad, z32.grad.to(dtype)) and same_bits(x.grad, x32.grad.to(dtype)),
              "%s fused: dx/dz not the fp32 gradients rounded (%.3g, %.3g)" % (
                  lab, max_diff(x.grad, x32.grad), max_diff(z.grad, z32.grad)))
        # A residual of another dtype: torch's composition, the reason named.
        bt._reset_fallback_warnings()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            if dtype == torch.bfloat16:
                y = bt.batch_norm_relu(x.detach(), None, None, training=True,
                                       residual=z.detach().float())
                check(y.dtype == torch.float32, "%s: mixed residual result dtype %s"
                      % (lab, y.dtype))
        if dtype == torch.bfloat16:
            check(any("residual" in str(i.message) for i in w),
                  "%s: a float32 residual did not fall back naming it" % lab)
        # In place: nn.ReLU(inplace=True) after a converted 16-bit module, and
        # convert(fuse_relu=True) fusing it.
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                  torch.nn.ReLU(inplace=True)).to(dtype) \
            if dtype == torch.bfloat16 else None
        if net is not None:  # torch's Half conv2d has no CPU kernel in torch 1.13
            xin = torch.randn(2, 3, 8, 8, generator=gen).to(dtype)
            ref = net(xin)
            import copy
            fused = bt.convert(copy.deepcopy(net), fuse_relu=True)
            got = fused(xin)
            check(type(fused[1]) is bt.BatchNormReLU2d and got.dtype == dtype and
                  max_diff(got, ref) <= 4 * UNIT[dtype] * (1 + float(ref.abs().max())),
                  "bfloat16 fused conv net: %.3g from torch's" % max_diff(got, ref))


def extensions_and_inference():
    """The extensions (ghost batch, batch renorm, frozen statistics, frozen affine) on 16-bit
    input, with fp32 and with converted 16-bit modules: the fp32 pass rounded once; and
    update_bn_stats / fold_batch_norm on a bf16 model."""
    for dtype in (torch.bfloat16, torch.float16):
        for kw in ({"ghost_batch": 4}, {"batch_renorm": True},
                   {"normalize_with_running_stats": True}, {"freeze_affine": True}):
            for converted in (False, True):
                tag = "%s %s%s" % (str(dtype)[6:], kw, " converted" if converted else "")
                gen = torch.Generator().manual_seed(11)
                m, m32 = bt.BatchNorm2d(3, **kw), bt.BatchNorm2d(3, **kw)
                if converted:
                    m.to(dtype)
                x = (2 * torch.randn(8, 3, 4, 4, generator=gen) + 1).to(dtype)
                x.requires_grad_(True)
                x32 = x.detach().float().requires_grad_(True)
                dy = torch.randn(8, 3, 4, 4, generator=gen).to(dtype)
                y, y32 = m(x), m32(x32)
                y.backward(dy)
                y32.backward(dy.float())
                rdt = dtype if converted else torch.float32
                check(same_bits(y, y32.detach().to(dtype)) and
                      same_bits(x.grad, x32.grad.to(dtype)) and
                      same_bits(m.running_mean, m32.running_mean.to(rdt)) and
                      same_bits(m.running_var, m32.running_var.to(rdt)),
                      "%s: not the fp32 pass rounded once" % tag)
    # update_bn_stats and fold_batch_norm on a bf16 model (torch ops in float64 inside).
    gen = torch.Generator().manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).to(
        torch.bfloat16)
    net = bt.convert(net)
    batches = [torch.randn(4, 3, 8, 8, generator=gen).to(torch.bfloat16) for _ in range(3)]
    bt.update_bn_stats(net, batches, 3)
    check(net[1].running_mean.dtype == torch.bfloat16 and
          bool(torch.isfinite(net[1].running_var.float()).all()),
          "update_bn_stats on a bf16 model: running statistics %s" % net[1].running_mean.dtype)
    net.eval()
    folded = bt.fold_batch_norm(net)
    with torch.no_grad():
        a, b = net(batches[0]), folded(batches[0])
    check(b.dtype == torch.bfloat16 and max_diff(a, b) <= 8 * UNIT[torch.bfloat16] *
          (1 + float(a.abs().max())), "fold_batch_norm on a bf16 model: %.3g" % max_diff(a, b))


def fallbacks_and_numpy():
    bt._reset_fallback_warnings()
    m = bt.BatchNorm2d(3).double()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        y = m(x)
    msgs = [str(i.message) for i in w if issubclass(i.category, bt.BnormFallbackWarning)]
    check(len(msgs) == 1 and "float64" in msgs[0] and "does not support float64" in msgs[0],
          "float64: fallback warning %s" % msgs)
    check(y.dtype == torch.float64, "float64 fallback: dtype %s" % y.dtype)
    # numpy float16
    gen = np.random.default_rng(5)
    x = gen.standard_normal((6, 3, 7)).astype(np.float16)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    rm32, rv32 = rm.copy(), rv.copy()
    y, sm, si = bnp.forward_train(x, None, None, rm, rv)
    y32, sm32, si32 = bnp.forward_train(x.astype(np.float32), None, None, rm32, rv32)
    check(y.dtype == np.float16 and np.array_equal(y, y32.astype(np.float16)) and
          np.array_equal(sm, sm32) and np.array_equal(rm, rm32),
          "numpy float16 forward_train: not the fp32 pass rounded once")
    dy = gen.standard_normal((6, 3, 7)).astype(np.float16)
    dx, dw, db = bnp.backward(dy, x, None, sm, si)
    dx32, dw32, db32 = bnp.backward(dy.astype(np.float32), x.astype(np.float32), None, sm, si)
    check(dx.dtype == np.float16 and np.array_equal(dx, dx32.astype(np.float16)) and
          np.array_equal(dw, dw32), "numpy float16 backward: not the fp32 pass rounded once")
    ye = bnp.forward_eval(x, None, None, rm, rv)
    check(ye.dtype == np.float16, "numpy float16 forward_eval dtype")
    for bad in (x.astype(np.float64),):
        try:
            bnp.forward_train(bad)
            check(False, "numpy float64 accepted")
        except TypeError as e:
            check("float64" in str(e), "numpy float64: message %s" % e)


def main():
    t0 = time.time()
    print("library: %s; torch %s" % (bnorm._lib.library_path(), torch.__version__))
    for name, fn in (("modules", modules_fp32_parameters), ("converted", modules_converted),
                     ("functional/fused/in place", functional_fused_inplace),
                     ("extensions/inference", extensions_and_inference),
                     ("fallbacks/numpy", fallbacks_and_numpy)):
        t = time.time()
        before = len(failures)
        try:
            fn()
        except Exception as e:  # a crash of one part is a failure, the others still run
            import traceback
            traceback.print_exc()
            check(False, "%s: %s: %s" % (name, type(e).__name__, e))
        print("%-26s %s (%.1f s)" % (name, "ok" if len(failures) == before else "FAILED",
                                     time.time() - t), flush=True)
    print("%.1f s" % (time.time() - t0))
    print("%d passed, %d failed" % (checks[0] - len(failures), len(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
