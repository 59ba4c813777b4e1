"""bnorm.torch.SyncBatchNorm over 1, 2 and 3 gloo processes against the single-process run.

The parent runs a scenario (several configurations, several training steps each, then eval)
in this process without torch.distributed, on the global batch; then it starts K = 1, 2, 3
worker processes (this script with --worker) in a gloo group (a file store in a temporary
folder, loopback, a timeout on the group), each running the same scenario on its part of every
global batch, uneven splits and a rank without samples included.  It checks, bit for bit, the
output y and the input gradient dx (the ranks' parts concatenated), the running statistics,
num_batches_tracked and the saved global statistics on every rank, and the eval output after
training; and that the ranks' local dweight/dbias sum to the single-process ones within the
rounding bound derived in check_equality (they are the local parts, as torch's SyncBatchNorm
gives them). The faults are sync_batchnorm_fault_test.py's.

Exit 0 on success, 1 on a failure, 77 when torch or gloo is missing.
"""

import datetime
import os
import subprocess
import sys
import tempfile
import time

try:
    import torch
    import torch.distributed as dist
except ImportError:
    print("skipped: python3-torch not installed")
    sys.exit(77)

import bnorm.torch as bt  # noqa: E402

GROUP_TIMEOUT_S = 60    # the gloo group's timeout (a slow start must not fail the runs)
WORKER_LIMIT_S = 90     # a worker still running after this is killed and the test fails
N = 7                   # the global batch

# (name, sample shape (C, ...), memory format, momentum, affine, splits for K = 1, 2, 3)
CONFIGS = [
    ("2d", (5,), "contiguous", 0.1, True, {1: [7], 2: [3, 4], 3: [2, 2, 3]}),
    ("4d-nchw", (4, 3, 5), "contiguous", None, True, {1: [7], 2: [1, 6], 3: [0, 1, 6]}),
    ("4d-channels_last", (4, 3, 5), "channels_last", 0.1, True,
     {1: [7], 2: [3, 4], 3: [2, 2, 3]}),
    ("4d-channels_last-uneven", (6, 2, 3), "channels_last", 0.1, True,
     {1: [7], 2: [6, 1], 3: [3, 0, 4]}),
    ("3d-no-affine", (3, 6), "contiguous", 0.3, False, {1: [7], 2: [2, 5], 3: [5, 1, 1]}),
    # 16-bit input (the name says the dtype): x, y, dx bf16/fp16, parameters fp32; "buffers":
    # the module itself converted (model.to(dtype)), its running statistics 16-bit.
    ("4d-channels_last-bf16", (4, 3, 5), "channels_last", 0.1, True,
     {1: [7], 2: [3, 4], 3: [2, 0, 5]}),
    ("3d-fp16", (3, 6), "contiguous", None, True, {1: [7], 2: [4, 3], 3: [1, 5, 1]}),
    ("2d-bf16-buffers", (5,), "contiguous", 0.1, False, {1: [7], 2: [5, 2], 3: [2, 3, 2]}),
]


def _dtype_of(name):
    return torch.bfloat16 if "bf16" in name else torch.float16 if "fp16" in name else \
        torch.float32
STEPS = 3

failures = []


def fail(msg):
    failures.append(msg)
    print("FAILED: " + msg, flush=True)


def _fmt(t, fmt):
    return t.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else t


def scenario(k, rank):
    """Every configuration's steps on this rank's part (k = 0: the whole batch, no group).
    Returns {config: {...tensors...}}."""
    out = {}
    for ci, (name, sample, fmt, momentum, affine, splits) in enumerate(CONFIGS):
        split = splits[k] if k else [N]
        lo = sum(split[:rank])
        hi = lo + split[rank]
        gen = torch.Generator().manual_seed(1000 + ci)
        c = sample[0]
        m = bt.SyncBatchNorm(c, momentum=momentum, affine=affine)
        if affine:
            with torch.no_grad():
                m.weight.copy_(1 + 0.5 * torch.randn(c, generator=gen))
                m.bias.copy_(torch.randn(c, generator=gen))
        dtype = _dtype_of(name)
        if "buffers" in name:
            m.to(dtype)
        rec = {"y": [], "dx": [], "dweight": [], "dbias": [], "running_mean": [],
               "running_var": [], "nbt": [], "save_mean": [], "save_invstd": [], "fmt_ok": []}
        for step in range(STEPS):
            x = (3 * torch.randn((N,) + sample, generator=gen) - 2 + step).to(dtype)
            dy = torch.randn((N,) + sample, generator=gen).to(dtype)
            xl = _fmt(x[lo:hi].clone(), fmt).requires_grad_(True)
            y = m(xl)
            rec["fmt_ok"].append((fmt != "channels_last" or xl.dim() != 4 or hi == lo or
                                  y.is_contiguous(memory_format=torch.channels_last)) and
                                 y.dtype == dtype and xl.grad is None)
            saved = y.grad_fn.saved_tensors
            y.backward(_fmt(dy[lo:hi].clone(), fmt))
            rec["y"].append(y.detach().contiguous())
            rec["dx"].append(xl.grad.contiguous())
            rec["fmt_ok"][-1] = rec["fmt_ok"][-1] and xl.grad.dtype == dtype
            rec["save_mean"].append(saved[2].clone())
            rec["save_invstd"].append(saved[3].clone())
            if affine:
                rec["dweight"].append(m.weight.grad.clone())
                rec["dbias"].append(m.bias.grad.clone())
                m.weight.grad = None
                m.bias.grad = None
            rec["running_mean"].append(m.running_mean.clone())
            rec["running_var"].append(m.running_var.clone())
            rec["nbt"].append(m.num_batches_tracked.clone())
        m.eval()
        xe = (2 * torch.randn((N,) + sample, generator=gen) + 1).to(dtype)
        with torch.no_grad():
            rec["eval"] = m(_fmt(xe[lo:hi].clone(), fmt)).contiguous()
        out[name] = rec
    return out


DDP_SPLITS = {1: [7], 2: [3, 4], 3: [1, 2, 4]}
DDP_STEPS = 3


def ddp_train(k, rank):
    """A conv net whose BatchNorm2d convert_sync_batchnorm makes bnorm's, trained for
    DDP_STEPS SGD steps on this rank's part (k = 0: the whole batch, no DDP). Each rank's loss
    is its part of the global batch's mean loss times k, which DDP's gradient average turns
    into the global batch's gradient: with the local dweight/dbias of the batch norm (torch's
    convention) the run follows the single-process one; with global ones the batch norm's
    parameters would get k times their gradient."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(100, 2))
    model = bt.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(model[1]) is bt.SyncBatchNorm
    net = torch.nn.parallel.DistributedDataParallel(model) if k else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    split = DDP_SPLITS[k] if k else [N]
    lo = sum(split[:rank])
    hi = lo + split[rank]
    gen = torch.Generator().manual_seed(77)
    for _ in range(DDP_STEPS):
        x = torch.randn(N, 3, 5, 5, generator=gen)
        target = torch.randn(N, 2, generator=gen)
        loss = ((net(x[lo:hi]) - target[lo:hi]) ** 2).sum() * max(k, 1) / N
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k2: v.detach().clone() for k2, v in model.state_dict().items()}


PER_RANK_SPLITS = {1: [7], 2: [2, 5], 3: [3, 1, 3]}


def per_rank_mode(k, rank):
    """sync_mode="per-rank", channels_last, two steps: y, dx and the running statistics."""
    split = PER_RANK_SPLITS[k] if k else [N]
    lo = sum(split[:rank])
    hi = lo + split[rank]
    gen = torch.Generator().manual_seed(99)
    m = bt.SyncBatchNorm(4, sync_mode="per-rank")
    out = {"y": [], "dx": []}
    for _ in range(2):
        x = torch.randn(N, 4, 3, 5, generator=gen) * 2 + 1
        dy = torch.randn(N, 4, 3, 5, generator=gen)
        xl = _fmt(x[lo:hi].clone(), "channels_last").requires_grad_(True)
        y = m(xl)
        y.backward(_fmt(dy[lo:hi].clone(), "channels_last"))
        out["y"].append(y.detach().contiguous())
        out["dx"].append(xl.grad.contiguous())
    out["running"] = torch.cat([m.running_mean, m.running_var])
    return out


def collective_error(rank):
    """Rank 1's module has another momentum: every rank's forward must raise, naming it on
    every rank, with the buffers untouched. Returns (raised, message, untouched)."""
    m = bt.SyncBatchNorm(3, momentum=0.2 if rank == 1 else 0.1)
    before = [t.clone() for t in (m.running_mean, m.running_var, m.num_batches_tracked)]
    try:
        m(torch.randn(3, 3, 4))
        return (False, "no exception", True)
    except Exception as e:  # noqa: B902
        after = (m.running_mean, m.running_var, m.num_batches_tracked)
        return (type(e).__name__, str(e), all(torch.equal(a, b) for a, b in zip(before, after)))


def check_module_api():
    """One process: the class, convert_sync_batchnorm, state_dict both ways, a fallback, a
    bad input."""
    from torch.nn.modules.batchnorm import _BatchNorm
    m = bt.SyncBatchNorm(4, process_group=None)
    if not isinstance(m, _BatchNorm) or isinstance(m, torch.nn.SyncBatchNorm):
        fail("SyncBatchNorm must be a _BatchNorm and not a torch.nn.SyncBatchNorm (DDP)")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    model[1].weight.requires_grad_(False)
    model.eval()
    w = model[1].weight
    out = bt.SyncBatchNorm.convert_sync_batchnorm(model)
    if not (type(out[1]) is bt.SyncBatchNorm and out[1].weight is w and not out[1].training
            and not out[1].weight.requires_grad):
        fail("convert_sync_batchnorm: lost the parameter, the mode or requires_grad")
    torch_sync = torch.nn.SyncBatchNorm(4)
    with torch.no_grad():
        torch_sync.running_mean.uniform_()
        torch_sync.num_batches_tracked.fill_(5)
    m.load_state_dict(torch_sync.state_dict())
    back = torch.nn.SyncBatchNorm(4)
    back.load_state_dict(m.state_dict())
    if not (torch.equal(back.running_mean, torch_sync.running_mean) and
            int(back.num_batches_tracked) == 5):
        fail("state_dict does not round-trip with torch.nn.SyncBatchNorm")
    import warnings
    m = bt.SyncBatchNorm(4)
    x64 = torch.randn(5, 4, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = m.double()(x64)
    if not any("float64" in str(w.message) for w in caught):
        fail("float64 input: no fallback warning naming the dtype")
    want = torch.nn.functional.batch_norm(x64, None, None, m.weight, m.bias, True, 0.0, m.eps)
    if max_diff(y, want) > 1e-12:
        fail("float64 fallback differs from torch's batch norm")
    m = bt.SyncBatchNorm(4)
    try:
        m(torch.randn(5, 3, 2))
        fail("a wrong channel count did not raise")
    except Exception as e:  # noqa: B902
        if not ("weight" in str(e) and "C = 3" in str(e)):
            fail("wrong channel count: unexpected message %s" % e)
    if int(m.num_batches_tracked) != 0:
        fail("a failed call changed num_batches_tracked")


def bits(t):
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(bits(a), bits(b)))


def max_diff(a, b):
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


# ----------------------------------------------------------------------------- workers

def init_group(rank, world, store, timeout):
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))


def worker(case, rank, world, store, outdir):
    torch.set_num_threads(1)
    if case == "equality":
        init_group(rank, world, store, GROUP_TIMEOUT_S)
        res = scenario(world, rank)
        res["ddp"] = ddp_train(world, rank)
        res["collective_error"] = collective_error(rank)
        res["per_rank"] = per_rank_mode(world, rank)
        torch.save(res, os.path.join(outdir, "rank%d.pt" % rank))
        dist.barrier()
        dist.destroy_process_group()
        return 0
    raise SystemExit("unknown worker case %r" % case)


def launch(case, world, tmp, script=None):
    """Start `world` workers (of `script`, default this one); returns (procs, outdir, start
    time)."""
    outdir = tempfile.mkdtemp(dir=tmp)
    store = os.path.join(outdir, "store")
    env = dict(os.environ)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env["BNORM_NUM_THREADS"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    procs = [subprocess.Popen([sys.executable, script or os.path.abspath(__file__), "--worker", case,
                               str(r), str(world), store, outdir], env=env)
             for r in range(world)]
    return procs, outdir, time.monotonic()


def wait_all(procs, limit):
    """Exit codes (None for a worker killed at the limit) and the seconds each took."""
    codes, took = [], []
    t0 = time.monotonic()
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, limit - (time.monotonic() - t0))))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            codes.append(None)
        took.append(time.monotonic() - t0)
    return codes, took


# ----------------------------------------------------------------------------- checks

def check_equality(ref, world, tmp):
    procs, outdir, _ = launch("equality", world, tmp)
    codes, _ = wait_all(procs, WORKER_LIMIT_S)
    if any(c != 0 for c in codes):
        fail("%d processes: exit codes %s" % (world, codes))
        return
    ranks = [torch.load(os.path.join(outdir, "rank%d.pt" % r)) for r in range(world)]
    compared = 0
    worst_grad = (0.0, 0.0)  # (largest |sum of parts - single|, its bound)
    for name, _, _, _, affine, splits in CONFIGS:
        r0 = ref[name]
        tag = "%d processes, %s, split %s" % (world, name, splits[world])
        for step in range(STEPS):
            for key in ("y", "dx"):
                got = torch.cat([rk[name][key][step] for rk in ranks])
                compared += got.numel()
                if not same_bits(got, r0[key][step]):
                    fail("%s step %d: %s differs (largest %.3g)" % (
                        tag, step, key, max_diff(got, r0[key][step])))
            for rk_i, rk in enumerate(ranks):
                if not rk[name]["fmt_ok"][step]:
                    fail("%s rank %d: y lost the channels_last format, or y / dx the input's "
                         "dtype" % (tag, rk_i))
                for key in ("running_mean", "running_var", "nbt", "save_mean", "save_invstd"):
                    compared += rk[name][key][step].numel()
                    if not same_bits(rk[name][key][step].float() if key == "nbt" else
                                     rk[name][key][step],
                                     r0[key][step].float() if key == "nbt" else r0[key][step]):
                        fail("%s step %d rank %d: %s differs (largest %.3g)" % (
                            tag, step, rk_i, key,
                            max_diff(rk[name][key][step], r0[key][step])))
            if not affine:
                continue
            for key in ("dweight", "dbias"):
                parts = [rk[name][key][step] for rk in ranks]
                single = r0[key][step]
                total = torch.stack(parts).double().sum(0)
                # Each part is an fp64 sum rounded once to fp32 (error <= 2^-24 |part|), the
                # single-process value too (2^-24 |single|); their fp64 merges differ by far
                # less (2^-40 of the same scale covers it): the bound per channel.
                scale = torch.stack(parts).double().abs().sum(0) + single.double().abs()
                bound = scale * (2.0 ** -24 + 2.0 ** -40)
                err = (total - single.double()).abs()
                if bool((err > bound).any()):
                    fail("%s step %d: sum of the ranks' %s off by %.3g > bound %.3g" % (
                        tag, step, key, float(err.max()), float(bound.max())))
                i = int(torch.argmax(err))
                if float(err[i]) > worst_grad[0]:
                    worst_grad = (float(err[i]), float(bound[i]))
                if world == 1 and not same_bits(parts[0], single):
                    fail("%s step %d: %s of one process differs" % (tag, step, key))
                if world > 1 and all(same_bits(p, single) for p in parts):
                    fail("%s step %d: %s are not local parts" % (tag, step, key))
        got = torch.cat([rk[name]["eval"] for rk in ranks])
        compared += got.numel()
        if not same_bits(got, r0["eval"]):
            fail("%s: eval output differs (largest %.3g)" % (tag, max_diff(got, r0["eval"])))
    # DDP: the parameters after DDP_STEPS steps. The convolution's and linear layer's
    # gradients are sums over the batch, rounded differently when split, so this is not
    # bitwise: fp32 roundings of gradients of size ~1 over 3 steps of lr 0.1 stay below 1e-5,
    # where a batch norm gradient k times too large would move its parameters by ~1e-2.
    worst_ddp = 0.0
    for key, want in ref["ddp"].items():
        for r, rk in enumerate(ranks):
            d = max_diff(rk["ddp"][key], want)
            worst_ddp = max(worst_ddp, d)
            if not d <= 1e-5:
                fail("%d processes, DDP: %s on rank %d differs by %.3g (> 1e-5)" % (
                    world, key, r, d))
    # Per-rank mode: within rounding of one process (statistics merged per rank in fp64; the
    # outputs are fp32: a few ulps), the running statistics bitwise the same on every rank.
    worst_pr = 0.0
    for key in ("y", "dx"):
        for step in range(2):
            got = torch.cat([rk["per_rank"][key][step] for rk in ranks])
            want = ref["per_rank"][key][step]
            d = float(((got - want).abs() / (1 + want.abs())).max())
            worst_pr = max(worst_pr, d)
            if not d <= 1e-5:
                fail("%d processes, per-rank mode: %s differs by %.3g" % (world, key, d))
    for r, rk in enumerate(ranks):
        if not same_bits(rk["per_rank"]["running"], ranks[0]["per_rank"]["running"]):
            fail("%d processes, per-rank mode: rank %d's running statistics differ" % (world, r))
    print("%d processes: per-rank mode, split %s: largest relative difference %.3g"
          % (world, PER_RANK_SPLITS[world], worst_pr), flush=True)
    for r, rk in enumerate(ranks):
        raised, msg, untouched = rk["collective_error"]
        if world == 1:
            continue  # one rank: nothing to disagree with
        if raised != "BnormError" or "momentum" not in msg or not untouched:
            fail("%d processes: rank %d with another rank's momentum: %s %s, buffers untouched "
                 "%s" % (world, r, raised, msg, untouched))
    print("%d processes: %d values compared bit for bit with the single-process run; "
          "sum of the ranks' local dweight/dbias: largest difference %.3g (bound %.3g)"
          % (world, compared, worst_grad[0], worst_grad[1]), flush=True)
    print("%d processes: DDP with split %s, parameters and buffers after %d steps: largest "
          "difference %.3g" % (world, DDP_SPLITS[world], DDP_STEPS, worst_ddp), flush=True)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        case, rank, world, store, outdir = sys.argv[2:7]
        return worker(case, int(rank), int(world), store, outdir)
    if not dist.is_available() or not dist.is_gloo_available():
        print("skipped: torch.distributed with gloo not available")
        return 77
    t0 = time.monotonic()
    check_module_api()
    ref = scenario(0, 0)
    ref["ddp"] = ddp_train(0, 0)
    ref["per_rank"] = per_rank_mode(0, 0)
    # The single-process run is batch norm: torch's own module on the same data, within fp32
    # rounding (the conformance proper is tests/python/torch_modules_test.py).
    x = torch.randn(7, 4, 3, 5)
    m, tm = bt.SyncBatchNorm(4), torch.nn.BatchNorm2d(4)
    d = max_diff(m(x), tm(x))
    if not d < 1e-5:
        fail("single process vs torch.nn.BatchNorm2d: y differs by %.3g" % d)
    # 16-bit input in one process: the fp32 pass on the widened values, y and dx rounded once
    # to bf16 / fp16 (what the library's 16-bit path is), the statistics bit for bit; a module
    # converted to bf16 keeps bf16 running statistics (rounded), as torch's does.
    for dtype in (torch.bfloat16, torch.float16):
        x = (3 * torch.randn(7, 4, 3, 5) - 2).to(dtype).requires_grad_(True)
        x32 = x.detach().float().requires_grad_(True)
        dy = torch.randn(7, 4, 3, 5).to(dtype)
        m16, m32 = bt.SyncBatchNorm(4), bt.SyncBatchNorm(4)
        y16, y32 = m16(x), m32(x32)
        y16.backward(dy)
        y32.backward(dy.float())
        if not (same_bits(y16, y32.detach().to(dtype)) and same_bits(x.grad, x32.grad.to(dtype))):
            fail("%s: y or dx is not the fp32 pass rounded once (largest %.3g, %.3g)" % (
                dtype, max_diff(y16, y32), max_diff(x.grad, x32.grad)))
        if not (same_bits(m16.running_mean, m32.running_mean) and
                same_bits(m16.running_var, m32.running_var)):
            fail("%s: running statistics differ from the fp32 pass's" % dtype)
        mb = bt.SyncBatchNorm(4).to(dtype)
        mb(x.detach())
        if mb.running_mean.dtype != dtype or not same_bits(mb.running_var,
                                                           m32.running_var.to(dtype)):
            fail("%s buffers: running statistics not the fp32 update rounded (%s)" % (
                dtype, mb.running_var.dtype))
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2, 3):
            check_equality(ref, world, tmp)
    print("%.1f s; %s" % (time.monotonic() - t0,
                          "%d failures" % len(failures) if failures else "all passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
