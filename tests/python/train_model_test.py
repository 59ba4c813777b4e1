#!/usr/bin/env python3
"""A small conv net trained with torch's batch norm and with bnorm's (bnorm.torch.convert), from
the same initial weights on the same batches: the loss curves must agree.

The net: conv3x3(3->16)-BN2d-ReLU, conv3x3/2(16->32)-BN2d-ReLU, conv3x3/2(32->32)-BN2d-ReLU,
global average pool, Linear(32->32)-BN1d-ReLU, Linear(32->10); 16x16 inputs, batch 32, labels
of one fixed random prototype image per class plus noise (so the loss falls), SGD with momentum 0.9, weight decay 5e-4,
STEPS steps; then the eval-mode loss (running statistics) on a held-out batch.  Trained four
times: torch in float64 (the oracle, "exact"), torch in float32 (NCHW and channels_last), and the
converted net in float32 (NCHW and channels_last).

Tolerance: derivation
=====================
The float32 runs compute the same mathematics; they differ from the exact trajectory only by
rounding, and bnorm's batch norm rounds no worse than torch's (tests/torch/conformance.py: both
within the same error bound B per element, measured |bnorm - torch| <= 0.4 of 2B).  SGD carries
and amplifies every rounding difference from step to step, by an amount that is a property of
the trajectory, not of the implementation; torch's own float32 run measures it:
    e(t) = max over s <= t of |L_torch32(s) - L_exact(s)|
(the running maximum, since a single step's difference can be small by accident).  bnorm's run
must stay within the same envelope up to the factor that another summation order gives (the
error of a length-K sum grows like sqrt(K) u times the sum of magnitudes for random-order
rounding, and the bound differs by a small factor between blockings: 8, as in
tests/torch/checkpoint_roundtrip.py), plus 64 ulps of the loss to keep the bound meaningful when
torch happens to be very close:
    |L_bnorm32(t) - L_exact(t)| <= 8 e(t) + 64 u |L_exact(t)|,   u = 2^-24
for every step t and for the final eval loss (with e the largest over the whole run), in both
memory formats.  The measured values and ratios are printed.

The test can fail: the loss must fall (the last training loss below 0.8 of the first) and a
control run of the converted net with eps = 1e-3 instead of 1e-5 (a real, small difference in
the batch norm) must fall outside the tolerance.
"""

import copy
import math
import sys
import time

try:
    import torch
except ImportError:
    print("skipped: python3-torch not installed")
    sys.exit(77)

import bnorm._lib  # noqa: E402
import bnorm.torch as bt  # noqa: E402

nn = torch.nn
U = 2.0 ** -24
STEPS = 40
BATCH = 32
FACTOR = 8.0
FLOOR_ULPS = 64.0


def make_net():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 10))


def make_data():
    """Class c is a fixed random image (a prototype) plus noise of the same size."""
    g = torch.Generator().manual_seed(11)
    protos = torch.randn(10, 3, 16, 16, generator=g, dtype=torch.float64)
    batches = []
    for _ in range(STEPS + 1):
        y = torch.randint(0, 10, (BATCH,), generator=g)
        x = protos[y] + torch.randn(BATCH, 3, 16, 16, generator=g, dtype=torch.float64)
        x = x * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64).view(1, 3, 1, 1) + 0.5
        batches.append((x, y))
    return batches[:STEPS], batches[STEPS]


def train(net, dtype, memory_format, batches, held_out):
    net = net.to(dtype)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    losses = []
    net.train()
    for x, y in batches:
        x = x.to(dtype).contiguous(memory_format=memory_format)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    net.eval()
    with torch.no_grad():
        x, y = held_out
        eval_loss = float(nn.functional.cross_entropy(
            net(x.to(dtype).contiguous(memory_format=memory_format)), y))
    return losses, eval_loss


def main():
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except AttributeError:
        pass
    t0 = time.time()
    print("library: %s; torch %s, %d threads" % (bnorm._lib.library_path(), torch.__version__,
                                                 torch.get_num_threads()))
    torch.manual_seed(7)
    init = make_net()
    batches, held_out = make_data()
    cl = torch.channels_last

    exact, exact_eval = train(copy.deepcopy(init), torch.float64, torch.contiguous_format,
                              batches, held_out)
    runs = {}
    for fmt_name, fmt in (("NCHW", torch.contiguous_format), ("channels_last", cl)):
        runs["torch " + fmt_name] = train(copy.deepcopy(init), torch.float32, fmt, batches,
                                          held_out)
        conv = bt.convert(copy.deepcopy(init))
        n_bn = sum(isinstance(m, (bt.BatchNorm1d, bt.BatchNorm2d)) for m in conv.modules())
        assert n_bn == 4, "convert replaced %d of the 4 BN layers" % n_bn
        runs["bnorm " + fmt_name] = train(conv, torch.float32, fmt, batches, held_out)
    control_net = bt.convert(copy.deepcopy(init))
    for m in control_net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = 1e-3
    control = train(control_net, torch.float32, torch.contiguous_format, batches, held_out)

    failures = []
    print("losses (exact = torch float64): step, exact, then |run - exact| per run")
    names = list(runs)
    print("  %4s %12s " % ("step", "exact") + " ".join("%14s" % n for n in names))
    for t in range(STEPS):
        if t < 3 or t % 5 == 4 or t == STEPS - 1:
            print("  %4d %12.8f " % (t, exact[t]) + " ".join(
                "%14.3e" % abs(runs[n][0][t] - exact[t]) for n in names))

    def envelope(torch_losses):
        e, out = 0.0, []
        for a, b in zip(torch_losses, exact):
            e = max(e, abs(a - b))
            out.append(e)
        return out

    def worst_ratio(losses, eval_loss, env, env_eval):
        worst = 0.0
        for t in range(STEPS):
            tol = FACTOR * env[t] + FLOOR_ULPS * U * abs(exact[t])
            worst = max(worst, abs(losses[t] - exact[t]) / tol)
        tol = FACTOR * env_eval + FLOOR_ULPS * U * abs(exact_eval)
        return max(worst, abs(eval_loss - exact_eval) / tol)

    print("agreement (|bnorm - exact| / tolerance, tolerance = %g * torch32's running max "
          "deviation + %g u |exact|):" % (FACTOR, FLOOR_ULPS))
    for fmt_name in ("NCHW", "channels_last"):
        tl, te = runs["torch " + fmt_name]
        bl, be = runs["bnorm " + fmt_name]
        env = envelope(tl)
        env_eval = max(env[-1], abs(te - exact_eval))
        r = worst_ratio(bl, be, env, env_eval)
        diff = max(abs(a - b) for a, b in zip(bl, tl))
        print("  %-14s worst ratio %.3g; max |bnorm - torch32| over the steps %.3e, "
              "torch32 envelope at the end %.3e; eval loss exact %.8f torch %.8f bnorm %.8f"
              % (fmt_name, r, diff, env[-1], exact_eval, te, be))
        if not r <= 1.0:
            failures.append("%s: bnorm's losses outside the tolerance (worst ratio %.3g)"
                            % (fmt_name, r))
        if not bl[-1] < 0.8 * bl[0]:
            failures.append("%s: the loss did not fall (%.4f -> %.4f)" % (fmt_name, bl[0], bl[-1]))
    env = envelope(runs["torch NCHW"][0])
    rc = worst_ratio(control[0], control[1], env,
                     max(env[-1], abs(runs["torch NCHW"][1] - exact_eval)))
    print("  control (eps 1e-3 instead of 1e-5): worst ratio %.3g (must be > 1)" % rc)
    if not rc > 1.0:
        failures.append("the control run with another eps is inside the tolerance (ratio %.3g):"
                        " the test cannot tell a real difference" % rc)
    for f in failures:
        print("FAIL " + f)
    print("%s (%.1f s)" % ("PASS" if not failures else "FAIL", time.time() - t0))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
