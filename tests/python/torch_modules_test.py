#!/usr/bin/env python3
"""bnorm.torch against PyTorch's own batch norm modules.

1. Conformance: on seeded random configurations (the generator of tests/torch/conformance.py:
   ranks 2..5, channels_first and channels_last memory, affine and track_running_stats on and
   off, momentum 0.1 and None, eps, per-channel offsets up to 1e3, constant channels), a torch
   module and bnorm's (BatchNorm1d for ranks 2 and 3, 2d, 3d; every fifth configuration the
   rank-agnostic bnorm.torch.BatchNorm) start from the same state_dict and run at least two
   training steps and one eval step on the same inputs, through autograd (module(x), then
   y.backward(dy)).  Compared after every step: y, dx, dweight, dbias, running_mean,
   running_var (bnorm's module keeps its own buffers across the training steps) and
   num_batches_tracked (exactly).  Before the eval step bnorm's buffers are set to torch's, so
   that step is compared on its own.  The first configurations are chosen to cover each of the
   64 combinations of (rank, layout, affine, tracking, momentum) once.
   Also checked on every step: the pointers the library received are the tensors' own
   (x, and dy when its memory format is x's: no copy), y has x's strides, eval leaves the
   buffers bit for bit, isinstance of torch's concrete class and of _BatchNorm.

   Tolerances: the error model of tests/torch/conformance.py (its docstring derives it), imported
   from there: B bounds |computed - exact| for any fp32 implementation whose per-channel sums are
   no worse than a sequential fp32 sum, from u = 2^-24 times a reduction-length factor
   K = min(n - 1, 3 sqrt(n)) (n - 1 when the terms are not noisy); bnorm and torch may each be
   off by B, so |bnorm - torch| <= 2B per element; the running statistics carry the allowed
   difference over the steps (T_t = (1 - f)(1 + 2u) T_{t-1} + 2B).  Printed: the largest
   |bnorm - torch| and its ratio to the tolerance per output.

2. Strides: a tensor in neither memory format is copied once (results bit for bit those of
   its contiguous copy, output contiguous); a (N, C, L) channels-last-like tensor and a
   non-contiguous weight Parameter work.
3. state_dict: torch -> bnorm -> torch, keys and values bit for bit; an old (version 1)
   checkpoint without num_batches_tracked loads into both with the counter 0.
4. convert() on a nested model: every torch BatchNorm1d/2d/3d replaced (also the root, and a
   module used twice by one module), a subclass left alone, a CPU SyncBatchNorm made the
   rank-agnostic BatchNorm without a process group (ranks 2..6 checked), bnorm's SyncBatchNorm
   on the same group with one (gloo, one process), Parameter and buffer objects identical,
   train/eval flags and requires_grad kept, hooks kept, outputs as before.
5. Fallbacks (BnormFallbackWarning, once per reason, result = torch's): float64, the meta
   device (standing in for a non-CPU one), an empty batch, double backward (create_graph=True,
   training and eval: second derivatives equal torch's); one value per channel in training:
   torch's ValueError, the module untouched.
6. Bad input: eps <= 0 and momentum > 1 give the library's message (bnorm.BnormError, a
   RuntimeError); a wrong channel count the same message form, a wrong rank torch's ValueError;
   NaN with BNORM_CHECK_FINITE=1 the library's message; the module's state bit for bit
   unchanged after each.
7. Threads: modules run concurrently on 4 threads give the sequential results bit for bit,
   while another thread's failing call reports its own message; running statistics are
   updated in place (same storage) also under torch.no_grad().

Usage: torch_modules_test.py [--count N]   exit 0 iff every check passed (77: no torch).
"""

import argparse
import copy
import itertools
import math
import os
import sys
import threading
import time
import warnings

try:
    import numpy as np
    import torch
except ImportError:
    print("skipped: python3-torch not installed")
    sys.exit(77)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "torch"))
sys.path.append(os.path.join(HERE, "..", "..", "python"))
import conformance as cf  # noqa: E402  the error model and the configuration generator
import bnorm  # noqa: E402
import bnorm._lib  # noqa: E402
import bnorm.torch as bt  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

nn = torch.nn
TORCH_CLS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
BNORM_CLS = {2: bt.BatchNorm1d, 3: bt.BatchNorm1d, 4: bt.BatchNorm2d, 5: bt.BatchNorm3d}
OUTPUTS = ["y", "dx", "dweight", "dbias", "running_mean", "running_var", "num_batches_tracked"]

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL " + what, flush=True)
    return cond


def bitwise(a, b):
    """Equal values (NaN where the other has NaN), shapes and dtypes."""
    a, b = a.detach(), b.detach()
    return (a.shape == b.shape and a.dtype == b.dtype
            and bool(((a == b) | (a.isnan() & b.isnan())).all()))


def same_strides(a, b):
    return a.shape == b.shape and all(d == 1 or x == y
                                      for d, x, y in zip(a.shape, a.stride(), b.stride()))


class Spy:
    """Records the x (and dy) pointers the library is called with."""

    NAMES = ("bnorm_forward_train", "bnorm_forward_eval", "bnorm_backward")

    def __enter__(self):
        self.lib = bnorm._lib.lib()
        self.calls = []
        # bnorm.torch calls the *_dt entry points (the element type after layout): recorded
        # under the plain name with the arguments of the fp32 entry point (dtype dropped) and
        # the dtype in self.dtypes.
        self.dtypes = []
        self.saved = {name + "_dt": getattr(self.lib, name + "_dt") for name in self.NAMES}
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

    def pointers(self, name, index):
        return [args[index] for n, args in self.calls if n == name]


def state_of(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(bitwise(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- 1. conformance

def pick_seeds(count):
    """Seeds of cf.Config: first one per (rank, layout, affine, track, momentum), then the
    following seeds in order, `count` in all."""
    want = set(itertools.product(range(2, 6), (cf.bn.CHANNELS_FIRST, cf.bn.CHANNELS_LAST),
                                 (False, True), (False, True), (0.1, None)))
    chosen, rest, seed = [], [], 0
    while want and seed < 20000:
        c = cf.Config(seed)
        key = (c.rank, c.layout, c.affine, c.track, c.momentum)
        if key in want:
            want.discard(key)
            chosen.append(seed)
        elif len(rest) < count:
            rest.append(seed)
        seed += 1
    check(not want, "seed search left combinations uncovered: %s" % sorted(want, key=str))
    return (chosen + rest)[:max(count, len(chosen))]


def to_layout(t, layout):
    return cf.to_torch_layout(t, layout)


def run_config(seed, st):
    cfg = cf.Config(seed)
    cfg.steps = max(cfg.steps, 2)
    C, n, s, rank = cfg.c, cfg.n, cfg.s, cfg.rank
    label0 = "seed=%d %s" % (seed, cfg.describe())
    kw = dict(eps=cfg.eps, momentum=cfg.momentum, affine=cfg.affine,
              track_running_stats=cfg.track)
    tm = TORCH_CLS[rank](C, **kw)
    bcls = bt.BatchNorm if seed % 5 == 0 else BNORM_CLS[rank]
    bm = bcls(C, **kw)
    if bcls is not bt.BatchNorm:
        check(isinstance(bm, TORCH_CLS[rank]), "%s: not an instance of %s" % (label0, TORCH_CLS[rank]))
    check(isinstance(bm, _BatchNorm), "%s: not a _BatchNorm" % label0)
    with torch.no_grad():
        if cfg.affine:
            tm.weight.copy_(torch.from_numpy(cfg.weight))
            tm.bias.copy_(torch.from_numpy(cfg.bias))
        if cfg.track:
            tm.running_mean.copy_(torch.from_numpy(cfg.rm0))
            tm.running_var.copy_(torch.from_numpy(cfg.rv0))
            tm.num_batches_tracked.fill_(cfg.nbt0)
    bm.load_state_dict(tm.state_dict())
    gam = cfg.weight.astype(np.float64) if cfg.affine else np.ones(C)
    bet = cfg.bias.astype(np.float64) if cfg.affine else np.zeros(C)
    T_rm = np.zeros(C)
    T_rv = np.zeros(C)
    for step in range(cfg.steps + 1):
        training = step < cfg.steps
        label = "%s %s" % (label0, ("train#%d" % (step + 1)) if training else "eval")
        x32, dy32 = cfg.batch()
        xt = to_layout(torch.from_numpy(x32), cfg.layout)
        dyt = to_layout(torch.from_numpy(dy32), cfg.layout)
        X = x32.astype(np.float64).reshape(n, C, s)
        G = dy32.astype(np.float64).reshape(n, C, s)
        tm.train(training)
        bm.train(training)
        if not training and cfg.track:
            with torch.no_grad():  # isolate the eval step: the same buffers on both sides
                bm.running_mean.copy_(tm.running_mean)
                bm.running_var.copy_(tm.running_var)
        for m in (tm, bm):
            if cfg.affine:
                m.weight.grad = None
                m.bias.grad = None
        if cfg.track:
            p_mean = tm.running_mean.detach().clone().numpy().astype(np.float64)
            p_var = tm.running_var.detach().clone().numpy().astype(np.float64)
            p_nbt = int(tm.num_batches_tracked)
            b_before = state_of(bm)
            lp_mean = bm.running_mean.detach().numpy().astype(np.float64)
            lp_var = bm.running_var.detach().numpy().astype(np.float64)
        xa = xt.clone().requires_grad_(True)
        ya = tm(xa)
        ya.backward(dyt)
        xb = xt.clone().requires_grad_(True)
        with Spy() as spy:
            yb = bm(xb)
            yb.backward(dyt)
        fwd = "bnorm_forward_train" if (training or not cfg.track) else "bnorm_forward_eval"
        check(spy.pointers(fwd, 4) == [xb.data_ptr()],
              "%s: the library did not get x's own memory (%s)" % (label, spy.calls and spy.calls[0][0]))
        check(spy.pointers("bnorm_backward", 4) == [dyt.data_ptr()],
              "%s: the library did not get dy's own memory" % label)
        check(spy.pointers("bnorm_backward", 5) == [xb.data_ptr()],
              "%s: backward did not get x's own memory" % label)
        check(same_strides(yb, xb), "%s: y strides %s, x strides %s" % (label, yb.stride(), xb.stride()))
        check(same_strides(xb.grad, xb) or xb.grad.is_contiguous(),
              "%s: dx strides %s" % (label, xb.grad.stride()))
        t_y, b_y = cf.logical64(ya, n, C, s), cf.logical64(yb, n, C, s)
        t_dx, b_dx = cf.logical64(xa.grad, n, C, s), cf.logical64(xb.grad, n, C, s)
        if training or not cfg.track:
            ref = cf.train_bounds(X, G, gam, bet, cfg.eps)
        else:
            ref = cf.eval_bounds(X, G, gam, bet, p_mean, p_var, cfg.eps)
        cf.compare(st, "y", b_y, t_y, *ref["y"], label=label)
        cf.compare(st, "dx", b_dx, t_dx, *ref["dx"], label=label)
        if cfg.affine:
            cf.compare(st, "dweight", bm.weight.grad.numpy(), tm.weight.grad.numpy(),
                       *ref["dweight"], label=label)
            cf.compare(st, "dbias", bm.bias.grad.numpy(), tm.bias.grad.numpy(), *ref["dbias"],
                       label=label)
        if cfg.track:
            t_rm = tm.running_mean.detach().numpy().astype(np.float64)
            t_rv = tm.running_var.detach().numpy().astype(np.float64)
            b_rm = bm.running_mean.detach().numpy().astype(np.float64)
            b_rv = bm.running_var.detach().numpy().astype(np.float64)
            if training:
                f = 1.0 / (p_nbt + 1) if cfg.momentum is None else cfg.momentum
                em_t, bm_t, ev_t, bv_t = cf.running_bounds(ref["_stats"], f, p_mean, p_var)
                em_l, _, ev_l, _ = cf.running_bounds(ref["_stats"], f, lp_mean, lp_var)
                T_rm = (1.0 - f) * (1.0 + 2 * cf.U) * T_rm + 2.0 * bm_t
                T_rv = (1.0 - f) * (1.0 + 2 * cf.U) * T_rv + 2.0 * bv_t
                cf.compare(st, "running_mean", b_rm, t_rm, em_t, bm_t, tol=T_rm, label=label,
                           lib_exact=em_l)
                cf.compare(st, "running_var", b_rv, t_rv, ev_t, bv_t, tol=T_rv, label=label,
                           lib_exact=ev_l)
            else:
                check(same_state(b_before, state_of(bm)), "%s: eval changed the buffers" % label)
            t_nbt, b_nbt = int(tm.num_batches_tracked), int(bm.num_batches_tracked)
            if t_nbt != b_nbt:
                st.ratio["num_batches_tracked"] = math.inf
                st.where["num_batches_tracked"] = label
            st.abs["num_batches_tracked"] = max(st.abs["num_batches_tracked"], abs(t_nbt - b_nbt))
    return cfg


def conformance(count):
    t0 = time.time()
    total = cf.Stats()
    seeds = pick_seeds(count)
    n_fail = 0
    for seed in seeds:
        st = cf.Stats()
        try:
            run_config(seed, st)
        except Exception as e:  # a crash is a failure of this configuration
            check(False, "seed=%d: %s: %s" % (seed, type(e).__name__, e))
            n_fail += 1
            continue
        total.merge(st)
        bad = [k for k in OUTPUTS if not st.ratio[k] <= 1.0]
        if bad:
            n_fail += 1
            check(False, "seed=%d %s: |bnorm - torch| / tol: %s"
                  % (seed, cf.Config(seed).describe(), cf.fmt_ratios(st, bad)))
    print("conformance: %d configurations (%d failed), %.1f s" % (len(seeds), n_fail,
                                                                  time.time() - t0))
    print("  largest |bnorm.torch - torch.nn| per output (tolerance 2B, running stats the "
          "carried T; tests/torch/conformance.py derives B):")
    print("  %-20s %12s %12s  %s" % ("output", "max |d|", "max |d|/tol", "where"))
    for k in OUTPUTS:
        print("  %-20s %12.4g %12.4g  %s" % (k, total.abs[k], total.ratio[k],
                                             total.where.get(k, "-")))


# ----------------------------------------------------------------------------- 2. strides

def strides_checks():
    torch.manual_seed(1)
    C = 5
    m = bt.BatchNorm2d(C)
    ref = bt.BatchNorm2d(C)
    base = torch.randn(4, C, 7, 12) * 3 + 2
    odd = base[:, :, :, ::2]                      # neither layout
    perm = torch.randn(4, 6, C, 7).permute(0, 2, 3, 1)  # (N, C, H, W) with W outermost
    for name, x in (("sliced", odd), ("permuted", perm)):
        check(bt._layout_of(x) is None, "%s input should be in neither layout" % name)
        xa = x.detach().requires_grad_(True)  # the same strided memory
        xc = x.contiguous().requires_grad_(True)
        dy = torch.randn(x.shape)
        with Spy() as spy:
            ya = m(xa)
        yc = ref(xc)
        ya.backward(dy)
        yc.backward(dy)
        check(spy.pointers("bnorm_forward_train", 4) != [xa.data_ptr()],
              "%s: strided input passed as it is" % name)
        check(ya.is_contiguous(), "%s: output of a strided input not contiguous" % name)
        check(bitwise(ya, yc) and bitwise(xa.grad, xc.grad) and bitwise(m.weight.grad, ref.weight.grad)
              and bitwise(m.running_var, ref.running_var),
              "%s input: results differ from those of its contiguous copy" % name)
        m.weight.grad = ref.weight.grad = None
        m.bias.grad = ref.bias.grad = None

    # (N, C, L) with C fastest, as BatchNorm1d gets it from a transposed (N, L, C) tensor.
    m1, t1 = bt.BatchNorm1d(C), nn.BatchNorm1d(C)
    x = (torch.randn(3, 9, C) * 2 + 1).transpose(1, 2)
    with Spy() as spy:
        y = m1(x)
    check(spy.pointers("bnorm_forward_train", 4) == [x.data_ptr()] and spy.calls[0][1][0] == 1,
          "(N, C, L) channels-last-like input not passed as channels-last memory")
    check(same_strides(y, x), "(N, C, L) channels-last-like: y strides %s, x %s" % (y.stride(), x.stride()))
    check(float((y - t1(x)).abs().max()) < 1e-5, "(N, C, L) channels-last-like: y differs from torch")

    # A non-contiguous weight Parameter (and a requires_grad weight in the forward).
    mw, mc = bt.BatchNorm2d(C), bt.BatchNorm2d(C)
    w = torch.randn(2 * C)
    mw.weight = nn.Parameter(w[::2])
    mc.weight = nn.Parameter(w[::2].contiguous())
    check(not mw.weight.is_contiguous(), "test setup: weight should be strided")
    x = torch.randn(4, C, 3, 3).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    ya, yc = mw(x), mc(x2)
    ya.sum().backward()
    yc.sum().backward()
    check(bitwise(ya, yc) and bitwise(mw.weight.grad, mc.weight.grad) and bitwise(x.grad, x2.grad),
          "strided weight: results differ from a contiguous one")

    # dy in another memory format than x: made x's layout once.
    mcl, mcf = bt.BatchNorm2d(C), bt.BatchNorm2d(C)
    x = (torch.randn(4, C, 5, 6) + 1).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(4, C, 5, 6)  # contiguous
    xa = x.clone().requires_grad_(True)
    xc = x.contiguous().requires_grad_(True)
    mcl(xa).backward(dy)
    mcf(xc).backward(dy)
    check(float((xa.grad - xc.grad).abs().max()) <= 1e-5 * float(xc.grad.abs().max()),
          "channels_last x with a contiguous dy: dx differs from the contiguous run")


# ----------------------------------------------------------------------------- 3. state_dict

def state_dict_checks():
    torch.manual_seed(2)
    for tcls, bcls, shape in ((nn.BatchNorm1d, bt.BatchNorm1d, (8, 4)),
                              (nn.BatchNorm2d, bt.BatchNorm2d, (4, 4, 3, 3)),
                              (nn.BatchNorm3d, bt.BatchNorm3d, (2, 4, 3, 3, 2))):
        t = tcls(4, momentum=None)
        for _ in range(3):
            t(torch.randn(shape) * 2 + 1)
        b = bcls(4, momentum=None)
        b.load_state_dict(t.state_dict())
        check(same_state(state_of(t), state_of(b)), "%s: torch -> bnorm state differs" % tcls.__name__)
        check(list(t.state_dict().keys()) == list(b.state_dict().keys()),
              "%s: state_dict keys differ" % tcls.__name__)
        check(t.state_dict()._metadata[""].get("version") == b.state_dict()._metadata[""].get("version"),
              "%s: state_dict versions differ" % tcls.__name__)
        for _ in range(2):
            b(torch.randn(shape) * 2 + 1)
        t2 = tcls(4, momentum=None)
        t2.load_state_dict(b.state_dict())
        check(same_state(state_of(t2), state_of(b)) and int(t2.num_batches_tracked) == 5,
              "%s: bnorm -> torch state differs" % tcls.__name__)
        old = t.state_dict()
        del old["num_batches_tracked"]
        old._metadata[""]["version"] = 1
        t3, b3 = tcls(4), bcls(4)
        t3.load_state_dict(copy.deepcopy(old))
        b3.load_state_dict(copy.deepcopy(old))
        check(int(b3.num_batches_tracked) == 0 and same_state(state_of(t3), state_of(b3)),
              "%s: an old checkpoint without num_batches_tracked did not load as torch's"
              % tcls.__name__)
    # A whole model, converted, against the torch one.
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 5), nn.BatchNorm1d(5))
    net(torch.randn(6, 3, 6, 6))
    conv = bt.convert(copy.deepcopy(net))
    check(same_state(state_of(net), state_of(conv)), "converted model: state_dict differs")
    fresh = bt.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                     nn.Flatten(), nn.Linear(64, 5), nn.BatchNorm1d(5)))
    fresh.load_state_dict(net.state_dict())
    check(same_state(state_of(net), state_of(fresh)), "torch model -> converted model: differs")


# ----------------------------------------------------------------------------- 4. convert

class MyBN(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, affine=False),
                                   nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4, momentum=None)))
        self.shared = nn.BatchNorm2d(4)
        self.mine = MyBN(4)
        self.vol = nn.ModuleDict({"bn3": nn.BatchNorm3d(4, track_running_stats=False)})
        self.sync = nn.SyncBatchNorm(4)
        self.head = nn.ModuleList([nn.Linear(4, 6), nn.BatchNorm1d(6)])

    def forward(self, x):
        x = self.shared(self.block(self.bn(self.conv(x))))
        x = self.shared(self.mine(x))
        x = self.vol["bn3"](x.unsqueeze(2)).squeeze(2)
        # self.sync is not called: torch's SyncBatchNorm refuses CPU input (the reference copy
        # of the net could not run); its converted form is checked on its own.
        x = x.mean(dim=(2, 3))
        return self.head[1](self.head[0](x))


def convert_checks():
    torch.manual_seed(3)
    net = Net()
    net.block[1].eval()
    net.bn.weight.requires_grad_(False)
    calls = []
    net.bn.register_forward_hook(lambda mod, inp, out: calls.append(type(mod).__name__))
    net(torch.randn(5, 3, 6, 6))  # some running stats
    ref = copy.deepcopy(net)
    params = dict(net.named_parameters())
    buffers = dict(net.named_buffers())
    modes = {k: m.training for k, m in net.named_modules()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    out = bt.convert(net)
    check(out is net, "convert did not return the (non-BN) root itself")
    kinds = {k: type(m) for k, m in net.named_modules()}
    want = {"bn": bt.BatchNorm2d, "block.1": bt.BatchNorm2d, "block.2.1": bt.BatchNorm2d,
            "shared": bt.BatchNorm2d, "mine": MyBN, "vol.bn3": bt.BatchNorm3d,
            "sync": bt.BatchNorm, "head.1": bt.BatchNorm1d}
    for k, cls in want.items():
        check(kinds.get(k) is cls, "convert: %s is %s, want %s" % (k, kinds.get(k), cls))
    check(net.shared is net._modules["shared"], "shared module")
    for k, p in net.named_parameters():
        check(p is params[k], "convert: parameter %s is not the same object" % k)
    check(set(dict(net.named_parameters())) == set(params), "convert: parameter names changed")
    for k, b in net.named_buffers():
        check(b is buffers[k], "convert: buffer %s is not the same object" % k)
    check(set(dict(net.named_buffers())) == set(buffers), "convert: buffer names changed")
    for k, m in net.named_modules():
        check(m.training == modes[k], "convert: %s training=%s, was %s" % (k, m.training, modes[k]))
    check(not net.bn.weight.requires_grad and net.bn.bias.requires_grad, "convert: requires_grad")
    x = torch.randn(5, 3, 6, 6)
    ya, yb = ref(x), net(x)
    check(calls[-1] == "BatchNorm2d" and type(net.bn) is bt.BatchNorm2d and len(calls) == 3,
          "convert: the forward hook did not carry over (%s)" % calls)
    check(float((ya - yb).abs().max()) < 1e-4, "converted net output differs: %g"
          % float((ya - yb).abs().max()))
    sr, sn = state_of(ref), state_of(net)
    check(sr.keys() == sn.keys() and all(
        bitwise(sr[k], sn[k]) if not k.endswith(("running_mean", "running_var"))
        else torch.allclose(sr[k], sn[k], rtol=1e-5, atol=1e-6) for k in sr),
        "converted net: state after a step differs")
    before = net.head[1].weight.detach().clone()
    yb.sum().backward()
    opt.step()  # the optimizer built before convert still trains the converted module
    check(not torch.equal(before, net.head[1].weight), "optimizer did not update the converted BN")
    root = nn.BatchNorm2d(3)
    r2 = bt.convert(root)
    check(type(r2) is bt.BatchNorm2d and r2.weight is root.weight, "convert: root BN")
    check(bt.convert(r2) is r2, "convert of a converted module made a new one")
    sync = bt.convert(nn.SyncBatchNorm(3, momentum=None))
    for shape in ((6, 3), (4, 3, 5), (2, 3, 4, 4), (2, 3, 2, 3, 4), (2, 3, 2, 2, 2, 3)):
        x = torch.randn(shape)
        check(torch.allclose(sync(x), nn.functional.batch_norm(x, None, None, training=True),
                             atol=1e-5), "SyncBatchNorm -> BatchNorm: rank %d differs" % len(shape))
    check(int(sync.num_batches_tracked) == 5, "SyncBatchNorm -> BatchNorm: counter")
    convert_sync_with_group()


def convert_sync_with_group():
    """With a process group (gloo, one process, a file store), a CPU SyncBatchNorm becomes
    bnorm's SyncBatchNorm on the same group (when the package has it: bnorm/_torch_sync.py)."""
    import tempfile
    import torch.distributed as dist
    if not os.path.exists(os.path.join(os.path.dirname(bt.__file__), "_torch_sync.py")):
        print("note: no bnorm/_torch_sync.py in this tree: SyncBatchNorm with a process group "
              "not checked")
        return
    if not dist.is_available():
        check(False, "torch.distributed is not available")
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method="file://" + os.path.join(tmp, "store"),
                                rank=0, world_size=1)
        try:
            group = dist.new_group([0])
            model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4, process_group=group),
                                  nn.SyncBatchNorm(4))
            model[2].eval()
            w = model[1].weight
            out = bt.convert(model)
            check(type(out[1]) is bt.SyncBatchNorm and type(out[2]) is bt.SyncBatchNorm,
                  "convert with a process group: got %s, %s" % (type(out[1]), type(out[2])))
            check(out[1].process_group is group and out[2].process_group is None,
                  "convert with a process group: process_group not kept")
            check(out[1].weight is w and out[1].training and not out[2].training,
                  "convert with a process group: parameters or modes not kept")
            x = torch.randn(4, 3, 5, 5)
            y = out(x)
            check(torch.allclose(out[1](out[0](x)), nn.functional.batch_norm(
                out[0](x), None, None, training=True), atol=1e-5) and y.shape == (4, 4, 5, 5),
                "convert with a process group: one-process SyncBatchNorm differs")
        finally:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- 5. fallbacks

def caught(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(x.message) for x in w if issubclass(x.category, bt.BnormFallbackWarning)]


def fallback_checks():
    torch.manual_seed(4)
    bt._reset_fallback_warnings()
    # float64: torch's own code runs, so the result is torch's bit for bit.
    t = nn.BatchNorm2d(3).double()
    b = bt.convert(copy.deepcopy(t))
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    y1, w1 = caught(lambda: b(x))
    y2, w2 = caught(lambda: b(x))
    t1, t2 = t(x), t(x)
    check(len(w1) == 1 and "dtype float64" in w1[0] and not w2,
          "float64: warnings %s then %s" % (w1, w2))
    check(bitwise(y1, t1) and bitwise(y2, t2), "float64 fallback: output differs from torch's")
    check(same_state(state_of(t), state_of(b)), "float64 fallback: state differs from torch's")

    # A non-CPU device: the meta device stands in (no GPU here).
    try:
        bm = bt.BatchNorm2d(3, device="meta")
        xm = torch.empty(4, 3, 5, 5, device="meta")
        ym, wm = caught(lambda: bm(xm))
        _, wm2 = caught(lambda: bm(xm))
        check(len(wm) == 1 and "device meta" in wm[0] and ym.device.type == "meta" and not wm2,
              "meta device: warnings %s, then %s" % (wm, wm2))
    except (NotImplementedError, RuntimeError) as e:
        print("note: torch %s cannot run batch_norm on the meta device (%s); device fallback "
              "checked through the reason only" % (torch.__version__, str(e).splitlines()[0]))
        reason = bt._fallback_reason(torch.empty(2, 3, device="meta"), ())
        check(reason is not None and "device meta" in reason, "meta device reason: %s" % reason)

    # Empty batch: torch's result (an empty tensor), torch's counter.
    t, b = nn.BatchNorm2d(3), bt.BatchNorm2d(3)
    x = torch.randn(0, 3, 4, 4)
    y, we = caught(lambda: b(x))
    _, we2 = caught(lambda: b(x))
    check(len(we) == 1 and "empty input" in we[0] and y.shape == x.shape and not we2,
          "empty batch: warnings %s, then %s" % (we, we2))
    t(x)
    t(x)
    check(same_state(state_of(t), state_of(b)), "empty batch: state differs from torch's")

    # Double backward, training and eval: second derivatives as torch's.
    for training in (True, False):
        t = nn.BatchNorm2d(3)
        t.running_var.fill_(1.7)
        t.running_mean.fill_(0.3)
        t.train(training)
        b = bt.convert(copy.deepcopy(t))
        x0 = torch.randn(4, 3, 3, 3) * 2 + 1
        dy = torch.randn(4, 3, 3, 3)

        def second(m):
            x = x0.clone().requires_grad_(True)
            g = dy.clone().requires_grad_(True)
            y = m(x)
            gx, gw = torch.autograd.grad(y, (x, m.weight), g, create_graph=True)
            loss = (gx ** 2).sum() + (gw ** 3).sum()
            return (gx, gw) + torch.autograd.grad(loss, (x, m.weight, g))

        bt._reset_fallback_warnings()
        rb, wd = caught(lambda: second(b))
        rt = second(t)
        _, wd2 = caught(lambda: second(b))
        check(len(wd) == 1 and "double backward" in wd[0] and not wd2,
              "double backward (training=%s): warnings %s, then %s" % (training, wd, wd2))
        ok = all(torch.allclose(p, q, rtol=1e-4, atol=1e-5) for p, q in zip(rb, rt))
        check(ok, "double backward (training=%s): second derivatives differ from torch's: %s"
              % (training, [float((p - q).abs().max()) for p, q in zip(rb, rt)]))
        # A plain backward after that is still the library's, without a warning.
        x = x0.clone().requires_grad_(True)
        _, wp = caught(lambda: b(x).backward(dy))
        check(not wp, "plain backward warned: %s" % wp)

    # One value per channel in training: torch's ValueError, nothing changed.
    for shape, tcls, bcls in (((1, 3), nn.BatchNorm1d, bt.BatchNorm1d),
                              ((1, 3, 1, 1), nn.BatchNorm2d, bt.BatchNorm2d)):
        t, b = tcls(3), bcls(3)
        before = state_of(b)
        x = torch.randn(shape)
        try:
            t(x)
            t_msg = None
        except ValueError as e:
            t_msg = str(e)
        try:
            b(x)
            b_msg = None
        except ValueError as e:
            b_msg = str(e)
        check(t_msg is not None and b_msg == t_msg,
              "one value per channel: torch says %r, bnorm %r" % (t_msg, b_msg))
        check(same_state(before, state_of(b)), "one value per channel: bnorm's state changed")
        b.eval()
        t.eval()
        check(torch.allclose(b(x), t(x), atol=1e-6), "one value per channel in eval differs")


# ----------------------------------------------------------------------------- 6. bad input

def expect_error(label, fn, module, needles, exc=bnorm.BnormError):
    before = state_of(module)
    try:
        fn()
    except exc as e:
        msg = str(e)
        check(all(n in msg for n in needles), "%s: message %r lacks %s" % (label, msg, needles))
        if isinstance(e, bnorm.BnormError):
            check(isinstance(e, RuntimeError) and e.code in (1, 2),
                  "%s: code %s" % (label, e.code))
    else:
        check(False, "%s: no %s raised" % (label, exc.__name__))
    check(same_state(before, state_of(module)), "%s: the module's state changed" % label)


def bad_input_checks():
    torch.manual_seed(5)
    x = torch.randn(4, 3, 5, 5)
    m = bt.BatchNorm2d(3, eps=0.0)
    expect_error("eps=0", lambda: m(x), m, ["eps", "got 0"])
    m.eval()
    expect_error("eps=0 (eval)", lambda: m(x), m, ["eps"])
    m = bt.BatchNorm2d(3, momentum=1.5)
    expect_error("momentum=1.5", lambda: m(x), m, ["momentum", "1.5"])
    m = bt.BatchNorm2d(4, momentum=None)
    for mode in ("train", "eval"):
        getattr(m, mode)()
        expect_error("wrong C (%s)" % mode, lambda: m(x), m,
                     ["one value per channel", "C = 3", "got 4", "[4, 3, 5, 5]"])
    expect_error("wrong rank", lambda: m(torch.randn(4, 4, 5)), m, ["expected 4D input"],
                 exc=ValueError)
    # The message is the library's: the same call through bnorm.numpy gives the same text.
    try:
        import bnorm.numpy as bnp
        bnp.forward_train(x.numpy(), eps=0.0)
    except bnorm.BnormError as e:
        lib_msg = e.message
    try:
        bt.BatchNorm2d(3, eps=0.0, affine=False, track_running_stats=False)(x)
        mod_msg = None
    except bnorm.BnormError as e:
        mod_msg = e.message
    check(mod_msg == lib_msg, "eps=0: module message %r, library %r" % (mod_msg, lib_msg))
    # NaN with BNORM_CHECK_FINITE=1 (read on every call).
    os.environ["BNORM_CHECK_FINITE"] = "1"
    try:
        m = bt.BatchNorm2d(3)
        xn = x.clone()
        xn[2, 1, 3, 4] = float("nan")
        # The index is the caller's (N, C, H, W) one, in either memory format, not the
        # C API's flattened (n, c, s).
        expect_error("NaN input", lambda: m(xn), m, ["nan at index [2, 1, 3, 4]", "channel 1"])
        expect_error("NaN input (channels_last)",
                     lambda: m(xn.contiguous(memory_format=torch.channels_last)), m,
                     ["nan at index [2, 1, 3, 4]", "channel 1"])
        m3 = bt.BatchNorm3d(3)
        x3 = torch.randn(2, 3, 2, 3, 4)
        x3[1, 2, 1, 2, 3] = float("inf")
        expect_error("Inf input (5-D)", lambda: m3(x3), m3, ["inf at index [1, 2, 1, 2, 3]"])
        m1 = bt.BatchNorm1d(3)
        x1 = torch.randn(5, 3)
        x1[4, 0] = float("nan")
        expect_error("NaN input (2-D)", lambda: m1(x1), m1, ["nan at index [4, 0]"])
    finally:
        del os.environ["BNORM_CHECK_FINITE"]


# ----------------------------------------------------------------------------- 7. threads

def thread_checks():
    torch.manual_seed(6)
    shapes = [(8, 16, 12, 12), (16, 32, 6, 6), (32, 24), (4, 8, 4, 5, 6)]
    inputs = [(torch.randn(s) * 3 + 1).requires_grad_(True) for s in shapes]

    def make(i):
        cls = {2: bt.BatchNorm1d, 4: bt.BatchNorm2d, 5: bt.BatchNorm3d}[len(shapes[i])]
        return cls(shapes[i][1], momentum=None)

    def work(m, x, out):
        for _ in range(5):
            x.grad = None
            y = m(x)
            y.backward(torch.ones_like(y) * 0.5 + y.detach())
            out.append((y.detach().clone(), x.grad.clone()))

    seq = []
    for i in range(4):
        out = []
        work(make(i), inputs[i], out)
        seq.append(out)
    par = [[] for _ in range(4)]
    mods = [make(i) for i in range(4)]
    errors = []

    def failing():
        bad = bt.BatchNorm2d(3, eps=-1.0)
        for _ in range(20):
            try:
                bad(torch.randn(2, 3, 4, 4))
            except bnorm.BnormError as e:
                errors.append(e.message)

    threads = [threading.Thread(target=work, args=(mods[i], inputs[i], par[i])) for i in range(4)]
    threads.append(threading.Thread(target=failing))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        check(len(par[i]) == 5 and all(bitwise(a[0], b[0]) and bitwise(a[1], b[1])
                                       for a, b in zip(seq[i], par[i])),
              "threads: module %d differs from its sequential run" % i)
    check(len(errors) == 20 and all("eps" in e and "-1" in e for e in errors),
          "threads: the failing thread's messages: %s" % sorted(set(errors)))

    # In place, also under no_grad.
    m = bt.BatchNorm2d(3)
    rm, rv, nbt = m.running_mean, m.running_var, m.num_batches_tracked
    ptrs = (rm.data_ptr(), rv.data_ptr(), nbt.data_ptr())
    t = nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5) * 2 + 3
    with torch.no_grad():
        m(x)
        t(x)
    check(m.running_mean is rm and m.running_var is rv and m.num_batches_tracked is nbt and
          (rm.data_ptr(), rv.data_ptr(), nbt.data_ptr()) == ptrs, "running stats not in place")
    check(torch.allclose(rm, t.running_mean, atol=1e-6) and torch.allclose(rv, t.running_var, atol=1e-6)
          and int(nbt) == 1, "no_grad update differs from torch's")

    # The kernels follow torch.set_num_threads and run on torch's OpenMP threads; the results
    # are bitwise the same for any count.
    saved = torch.get_num_threads()
    x = (torch.randn(8, 32, 40, 40) * 2 + 5).requires_grad_(True)
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            m = bt.BatchNorm2d(32)
            x.grad = None
            y = m(x)
            y.backward(y.detach() * 0.25 + 1)
            count, openmp = bt.threads_info()
            if "BNORM_NUM_THREADS" not in os.environ:
                check(count == n, "threads: bnorm runs %d threads under torch.set_num_threads(%d)"
                      % (count, n))
            want_openmp = os.environ.get("BNORM_OPENMP_THREADS", "0") == "1"
            check(openmp == want_openmp, "threads: on torch's OpenMP threads: %s, BNORM_OPENMP_"
                  "THREADS asks for %s" % (openmp, want_openmp))
            runs.append((y.detach().clone(), x.grad.clone(), m.running_mean.clone(),
                         m.running_var.clone()))
    finally:
        torch.set_num_threads(saved)
    check(all(all(bitwise(a, b) for a, b in zip(runs[0], r)) for r in runs[1:]),
          "threads: results differ between 1, 2 and 3 threads")


def main():
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except AttributeError:
        pass
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=120, help="random configurations (>= 64)")
    args = ap.parse_args()
    t0 = time.time()
    print("library: %s (version %s); torch %s, %d threads" % (
        bnorm._lib.library_path(), bnorm.version(), torch.__version__, torch.get_num_threads()))
    for name, fn in (("conformance", lambda: conformance(args.count)),
                     ("strides", strides_checks), ("state_dict", state_dict_checks),
                     ("convert", convert_checks), ("fallbacks", fallback_checks),
                     ("bad input", bad_input_checks), ("threads", thread_checks)):
        n0 = len(failures)
        t1 = time.time()
        try:
            fn()
        except Exception as e:
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
