#!/usr/bin/env python3
"""bnorm.torch's extensions (freeze switches, stateless update, batch renorm, ghost batch norm)
against the same computation composed of torch's own ops.

1. Freeze switches, all 8 combinations, on BatchNorm2d (contiguous and channels_last): the
   torch equivalent is torch's eval-mode batch norm with the running statistics as they were
   (normalize_with_running_stats), torch's training batch norm on copies of the buffers for
   the update (compared, or the buffers bit for bit unchanged with freeze_running_stats), and
   no gradient for weight and bias (freeze_affine: .grad stays None).
2. Batch renorm: y = w * (xhat * r + d) + b in torch ops with r, d computed from the batch and
   the running statistics before the step (fp64, detached), through autograd; the running
   statistics follow torch's batch norm; rmax/dmax changed between steps (the paper's
   schedule); a frozen-statistics renorm leaves the buffers alone.
3. Ghost batch norm: torch's BatchNorm on torch.split(x, G) chunks in order (G dividing N and
   not), the buffers and num_batches_tracked chained through the chunks; momentum None too.
4. The stateless functional update: bnorm.torch.batch_norm with running_*_out leaves the
   inputs bit for bit and writes what the in-place call writes.
5. Bad input raises the library's message and leaves the module's buffers bit for bit.
6. Double backward of a ghost module (torch ops recompute it) equals the composed one's.

Tolerances: an fp32 result computed with reductions over n terms is within 2 (n + 8) u of
the scale of the output (u = 2^-24, worst-case linear bound of a sequential fp32 sum, plus a
few roundings), and bnorm and torch may each be off by that: 2x of it is allowed.
"""

import sys

import torch
import torch.nn.functional as F

import bnorm.torch as bt
from bnorm import _lib

U = 2.0 ** -24
failures = []


def check_close(name, got, want, n):
    got, want = got.detach().double(), want.detach().double()
    scale = 1.0 + float(want.abs().max()) if want.numel() else 1.0
    tol = 4 * (n + 8) * U * scale
    err = float((got - want).abs().max()) if want.numel() else 0.0
    if not err <= tol:
        failures.append("%s: max |diff| %.3g > tol %.3g" % (name, err, tol))


def check(name, cond):
    if not cond:
        failures.append(name)


def make(shape, channels_last, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 1.5 + offset
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def start_state(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight.copy_(torch.rand(m.num_features, generator=g) * 2 - 0.5)
        m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
        m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
        m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        m.num_batches_tracked.fill_(3)


def test_freeze():
    for channels_last in (False, True):
        for combo in range(8):
            normalize, freeze_stats, freeze_affine = bool(combo & 1), bool(combo & 2), bool(combo & 4)
            tag = "freeze %d%d%d cl %d" % (normalize, freeze_stats, freeze_affine, channels_last)
            m = bt.BatchNorm2d(3, normalize_with_running_stats=normalize,
                               freeze_running_stats=freeze_stats, freeze_affine=freeze_affine)
            start_state(m, 1)
            ref = torch.nn.BatchNorm2d(3)
            ref.load_state_dict(m.state_dict())
            x = make((4, 3, 3, 5), channels_last, 2 + combo).requires_grad_()
            xr = x.detach().clone().requires_grad_()
            dy = make((4, 3, 3, 5), channels_last, 20 + combo)
            rm0, rv0 = m.running_mean.clone(), m.running_var.clone()
            y = m(x)
            y.backward(dy)
            # The torch composition.
            w = ref.weight.detach() if freeze_affine else ref.weight
            b = ref.bias.detach() if freeze_affine else ref.bias
            if normalize:
                yr = F.batch_norm(xr, rm0.clone(), rv0.clone(), w, b, False, 0.0, ref.eps)
            else:
                yr = F.batch_norm(xr, None, None, w, b, True, 0.0, ref.eps)
            yr.backward(dy)
            rm, rv = rm0.clone(), rv0.clone()
            F.batch_norm(xr.detach(), rm, rv, None, None, True, 0.1, ref.eps)
            n = 4 * 15
            check_close(tag + " y", y, yr, n)
            check_close(tag + " dx", x.grad, xr.grad, n)
            if freeze_affine:
                check(tag + " weight.grad is None", m.weight.grad is None and m.bias.grad is None)
            else:
                check_close(tag + " dweight", m.weight.grad, ref.weight.grad, n)
                check_close(tag + " dbias", m.bias.grad, ref.bias.grad, n)
            if freeze_stats:
                check(tag + " running stats unchanged",
                      torch.equal(m.running_mean, rm0) and torch.equal(m.running_var, rv0) and
                      int(m.num_batches_tracked) == 3)
            else:
                check_close(tag + " running_mean", m.running_mean, rm, n)
                check_close(tag + " running_var", m.running_var, rv, n)
                check(tag + " num_batches_tracked", int(m.num_batches_tracked) == 4)
            check(tag + " repr", ("normalize_with_running_stats=True" in repr(m)) == normalize)


def renorm_reference(x, w, b, rm, rv, eps, rmax, dmax):
    dims = [0, 2, 3]
    with torch.no_grad():
        xd = x.detach().double()
        sigma_b = (xd.var(dims, unbiased=False) + eps).sqrt()
        sigma = (rv.double() + eps).sqrt()
        r = (sigma_b / sigma).clamp(1 / rmax, rmax).float().view(1, -1, 1, 1)
        d = ((xd.mean(dims) - rm.double()) / sigma).clamp(-dmax, dmax).float().view(1, -1, 1, 1)
    xhat = F.batch_norm(x, None, None, None, None, True, 0.0, eps)
    return w.view(1, -1, 1, 1) * (xhat * r + d) + b.view(1, -1, 1, 1)


def test_renorm():
    for channels_last in (False, True):
        m = bt.BatchNorm2d(3, batch_renorm=True)
        start_state(m, 3)
        ref = torch.nn.BatchNorm2d(3)
        ref.load_state_dict(m.state_dict())
        for step, (rmax, dmax) in enumerate([(1.0, 0.0), (1.0, 0.0), (1.5, 0.5), (3.0, 5.0)]):
            tag = "renorm step %d cl %d" % (step, channels_last)
            m.rmax, m.dmax = rmax, dmax
            x = make((6, 3, 2, 3), channels_last, 30 + step, offset=1.0).requires_grad_()
            xr = x.detach().clone().requires_grad_()
            dy = make((6, 3, 2, 3), channels_last, 40 + step)
            m.zero_grad()
            ref.zero_grad()
            rm0, rv0 = ref.running_mean.clone(), ref.running_var.clone()
            y = m(x)
            y.backward(dy)
            yr = renorm_reference(xr, ref.weight, ref.bias, rm0, rv0, ref.eps, rmax, dmax)
            yr.backward(dy)
            with torch.no_grad():
                ref(xr.detach())  # torch's update of the running statistics
            n = 6 * 6
            check_close(tag + " y", y, yr, n)
            check_close(tag + " dx", x.grad, xr.grad, n)
            check_close(tag + " dweight", m.weight.grad, ref.weight.grad, n)
            check_close(tag + " dbias", m.bias.grad, ref.bias.grad, n)
            check_close(tag + " running_mean", m.running_mean, ref.running_mean, n)
            check_close(tag + " running_var", m.running_var, ref.running_var, n)
            check(tag + " num_batches_tracked",
                  int(m.num_batches_tracked) == int(ref.num_batches_tracked))
        m.freeze_running_stats = True
        before = [t.clone() for t in (m.running_mean, m.running_var, m.num_batches_tracked)]
        m(make((6, 3, 2, 3), channels_last, 50))
        check("renorm frozen statistics unchanged",
              all(torch.equal(a, b) for a, b in zip(before, (m.running_mean, m.running_var,
                                                            m.num_batches_tracked))))


def test_ghost():
    for channels_last in (False, True):
        for ghost, n_batch, momentum in ((2, 6, 0.1), (4, 10, 0.1), (3, 7, None)):
            tag = "ghost G %d N %d momentum %s cl %d" % (ghost, n_batch, momentum, channels_last)
            m = bt.BatchNorm2d(3, momentum=momentum, ghost_batch=ghost)
            start_state(m, 5)
            ref = torch.nn.BatchNorm2d(3, momentum=momentum)
            ref.load_state_dict(m.state_dict())
            x = make((n_batch, 3, 2, 2), channels_last, 60 + ghost).requires_grad_()
            xr = x.detach().clone().requires_grad_()
            dy = make((n_batch, 3, 2, 2), channels_last, 70 + ghost)
            y = m(x)
            y.backward(dy)
            yr = torch.cat([ref(chunk) for chunk in torch.split(xr, ghost)])
            yr.backward(dy)
            n = ghost * 4
            check_close(tag + " y", y, yr, n)
            check_close(tag + " dx", x.grad, xr.grad, n)
            check_close(tag + " dweight", m.weight.grad, ref.weight.grad, n_batch * 4)
            check_close(tag + " dbias", m.bias.grad, ref.bias.grad, n_batch * 4)
            check_close(tag + " running_mean", m.running_mean, ref.running_mean, n)
            check_close(tag + " running_var", m.running_var, ref.running_var, n)
            check(tag + " num_batches_tracked",
                  int(m.num_batches_tracked) == int(ref.num_batches_tracked))
            check(tag + " y strides", y.stride() == x.stride())
            # Eval is torch's, whatever G says.
            m.eval()
            ref.eval()
            check_close(tag + " eval", m(x.detach()), ref(x.detach()), 1)


def test_stateless():
    x = make((5, 3, 4, 2), False, 80)
    rm, rv = torch.zeros(3) + 0.5, torch.ones(3) * 2
    nbt = torch.tensor(7)
    rm_in, rv_in, nbt_in = rm.clone(), rv.clone(), nbt.clone()
    out_m, out_v, out_n = torch.empty(3), torch.empty(3), torch.tensor(0)
    for ghost in (0, 2):
        y = bt.batch_norm(x, rm, rv, None, None, True, None, 1e-5, nbt, ghost_batch=ghost,
                          running_mean_out=out_m, running_var_out=out_v,
                          num_batches_tracked_out=out_n)
        check("stateless inputs unchanged", torch.equal(rm, rm_in) and torch.equal(rv, rv_in) and
              torch.equal(nbt, nbt_in))
        rm2, rv2, nbt2 = rm.clone(), rv.clone(), nbt.clone()
        y2 = bt.batch_norm(x, rm2, rv2, None, None, True, None, 1e-5, nbt2, ghost_batch=ghost)
        check("stateless outputs = in place", torch.equal(out_m, rm2) and
              torch.equal(out_v, rv2) and torch.equal(out_n, nbt2) and torch.equal(y, y2))


def expect_error(name, fn, text):
    try:
        fn()
    except (_lib.BnormError, ValueError) as e:
        if text not in str(e):
            failures.append("%s: message %r lacks %r" % (name, str(e), text))
        return
    failures.append("%s: no error" % name)


def test_bad_input():
    m = bt.BatchNorm2d(3, ghost_batch=4)
    start_state(m, 9)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    expect_error("G > N", lambda: m(make((3, 3, 2, 2), False, 90)),
                 "ghost_batch: must be <= N = 3")
    m.ghost_batch = 1
    expect_error("G = 1", lambda: m(make((6, 3, 2, 2), False, 90)),
                 "ghost_batch: must be 0 (off) or >= 2, got 1")
    m.ghost_batch = 0
    m.batch_renorm = True
    m.rmax = 0.5
    expect_error("rmax < 1", lambda: m(make((6, 3, 2, 2), False, 90)), "rmax: must be >= 1")
    m.rmax, m.dmax = 2.0, -1.0
    expect_error("dmax < 0", lambda: m(make((6, 3, 2, 2), False, 90)), "dmax: must be >= 0")
    check("bad input leaves the module", all(torch.equal(before[k], v)
                                             for k, v in m.state_dict().items()))
    expect_error("frozen statistics without running statistics",
                 lambda: bt.BatchNorm2d(3, track_running_stats=False,
                                        normalize_with_running_stats=True),
                 "normalize_with_running_stats: a frozen-statistics layer needs running")
    # convert() makes plain modules: the defaults are torch's.
    conv = bt.convert(torch.nn.BatchNorm2d(3))
    check("converted defaults", conv.ghost_batch == 0 and not conv.batch_renorm and
          not conv.normalize_with_running_stats)


def test_double_backward():
    m = bt.BatchNorm2d(3, ghost_batch=2)
    ref = torch.nn.BatchNorm2d(3)
    x = make((4, 3, 2, 2), False, 95).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (g,) = torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)
    (gr,) = torch.autograd.grad(torch.cat([ref(c) for c in torch.split(xr, 2)]).pow(2).sum(), xr,
                                create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    (hr,) = torch.autograd.grad(gr.sum(), xr)
    check_close("double backward first", g, gr, 8)
    check_close("double backward second", h, hr, 8)


def main():
    torch.manual_seed(0)
    passed = failed = 0
    for t in (test_freeze, test_renorm, test_ghost, test_stateless, test_bad_input,
              test_double_backward):
        before = len(failures)
        t()
        ok = len(failures) == before
        passed, failed = passed + ok, failed + (not ok)
        print("%s: %s" % (t.__name__, "ok" if ok else "FAILED"))
    for f in failures:
        print("FAIL", f)
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
