#!/usr/bin/env python3
"""bnorm.torch's fused batch norm + ReLU (batch_norm_relu, BatchNormReLU1d/2d/3d,
convert(model, fuse_relu=True)) against torch's batch norm then ReLU.

1. Modules: every combination of input kind ((N, C) and (N, C, L) for 1d, 2d, 3d), memory
   format (contiguous, channels_last / channels_last_3d, and the (N, C, L) tensor transposed
   from (N, L, C)), affine on/off, track_running_stats on/off, momentum 0.1/None and residual
   on/off: two training steps and one eval step through autograd, BatchNormReLU*d(x, z)
   against three references from the same state_dict:
   - bnorm's unfused modules, relu(bnorm.torch.BatchNorm*d(x) + z): bitwise (the library's
     fused passes are its unfused passes with the add and the mask inside, tests/fused_test.cc);
   - torch's composition, relu(torch.nn.BatchNorm*d(x) + z): y, dx, dweight, dbias, dz,
     running_mean, running_var within TOL = 32 u sqrt(M) (u = 2^-24, M = N x spatial the
     reduction length) of the largest magnitude of torch's tensor (the summation orders of two
     fp32 implementations differ by about u sqrt(M) relative; a wrong term is off by O(1)),
     num_batches_tracked exactly; the ReLU masks agree except where torch's pre-activation is
     within TOL of 0 (there the gradients are compared with bnorm's mask);
   - the library got x's and z's own memory (no copy), the fused entry points ran and the
     unfused ones did not, y has x's strides, eval left the buffers bit for bit.
   Also: a residual in the other memory format than x, and x and residual in neither format
   (copied once): bit for bit the results of the dense same-format tensors.
2. Finite differences of the library's fp32 function itself: the directional derivative
   (f(p + h v) - f(p - h v)) / 2h of f = sum(w * relu(bn(x) + z)) along random directions v of
   x, weight, bias and z, against the backward's <grad, v>, training and eval, contiguous and
   channels_last; the problem is drawn off the ReLU's kink (no pre-activation within 50 h of 0,
   checked), fp32 rounding gives |error| <= ~1e-3 relative at h = 1e-2.
3. convert(model, fuse_relu=True) on a Sequential CNN (Conv-BN-ReLU, Conv-BN-ReLU(inplace),
   Linear-BN1d-ReLU): the pairs fused (BatchNormReLU2d/1d and Identity), state_dict keys those
   of torch's model; five SGD steps (momentum 0.9) against the unconverted torch model
   (outputs, gradients, state_dict within tolerance) and against convert(model) without fusion
   (bitwise); a torch checkpoint loads into the fused model and back; not fused: a shared
   batch norm, a batch norm with a forward hook, a ReLU with a hook, a Sequential subclass, a
   block calling self.relu in forward; fold_batch_norm of a fused model keeps the ReLU.
4. Fallbacks (BnormFallbackWarning, results torch's): float64 input, a float64 residual, the
   meta device, an empty batch, double backward (second derivatives equal torch's).
5. Bad input, named, nothing written: a residual of another shape, a residual that is not a
   tensor, a weight of the wrong length, eps <= 0, training with one value per channel.

Usage: torch_fused_test.py   exit 0 iff every check passed (77: no torch).
"""

import copy
import itertools
import math
import os
import sys
import time
import warnings
import zlib

try:
    import torch
except ImportError:
    print("skipped: python3-torch not installed")
    sys.exit(77)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(HERE, "..", "..", "python"))
import bnorm  # noqa: E402
import bnorm._lib  # noqa: E402
import bnorm.torch as bt  # noqa: E402

nn = torch.nn
U = 2.0 ** -24
FUSED_NAMES = ("bnorm_forward_train_relu", "bnorm_forward_eval_relu", "bnorm_backward_relu")
PLAIN_NAMES = ("bnorm_forward_train", "bnorm_forward_eval", "bnorm_backward")

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL " + what, flush=True)
    return cond


def bitwise(a, b):
    if a is None or b is None:
        return a is None and b is None
    a, b = a.detach(), b.detach()
    return (a.shape == b.shape and a.dtype == b.dtype
            and bool(((a == b) | (a.isnan() & b.isnan())).all()))


def same_strides(a, b):
    return a.shape == b.shape and all(d == 1 or x == y
                                      for d, x, y in zip(a.shape, a.stride(), b.stride()))


class Spy:
    """Records the calls of the library's batch-norm entry points (name, args)."""

    def __enter__(self):
        self.lib = bnorm._lib.lib()
        self.calls = []
        # bnorm.torch calls the *_dt entry points (the element type after layout): recorded
        # under the plain name with the arguments of the fp32 entry point (dtype dropped) and
        # the dtype in self.dtypes.
        self.dtypes = []
        self.saved = {name + "_dt": getattr(self.lib, name + "_dt") for name in FUSED_NAMES + PLAIN_NAMES}
        for name, fn in self.saved.items():
            setattr(self.lib, name, self._wrap(name, fn))
        return self

    def _wrap(self, name, fn):
        def call(*args):
            self.calls.append((name[:-len("_dt")], args[:1] + args[2:]))
            self.dtypes.append(args[1])
            return fn(*args)
        return call

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.lib, name, fn)

    def names(self):
        return [n for n, _ in self.calls]

    def arg(self, name, index):
        return [args[index] for n, args in self.calls if n == name]


def state_of(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(bitwise(a[k], b[k]) for k in a)


def max_diff(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def close(label, name, got, want, tol_rel, worst, floor=1e-3):
    """|got - want| <= tol_rel * max(max|want|, floor); records the ratio in worst[name]."""
    if got is None or want is None:
        return check(got is None and want is None, "%s: %s is %s, torch's %s" % (
            label, name, "None" if got is None else "set", "None" if want is None else "set"))
    scale = max(float(want.detach().abs().max()) if want.numel() else 0.0, floor)
    d = max_diff(got, want)
    r = d / (tol_rel * scale)
    if r > worst.get(name, (0.0, ""))[0]:
        worst[name] = (r, label)
    return check(r <= 1.0, "%s: %s differs from torch's by %.3g (tolerance %.3g)"
                 % (label, name, d, tol_rel * scale))


# ----------------------------------------------------------------------------- 1. modules

KINDS = {  # name: (rank, torch class, bnorm plain class, bnorm fused class, memory formats)
    "1d(N,C)": (2, nn.BatchNorm1d, bt.BatchNorm1d, bt.BatchNormReLU1d, ("contiguous",)),
    "1d(N,C,L)": (3, nn.BatchNorm1d, bt.BatchNorm1d, bt.BatchNormReLU1d,
                  ("contiguous", "channels_last")),
    "2d": (4, nn.BatchNorm2d, bt.BatchNorm2d, bt.BatchNormReLU2d, ("contiguous", "channels_last")),
    "3d": (5, nn.BatchNorm3d, bt.BatchNorm3d, bt.BatchNormReLU3d, ("contiguous", "channels_last")),
}
SHAPES = {2: (37, 6), 3: (5, 6, 11), 4: (4, 6, 5, 7), 5: (3, 6, 3, 4, 5)}


def in_format(t, fmt):
    if fmt == "contiguous" or t.dim() == 2:
        return t.contiguous()
    if t.dim() == 3:  # (N, C, L) with C fastest: a transposed (N, L, C) tensor
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    mf = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=mf)


def torch_composed(tm, x, z, dy):
    """relu(tm(x) + z) through torch's autograd: (y, h, dx, dz) with the grads set on tm."""
    xa = x.detach().clone().requires_grad_(True)
    za = None if z is None else z.detach().clone().requires_grad_(True)
    h = tm(xa)
    if za is not None:
        h = h + za
    y = torch.relu(h)
    return y, h, xa, za


def module_case(kind, fmt, affine, track, momentum, residual, worst):
    rank, tcls, pcls, fcls, _ = KINDS[kind]
    label0 = "%s %s affine=%d track=%d momentum=%s residual=%d" % (
        kind, fmt, affine, track, momentum, residual)
    shape = SHAPES[rank]
    C = shape[1]
    M = math.prod(shape) // C
    tol = 32 * U * math.sqrt(M)
    kw = dict(eps=1e-5, momentum=momentum, affine=affine, track_running_stats=track)
    tm, pm, fm = tcls(C, **kw), pcls(C, **kw), fcls(C, **kw)
    check(isinstance(fm, tcls), "%s: %s is not a %s" % (label0, fcls.__name__, tcls.__name__))
    g = torch.Generator().manual_seed(zlib.crc32(label0.encode()))
    with torch.no_grad():
        if affine:
            tm.weight.copy_(torch.rand(C, generator=g) * 1.5 + 0.25)
            tm.bias.copy_(torch.randn(C, generator=g) * 0.5)
        if track:
            tm.running_mean.copy_(torch.randn(C, generator=g))
            tm.running_var.copy_(torch.rand(C, generator=g) + 0.5)
            tm.num_batches_tracked.fill_(3)
    pm.load_state_dict(tm.state_dict())
    fm.load_state_dict(tm.state_dict())
    check(list(fm.state_dict()) == list(tm.state_dict()),
          "%s: state_dict keys %s, torch's %s" % (label0, list(fm.state_dict()),
                                                  list(tm.state_dict())))
    for step in range(3):
        training = step < 2
        label = "%s %s" % (label0, ("train#%d" % (step + 1)) if training else "eval")
        for m in (tm, pm, fm):
            m.train(training)
            if affine:
                m.weight.grad = m.bias.grad = None
        shift = torch.randn(1, C, *([1] * (rank - 2)), generator=g) * 2
        x = in_format(torch.randn(shape, generator=g) * 1.7 + shift, fmt)
        z = in_format(torch.randn(shape, generator=g), fmt) if residual else None
        dy = in_format(torch.randn(shape, generator=g), fmt)
        before = state_of(fm)
        # torch's composition (its backward below, once the masks are compared)
        yt, ht, xt, zt = torch_composed(tm, x, z, dy)
        # bnorm's unfused modules, then torch's add and relu
        xp = x.detach().clone().requires_grad_(True)
        zp = None if z is None else z.detach().clone().requires_grad_(True)
        hp = pm(xp)
        yp = torch.relu(hp + zp if zp is not None else hp)
        yp.backward(dy)
        # fused
        xf = x.detach().clone().requires_grad_(True)
        zf = None if z is None else z.detach().clone().requires_grad_(True)
        with Spy() as spy:
            yf = fm(xf, zf)
            yf.backward(dy)
        use_batch = training or not track
        fwd = "bnorm_forward_train_relu" if use_batch else "bnorm_forward_eval_relu"
        check(spy.names() == [fwd, "bnorm_backward_relu"],
              "%s: library calls %s" % (label, spy.names()))
        z_index = 12 if use_batch else 10
        check(spy.arg(fwd, 4) == [xf.data_ptr()], "%s: x was copied" % label)
        if residual:
            check(spy.arg(fwd, z_index) == [zf.data_ptr()], "%s: residual was copied" % label)
        else:
            check(spy.arg(fwd, z_index) == [None], "%s: a residual was passed" % label)
        check(spy.arg("bnorm_backward_relu", 4) == [dy.data_ptr()], "%s: dy was copied" % label)
        check(spy.arg("bnorm_backward_relu", 6) == [yf.data_ptr()],
              "%s: backward did not get the forward's y" % label)
        check(same_strides(yf, xf), "%s: y strides %s, x strides %s" % (label, yf.stride(),
                                                                       xf.stride()))
        # bitwise against bnorm's unfused path
        pairs = [("y", yf, yp), ("dx", xf.grad, xp.grad)]
        if affine:
            pairs += [("dweight", fm.weight.grad, pm.weight.grad),
                      ("dbias", fm.bias.grad, pm.bias.grad)]
        if residual:
            pairs.append(("dz", zf.grad, zp.grad))
        if track:
            pairs += [("running_mean", fm.running_mean, pm.running_mean),
                      ("running_var", fm.running_var, pm.running_var),
                      ("num_batches_tracked", fm.num_batches_tracked, pm.num_batches_tracked)]
        for name, a, b in pairs:
            check(bitwise(a, b), "%s: %s differs from bnorm's unfused modules (max %.3g)"
                  % (label, name, max_diff(a, b)))
        if not training and track:
            check(same_state(before, state_of(fm)), "%s: eval changed the buffers" % label)
        # against torch, with the masks compared first
        band = ht.detach().abs() <= tol * max(float(ht.detach().abs().max()), 1e-3)
        mask_f, mask_t = yf.detach() > 0, yt.detach() > 0
        off = (mask_f != mask_t) & ~band
        check(not bool(off.any()), "%s: ReLU masks differ at %d elements away from the kink"
              % (label, int(off.sum())))
        if bool((mask_f != mask_t).any()):
            # Only on the kink: torch's batch norm backward from bnorm's mask there.
            print("  %s: %d pre-activations on the kink, torch's gradient taken with bnorm's "
                  "mask" % (label, int((mask_f != mask_t).sum())))
            ht.backward(dy * mask_f)
        else:
            yt.backward(dy)
        close(label, "y", yf, yt, tol, worst)
        close(label, "dx", xf.grad, xt.grad, tol, worst)
        if affine:
            close(label, "dweight", fm.weight.grad, tm.weight.grad, tol, worst)
            close(label, "dbias", fm.bias.grad, tm.bias.grad, tol, worst)
        if residual:
            check(bitwise(zf.grad, dy * mask_f), "%s: dz is not dy * (y > 0)" % label)
            close(label, "dz", zf.grad, zt.grad, tol, worst)
        if track:
            close(label, "running_mean", fm.running_mean, tm.running_mean, tol, worst)
            close(label, "running_var", fm.running_var, tm.running_var, tol, worst)
            check(int(fm.num_batches_tracked) == int(tm.num_batches_tracked),
                  "%s: num_batches_tracked %d, torch's %d" % (
                      label, int(fm.num_batches_tracked), int(tm.num_batches_tracked)))


def module_checks():
    worst = {}
    count = 0
    for kind, (_, _, _, _, fmts) in KINDS.items():
        for fmt, affine, track, momentum, residual in itertools.product(
                fmts, (True, False), (True, False), (0.1, None), (False, True)):
            module_case(kind, fmt, affine, track, momentum, residual, worst)
            count += 1
    print("  %d cases; largest |bnorm - torch| / tolerance per output:" % count)
    for name, (r, where) in sorted(worst.items()):
        print("    %-14s %.3g  (%s)" % (name, r, where))


def strides_checks():
    """A residual in the other memory format than x, and x in neither format: copied once,
    results bit for bit those of the dense same-format tensors."""
    torch.manual_seed(2)
    shape = (4, 5, 6, 7)
    x = torch.randn(shape) * 2 + 1
    z = torch.randn(shape)
    dy = torch.randn(shape)
    cases = [("residual channels_last, x contiguous", x, in_format(z, "channels_last"), x, z),
             ("residual contiguous, x channels_last", in_format(x, "channels_last"), z,
              in_format(x, "channels_last"), in_format(z, "channels_last")),
             ("x and residual in neither format", torch.randn(4, 5, 6, 14)[..., ::2], None,
              None, None)]
    for label, xa, za, xr, zr in cases:
        if xr is None:
            za = torch.randn(4, 5, 6, 14)[..., ::2]
            xr, zr = xa.contiguous(), za.contiguous()
        a, r = bt.BatchNormReLU2d(5), bt.BatchNormReLU2d(5)
        xa, za = xa.detach().requires_grad_(True), za.detach().requires_grad_(True)
        xr, zr = xr.detach().clone().requires_grad_(True), zr.detach().clone().requires_grad_(True)
        ya, yr = a(xa, za), r(xr, zr)
        ya.backward(dy)
        yr.backward(dy)
        check(same_strides(ya, xr), "%s: y strides %s, want %s" % (label, ya.stride(),
                                                                   xr.stride()))
        for name, p, q in (("y", ya, yr), ("dx", xa.grad, xr.grad), ("dz", za.grad, zr.grad),
                           ("dweight", a.weight.grad, r.weight.grad),
                           ("running_var", a.running_var, r.running_var)):
            check(bitwise(p, q), "%s: %s differs from the dense tensors' (max %.3g)"
                  % (label, name, max_diff(p, q)))


# ----------------------------------------------------------------------------- 2. finite diffs

def finite_difference_checks():
    h = 1e-3
    worst = 0.0
    for training, fmt, residual in itertools.product((True, False), ("contiguous", "channels_last"),
                                                     (False, True)):
        label = "finite differences training=%d %s residual=%d" % (training, fmt, residual)
        shape, C = (3, 4, 2, 3), 4
        g = torch.Generator().manual_seed(7 + 2 * training + residual)
        # Draw until no pre-activation is within 20 h of the kink (a step moves one by a few h).
        for attempt in range(500):
            x = in_format(torch.randn(shape, generator=g) * 2 + 1, fmt)
            z = in_format(torch.randn(shape, generator=g), fmt) if residual else None
            w = torch.rand(C, generator=g) + 0.5
            b = torch.randn(C, generator=g) * 0.3
            rm, rv = torch.randn(C, generator=g) * 0.3, torch.rand(C, generator=g) + 0.5
            pre = bt.batch_norm(x, None if training else rm, None if training else rv, w, b,
                                training, 0.1, 1e-5)
            if z is not None:
                pre = pre + z
            if float(pre.abs().min()) > 20 * h:
                break
        else:
            check(False, "%s: no problem off the kink in 500 draws" % label)
            continue
        wsum = torch.randn(shape, generator=g, dtype=torch.float64)

        def f(x, w, b, z):
            y = bt.batch_norm_relu(x, None if training else rm, None if training else rv, w, b,
                                   training, 0.1, 1e-5, residual=z)
            return y, float((y.double() * wsum).sum())

        args = [x.clone().requires_grad_(True), w.clone().requires_grad_(True),
                b.clone().requires_grad_(True)]
        args.append(z.clone().requires_grad_(True) if residual else None)
        y, _ = f(*args)
        y.backward(wsum.float())
        mask = y.detach() > 0
        check(0 < int(mask.sum()) < mask.numel(), "%s: the ReLU is all on or all off" % label)
        for name, i in (("x", 0), ("weight", 1), ("bias", 2), ("residual", 3)):
            if args[i] is None:
                continue
            for k in range(3):
                v = torch.randn(args[i].shape, generator=g)
                plus = [a.detach().clone() if a is not None else None for a in args]
                minus = [a.detach().clone() if a is not None else None for a in args]
                plus[i] += h * v
                minus[i] -= h * v
                yp, fp = f(*plus)
                ym, fm = f(*minus)
                if not check(bool(((yp > 0) == mask).all() and ((ym > 0) == mask).all()),
                             "%s: d%s: a step crossed the kink" % (label, name)):
                    continue
                fd = (fp - fm) / (2 * h)
                an = float((args[i].grad.double() * v.double()).sum())
                # fp32 rounding of f (~u sqrt(72) |f|) over 2h, against |grad| |v|
                scale = float(args[i].grad.double().norm() * v.double().norm())
                err = abs(fd - an)
                worst = max(worst, err / max(scale, 1e-3))
                check(err <= 1e-3 * max(scale, 1e-3),
                      "%s: d%s along v#%d: finite difference %.6g, backward %.6g (|diff| %.3g, "
                      "bound %.3g)" % (label, name, k, fd, an, err, 1e-3 * scale))
    print("  largest |finite difference - backward| / (|grad| |v|): %.3g (bound 1e-3)" % worst)


# ----------------------------------------------------------------------------- 3. convert

def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, momentum=None),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 5))


def train_steps(model, batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    outs, grads = [], []
    for x, target in batches:
        opt.zero_grad()
        out = model(x)
        loss = nn.functional.cross_entropy(out, target)
        loss.backward()
        outs.append(out.detach().clone())
        grads.append({k: p.grad.detach().clone() for k, p in model.named_parameters()})
        opt.step()
    return outs, grads


class Block(nn.Module):
    """torchvision's BasicBlock shape: relu called in forward, not a Sequential."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)) + x)


class MySequential(nn.Sequential):
    pass


def convert_checks():
    torch.manual_seed(3)
    base = small_cnn()
    tmodel = copy.deepcopy(base)
    fmodel = bt.convert(copy.deepcopy(base), fuse_relu=True)
    pmodel = bt.convert(copy.deepcopy(base))
    kinds = [type(m).__name__ for m in fmodel]
    check(kinds == ["Conv2d", "BatchNormReLU2d", "Identity", "Conv2d", "BatchNormReLU2d",
                    "Identity", "MaxPool2d", "Flatten", "Linear", "BatchNormReLU1d", "Identity",
                    "Linear"], "convert(fuse_relu=True): modules %s" % kinds)
    check([type(m).__name__ for m in pmodel][1:3] == ["BatchNorm2d", "ReLU"],
          "convert() without fuse_relu fused something")
    check(type(bt.convert(copy.deepcopy(base))[1]) is bt.BatchNorm2d,
          "convert() default: not bnorm's BatchNorm2d")
    check(list(fmodel.state_dict()) == list(tmodel.state_dict()),
          "fused state_dict keys %s, torch's %s" % (list(fmodel.state_dict()),
                                                   list(tmodel.state_dict())))
    check(fmodel[4].momentum is None, "momentum None not carried into the fused module")
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(6, 3, 8, 8, generator=g),
                torch.randint(0, 5, (6,), generator=g)) for _ in range(5)]
    t_out, t_grads = train_steps(tmodel, batches)
    f_out, f_grads = train_steps(fmodel, batches)
    p_out, p_grads = train_steps(pmodel, batches)
    worst = {}
    for step in range(len(batches)):
        label = "convert(fuse_relu=True) SGD step %d" % (step + 1)
        check(bitwise(f_out[step], p_out[step]),
              "%s: output differs from convert() without fusion" % label)
        check(all(bitwise(f_grads[step][k], p_grads[step][k]) for k in p_grads[step]),
              "%s: gradients differ from convert() without fusion" % label)
        # Against torch: fp32 rounding differences grow through the steps; 1e-4 relative to
        # each tensor's largest magnitude (a wrong gradient is off by O(1)), floored at 1e-2 of
        # the step's largest gradient (the Linear bias before BatchNorm1d has a zero gradient
        # in exact arithmetic: fp32 noise of the size of the gradients around it).
        close(label, "logits", f_out[step], t_out[step], 1e-4, worst)
        gmax = max(float(t.abs().max()) for t in t_grads[step].values())
        for k in t_grads[step]:
            close(label, "grad " + k, f_grads[step][k], t_grads[step][k], 1e-4, worst,
                  floor=1e-2 * gmax)
    fs, ts, ps = fmodel.state_dict(), tmodel.state_dict(), pmodel.state_dict()
    for k in ts:
        if ts[k].dtype == torch.int64:
            check(bitwise(fs[k], ts[k]), "state_dict %s: %s, torch's %s" % (k, fs[k], ts[k]))
        else:
            close("after 5 SGD steps", "state " + k, fs[k], ts[k], 1e-4, worst)
        check(bitwise(fs[k], ps[k]), "state_dict %s differs from convert() without fusion" % k)
    print("  SGD steps: largest |fused - torch| / tolerance: %.3g (%s)" % max(
        (r, "%s, %s" % (n, w)) for n, (r, w) in worst.items()))
    # checkpoints both ways
    other = bt.convert(small_cnn(), fuse_relu=True)
    other.load_state_dict(tmodel.state_dict())
    check(same_state(state_of(other), state_of(tmodel)), "torch checkpoint into fused model")
    back = small_cnn()
    back.load_state_dict(fmodel.state_dict())
    check(same_state(state_of(back), state_of(fmodel)), "fused checkpoint into torch model")
    # eval outputs after training agree too
    tmodel.eval()
    fmodel.eval()
    x = torch.randn(4, 3, 8, 8, generator=g)
    close("eval after training", "logits", fmodel(x), tmodel(x), 1e-4, worst)
    # fold_batch_norm keeps the ReLU of a fused layer
    folded = bt.fold_batch_norm(fmodel, strict=False)
    check([type(m) for m in folded][1:3] == [bt.FoldedReLU, nn.Identity],
          "fold_batch_norm of a fused model: %s" % [type(m).__name__ for m in folded])
    close("fold_batch_norm of the fused model", "logits", folded(x), tmodel(x), 1e-4, worst)

    # Not fused.
    shared = nn.BatchNorm2d(4)
    m = bt.convert(nn.Sequential(nn.Conv2d(4, 4, 1), shared, nn.ReLU(), shared, nn.Sigmoid()),
                   fuse_relu=True)
    check(type(m[1]) is bt.BatchNorm2d and type(m[2]) is nn.ReLU,
          "a batch norm used twice was fused: %s" % [type(c).__name__ for c in m])
    hooked = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())
    hooked[0].register_forward_hook(lambda mod, i, o: None)
    m = bt.convert(hooked, fuse_relu=True)
    check(type(m[1]) is nn.ReLU, "a batch norm with a forward hook was fused")
    hooked = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())
    hooked[1].register_forward_pre_hook(lambda mod, i: None)
    m = bt.convert(hooked, fuse_relu=True)
    check(type(m[1]) is nn.ReLU, "a ReLU with a hook was fused")
    m = bt.convert(MySequential(nn.BatchNorm2d(4), nn.ReLU()), fuse_relu=True)
    check(type(m[0]) is bt.BatchNorm2d and type(m[1]) is nn.ReLU,
          "a Sequential subclass was fused")
    m = bt.convert(Block(), fuse_relu=True)
    check(type(m.bn) is bt.BatchNorm2d and type(m.relu) is nn.ReLU,
          "a block calling self.relu in forward was changed")
    m = bt.convert(nn.Sequential(nn.BatchNorm2d(4), nn.Sigmoid(), nn.ReLU()), fuse_relu=True)
    check(type(m[0]) is bt.BatchNorm2d and type(m[2]) is nn.ReLU,
          "a ReLU not directly after the batch norm was fused")
    ghost = nn.Sequential(bt.BatchNorm2d(4, ghost_batch=2), nn.ReLU())
    m = bt.convert(ghost, fuse_relu=True)
    check(type(m[0]) is bt.BatchNorm2d and type(m[1]) is nn.ReLU,
          "a bnorm batch norm with an extension on was fused")
    m = bt.convert(nn.Sequential(bt.BatchNorm2d(4), nn.ReLU()), fuse_relu=True)
    check(type(m[0]) is bt.BatchNormReLU2d and type(m[1]) is nn.Identity,
          "bnorm's BatchNorm2d followed by a ReLU was not fused")


# ----------------------------------------------------------------------------- 4. fallbacks

def caught(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn()
    return out, [x for x in w if issubclass(x.category, bt.BnormFallbackWarning)]


def fallback_checks():
    bt._reset_fallback_warnings()
    torch.manual_seed(5)
    # float64 input (and module): torch's composition, warned once
    tm = nn.BatchNorm2d(3).double()
    fm = bt.BatchNormReLU2d(3).double()
    fm.load_state_dict(tm.state_dict())
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    z = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    y, w = caught(lambda: fm(x, z))
    check(len(w) == 1 and "float64" in str(w[0].message), "float64: warnings %s" % [
        str(v.message) for v in w])
    check(bitwise(y, torch.relu(tm(x) + z)), "float64: result is not torch's composition")
    check(same_state(state_of(fm), state_of(tm)), "float64: running statistics not torch's")
    _, w = caught(lambda: fm(x, z))
    check(not w, "float64: warned twice")
    # a float64 residual with a float32 input
    bt._reset_fallback_warnings()
    tm, fm = nn.BatchNorm2d(3), bt.BatchNormReLU2d(3)
    x32 = torch.randn(4, 3, 5, 5)
    y, w = caught(lambda: fm(x32, z))
    check(len(w) == 1 and "residual" in str(w[0].message), "float64 residual: warnings %s" % [
        str(v.message) for v in w])
    check(bitwise(y, torch.relu(tm(x32) + z)), "float64 residual: not torch's composition")
    # the meta device stands in for a non-CPU one
    bt._reset_fallback_warnings()
    meta = bt.BatchNormReLU2d(3).to("meta")
    y, w = caught(lambda: meta(torch.empty(4, 3, 5, 5, device="meta"),
                               torch.empty(4, 3, 5, 5, device="meta")))
    check(len(w) == 1 and "meta" in str(w[0].message) and y.device.type == "meta",
          "meta device: warnings %s" % [str(v.message) for v in w])
    # an empty batch
    bt._reset_fallback_warnings()
    fm, tm = bt.BatchNormReLU2d(3).eval(), nn.BatchNorm2d(3).eval()
    y, w = caught(lambda: fm(torch.empty(0, 3, 5, 5)))
    check(len(w) == 1 and "empty" in str(w[0].message) and tuple(y.shape) == (0, 3, 5, 5),
          "empty batch: warnings %s" % [str(v.message) for v in w])
    # double backward: second derivatives equal torch's composition's
    for training in (True, False):
        bt._reset_fallback_warnings()
        tm, fm = nn.BatchNorm2d(3), bt.BatchNormReLU2d(3)
        with torch.no_grad():
            tm.weight.uniform_(0.5, 1.5)
            tm.bias.normal_()
            tm.running_mean.normal_()
            tm.running_var.uniform_(0.5, 1.5)
        fm.load_state_dict(tm.state_dict())
        tm.train(training)
        fm.train(training)
        x = torch.randn(4, 3, 5, 5)
        z = torch.randn(4, 3, 5, 5)
        res = []
        for m, is_bnorm in ((tm, False), (fm, True)):
            xa, za = x.clone().requires_grad_(True), z.clone().requires_grad_(True)

            def run():
                y = m(xa, za) if is_bnorm else torch.relu(m(xa) + za)
                gx, gw = torch.autograd.grad((y * y).sum(), (xa, m.weight), create_graph=True)
                return torch.autograd.grad(gx.sum() + gw.sum(), (xa, za, m.weight, m.bias))
            out, w = caught(run)
            res.append(out)
            if is_bnorm:
                check(len(w) == 1 and "double backward" in str(w[0].message),
                      "double backward: warnings %s" % [str(v.message) for v in w])
        for name, a, b in zip(("x", "residual", "weight", "bias"), res[1], res[0]):
            scale = max(float(b.abs().max()), 1e-3)
            check(max_diff(a, b) <= 1e-4 * scale,
                  "double backward training=%d: d2/d%s differs from torch's by %.3g" % (
                      training, name, max_diff(a, b)))


# ----------------------------------------------------------------------------- 5. bad input

def expect_error(label, fn, module, needles, exc=bnorm.BnormError):
    before = state_of(module)
    try:
        fn()
    except exc as e:
        msg = str(e)
        check(all(n in msg for n in needles), "%s: message %r lacks %s" % (label, msg, needles))
    except Exception as e:  # noqa: BLE001
        check(False, "%s: raised %s (%s), expected %s" % (label, type(e).__name__, e,
                                                          exc.__name__))
    else:
        check(False, "%s: no error" % label)
    check(same_state(before, state_of(module)), "%s: the module's state changed" % label)


def bad_input_checks():
    m = bt.BatchNormReLU2d(3)
    x = torch.randn(4, 3, 5, 5)
    expect_error("residual of another shape", lambda: m(x, torch.randn(4, 3, 5, 4)), m,
                 ["residual", "[4, 3, 5, 5]", "[4, 3, 5, 4]"])
    expect_error("broadcastable residual", lambda: m(x, torch.randn(1, 3, 1, 1)), m,
                 ["residual", "[1, 3, 1, 1]"])
    expect_error("residual not a tensor", lambda: m(x, 1.0), m, ["residual", "float"],
                 exc=TypeError)
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    expect_error("weight of the wrong length", lambda: bt.batch_norm_relu(
        x, rm, rv, torch.ones(4), torch.zeros(3), True), m, ["weight", "C = 3"])
    check(bitwise(rm, m.running_mean) and bitwise(rv, m.running_var),
          "weight of the wrong length: running statistics written")
    bad_eps = bt.BatchNormReLU2d(3, eps=0.0)
    expect_error("eps = 0", lambda: bad_eps(x), bad_eps, ["eps"])
    bad_eps.eval()
    expect_error("eps = 0 (eval)", lambda: bad_eps(x, x), bad_eps, ["eps"])
    one = bt.BatchNormReLU1d(3)
    expect_error("one value per channel", lambda: one(torch.randn(1, 3)), one,
                 ["Expected more than 1 value per channel"], exc=ValueError)
    expect_error("wrong rank", lambda: m(torch.randn(4, 3, 5)), m, ["4D"], exc=ValueError)


def main():
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except AttributeError:
        pass
    t0 = time.time()
    print("library: %s (version %s); torch %s, %d threads" % (
        bnorm._lib.library_path(), bnorm.version(), torch.__version__, torch.get_num_threads()))
    for name, fn in (("modules", module_checks), ("strides", strides_checks),
                     ("finite diff", finite_difference_checks),
                     ("convert", convert_checks), ("fallbacks", fallback_checks),
                     ("bad input", bad_input_checks)):
        n0 = len(failures)
        t1 = time.time()
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            check(False, "%s: %s: %s" % (name, type(e).__name__, e))
        print("%-12s %s (%.1f s)" % (name, "ok" if len(failures) == n0 else
                                     "%d failures" % (len(failures) - n0), time.time() - t1))
    print("%s: %d failures, %.1f s" % ("PASS" if not failures else "FAIL", len(failures),
                                        time.time() - t0))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
