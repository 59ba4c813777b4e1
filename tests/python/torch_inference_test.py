#!/usr/bin/env python3
"""bnorm.torch.fold_batch_norm and bnorm.torch.update_bn_stats on torch models.

fold: an MLP and a conv net (Sequential) and torchvision's ResNet-18 (explicit pairs) equal the
original in eval mode (float32: relative 1e-5 of the largest logit; float64: 1e-12), the conv
pair equals torch's own torch.nn.utils.fusion.fuse_conv_bn_eval, the original model is
unchanged, and every unfoldable case raises FoldError naming the module.
update_bn_stats: both aggregations against an oracle computed in float64 from each layer's
inputs (forward hooks on a copy), on torch's and bnorm.torch's modules; modes, momentum and
num_batches_tracked restored; errors leave the model unchanged.
"""

import copy
import datetime
import os
import subprocess
import sys
import tempfile

try:
    import torch
except ImportError:
    print("skipped: python3-torch not installed")
    sys.exit(77)

import bnorm.torch as bt

failures = []


def check(name, cond, detail=""):
    print(("ok   " if cond else "FAIL ") + name + ("" if cond else "  " + str(detail)))
    if not cond:
        failures.append(name)


def expect_error(name, fn, *needles, kind=ValueError):
    try:
        fn()
    except kind as e:
        msg = str(e)
        check(name, all(n in msg for n in needles), msg)
        return
    except Exception as e:  # noqa: BLE001
        check(name, False, "raised %r" % e)
        return
    check(name, False, "no error")


def randomize(model, gen):
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1, generator=gen)
                m.running_var.uniform_(0.2, 3, generator=gen)
                if m.affine:
                    m.weight.uniform_(-1.5, 1.5, generator=gen)
                    m.bias.uniform_(-1, 1, generator=gen)


def rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, saved):
    now = model.state_dict()
    return now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in now)


def fold_tests():
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    mlp = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 8, bias=False), torch.nn.BatchNorm1d(8, affine=False),
                              torch.nn.Sigmoid(), torch.nn.Linear(8, 4))
    conv = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, stride=2, groups=2), torch.nn.BatchNorm2d(8)),
        torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 3 * 3, 10), torch.nn.BatchNorm1d(10))
    for name, model, x in (("mlp", mlp, torch.randn(32, 20, generator=gen)),
                           ("conv net", conv, torch.randn(6, 3, 14, 14, generator=gen))):
        randomize(model, gen)
        model.eval()
        before = state(model)
        folded = bt.fold_batch_norm(model)
        check("%s: no batch norm left" % name,
              not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules()))
        check("%s: original unchanged" % name, same_state(model, before))
        with torch.no_grad():
            r = rel(model(x), folded(x))
        check("%s: float32 outputs within 1e-5 of the original (%.2e)" % (name, r), r < 1e-5, r)
        m64, x64 = copy.deepcopy(model).double(), x.double()
        with torch.no_grad():
            r64 = rel(m64(x64), bt.fold_batch_norm(m64)(x64))
        check("%s: float64 outputs within 1e-12 (%.2e)" % (name, r64), r64 < 1e-12, r64)

    # The same as torch's own fusion on a conv pair.
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    c, b = conv[0], conv[1]
    theirs = fuse_conv_bn_eval(copy.deepcopy(c), copy.deepcopy(b))
    ours = bt.fold_batch_norm(torch.nn.Sequential(copy.deepcopy(c), copy.deepcopy(b)))[0]
    check("conv pair: weights as torch's fuse_conv_bn_eval (within 2 ulps)",
          torch.allclose(ours.weight, theirs.weight, rtol=2.5e-7, atol=0)
          and torch.allclose(ours.bias, theirs.bias, rtol=1e-6, atol=1e-7),
          (ours.weight - theirs.weight).abs().max())

    # ResNet-18: its BasicBlocks' forward is not a Sequential; the pairs are named.
    try:
        import torchvision
    except ImportError:
        print("skipped: ResNet-18 fold (python3-torchvision not installed)")
        if os.environ.get("BNORM_REQUIRE_ALL_TESTS") == "1":
            failures.append("torchvision missing")
    else:
        net = torchvision.models.resnet18(num_classes=10)
        randomize(net, gen)
        net.eval()
        expect_error("resnet without pairs: strict refuses, naming a layer",
                     lambda: bt.fold_batch_norm(net), "bn1 (BatchNorm2d) is not directly after",
                     "pairs=[(layer, bn)]", kind=bt.FoldError)
        pairs = [(n.replace("bn", "conv"), n) for n, m in net.named_modules()
                 if isinstance(m, torch.nn.BatchNorm2d) and "downsample" not in n]
        pairs += [(n[:-1] + "0", n) for n, m in net.named_modules()
                  if isinstance(m, torch.nn.BatchNorm2d) and "downsample" in n]
        folded = bt.fold_batch_norm(net, pairs=pairs)
        x = torch.randn(2, 3, 64, 64, generator=gen)
        with torch.no_grad():
            r = rel(net(x), folded(x))
        check("resnet18: %d batch norms folded, outputs within 1e-4 (%.2e)" % (len(pairs), r),
              len(pairs) == 20 and r < 1e-4, r)

    # Refusals.
    L, B1, B2, R = torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.ReLU
    expect_error("batch norm after ReLU", lambda: bt.fold_batch_norm(torch.nn.Sequential(L(4, 3), R(), B1(3))),
                 "1 (ReLU)", "2 (BatchNorm1d)", kind=bt.FoldError)
    expect_error("batch norm first", lambda: bt.fold_batch_norm(torch.nn.Sequential(B1(4), L(4, 3))),
                 "0 (BatchNorm1d) is the first module", kind=bt.FoldError)
    expect_error("BatchNorm2d after Linear", lambda: bt.fold_batch_norm(torch.nn.Sequential(L(4, 3), B2(3))),
                 "follows a Linear, which only a BatchNorm1d", kind=bt.FoldError)
    expect_error("feature count", lambda: bt.fold_batch_norm(torch.nn.Sequential(L(4, 3), B1(5))),
                 "5 features after 0 with 3 outputs", kind=bt.FoldError)
    expect_error("no running statistics",
                 lambda: bt.fold_batch_norm(torch.nn.Sequential(L(4, 3), B1(3, track_running_stats=False))),
                 "keeps no running statistics", kind=bt.FoldError)
    bad = torch.nn.Sequential(L(4, 3), B1(3))
    with torch.no_grad():
        bad[1].running_var[1] = -1.0
    before = state(bad)
    expect_error("negative running_var", lambda: bt.fold_batch_norm(bad, inplace=True),
                 "channel 1 cannot be folded", kind=bt.FoldError)
    check("refused in place: model unchanged", same_state(bad, before) and isinstance(bad[1], B1))
    expect_error("unknown pair name", lambda: bt.fold_batch_norm(bad, pairs=[("0", "nope")]),
                 "no module named 'nope'", kind=bt.FoldError)
    lenient = bt.fold_batch_norm(torch.nn.Sequential(L(4, 3), R(), B1(3), L(3, 3), B1(3)), strict=False)
    check("strict=False leaves the unfoldable one",
          isinstance(lenient[2], B1) and isinstance(lenient[4], torch.nn.Identity), lenient)
    # bnorm.torch's modules fold too.
    m = bt.convert(torch.nn.Sequential(L(4, 3), B1(3)))
    check("bnorm.torch.BatchNorm1d folds", isinstance(bt.fold_batch_norm(m)[1], torch.nn.Identity))


def oracle(model, batches, aggregation):
    """Per batch-norm layer: the aggregated mean and unbiased variance, float64, from the layer
    inputs of training-mode forwards of a copy."""
    m = copy.deepcopy(model).train()
    inputs = {}
    bns = [(n, mod) for n, mod in m.named_modules()
           if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]
    hooks = [mod.register_forward_pre_hook(
        lambda mod, inp, n=n: inputs.setdefault(n, []).append(inp[0].detach().double()))
        for n, mod in bns]
    with torch.no_grad():
        for x in batches:
            m(x)
    for h in hooks:
        h.remove()
    out = {}
    for n, _ in bns:
        ms, us, ns = [], [], []
        for t in inputs[n]:
            c = t.shape[1]
            flat = t.transpose(0, 1).reshape(c, -1)
            ms.append(flat.mean(1))
            us.append(flat.var(1, unbiased=True))
            ns.append(flat.shape[1])
        if aggregation == "mean":
            out[n] = (sum(ms) / len(ms), sum(us) / len(us))
        else:
            total = sum(ns)
            mean = sum(k * a for k, a in zip(ns, ms)) / total
            var = sum((k - 1) * u + k * (a - mean) ** 2 for k, a, u in zip(ns, ms, us)) / (total - 1)
            out[n] = (mean, var)
    return out


def precise_tests():
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    base = torch.nn.Sequential(torch.nn.Conv2d(2, 6, 3, padding=1), torch.nn.BatchNorm2d(6),
                               torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(6 * 8 * 8, 5),
                               torch.nn.BatchNorm1d(5))
    batches = [torch.randn(n, 2, 8, 8, generator=gen) + 0.5 * k for k, n in enumerate((8, 12, 5))]
    for flavour, model in (("torch", copy.deepcopy(base)), ("bnorm.torch", bt.convert(copy.deepcopy(base)))):
        for aggregation in ("mean", "population"):
            m = copy.deepcopy(model).eval()
            before = state(m)
            want = oracle(m, batches, aggregation)
            n = bt.update_bn_stats(m, [(x, None) for x in batches], 3, aggregation=aggregation)
            err = 0.0
            for name, mod in m.named_modules():
                if name in want:
                    err = max(err, rel(want[name][0], mod.running_mean.double()),
                              rel(want[name][1], mod.running_var.double()))
            check("%s, %s: running statistics within 1e-6 of the float64 oracle (%.1e)"
                  % (flavour, aggregation, err), err < 1e-6 and n == 25, (err, n))
            after = state(m)
            check("%s, %s: only running_mean/var changed, modes and momentum restored"
                  % (flavour, aggregation),
                  all(torch.equal(before[k], after[k]) == ("running_" not in k) for k in before)
                  and not m.training and not any(x.training for x in m.modules())
                  and all(x.momentum == 0.1 for x in m.modules()
                          if isinstance(x, torch.nn.modules.batchnorm._BatchNorm)))
    # The two aggregations differ when the batch means move (population includes their spread).
    a, b = oracle(base, batches, "mean"), oracle(base, batches, "population")
    gap = float((b["1"][1] - a["1"][1]).sum() / a["1"][1].sum())
    check("the aggregations differ: population variance larger in sum here (%.1f %%)" % (100 * gap),
          gap > 0.01, gap)

    m = copy.deepcopy(base).train()
    before = state(m)
    expect_error("too few batches", lambda: bt.update_bn_stats(m, batches, 4),
                 "gave 3 batches, num_batches is 4")
    expect_error("bad aggregation", lambda: bt.update_bn_stats(m, batches, 2, aggregation="median"),
                 "expected 'mean' or 'population'")
    expect_error("num_batches 0", lambda: bt.update_bn_stats(m, batches, 0), "num_batches: must be")
    expect_error("a failing batch", lambda: bt.update_bn_stats(m, [batches[0], torch.randn(4, 3, 8, 8)], 2),
                 "channels", kind=RuntimeError)
    check("errors leave the model unchanged, in training mode",
          same_state(m, before) and m.training and m[1].momentum == 0.1)
    expect_error("no batch norm", lambda: bt.update_bn_stats(torch.nn.Linear(2, 2), [torch.randn(2, 2)], 1),
                 "no batch-norm layer")
    expect_error("untracked", lambda: bt.update_bn_stats(
        torch.nn.Sequential(torch.nn.BatchNorm1d(2, track_running_stats=False)), [torch.randn(4, 2)], 1),
        "0 (BatchNorm1d) keeps no running statistics")


def dist_model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.ReLU(),
                               torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4))


def dist_batch(j):  # global batch index j: 10 rows, its mean moving with j
    g = torch.Generator().manual_seed(100 + j)
    return torch.randn(10, 6, generator=g) + 0.4 * j


def dist_worker(rank, world, store, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    res = {}
    for aggregation in ("mean", "population"):
        m = dist_model()
        # rank r's own batches: global indices r * 2, r * 2 + 1
        n = bt.update_bn_stats(m, [dist_batch(rank * 2 + j) for j in range(2)], 2,
                               aggregation=aggregation, process_group=True)
        res[aggregation] = ({k: v for k, v in m.state_dict().items() if "running_" in k}, n)
    torch.save(res, os.path.join(out, "rank%d.pt" % rank))
    dist.destroy_process_group()


def dist_tests():
    """Two gloo processes, two batches each: one process on the four batches, same statistics
    on both ranks."""
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
                   OMP_NUM_THREADS="1")
        store = os.path.join(tmp, "store")
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(r),
                                   str(world), store, tmp], env=env) for r in range(world)]
        codes = [p.wait(timeout=120) for p in procs]
        check("2 gloo processes ran", codes == [0, 0], codes)
        if codes != [0, 0]:
            return
        ranks = [torch.load(os.path.join(tmp, "rank%d.pt" % r)) for r in range(world)]
    for aggregation in ("mean", "population"):
        single = dist_model()
        bt.update_bn_stats(single, [dist_batch(j) for j in range(4)], 4, aggregation=aggregation)
        want = {k: v for k, v in single.state_dict().items() if "running_" in k}
        got0, n0 = ranks[0][aggregation]
        got1, _ = ranks[1][aggregation]
        err = max(rel(want[k].double(), got0[k].double()) for k in want)
        check("2 processes, %s: one process's statistics on the 4 batches (%.1e), %d samples"
              % (aggregation, err, n0), err < 1e-6 and n0 == 40, (err, n0))
        check("2 processes, %s: both ranks bitwise equal" % aggregation,
              all(torch.equal(got0[k], got1[k]) for k in got0))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        torch.set_num_threads(1)
        dist_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
        return 0
    fold_tests()
    precise_tests()
    dist_tests()
    print("%d failed" % len(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
