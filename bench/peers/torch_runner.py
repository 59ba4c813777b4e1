#!/usr/bin/env python3
"""PyTorch as a peer of the batch-norm benchmark.

Times torch.ops.aten.native_batch_norm (training and inference: what F.batch_norm dispatches to)
and torch.ops.aten.native_batch_norm_backward (dx, dweight, dbias) on the shapes of
bench/shapes/*.txt, contiguous (nchw) and channels_last (nhwc) for 4-D, (N, C) for 2-D, with
torch.set_num_threads(N). Each case is validated first against an fp64 computation (torch double)
with the tolerances batch_norm_bench.cc derives; a failure is printed loudly and written as
status FAIL, not timed. Writes the CSV columns of bench/bench_common.h.

The fused ops (fwd_train_relu, fwd_infer_relu, bwd_relu, fwd_train_add_relu) are torch's batch
norm followed by torch.relu_ in place (and `y += z` before it), the backward threshold_backward
then native_batch_norm_backward, as autograd runs them. --mode cold rotates the inputs through
buffer sets larger than twice the L3 (the rule of bench_common.h).

--dtypes f32,bf16,f16 (default f32): the tensors' element type. bf16 runs the same aten calls on
bfloat16 tensors with fp32 weight, bias and running statistics (PyTorch's mixed-type CPU path);
the inputs are drawn in fp32 and rounded to the format, the fp64 results computed from those
values, and the 16-bit outputs get the tolerance of one more rounding (bench_common.h). A dtype
PyTorch refuses (1.13: fp16 batch norm on the CPU, "not implemented for 'Half'") gets "skip" rows
that say so. --half-ops restricts the 16-bit dtypes to some of the ops (default: every op).

  torch_runner.py --shapes FILE [--shapes FILE]... [--ops fwd_train,...] [--quick]
                  [--mode warm|cold|both] [--cold] [--cold-mib 1536]
                  [--threads 2] [--min-time S] [--min-reps N] [--dtypes f32,bf16,f16]
                  [--half-ops OP,...] --csv PATH
"""
import argparse
import csv
import math
import os
import platform
import subprocess
import sys
import time

import torch

EPS32 = 2.0 ** -23
OPS = ("fwd_train", "fwd_infer", "bwd", "fwd_train_relu", "fwd_infer_relu", "bwd_relu",
       "fwd_train_add_relu")
# Tensors one call reads and writes at the minimum (bench_common.h, min_tensors) and the inputs.
MIN_TENSORS = dict(fwd_train=2, fwd_infer=2, bwd=3, fwd_train_relu=2, fwd_infer_relu=2,
                   bwd_relu=4, fwd_train_add_relu=3)
INPUTS = dict(fwd_train="x", fwd_infer="x", bwd="x dy", fwd_train_relu="x", fwd_infer_relu="x",
              bwd_relu="x dy y", fwd_train_add_relu="x z")
INPUTS = {op: names.split() for op, names in INPUTS.items()}
COLUMNS = ["impl", "shape", "layout", "op", "mode", "status", "median_ms", "min_ms", "reps",
           "bytes", "err_ratio", "note", "dtype"]
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# Unit roundoff (bench_common.h, unit_roundoff) and fp16's underflow step; 2 roundings allowed.
UNIT_ROUNDOFF = {"f32": 0.0, "bf16": 2.0 ** -8, "f16": 2.0 ** -11}
UNDERFLOW_STEP = {"f32": 0.0, "bf16": 0.0, "f16": 2.0 ** -25}
ROUNDINGS = 2.0


def rounding_tol(dtype, max_out):
    return ROUNDINGS * (UNIT_ROUNDOFF[dtype] * max_out + UNDERFLOW_STEP[dtype])


def backward(op):
    return op in ("bwd", "bwd_relu")


def l3_cache_bytes():
    """The last-level (L3) cache in bytes, read at run time (as bench_common.h); 0 if unknown."""
    try:
        v = os.sysconf("SC_LEVEL3_CACHE_SIZE")
        if v > 0:
            return v
    except (ValueError, OSError):
        pass
    try:  # glibc's value, which Python's sysconf names often lack
        out = subprocess.run(["getconf", "LEVEL3_CACHE_SIZE"], capture_output=True, text=True,
                             check=False).stdout.strip()
        if out.isdigit() and int(out) > 0:
            return int(out)
    except OSError:
        pass
    for index in (3, 2):
        d = f"/sys/devices/system/cpu/cpu0/cache/index{index}/"
        try:
            with open(d + "level") as f:
                if f.read().strip() != "3":
                    continue
            with open(d + "size") as f:
                size = f.read().strip()
            unit = {"K": 1024, "M": 2**20}.get(size[-1:], 1)
            return int(size.rstrip("KM")) * unit
        except (OSError, ValueError):
            continue
    return 0


def rotation(mode, set_bytes, budget_bytes):
    """Buffer sets per measurement, the rule of bench_common.h: 1 warm; cold: > 2 x L3 (256 MiB
    assumed when unknown), at least 2, at most budget_bytes. Returns (sets, note)."""
    if mode == "warm":
        return 1, ""
    l3 = l3_cache_bytes()
    target = 2.0 * (l3 or 256 * 2**20)
    sets = max(2, math.ceil(target / set_bytes))
    short = False
    if sets * set_bytes > budget_bytes:
        sets = max(2, math.floor(budget_bytes / set_bytes))
        short = sets * set_bytes < target
    note = (f"cold: {sets} sets x {set_bytes / 2**20:.1f} MiB = {sets * set_bytes / 2**20:.0f} MiB "
            f"(L3 {'' if l3 else 'unknown, assumed '}{(l3 or 256 * 2**20) / 2**20:.0f} MiB)"
            + (", below 2 x L3: --cold-mib too small" if short else ""))
    return sets, note


def growth(n):
    return 4.0 * EPS32 * (math.sqrt(n) + 8.0)


def elementwise_tol(n, scale):
    return growth(n) * scale


def sum_tol(n, term):
    return growth(n) * math.sqrt(n) * term


def read_shapes(files):
    shapes = []
    for name in files:
        with open(name) as f:
            for line_no, line in enumerate(f, 1):
                text = "".join(line.split("#", 1)[0].split())
                if not text:
                    continue
                dims = [int(d) for d in text.split("x")]
                if len(dims) not in (2, 4) or min(dims) <= 0:
                    sys.exit(f"{name}:{line_no}: bad shape '{text}' (expected NxC or NxCxHxW)")
                shapes.append((text, dims))
    return shapes


def time_calls(call, warmup, min_reps, min_seconds, max_reps=100000):
    """Same rule as bench_common.h: min_reps calls and min_seconds counted at the fastest call;
    a warm-up call slower than 0.25 s ends the warm-up and lowers min_reps to 3."""
    for _ in range(warmup):
        t0 = time.perf_counter()
        call()
        if time.perf_counter() - t0 > 0.25:
            min_reps = min(min_reps, 3)
            break
    times = []
    total = 0.0
    fastest = float("inf")
    while True:
        n = len(times)
        if n >= max_reps:
            break
        if n >= min_reps and (n * fastest >= min_seconds or total >= 10 * min_seconds):
            break
        t0 = time.perf_counter()
        call()
        d = time.perf_counter() - t0
        times.append(d)
        total += d
        fastest = min(fastest, d)
    times.sort()
    k = len(times)
    median = times[k // 2] if k % 2 else 0.5 * (times[k // 2 - 1] + times[k // 2])
    return median * 1e3, times[0] * 1e3, k


def compare(what, who, got, want, tol):
    diff = (got.double() - want).abs()
    diff[~torch.isfinite(got)] = float("inf")
    worst = diff.max().item()
    ratio = worst / tol
    if not ratio <= 1.0:
        i = int(diff.flatten().argmax())
        print(f"\n!!! VALIDATION FAILED: {who}: {what} differs from the fp64 computation: "
              f"flat index {i} got {got.flatten()[i].item():.9g} want {want.flatten()[i].item():.9g}, "
              f"|diff| {worst:.3g} > tolerance {tol:.3g} ({ratio:.3g}x)\n", file=sys.stderr, flush=True)
    return ratio


def run_shape(text, dims, args, writer, timing, dtype="f32", ops=None):
    ops = args.ops if ops is None else ops
    tdt = DTYPES[dtype]
    # The values every implementation gets: fp32 draws rounded to the dtype (exact for f32).
    q = (lambda t: t) if dtype == "f32" else (lambda t: t.to(tdt).float())
    torch.manual_seed(sum(dims) * 7919 + len(dims))
    N, C = dims[0], dims[1]
    red = [0] + list(range(2, len(dims)))
    n = N
    for d in dims[2:]:
        n *= d
    view = [1, C] + [1] * (len(dims) - 2)
    offset = torch.rand(C) * 4 - 2
    weight = torch.rand(C) + 0.5
    bias = torch.rand(C) - 0.5
    eval_mean = offset + torch.rand(C) * 0.2 - 0.1
    eval_var = torch.rand(C) * 1.5 + 0.5
    eps, momentum = 1e-5, 0.1
    x0 = q(torch.randn(dims) + offset.view(view))
    dy0 = q(torch.randn(dims))

    # fp64 results and the magnitudes the tolerances come from.
    xd = x0.double()
    mean = xd.mean(red)
    var = ((xd - mean.view(view)) ** 2).mean(red)
    invstd = 1.0 / torch.sqrt(var + eps)
    xhat = (xd - mean.view(view)) * invstd.view(view)
    wd, bd = weight.double(), bias.double()
    y_train = xhat * wd.view(view) + bd.view(view)
    run_mean = momentum * mean
    run_var = (1 - momentum) * 1.0 + momentum * var * n / (n - 1)
    a = wd / torch.sqrt(eval_var.double() + eps)
    y_eval = xd * a.view(view) + (bd - eval_mean.double() * a).view(view)
    dyd = dy0.double()
    dbias = dyd.sum(red)
    dweight = (dyd * xhat).sum(red)
    dx = (wd * invstd / n).view(view) * (n * dyd - dbias.view(view) - xhat * dweight.view(view))
    # The fused ops: z the added tensor (drawn after x and dy), and the fused backward from the
    # fp32 output y = relu(bn(x)) it is given (its mask y > 0, as autograd's relu backward).
    z0 = q(torch.randn(dims)) if "fwd_train_add_relu" in ops else None
    y_relu32 = q(y_train.clamp_min(0).float()) if "bwd_relu" in ops else None
    if y_relu32 is not None:
        g = dyd * (y_relu32 > 0).double()
        dbias_relu = g.sum(red)
        dweight_relu = (g * xhat).sum(red)
        dx_relu = (wd * invstd / n).view(view) * (n * g - dbias_relu.view(view)
                                                  - xhat * dweight_relu.view(view))
        del g
    max_x = xd.abs().max().item()
    max_dy = dyd.abs().max().item()
    max_xhat = xhat.abs().max().item()
    max_invstd = invstd.max().item()
    max_w = wd.abs().max().item()
    max_var = var.max().item()
    max_y_train = y_train.abs().max().item()
    term = max_dy * (1 + max_xhat)
    tol = {
        "y_train": elementwise_tol(n, max_w * max_invstd * max_x + max_y_train + 1),
        "y_eval": elementwise_tol(1, y_eval.abs().max().item() + 1) * (1 + max_x),
        "mean": elementwise_tol(n, max_x),
        "invstd": elementwise_tol(n, max_invstd * (1 + max_x * max_invstd)),
        "running_var": elementwise_tol(n, max_var * (1 + max_x * max_invstd)),
        "dx": elementwise_tol(n, max_w * max_invstd * term + dx.abs().max().item()),
        "dweight": sum_tol(n, term),
        "dbias": sum_tol(n, max_dy),
    }
    # relu is 1-Lipschitz (the tolerances of bn(x) hold); the add is one more rounding.
    if z0 is not None:
        tol["y_train_add"] = tol["y_train"] + elementwise_tol(1, z0.abs().max().item() + max_y_train)
    if y_relu32 is not None:
        tol["dx_relu"] = elementwise_tol(n, max_w * max_invstd * term + dx_relu.abs().max().item())
    if dtype != "f32":  # the 16-bit outputs are rounded once more (bench_common.h, tolerances)
        tol["y_train"] += rounding_tol(dtype, max_y_train)
        tol["y_eval"] += rounding_tol(dtype, y_eval.abs().max().item())
        tol["dx"] += rounding_tol(dtype, dx.abs().max().item())
        if z0 is not None:
            tol["y_train_add"] += rounding_tol(dtype, z0.abs().max().item() + max_y_train)
        if y_relu32 is not None:
            tol["dx_relu"] += rounding_tol(dtype, dx_relu.abs().max().item())
    del xd, dyd, xhat
    save_mean32, save_invstd32 = mean.float(), invstd.float()

    layouts = [("nc", torch.contiguous_format)] if len(dims) == 2 else [
        ("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)]
    bn = torch.ops.aten.native_batch_norm
    bn_bwd = torch.ops.aten.native_batch_norm_backward
    relu_bwd = torch.ops.aten.threshold_backward  # what autograd runs for relu, from its output
    numel_bytes = float(torch.finfo(tdt).bits // 8) * x0.numel()
    threads_note = f"threads={torch.get_num_threads()}"
    for layout, fmt in layouts:
        who = f"torch {text} {layout}" + ("" if dtype == "f32" else f" {dtype}")
        # The inputs of one call in the layout and dtype; the outputs are allocated by every call.
        base = dict(x=x0.to(tdt).contiguous(memory_format=fmt))
        if any(backward(op) for op in ops):
            base["dy"] = dy0.to(tdt).contiguous(memory_format=fmt)
        if z0 is not None:
            base["z"] = z0.to(tdt).contiguous(memory_format=fmt)
        if y_relu32 is not None:
            base["y"] = y_relu32.to(tdt).contiguous(memory_format=fmt)
        rm, rv = torch.zeros(C), torch.ones(C)
        # One call per op. The fused ops are what a user of torch writes: batch norm, then
        # relu_ in place (torchvision's ResNet: nn.ReLU(inplace=True)); the add as
        # `out += identity` then the ReLU; the backward is autograd's: threshold_backward of the
        # ReLU from its output, then batch norm's backward.
        def call(op, t):
            if op in ("fwd_train", "fwd_train_relu", "fwd_train_add_relu"):
                y, sm, si = bn(t["x"], weight, bias, rm, rv, True, momentum, eps)
                if op == "fwd_train_add_relu":
                    y.add_(t["z"])
                if op != "fwd_train":
                    torch.relu_(y)
                return y, sm, si
            if op in ("fwd_infer", "fwd_infer_relu"):
                y = bn(t["x"], weight, bias, eval_mean, eval_var, False, momentum, eps)[0]
                return torch.relu_(y) if op == "fwd_infer_relu" else y
            g = t["dy"] if op == "bwd" else relu_bwd(t["dy"], t["y"], 0)
            # The fp64 batch statistics, so that backward is judged on its own.
            return bn_bwd(g, t["x"], weight, rm, rv, save_mean32, save_invstd32, True, eps,
                          [True, True, True])

        for op in ops:
            err, error, refused = 0.0, None, False
            try:
                if op.startswith("fwd_train"):
                    rm.zero_()
                    rv.fill_(1)
                    y, sm, si = call(op, base)
                    want = (y_train if op == "fwd_train" else
                            y_train.clamp_min(0) if op == "fwd_train_relu" else
                            (y_train + z0.double()).clamp_min(0))
                    y_tol = tol["y_train_add" if op == "fwd_train_add_relu" else "y_train"]
                    err = max(compare("y", who, y, want, y_tol),
                              compare("save_mean", who, sm, mean, tol["mean"]),
                              compare("save_invstd", who, si, invstd, tol["invstd"]),
                              compare("running_mean", who, rm, run_mean, tol["mean"]),
                              compare("running_var", who, rv, run_var, tol["running_var"]))
                    del y, want
                elif op.startswith("fwd_infer"):
                    y = call(op, base)
                    err = compare("y", who, y, y_eval if op == "fwd_infer" else y_eval.clamp_min(0),
                                  tol["y_eval"])
                    del y
                else:
                    g = call(op, base)
                    relu = op == "bwd_relu"
                    err = max(compare("dx", who, g[0], dx_relu if relu else dx,
                                      tol["dx_relu" if relu else "dx"]),
                              compare("dweight", who, g[1], dweight_relu if relu else dweight,
                                      tol["dweight"]),
                              compare("dbias", who, g[2], dbias_relu if relu else dbias, tol["dbias"]))
                    del g
            except Exception as e:  # a failing call is reported, never dropped
                error = f"{type(e).__name__}: {e}"
                # PyTorch's way of refusing a dtype ("batch_norm" not implemented for 'Half'):
                # a skip row that names it.
                refused = dtype != "f32" and "not implemented for" in str(e)
                if refused:
                    error = f"unsupported by PyTorch {torch.__version__}: {e}"
                else:
                    print(f"\n!!! {who} {op}: {e}\n", file=sys.stderr, flush=True)
            for mode in args.modes:
                row = dict(impl="torch", shape=text, layout=layout, op=op, mode=mode, status="ok",
                           median_ms=0, min_ms=0, reps=0, bytes=MIN_TENSORS[op] * numel_bytes,
                           err_ratio=f"{err:.4g}", note=threads_note, dtype=dtype)
                if refused:
                    row.update(status="skip", note=error)
                elif error:
                    row.update(status="error", note=error)
                elif not err <= 1.0:
                    row.update(status="FAIL", note="validation failed (see the log); not timed")
                else:
                    try:
                        names = [k for k in ("x", "z", "dy", "y") if k in INPUTS[op]]
                        sets, note = rotation(mode, len(names) * numel_bytes, args.cold_mib * 2**20)
                        rotated = [base] + [{k: base[k].clone() for k in names}
                                            for _ in range(sets - 1)]
                        state = dict(next=0)

                        def timed():
                            t = rotated[state["next"] % len(rotated)]
                            state["next"] += 1
                            call(op, t)
                        med, mn, reps = time_calls(timed, timing["warmup"], timing["min_reps"],
                                                   timing["min_seconds"])
                        del rotated
                        row.update(median_ms=f"{med:.6f}", min_ms=f"{mn:.6f}", reps=reps)
                        if note:
                            row["note"] += f"; {note} (inputs; outputs allocated by each call)"
                    except Exception as e:
                        row.update(status="error", note=f"{type(e).__name__}: {e}")
                        print(f"\n!!! {who} {op} {mode}: {e}\n", file=sys.stderr, flush=True)
                writer.writerow(row)
                if row["status"] == "ok":
                    gbs = row["bytes"] / (float(row["median_ms"]) * 1e-3) / 1e9
                    print(f"  torch         {text:<15} {layout:<10} {op:<18} {mode:<4} {dtype:<4} median "
                          f"{float(row['median_ms']):9.4f} ms  min {float(row['min_ms']):9.4f} ms"
                          f"  {gbs:6.1f} GB/s  ({row['reps']} reps, err {row['err_ratio']} of tol)"
                          f" {row['note']}", file=sys.stderr, flush=True)
                else:
                    print(f"  torch         {text:<15} {layout:<10} {op:<18} {mode:<4} {dtype:<4} "
                          f"{row['status']} {row['note']}", file=sys.stderr, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", action="append", required=True)
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--mode", choices=("warm", "cold", "both"), default="warm")
    p.add_argument("--cold", action="store_true", help="= --mode cold")
    p.add_argument("--cold-mib", type=float, default=1536)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-time", type=float)
    p.add_argument("--min-reps", type=int)
    p.add_argument("--dtypes", default="f32",
                   help="the tensors' element types, a subset of f32,bf16,f16 (default f32)")
    p.add_argument("--half-ops", help="the ops the 16-bit dtypes run (default: every op of --ops)")
    p.add_argument("--csv", required=True)
    args = p.parse_args()
    args.dtypes = list(dict.fromkeys(d for d in args.dtypes.split(",") if d))
    for d in args.dtypes:
        if d not in DTYPES:
            sys.exit(f"torch_runner.py: unknown dtype '{d}' in --dtypes (expected f32, bf16, f16)")
    if not args.dtypes:
        sys.exit("torch_runner.py: --dtypes is empty")
    half_ops = None
    if args.half_ops is not None:
        half_ops = [o for o in args.half_ops.split(",") if o]
        for o in half_ops:
            if o not in OPS:
                sys.exit(f"torch_runner.py: unknown op '{o}' in --half-ops (expected {', '.join(OPS)})")
    args.ops = [o for o in args.ops.split(",") if o]
    for o in args.ops:
        if o not in OPS:
            sys.exit(f"torch_runner.py: unknown op '{o}' in --ops (expected {', '.join(OPS)})")
    if not args.ops:
        sys.exit("torch_runner.py: --ops is empty")
    if args.cold:
        args.mode = "cold"
    if not args.cold_mib >= 1:
        sys.exit(f"torch_runner.py: --cold-mib must be >= 1, got {args.cold_mib}")
    args.modes = ["warm", "cold"] if args.mode == "both" else [args.mode]
    timing = dict(warmup=3, min_reps=10, min_seconds=0.3)
    if args.quick:
        timing = dict(warmup=1, min_reps=5, min_seconds=0.05)
    if args.min_time is not None:
        timing["min_seconds"] = args.min_time
    if args.min_reps is not None:
        timing["min_reps"] = args.min_reps
    torch.set_num_threads(args.threads)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for key, value in (("torch_version", torch.__version__),
                           ("torch_threads", str(torch.get_num_threads())),
                           ("torch_python", platform.python_version()),
                           ("torch_dtypes", ",".join(args.dtypes))):
            writer.writerow(dict(impl="meta", shape="-", layout=key, op="-", mode="-", status="ok",
                                 median_ms=0, min_ms=0, reps=0, bytes=0, err_ratio=0, note=value,
                                 dtype="-"))
            print(f"  {key}: {value}", file=sys.stderr)
        with torch.no_grad():
            for text, dims in read_shapes(args.shapes):
                for dtype in args.dtypes:
                    ops = args.ops
                    if dtype != "f32" and half_ops is not None:
                        ops = [o for o in args.ops if o in half_ops]
                    if ops:
                        run_shape(text, dims, args, writer, timing, dtype, ops)
                    f.flush()


if __name__ == "__main__":
    main()
