#!/usr/bin/env python3
"""Merges the benchmark CSVs (bnorm_bench and peers/torch_runner.py) into one CSV and a markdown
table with the machine described. Standard library only.

  report.py --csv bnorm.csv [--csv torch.csv] [--torch-missing REASON] [--command CMD]
            --out-csv merged.csv --out-md table.md

bench/README.md explains the columns. Speed ratios are time(peer) / time(row): above 1 the row
is faster than the peer.

The dtype column of the CSVs (f32, bf16, f16; absent in older CSVs: f32): the peers' ratios
compare rows of the same dtype. When any row is bf16 or f16 the table gains a dtype column and
"vs bnorm f32" (bnorm's f32 median on the same shape, layout, op and mode over this 16-bit
row's), and a Targets table of the 16-bit rows follows each mode's; an f32-only run prints the
table it always did.
"""
import argparse
import csv
import datetime
import os
import platform
import sys

OP_ORDER = {"fwd_train": 0, "fwd_infer": 1, "bwd": 2, "fwd_train_relu": 3, "fwd_infer_relu": 4,
            "bwd_relu": 5, "fwd_train_add_relu": 6}
FUSED_OPS = ("fwd_train_relu", "fwd_infer_relu", "bwd_relu", "fwd_train_add_relu")
IMPL_ORDER = {"bnorm": 0, "bnorm_unfused": 1, "onednn": 2, "torch": 3}
DTYPE_ORDER = {"f32": 0, "bf16": 1, "f16": 2}
LAYOUT_ORDER = {"nchw": 0, "nhwc": 1, "nc": 2, "nChw16c": 3, "nc_as_nhwc": 4, "-": 5}
IMPL_NAME = {"bnorm": "bnorm", "bnorm_unfused": "bnorm unfused", "onednn": "oneDNN",
             "torch": "PyTorch"}
MODE_TEXT = {
    "warm": "warm: repeated calls on the same buffers (what fits in the caches stays there)",
    "cold": "cold: each call on the next of a rotation of buffer sets larger than 2 x the L3, "
            "so every call reads data evicted since its last use",
}
# The targets: (op, ratio column, minimum): bnorm's fused rows against its unfused pair,
# and every bnorm row against oneDNN's best layout (for the fused ops: oneDNN's fuse_norm_relu).
TARGETS = [("fwd_train_relu", "unfused", 1.3), ("fwd_train_relu", "onednn", 1.2),
           ("fwd_infer_relu", "onednn", 1.0), ("bwd_relu", "onednn", 1.0),
           ("fwd_infer", "onednn", 1.0), ("bwd", "onednn", 1.0)]
# The 16-bit targets (the bf16 issue): training forward and backward >= 1.7x bnorm's own f32
# on tensors larger than the cache (half the bytes to move), and >= 1.0x oneDNN's best layout
# of the same dtype on every shape. "f32" ratios are judged only where the tensors do not fit
# in the cache: every shape in the cold mode, in the warm mode the shapes whose fp32 x exceeds
# the L3 the system reports.
HALF_TARGETS = [("fwd_train", "f32", 1.7), ("bwd", "f32", 1.7), ("fwd_train", "onednn", 1.0),
                ("bwd", "onednn", 1.0)]


def machine():
    model, cpus, flags = "unknown", 0, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown":
                    model = value.strip()
                elif key == "processor":
                    cpus += 1
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB"
    except OSError:
        pass
    isa = [name for name, flag in (("AVX2", "avx2"), ("FMA", "fma"), ("AVX-512F", "avx512f"),
                                   ("AVX-512BW", "avx512bw"), ("AVX-512 BF16", "avx512_bf16"))
           if flag in flags]
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    return model, cpus, available, mem, ", ".join(isa) or "?"


def fnum(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return 0.0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--csv", action="append", required=True)
    p.add_argument("--torch-missing")
    p.add_argument("--command", default="bash scripts/bench.sh")
    p.add_argument("--out-csv", required=True)
    p.add_argument("--out-md", required=True)
    args = p.parse_args()

    rows, meta, shape_order = [], {}, {}
    for name in args.csv:
        if not os.path.exists(name):
            continue
        with open(name, newline="") as f:
            for r in csv.DictReader(f):
                r["mode"] = r.get("mode") or "warm"  # CSVs from before the modes were warm
                r["dtype"] = r.get("dtype") or "f32"  # CSVs from before the dtypes were f32
                if r["impl"] == "meta":
                    meta[r["layout"]] = r["note"]
                    continue
                rows.append(r)
                if r["impl"] not in ("copy", "copy_nt"):
                    shape_order.setdefault(r["shape"], len(shape_order))
    with open(args.out_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["impl", "shape", "layout", "op", "mode", "status",
                                          "median_ms", "min_ms", "reps", "bytes", "err_ratio",
                                          "note", "dtype"])
        w.writeheader()
        for key, value in meta.items():
            w.writerow(dict(impl="meta", shape="-", layout=key, op="-", mode="-", status="ok", median_ms=0,
                            min_ms=0, reps=0, bytes=0, err_ratio=0, note=value, dtype="-"))
        w.writerows(rows)

    def gbs(r):
        return fnum(r["bytes"]) / (fnum(r["median_ms"]) * 1e-3) / 1e9

    ok = lambda r: r["status"] == "ok" and fnum(r["median_ms"]) > 0
    modes = [m for m in ("warm", "cold") if any(r["mode"] == m for r in rows)]
    copy_gbs, nt_gbs, copy_row, nt_row = {}, {}, {}, {}
    for r in rows:
        if r["impl"] in ("copy", "copy_nt") and ok(r) and r["mode"] not in (copy_row if r["impl"] == "copy" else nt_row):
            (copy_row if r["impl"] == "copy" else nt_row)[r["mode"]] = r
            (copy_gbs if r["impl"] == "copy" else nt_gbs)[r["mode"]] = gbs(r)

    bench = [r for r in rows if r["impl"] in IMPL_ORDER]
    onednn_best, torch_ms, bnorm_ms, unfused_ms = {}, {}, {}, {}
    for r in bench:
        if not ok(r):
            continue
        key = (r["shape"], r["op"], r["mode"], r["dtype"])
        ms = fnum(r["median_ms"])
        if r["impl"] == "onednn":
            if key not in onednn_best or ms < onednn_best[key][0]:
                onednn_best[key] = (ms, r["layout"])
        elif r["impl"] == "torch":
            torch_ms[(r["shape"], r["layout"], r["op"], r["mode"], r["dtype"])] = ms
        elif r["impl"] == "bnorm":
            bnorm_ms[(r["shape"], r["layout"], r["op"], r["mode"], r["dtype"])] = ms
        elif r["impl"] == "bnorm_unfused":
            unfused_ms[(r["shape"], r["layout"], r["op"], r["mode"], r["dtype"])] = ms
    # A peer's refusal of a dtype (a skip row "unsupported by ..."), for the ratio cells.
    refused = {}
    for r in bench:
        if r["status"] == "skip" and r["note"].startswith("unsupported by"):
            refused.setdefault((r["impl"], r["shape"], r["op"], r["mode"], r["dtype"]),
                               r["note"].split(":")[0])
    half = any(r["dtype"] != "f32" for r in bench)
    bench.sort(key=lambda r: (shape_order.get(r["shape"], 99), OP_ORDER.get(r["op"], 9),
                              DTYPE_ORDER.get(r["dtype"], 9), IMPL_ORDER[r["impl"]],
                              LAYOUT_ORDER.get(r["layout"], 9)))

    onednn_version = meta.get("onednn_version")
    torch_version = meta.get("torch_version")
    model, cpus, available, mem, isa = machine()
    threads = meta.get("threads_requested", "2")
    l3 = int(fnum(meta.get("l3_bytes", 0)))
    out = []
    out.append(f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} · command: "
               f"`{args.command}`" + (" (quick run: fewer repetitions)" if meta.get("quick") == "yes" else ""))
    out.append("")
    out.append("| machine | |")
    out.append("|---|---|")
    out.append(f"| CPU | {model}, {cpus} logical CPUs ({available} available to the run); {isa} |")
    out.append(f"| L3 (as the system reports it) | {l3 / 2**20:.0f} MiB |" if l3 else
               "| L3 | not reported (the cold mode assumed 256 MiB) |")
    out.append(f"| memory, OS | {mem}; {platform.system()} {platform.release()} |")
    out.append(f"| threads | {threads} for every implementation (bnorm: num_threads() = "
               f"{meta.get('bnorm_threads', '?')}; oneDNN OpenMP: {meta.get('onednn_threads', '-')}; "
               f"PyTorch: {meta.get('torch_threads', '-')}) |")
    out.append(f"| bnorm | {meta.get('bnorm_version', '?')}, built with {meta.get('compiler', '?')} |")
    if onednn_version and onednn_version != "not found":
        out.append(f"| oneDNN | {onednn_version} (linked into bnorm_bench) |")
    else:
        out.append("| oneDNN | **oneDNN: not found** (bnorm_bench built without it) |")
    if torch_version:
        out.append(f"| PyTorch | {torch_version} (Python {meta.get('torch_python', '?')}) |")
    else:
        reason = args.torch_missing or "no results"
        out.append(f"| PyTorch | **PyTorch: not found** ({reason}) |")
    for m in modes:
        if m in copy_gbs:
            out.append(f"| copy, {m} | {copy_gbs[m]:.1f} GB/s median ({copy_row[m]['shape']}, read + "
                       f"write counted, {copy_row[m]['note']}) |")
        else:
            out.append(f"| copy, {m} | not measured: % copy columns empty |")
        if m in nt_gbs:
            out.append(f"| non-temporal copy, {m} | {nt_gbs[m]:.1f} GB/s median ({nt_row[m]['note']}) |")
    if "loadavg_start" in meta:
        out.append(f"| load average | {meta['loadavg_start']} at the start of bnorm_bench, "
                   f"{meta.get('loadavg_end', '?')} at its end (other work on the machine skews "
                   f"2-thread runs) |")
    out.append("")
    out.append("GB/s over the minimum traffic (fwd: 2 x tensor bytes, + z for the add; bwd: 3 x, "
               "+ y for bwd_relu); vs oneDNN best / vs PyTorch: the peer's median time over this "
               "row's (> 1: faster than the peer; for the fused ops oneDNN runs fuse_norm_relu); "
               "vs unfused: bnorm's BN pass then a separate ReLU pass over this row's fused call. "
               "Every row was validated against bnorm's fp64 reference before timing." +
               (" dtype: the tensors' element type (bf16/f16: inputs rounded to the format, the "
                "fp64 reference on those values, one rounding of the outputs added to the "
                "tolerance; per-channel vectors fp32); GB/s counts 2 bytes an element for them; "
                "the peers' ratios compare rows of one dtype; vs bnorm f32: bnorm's f32 median "
                "on the same shape, layout and op over this row's (> 1: the 16-bit call is faster)."
                if half else ""))
    failures, skips, half_skips = [], [], {}

    def ratio(peer_ms, ms):
        return peer_ms / ms if peer_ms and ms else None

    def onednn_cell(r, ms):
        best = onednn_best.get((r["shape"], r["op"], r["mode"], r["dtype"]))
        if best:
            return f"{best[0] / ms:.2f}x ({best[1]})"
        if (("onednn", r["shape"], r["op"], r["mode"], r["dtype"])) in refused:
            return "unsupported"
        return "n/a" if not onednn_version or onednn_version == "not found" else "-"

    for m in modes:
        out.append("")
        out.append(f"### {MODE_TEXT[m]}")
        out.append("")
        if half:
            out.append("| shape | layout | op | dtype | impl | median ms | min ms | GB/s | % copy "
                       "| % NT copy | vs oneDNN best | vs PyTorch | vs unfused | vs bnorm f32 |")
            out.append("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        else:
            out.append("| shape | layout | op | impl | median ms | min ms | GB/s | % copy | % NT copy "
                       "| vs oneDNN best | vs PyTorch | vs unfused |")
            out.append("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        extra = 1 if half else 0
        cg, ng = copy_gbs.get(m), nt_gbs.get(m)
        for r in (r for r in bench if r["mode"] == m):
            impl = IMPL_NAME[r["impl"]]
            dt = r["dtype"]
            cells = [r["shape"], r["layout"], r["op"]] + ([dt] if half else []) + [impl]
            if r["status"] == "skip":
                cells += [f"skip: {r['note']}"] + [""] * (7 + extra)
                if m == modes[0]:
                    if dt == "f32":
                        skips.append(f"- {impl} {r['shape']} {r['op']}: {r['note']}")
                    else:  # grouped below: one line per (implementation, dtype, reason)
                        g = half_skips.setdefault((impl, dt, r["note"]), ([], []))
                        if r["shape"] not in g[0]:
                            g[0].append(r["shape"])
                        if r["op"] not in g[1]:
                            g[1].append(r["op"])
            elif not ok(r):
                what = "FAILED validation" if r["status"] == "FAIL" else r["status"]
                cells += [f"**{what}**", "", "", "", "", "", "", ""] + [""] * extra
                failures.append(f"- {impl} {'' if dt == 'f32' else dt + ' '}{r['shape']} "
                                f"{r['layout']} {r['op']} ({m}): {r['status']} ({r['note']})")
            else:
                ms = fnum(r["median_ms"])
                g = gbs(r)
                inf_op = r["op"].startswith("fwd_infer")
                cells += [f"{ms:.4g}", f"{fnum(r['min_ms']):.4g}", f"{g:.1f}",
                          f"{100 * g / cg:.0f} %" if cg else "",
                          f"{100 * g / ng:.0f} %" if ng and inf_op else "",
                          onednn_cell(r, ms)]
                torch_layout = "nc" if r["layout"] == "nc_as_nhwc" else r["layout"]
                t = torch_ms.get((r["shape"], torch_layout, r["op"], m, dt))
                if r["impl"] == "torch":
                    cells.append("-")
                elif t:
                    cells.append(f"{t / ms:.2f}x")
                elif ("torch", r["shape"], r["op"], m, dt) in refused:
                    cells.append("unsupported")
                else:
                    cells.append("n/a" if not torch_version else "-")
                u = unfused_ms.get((r["shape"], r["layout"], r["op"], m, dt))
                cells.append(f"{u / ms:.2f}x" if r["impl"] == "bnorm" and u else "")
                if half:
                    f32 = bnorm_ms.get((r["shape"], r["layout"], r["op"], m, "f32"))
                    cells.append(f"{f32 / ms:.2f}x" if r["impl"] == "bnorm" and dt != "f32" and f32
                                 else "")
            out.append("| " + " | ".join(cells) + " |")

    # The targets, per shape and bnorm layout: the ratio and whether it reaches the minimum.
    target_cols = [(op, kind, least) for op, kind, least in TARGETS
                   if any(r["op"] == op and r["impl"] == "bnorm" for r in bench)]
    if target_cols:
        for m in modes:
            out.append("")
            out.append(f"### Targets, {m} (bnorm's median over the peer's: **bold** below the "
                       f"target)")
            out.append("")
            head = ["shape", "layout"] + [
                f"{op} vs {'unfused' if kind == 'unfused' else 'oneDNN best'} (>= {least})"
                for op, kind, least in target_cols]
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "---|" * 2 + "---:|" * len(target_cols))
            keys = sorted({(r["shape"], r["layout"]) for r in bench
                           if r["impl"] == "bnorm" and r["mode"] == m and r["dtype"] == "f32"},
                          key=lambda k: (shape_order.get(k[0], 99), LAYOUT_ORDER.get(k[1], 9)))
            for shape, layout in keys:
                cells = [shape, layout]
                for op, kind, least in target_cols:
                    ms = bnorm_ms.get((shape, layout, op, m, "f32"))
                    if kind == "unfused":
                        peer = unfused_ms.get((shape, layout, op, m, "f32"))
                    else:
                        peer = (onednn_best.get((shape, op, m, "f32")) or (None,))[0]
                    x = ratio(peer, ms)
                    cells.append("-" if x is None else
                                 (f"{x:.2f}x" if x >= least else f"**{x:.2f}x**"))
                out.append("| " + " | ".join(cells) + " |")
    # The 16-bit targets, per shape, bnorm layout and dtype.
    half_cols = [(op, kind, least) for op, kind, least in HALF_TARGETS
                 if any(r["op"] == op and r["impl"] == "bnorm" and r["dtype"] != "f32"
                        for r in bench)]
    if half_cols:
        for m in modes:
            out.append("")
            out.append(f"### Targets of the 16-bit rows, {m} (bnorm's median over the peer's: "
                       f"**bold** below the target; vs bnorm f32 judged on tensors larger than "
                       f"the cache: {'every shape (cold mode)' if m == 'cold' else 'fp32 x > the L3 reported'}"
                       f", other cells in parentheses)")
            out.append("")
            head = ["shape", "layout", "dtype"] + [
                f"{op} vs {'bnorm f32' if kind == 'f32' else 'oneDNN best'} (>= {least})"
                for op, kind, least in half_cols]
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "---|" * 3 + "---:|" * len(half_cols))
            keys = sorted({(r["shape"], r["layout"], r["dtype"]) for r in bench
                           if r["impl"] == "bnorm" and r["mode"] == m and r["dtype"] != "f32"},
                          key=lambda k: (shape_order.get(k[0], 99), LAYOUT_ORDER.get(k[1], 9),
                                         DTYPE_ORDER.get(k[2], 9)))
            numel = {}
            for r in bench:
                if r["impl"] == "bnorm" and r["dtype"] == "f32" and r["op"] in ("fwd_train", "bwd"):
                    tensors = 2 if r["op"] == "fwd_train" else 3
                    numel[r["shape"]] = fnum(r["bytes"]) / tensors / 4
            for shape, layout, dt in keys:
                cells = [shape, layout, dt]
                big = m == "cold" or (l3 > 0 and numel.get(shape, 0) * 4 > l3)
                for op, kind, least in half_cols:
                    ms = bnorm_ms.get((shape, layout, op, m, dt))
                    if kind == "f32":
                        peer = bnorm_ms.get((shape, layout, op, m, "f32"))
                    else:
                        peer = (onednn_best.get((shape, op, m, dt)) or (None,))[0]
                    x = ratio(peer, ms)
                    if x is None:
                        cells.append("unsupported by oneDNN" if kind == "onednn" and
                                     ("onednn", shape, op, m, dt) in refused else "-")
                    elif kind == "f32" and not big:
                        cells.append(f"({x:.2f}x)")
                    else:
                        cells.append(f"{x:.2f}x" if x >= least else f"**{x:.2f}x**")
                out.append("| " + " | ".join(cells) + " |")
    if "bnorm_version" in meta and "loadavg_end" not in meta:
        failures.append("- bnorm_bench did not finish (hung, crashed or timed out: see bench.log); "
                        "the rows after its last one are missing")
    for (impl, dt, note), (shapes, ops) in half_skips.items():
        skips.append(f"- {impl} {dt} ({', '.join(ops)}; {', '.join(shapes)}): {note}")
    if skips:
        out.append("")
        out.append("Not run (not available in that implementation):")
        out.extend(skips)
    if failures:
        out.append("")
        out.append("**Not timed (validation failed or the call failed):**")
        out.extend(failures)
    text = "\n".join(out) + "\n"
    with open(args.out_md, "w") as f:
        f.write(text)
    sys.stdout.write(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
