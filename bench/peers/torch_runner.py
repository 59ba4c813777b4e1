#!/usr/bin/env python3
"""PyTorch as a peer of the batch-norm benchmark.

Times torch.ops.aten.native_batch_norm (training and inference: what F.batch_norm dispatches to)
and torch.ops.aten.native_batch_norm_backward (dx, dweight, dbias) on the shapes of
bench/shapes/*.txt, contiguous (nchw) and channels_last (nhwc) for 4-D, (N, C) for 2-D, with
torch.set_num_threads(N). Each case is validated first against an fp64 computation (torch double)
with the tolerances batch_norm_bench.cc derives; a failure is printed loudly and written as
status FAIL, not timed. Writes the CSV columns of bench/bench_common.h.

  torch_runner.py --shapes FILE [--shapes FILE]... [--ops fwd_train,fwd_infer,bwd] [--quick]
                  [--threads 2] [--min-time S] [--min-reps N] --csv PATH
"""
import argparse
import csv
import math
import platform
import sys
import time

import torch

EPS32 = 2.0 ** -23
OPS = ("fwd_train", "fwd_infer", "bwd")
COLUMNS = ["impl", "shape", "layout", "op", "status", "median_ms", "min_ms", "reps", "bytes",
           "err_ratio", "note"]


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
    """Same rule as bench_common.h: min_reps calls and min_seconds counted at the fastest call."""
    for _ in range(warmup):
        call()
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


def run_shape(text, dims, args, writer, timing):
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
    x0 = torch.randn(dims) + offset.view(view)
    dy0 = torch.randn(dims)

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
    max_x = xd.abs().max().item()
    max_dy = dyd.abs().max().item()
    max_xhat = xhat.abs().max().item()
    max_invstd = invstd.max().item()
    max_w = wd.abs().max().item()
    max_var = var.max().item()
    term = max_dy * (1 + max_xhat)
    tol = {
        "y_train": elementwise_tol(n, max_w * max_invstd * max_x + y_train.abs().max().item() + 1),
        "y_eval": elementwise_tol(1, y_eval.abs().max().item() + 1) * (1 + max_x),
        "mean": elementwise_tol(n, max_x),
        "invstd": elementwise_tol(n, max_invstd * (1 + max_x * max_invstd)),
        "running_var": elementwise_tol(n, max_var * (1 + max_x * max_invstd)),
        "dx": elementwise_tol(n, max_w * max_invstd * term + dx.abs().max().item()),
        "dweight": sum_tol(n, term),
        "dbias": sum_tol(n, max_dy),
    }
    del xd, dyd, xhat
    save_mean32, save_invstd32 = mean.float(), invstd.float()

    layouts = [("nc", torch.contiguous_format)] if len(dims) == 2 else [
        ("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)]
    bn = torch.ops.aten.native_batch_norm
    bn_bwd = torch.ops.aten.native_batch_norm_backward
    numel_bytes = 4.0 * x0.numel()
    for layout, fmt in layouts:
        x = x0.contiguous(memory_format=fmt)
        who = f"torch {text} {layout}"
        for op in args.ops:
            row = dict(impl="torch", shape=text, layout=layout, op=op, status="ok", median_ms=0,
                       min_ms=0, reps=0, bytes=(3 if op == "bwd" else 2) * numel_bytes,
                       err_ratio=0, note=f"threads={torch.get_num_threads()}")
            try:
                if op == "fwd_train":
                    rm, rv = torch.zeros(C), torch.ones(C)
                    y, sm, si = bn(x, weight, bias, rm, rv, True, momentum, eps)
                    err = max(compare("y", who, y, y_train, tol["y_train"]),
                              compare("save_mean", who, sm, mean, tol["mean"]),
                              compare("save_invstd", who, si, invstd, tol["invstd"]),
                              compare("running_mean", who, rm, run_mean, tol["mean"]),
                              compare("running_var", who, rv, run_var, tol["running_var"]))
                    del y
                    call = lambda: bn(x, weight, bias, rm, rv, True, momentum, eps)
                elif op == "fwd_infer":
                    y, _, _ = bn(x, weight, bias, eval_mean, eval_var, False, momentum, eps)
                    err = compare("y", who, y, y_eval, tol["y_eval"])
                    del y
                    call = lambda: bn(x, weight, bias, eval_mean, eval_var, False, momentum, eps)
                else:
                    dy = dy0.contiguous(memory_format=fmt)
                    # The fp64 batch statistics, so that backward is judged on its own.
                    rm, rv = torch.zeros(C), torch.ones(C)
                    g = bn_bwd(dy, x, weight, rm, rv, save_mean32, save_invstd32, True, eps,
                               [True, True, True])
                    err = max(compare("dx", who, g[0], dx, tol["dx"]),
                              compare("dweight", who, g[1], dweight, tol["dweight"]),
                              compare("dbias", who, g[2], dbias, tol["dbias"]))
                    del g
                    call = lambda: bn_bwd(dy, x, weight, rm, rv, save_mean32, save_invstd32, True,
                                          eps, [True, True, True])
                row["err_ratio"] = f"{err:.4g}"
                if not err <= 1.0:
                    row["status"] = "FAIL"
                    row["note"] = "validation failed (see the log); not timed"
                else:
                    med, mn, reps = time_calls(call, timing["warmup"], timing["min_reps"],
                                               timing["min_seconds"])
                    row.update(median_ms=f"{med:.6f}", min_ms=f"{mn:.6f}", reps=reps)
            except Exception as e:  # a failing call is reported, never dropped
                row.update(status="error", note=f"{type(e).__name__}: {e}")
                print(f"\n!!! {who} {op}: {e}\n", file=sys.stderr, flush=True)
            writer.writerow(row)
            if row["status"] == "ok":
                gbs = row["bytes"] / (float(row["median_ms"]) * 1e-3) / 1e9
                print(f"  torch    {text:<15} {layout:<11} {op:<9} median {float(row['median_ms']):9.4f} ms"
                      f"  min {float(row['min_ms']):9.4f} ms  {gbs:6.1f} GB/s  ({row['reps']} reps, "
                      f"err {row['err_ratio']} of tol)", file=sys.stderr, flush=True)
            else:
                print(f"  torch    {text:<15} {layout:<11} {op:<9} {row['status']} {row['note']}",
                      file=sys.stderr, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", action="append", required=True)
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-time", type=float)
    p.add_argument("--min-reps", type=int)
    p.add_argument("--csv", required=True)
    args = p.parse_args()
    args.ops = [o for o in args.ops.split(",") if o]
    for o in args.ops:
        if o not in OPS:
            sys.exit(f"torch_runner.py: unknown op '{o}' (expected {', '.join(OPS)})")
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
                           ("torch_python", platform.python_version())):
            writer.writerow(dict(impl="meta", shape="-", layout=key, op="-", status="ok",
                                 median_ms=0, min_ms=0, reps=0, bytes=0, err_ratio=0, note=value))
            print(f"  {key}: {value}", file=sys.stderr)
        with torch.no_grad():
            for text, dims in read_shapes(args.shapes):
                run_shape(text, dims, args, writer, timing)
                f.flush()


if __name__ == "__main__":
    main()
