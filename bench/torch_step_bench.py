#!/usr/bin/env python3
"""PyTorch training steps: torch's batch norm, bnorm.torch.convert (plain and fuse_relu=True) and
identity, 1 and 2 threads.

Full training steps with torch's batch norm, with bnorm's (bnorm.torch.convert), with bnorm's
fused with the ReLU after it (bnorm.torch.convert(model, fuse_relu=True): BatchNormReLU in place
of each BatchNorm + ReLU pair of an nn.Sequential) and with none (batch norm replaced by
identity), in one run, on 1 and 2 threads.

Models: torchvision's ResNet-18 (batch 16, 3x112x112, 10 classes, SGD with momentum 0.9) in NCHW
and channels_last, and the paper MLP (784-100-100-100-10, sigmoid, BatchNorm1d before each
sigmoid, batch 60, plain SGD; tools/torch_paper_mlp.py), and a conv-BN-ReLU CNN (cnn: five
Conv3x3-BatchNorm2d-ReLU blocks of 32, 32, 64, 64, 128 channels with two max-pools in one
nn.Sequential, global average pool, Linear to 10; batch 8, 3x64x64, SGD with momentum 0.9), the
model where fuse_relu fuses every batch norm. ResNet-18 has nothing fuse_relu fuses (its ReLUs
are called in forward(), not Sequential members: the fused variant is then the plain one), nor
the MLP (sigmoid). A step is zero_grad, forward, cross-entropy, backward and the SGD step, timed
whole with perf_counter.

Each thread count runs in its own worker process (this script with --worker), with
torch.set_num_threads(T), OMP_NUM_THREADS=T, OPENBLAS_NUM_THREADS=T (Debian's torch runs Linear
on OpenBLAS's own pthread pool) and BNORM_NUM_THREADS=T (bnorm's pool; the C API has no setter,
the library reads the variable), so the pools are the same size and only one of them computes at
any moment.

Before timing, every configuration is validated, for each converted variant: from the same
initial state the converted model's logits, loss and every parameter gradient after one backward
are compared with torch's fp32 model and judged by torch's model in float64 (the rule is derived
at ENVELOPE below). A row that fails is marked FAILED and its ratio is shown in parentheses.

Timing: the variants are interleaved, in a rotating order, repetition after repetition
(a shared VM's speed drifts over minutes); the first repetitions are warm-up. A ResNet-18
repetition is one step per variant; an MLP repetition is a block of steps per variant, whose mean
is one sample. The report gives the median and min-max (the JSON also the IQR and every
sample), the ratios torch/bnorm and torch/fused of the medians, and the batch-norm share of
the step, (t_bn - t_identity) / t_bn, for torch's BN and for bnorm's (unfused and fused).

Also, per batch-norm layer shape of each model (forward hooks), the BN layer alone: forward +
backward of torch's module against the converted module on the same input and output gradient
(where the step's time goes).

  torch_step_bench.py [--threads 1,2,2p] [--reps N] [--configs cnn,resnet18:nchw,...]
                      [--quick] [--out-dir DIR]

(2p: 2 threads with OMP_WAIT_POLICY=passive, see docs/benchmarks.md)

Writes DIR/results.json and DIR/results.md and prints the markdown. Exit status 1 when a row
failed validation or bnorm.torch is not importable (the table is still written).
"""
import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# Validation. bnorm and torch compute batch norm in fp32 with different summation orders, so their
# results differ by rounding; per layer both are within ~5e-8 (norm-wise) of float64 on these
# shapes. Through a whole ResNet-18, though, a rounding difference can flip a discrete decision
# (a ReLU input near 0, a max-pool tie) and the gradients of the layers before it move by up to
# 1e-2: torch's own fp32 gradients differ that much from the same model run in float64. So the
# judge is the float64 run of torch's model (same state, same batch): with e(g) = ||g - g64|| /
# ||g64|| per tensor (gradient scales floored at ZERO_FLOOR x the model's largest gradient norm:
# a Linear bias feeding BN has a zero gradient in exact arithmetic, fp32 noise on both sides),
# and E_torch the largest e of torch's fp32 run over the model's tensors, a tensor of the
# converted model passes when e_bnorm <= ENVELOPE x E_torch + ABS_FLOOR. Loss and logits: the
# same rule on their max-relative error. An implementation error (a wrong sign, a missing term,
# the wrong variance) gives e of order 1.
ENVELOPE = 4.0
ABS_FLOOR = 1e-5
ZERO_FLOOR = 1e-3

VARIANTS = ("torch", "bnorm", "bnorm_fused", "identity")
CONVERTED = ("bnorm", "bnorm_fused")  # the variants that need bnorm.torch
# Environment variables that change the timings, recorded in the report when set.
ENV_RECORDED = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "BNORM_NUM_THREADS", "OMP_WAIT_POLICY",
                "GOMP_SPINCOUNT", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                "BNORM_BACKEND", "BNORM_CHECK_FINITE")


# ----------------------------------------------------------------------------- worker

def _bn_classes(torch):
    return (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def _replace_bn_by_identity(torch, module):
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            setattr(module, name, torch.nn.Identity())
        else:
            _replace_bn_by_identity(torch, child)
    return module


def _paper_mlp(torch):
    layers = []
    width = 784
    for _ in range(3):
        layers += [torch.nn.Linear(width, 100), torch.nn.BatchNorm1d(100), torch.nn.Sigmoid()]
        width = 100
    layers.append(torch.nn.Linear(width, 10))
    net = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for m in net:
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, 0.1)
                m.bias.zero_()
    return net


def _cnn(torch):
    layers, width = [], 3
    for i, c in enumerate((32, 32, 64, 64, 128)):
        layers += [torch.nn.Conv2d(width, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c),
                   torch.nn.ReLU(inplace=True)]
        if i in (1, 3):
            layers.append(torch.nn.MaxPool2d(2))
        width = c
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(width, 10)]
    return torch.nn.Sequential(*layers)


LABELS = {"resnet18": "ResNet-18", "mlp": "paper MLP", "cnn": "conv-BN-ReLU CNN"}


class Config:
    def __init__(self, torch, model, fmt, seed):
        self.model_name, self.fmt = model, fmt
        torch.manual_seed(seed)
        if model == "resnet18":
            import torchvision
            base = torchvision.models.resnet18(num_classes=10)
            self.x = torch.randn(16, 3, 112, 112)
            self.y = torch.randint(0, 10, (16,))
            self.lr, self.momentum = 0.01, 0.9
        elif model == "cnn":
            base = _cnn(torch)
            self.x = torch.randn(8, 3, 64, 64)
            self.y = torch.randint(0, 10, (8,))
            self.lr, self.momentum = 0.01, 0.9
        elif model == "mlp":
            base = _paper_mlp(torch)
            self.x = torch.rand(60, 784)
            self.y = torch.randint(0, 10, (60,))
            self.lr, self.momentum = 0.1, 0.0
        else:
            raise SystemExit("torch_step_bench: unknown model %r (resnet18, cnn, mlp)" % model)
        mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        if fmt == "channels_last":
            base = base.to(memory_format=mf)
            self.x = self.x.contiguous(memory_format=mf)
        base.train()
        self.base = base

    def build(self, torch, variant, bnorm_torch):
        m = copy.deepcopy(self.base)
        if variant == "bnorm":
            m = bnorm_torch.convert(m)
        elif variant == "bnorm_fused":
            m = bnorm_torch.convert(m, fuse_relu=True)
        elif variant == "identity":
            m = _replace_bn_by_identity(torch, m)
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=self.lr, momentum=self.momentum)
        return m, opt

    @property
    def label(self):
        return LABELS[self.model_name]


def _step(torch, model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


def _run_once(torch, model, x, y):
    model.train()
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    grads = {k: p.grad.detach().double() for k, p in model.named_parameters() if p.grad is not None}
    bufs = {k: b.detach().double() for k, b in model.named_buffers() if b.dtype.is_floating_point}
    counters = {k: b.clone() for k, b in model.named_buffers() if not b.dtype.is_floating_point}
    return logits.detach().double(), loss.detach().double(), grads, bufs, counters


def _validate(torch, cfg, bnorm_torch, fuse_relu=False):
    """The converted model (convert(model, fuse_relu)) against torch's, both judged by torch's
    model in float64 (see ENVELOPE): logits, loss, every parameter gradient after one backward,
    the BN buffers after the forward."""
    got_model = bnorm_torch.convert(copy.deepcopy(cfg.base), fuse_relu=fuse_relu)
    converted = sum(1 for m in got_model.modules() if type(m).__module__.startswith("bnorm"))
    fused = sum(1 for m in got_model.modules() if type(m).__name__.startswith("BatchNormReLU"))
    expected = sum(1 for m in cfg.base.modules() if isinstance(m, _bn_classes(torch)))
    r64 = _run_once(torch, copy.deepcopy(cfg.base).double(), cfg.x.double(), cfg.y)
    r32 = _run_once(torch, copy.deepcopy(cfg.base), cfg.x, cfg.y)
    rb = _run_once(torch, got_model, cfg.x, cfg.y)
    problems = []
    if converted != expected:
        problems.append("convert replaced %d of %d BN layers" % (converted, expected))
    for k, v in r32[4].items():
        if not torch.equal(v, rb[4].get(k, v + 1)):
            problems.append("%s: %s != %s" % (k, rb[4].get(k), v))
    missing = sorted(set(r32[2]) ^ set(rb[2]))
    if missing:
        problems.append("gradients missing: %s" % ", ".join(missing))

    def max_rel(a, b):
        scale = b.abs().max().item()
        return (a - b).abs().max().item() / scale if scale > 0 else 0.0

    largest = max((g.norm().item() for g in r64[2].values()), default=0.0)
    rows = []
    pairs = [("logits", r32[0], rb[0], r64[0], False), ("loss", r32[1], rb[1], r64[1], False)]
    pairs += [(k, r32[2][k], rb[2][k], r64[2][k], True)
              for k in r64[2] if k in rb[2] and k in r32[2]]
    pairs += [(k, r32[3][k], rb[3][k], r64[3][k], True) for k in r64[3] if k in rb[3]]
    for name, t, b, ref, normwise in pairs:
        if normwise:
            scale = max(ref.norm().item(), ZERO_FLOOR * largest if name in r64[2] else 0.0)
            scale = scale if scale > 0 else 1.0
            e_t, e_b = (t - ref).norm().item() / scale, (b - ref).norm().item() / scale
            diff = (b - t).norm().item() / scale
        else:
            e_t, e_b, diff = max_rel(t, ref), max_rel(b, ref), max_rel(b, t)
        rows.append({"name": name, "kind": "grad" if name in r64[2] else (
            "output" if name in ("logits", "loss") else "buffer"),
            "err_torch": e_t, "err_bnorm": e_b, "diff": diff})
    envelope = {kind: max((r["err_torch"] for r in rows if r["kind"] == kind), default=0.0)
                for kind in ("output", "grad", "buffer")}
    for r in rows:
        tol = ENVELOPE * envelope[r["kind"]] + ABS_FLOOR
        r["tol"] = tol
        if not r["err_bnorm"] <= tol:  # NaN fails too
            problems.append("%s: error vs float64 %.2e > %.2e (= %g x torch's %.2e + %.0e)" % (
                r["name"], r["err_bnorm"], tol, ENVELOPE, envelope[r["kind"]], ABS_FLOOR))

    def worst(kind, key):
        return max((r[key] for r in rows if r["kind"] == kind), default=0.0)

    return {"ok": not problems, "problems": problems, "envelope": ENVELOPE,
            "abs_floor": ABS_FLOOR, "zero_floor": ZERO_FLOOR, "converted_layers": converted,
            "bn_layers": expected, "fused_layers": fused, "loss_torch": r32[1].item(), "loss_bnorm": rb[1].item(),
            "loss_float64": r64[1].item(),
            "max": {kind: {"bnorm_vs_torch": worst(kind, "diff"),
                           "torch_vs_float64": worst(kind, "err_torch"),
                           "bnorm_vs_float64": worst(kind, "err_bnorm")}
                    for kind in ("output", "grad", "buffer")},
            "tensors_compared": rows}


def _summary(samples):
    s = sorted(samples)
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) >= 2 else [s[0]] * 3
    return {"median": statistics.median(s), "min": s[0], "max": s[-1], "q1": q[0], "q3": q[2],
            "n": len(s), "samples": samples}


def _time_config(torch, cfg, bnorm_torch, reps, warmup, block, max_seconds):
    """Interleaved repetitions; stops early (after at least 3 timed ones) past max_seconds."""
    deadline = time.perf_counter() + max_seconds
    variants = [v for v in VARIANTS if v not in CONVERTED or bnorm_torch is not None]
    built = {v: cfg.build(torch, v, bnorm_torch) for v in variants}
    samples = {v: [] for v in variants}
    last_loss = {}
    for r in range(warmup + reps):
        k = r % len(variants)
        order = variants[k:] + variants[:k]  # rotate: each variant goes first in turn
        for v in order:
            model, opt = built[v]
            start = time.perf_counter()
            for _ in range(block):
                loss = _step(torch, model, opt, cfg.x, cfg.y)
            seconds = (time.perf_counter() - start) / block
            if r >= warmup:
                samples[v].append(seconds)
            last_loss[v] = loss.item()
        if r >= warmup + 2 and time.perf_counter() > deadline:
            break
    out = {v: _summary(samples[v]) for v in variants}
    for v in variants:
        out[v]["final_loss"] = last_loss[v]
    return out


def _layer_shapes(torch, cfg):
    """(shape, count) of the BN layers' inputs in one forward of cfg's model."""
    shapes = {}
    m = copy.deepcopy(cfg.base)

    def hook(mod, inp, out):
        key = tuple(inp[0].shape)
        shapes[key] = shapes.get(key, 0) + 1

    handles = [mod.register_forward_hook(hook) for mod in m.modules()
               if isinstance(mod, _bn_classes(torch))]
    with torch.no_grad():
        m(cfg.x)
    for h in handles:
        h.remove()
    return sorted(shapes.items(), key=lambda kv: -kv[0][0] * _prod(kv[0][1:]))


def _prod(t):
    p = 1
    for v in t:
        p *= v
    return p


def _time_layers(torch, cfg, bnorm_torch, min_seconds):
    """BN layer alone, forward + backward (training), torch's module vs the converted one."""
    rows = []
    mf = torch.channels_last if cfg.fmt == "channels_last" else torch.contiguous_format
    for shape, count in _layer_shapes(torch, cfg):
        c = shape[1]
        cls = torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d
        x = torch.randn(*shape)
        if len(shape) == 4:
            x = x.contiguous(memory_format=mf)
        x.requires_grad_(True)
        dy = torch.randn(*shape)
        if len(shape) == 4:
            dy = dy.contiguous(memory_format=mf)
        mods = {"torch": cls(c)}
        if bnorm_torch is not None:
            mods["bnorm"] = bnorm_torch.convert(copy.deepcopy(mods["torch"]))
        row = {"shape": list(shape), "count": count}
        timings = {k: {"fwd": [], "bwd": []} for k in mods}
        names = list(mods)
        deadline = None
        r = 0
        while True:
            for k in (names if r % 2 == 0 else names[::-1]):
                mod = mods[k]
                x.grad = None
                t0 = time.perf_counter()
                y = mod(x)
                t1 = time.perf_counter()
                y.backward(dy)
                t2 = time.perf_counter()
                if r >= 3:
                    timings[k]["fwd"].append(t1 - t0)
                    timings[k]["bwd"].append(t2 - t1)
            r += 1
            if r == 3:
                deadline = time.perf_counter() + min_seconds
            if r >= 13 and time.perf_counter() >= deadline:
                break
        for k in mods:
            row[k] = {p: statistics.median(timings[k][p]) for p in ("fwd", "bwd")}
        rows.append(row)
    return rows


def worker(args):
    import torch
    threads = args.threads_one
    torch.set_num_threads(threads)
    sys.path.insert(0, os.path.join(REPO, "python"))
    bnorm_torch, bnorm_error, bnorm_version, bnorm_library = None, None, None, None
    try:
        import bnorm
        import bnorm.torch as bnorm_torch
        bnorm_version = bnorm.version()
        bnorm_library = bnorm.library_path()
    except Exception as e:  # reported in the table, the other variants still run
        bnorm_torch, bnorm_error = None, "%s: %s" % (type(e).__name__, e)
    import torchvision
    result = {
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in ENV_RECORDED if k in os.environ},
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "bnorm": bnorm_version, "bnorm_library": bnorm_library, "bnorm_error": bnorm_error,
        "configs": [],
    }
    for spec in args.configs.split(","):
        model, _, fmt = spec.partition(":")
        cfg = Config(torch, model, fmt or "nchw", args.seed)
        resnet = model == "resnet18"
        block = {"resnet18": 1, "cnn": args.cnn_block}.get(model, args.mlp_block)
        reps = {"resnet18": args.reps, "cnn": args.cnn_reps}.get(model, args.mlp_reps)
        warmup = args.warmup if resnet else 2
        t0 = time.perf_counter()
        entry = {"model": model, "format": cfg.fmt, "label": cfg.label, "block": block,
                 "reps": reps, "warmup": warmup}
        if bnorm_torch is not None:
            entry["validation"] = _validate(torch, cfg, bnorm_torch)
            entry["validation_fused"] = _validate(torch, cfg, bnorm_torch, fuse_relu=True)
        entry["times"] = _time_config(torch, cfg, bnorm_torch, reps, warmup, block,
                                      args.max_seconds)
        if args.layers:
            entry["layers"] = _time_layers(torch, cfg, bnorm_torch, 0.3 if resnet else 0.1)
        entry["seconds"] = time.perf_counter() - t0
        print("  %d thread(s), %s %s: %.0f s" % (threads, cfg.label, cfg.fmt, entry["seconds"]),
              file=sys.stderr, flush=True)
        result["configs"].append(entry)
    json.dump(result, sys.stdout)


# ----------------------------------------------------------------------------- report

def _threads_label(r):
    """'2', or '2 passive' for a run with OMP_WAIT_POLICY=passive."""
    passive = r["env"].get("OMP_WAIT_POLICY", "").lower() == "passive"
    return "%d%s" % (r["threads"], " passive" if passive else "")


def _ms(t):
    return "%.1f" % (t * 1e3) if t >= 0.01 else "%.3f" % (t * 1e3)


def _cell(s):
    return "%s [%s-%s]" % (_ms(s["median"]), _ms(s["min"]), _ms(s["max"]))


def _share(t_bn, t_id):
    return (t_bn - t_id) / t_bn


TARGETS = {("resnet18", "nchw"): 1.12, ("resnet18", "channels_last"): 1.3}


def report(meta, runs):
    lines = []
    w = lines.append
    w("## PyTorch training step: torch's batch norm vs `bnorm.torch.convert`")
    w("")
    w("%s, `%s`, %s" % (meta["date"], meta["command"], meta["cpu"]))
    w("")
    r0 = runs[0] if runs else {}
    w("PyTorch %s, torchvision %s, bnorm %s (%s), Python %s; load average %s at the start, %s at "
      "the end; %.0f s in all." % (r0.get("torch"), r0.get("torchvision"), r0.get("bnorm"),
                                   meta.get("bnorm_build", "?"), meta["python"],
                                   meta["load_start"], meta["load_end"], meta["seconds"]))
    for r in runs:
        w("")
        w("%s thread(s): torch.get_num_threads() = %d; %s." % (
            _threads_label(r), r["torch_threads"],
            ", ".join("%s=%s" % kv for kv in sorted(r["env"].items()))))
        if r.get("bnorm_error"):
            w("")
            w("**bnorm.torch not importable (%s thread(s)): %s**" % (_threads_label(r),
                                                                  r["bnorm_error"]))
    w("")
    w("Step = zero_grad + forward + cross-entropy + backward + SGD step; ms per step, median "
      "[min-max] over the timed repetitions (variants interleaved). ratio = torch BN / bnorm "
      "(> 1: the converted model is faster); fused = convert(model, fuse_relu=True) (fused "
      "layers: the BatchNormReLU modules it made, of the model's BN layers). BN share = "
      "(t - t_identity) / t.")
    w("")
    w("| model | format | threads | torch BN ms | bnorm ms | bnorm fused ms | no BN (identity) ms "
      "| ratio torch/bnorm | ratio torch/fused | fused layers | BN share, torch "
      "| BN share, bnorm | BN share, fused | validation (bnorm; fused) |")
    w("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    summary = []
    failures = []

    def converted(t, v, key, ti):
        """(valid, ratio, ratio cell, time cell, share cell) of variant key."""
        if key not in t:
            return False, None, "-", "not run", "-"
        tb = t[key]["median"]
        valid = v is not None and v["ok"]
        ratio = t["torch"]["median"] / tb
        return (valid, ratio, "%.2fx" % ratio if valid else "(%.2fx)" % ratio, _cell(t[key]),
                "%.0f %%" % (100 * _share(tb, ti)))

    for r in runs:
        for c in r["configs"]:
            t = c["times"]
            tt, ti = t["torch"]["median"], t["identity"]["median"]
            v, vf = c.get("validation"), c.get("validation_fused")
            valid, ratio, ratio_s, bn_cell, share_b = converted(t, v, "bnorm", ti)
            _, _, ratio_f, fused_cell, share_f = converted(t, vf, "bnorm_fused", ti)
            cells = []
            for name, val in (("bnorm", v), ("fused", vf)):
                if val is None:
                    cells.append("not run")
                    continue
                g = val["max"]["grad"]
                cells.append(("ok" if val["ok"] else "**FAILED**") +
                             " (grads vs f64: %.0e, torch %.0e)" % (g["bnorm_vs_float64"],
                                                                     g["torch_vs_float64"]))
                if not val["ok"]:
                    failures.append("%s %s (%s), %s thread(s): %s" % (
                        c["label"], c["format"], name, _threads_label(r),
                        "; ".join(val["problems"][:5])))
            nfused = "%d of %d" % (vf["fused_layers"], vf["bn_layers"]) if vf else "-"
            fmt = c["format"] if c["model"] != "mlp" else "-"
            w("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %.0f %% | %s | %s | %s |" % (
                c["label"], fmt, _threads_label(r), _cell(t["torch"]), bn_cell, fused_cell,
                _cell(t["identity"]), ratio_s, ratio_f, nfused, 100 * _share(tt, ti), share_b,
                share_f, "; ".join(cells)))
            target = TARGETS.get((c["model"], c["format"]))
            if target is not None and r["threads"] == 2:
                summary.append((c["label"], c["format"] + (
                    "" if _threads_label(r) == "2" else " (OMP_WAIT_POLICY=passive)"),
                    target, ratio, valid))
    for f in failures:
        w("")
        w("**FAILED validation**: " + f)
    w("")
    w("Targets (issue 11, 2 threads):")
    w("")
    for label, fmt, target, ratio, valid in summary:
        if ratio is None:
            state = "not measured"
        elif not valid:
            state = "FAILED validation"
        else:
            state = "**met**" if ratio >= target else "**missed**"
        w("- %s %s: converted step >= %.2fx faster: %s (%s)" % (
            label, fmt, target, "-" if ratio is None else "%.2fx" % ratio, state))
    w("")
    w("Validation before timing, from the same state and batch: the converted model's logits, "
      "loss, every parameter gradient after one backward and the BN buffers after the forward, "
      "judged against torch's model run in float64: the error (max-relative for logits and loss, "
      "norm-wise per tensor for gradients and buffers, a gradient's scale floored at %.0e x the "
      "model's largest) must stay <= %g x the largest error of torch's own fp32 run + %.0e. A "
      "rounding difference can flip a ReLU or max-pool decision, so fp32 gradients of ResNet-18 "
      "deviate from float64 by up to ~1e-2 for torch too; per BN layer both are within 1e-7 "
      "(bench/torch_step_bench.py explains it). The column gives the largest gradient error of "
      "bnorm and of torch against float64." % (ZERO_FLOOR, ENVELOPE, ABS_FLOOR))
    if any("layers" in c for r in runs for c in r["configs"]):
        w("")
        w("BN layers alone (training forward + backward of the module, median ms per call; "
          "x count = layers of that input shape in the model):")
        w("")
        w("| model | format | threads | input shape | x count | torch fwd | torch bwd | bnorm fwd "
          "| bnorm bwd | ratio fwd+bwd |")
        w("|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
        for r in runs:
            for c in r["configs"]:
                fmt = c["format"] if c["model"] != "mlp" else "-"
                tot_t = tot_b = 0.0
                for row in c.get("layers", []):
                    t = row["torch"]
                    tot_t += row["count"] * (t["fwd"] + t["bwd"])
                    b = row.get("bnorm")
                    if b:
                        tot_b += row["count"] * (b["fwd"] + b["bwd"])
                    w("| %s | %s | %s | %s | %d | %s | %s | %s | %s | %s |" % (
                        c["label"], fmt, _threads_label(r), "x".join(map(str, row["shape"])),
                        row["count"], _ms(t["fwd"]), _ms(t["bwd"]),
                        _ms(b["fwd"]) if b else "-", _ms(b["bwd"]) if b else "-",
                        "%.2fx" % ((t["fwd"] + t["bwd"]) / (b["fwd"] + b["bwd"])) if b else "-"))
                if c.get("layers"):
                    w("| %s | %s | %s | **all BN layers of a step** | | %s | | %s | | %s |" % (
                        c["label"], fmt, _threads_label(r), _ms(tot_t),
                        _ms(tot_b) if tot_b else "-", "%.2fx" % (tot_t / tot_b) if tot_b else "-"))
    w("")
    return "\n".join(lines)


def _cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        info = {}
        for line in out.splitlines():
            k, _, v = line.partition(":")
            info[k.strip()] = v.strip()
        return "%s, %s CPUs" % (info.get("Model name", "?"), info.get("CPU(s)", "?"))
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "?"


def _load():
    try:
        return " ".join("%.2f" % v for v in os.getloadavg())
    except OSError:
        return "?"


def driver(args):
    start = time.perf_counter()
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": args.command or "bench/torch_step_bench.py",
        "cpu": _cpu_model(), "python": platform.python_version(), "load_start": _load(),
        "bnorm_build": args.bnorm_build or "?",
        "argv": sys.argv[1:],
    }
    runs = []
    status = 0
    for spec in args.threads.split(","):
        passive = spec.endswith("p")
        t = int(spec.rstrip("p"))
        # torch's OpenMP pool, OpenBLAS's own pthread pool (Debian's torch calls it for
        # Linear's matrix products; it ignores torch.set_num_threads and starts one thread per
        # core) and bnorm's pool: all the same size.
        env = dict(os.environ, OMP_NUM_THREADS=str(t), OPENBLAS_NUM_THREADS=str(t),
                   BNORM_NUM_THREADS=str(t))
        if passive:
            # libgomp's idle threads sleep at once instead of spinning for some milliseconds
            # after every parallel region (read when torch loads libgomp: only as a variable).
            env["OMP_WAIT_POLICY"] = "passive"
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--threads", str(t),
               "--reps", str(args.reps), "--warmup", str(args.warmup),
               "--mlp-reps", str(args.mlp_reps), "--mlp-block", str(args.mlp_block),
               "--cnn-reps", str(args.cnn_reps), "--cnn-block", str(args.cnn_block),
               "--configs", args.configs, "--seed", str(args.seed),
               "--max-seconds", str(args.max_seconds)]
        if not args.layers:
            cmd.append("--no-layers")
        print("== %s thread(s)" % spec, file=sys.stderr, flush=True)
        p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        if p.returncode != 0:
            print("torch_step_bench: the %s-thread worker failed (exit %d)" % (spec, p.returncode),
                  file=sys.stderr)
            status = 1
            continue
        run = json.loads(p.stdout)
        runs.append(run)
        if run.get("bnorm_error"):
            status = 1
        for c in run["configs"]:
            for key in ("validation", "validation_fused"):
                if c.get(key) is not None and not c[key]["ok"]:
                    status = 1
    meta["load_end"] = _load()
    meta["seconds"] = time.perf_counter() - start
    md = report(meta, runs)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "runs": runs}, f, indent=1)
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    print("Results: %s/results.md, results.json" % args.out_dir, file=sys.stderr)
    return status


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2,2p",
                    help="thread counts, one worker process each; a trailing p (2p) runs that "
                    "count with OMP_WAIT_POLICY=passive (1,2,2p)")
    ap.add_argument("--reps", type=int, default=5, help="timed ResNet-18 steps per variant (5)")
    ap.add_argument("--warmup", type=int, default=1, help="ResNet-18 warm-up steps per variant (1)")
    ap.add_argument("--mlp-reps", type=int, default=15, help="timed MLP blocks per variant (15)")
    ap.add_argument("--mlp-block", type=int, default=100, help="MLP steps per block (100)")
    ap.add_argument("--cnn-reps", type=int, default=15, help="timed CNN blocks per variant (15)")
    ap.add_argument("--cnn-block", type=int, default=5, help="CNN steps per block (5)")
    ap.add_argument("--configs", default="resnet18:nchw,resnet18:channels_last,cnn,mlp",
                    help="model:format list, models resnet18, cnn, mlp, formats nchw (default) "
                    "and channels_last (resnet18:nchw,resnet18:channels_last,cnn,mlp)")
    ap.add_argument("--no-layers", dest="layers", action="store_false",
                    help="skip the per-layer BN timings")
    ap.add_argument("--quick", action="store_true",
                    help="2 timed ResNet-18 steps, 5 MLP blocks: to try the script")
    ap.add_argument("--max-seconds", type=float, default=150,
                    help="time cap per configuration and thread count; past it the repetitions "
                    "stop (at least 3 timed) (150)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out-dir", default=os.path.join(REPO, "build", "torch-bench"))
    ap.add_argument("--command", help="the command line to print in the report")
    ap.add_argument("--bnorm-build", help="how the library was built (for the report)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.reps, args.mlp_reps, args.cnn_reps = 2, 5, 3
    if args.worker:
        args.threads_one = int(args.threads)
        worker(args)
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
