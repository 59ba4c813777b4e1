#!/usr/bin/env python3
"""Merges the benchmark CSVs (bnorm_bench and peers/torch_runner.py) into one CSV and a markdown
table with the machine described. Standard library only.

  report.py --csv bnorm.csv [--csv torch.csv] [--torch-missing REASON] [--command CMD]
            --out-csv merged.csv --out-md table.md

bench/README.md explains the columns. Speed ratios are time(peer) / time(row): above 1 the row
is faster than the peer.
"""
import argparse
import csv
import datetime
import os
import platform
import sys

OP_ORDER = {"fwd_train": 0, "fwd_infer": 1, "bwd": 2}
IMPL_ORDER = {"bnorm": 0, "onednn": 1, "torch": 2}
LAYOUT_ORDER = {"nchw": 0, "nhwc": 1, "nc": 2, "nChw16c": 3, "nc_as_nhwc": 4}
IMPL_NAME = {"bnorm": "bnorm", "onednn": "oneDNN", "torch": "PyTorch"}


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
                if r["impl"] == "meta":
                    meta[r["layout"]] = r["note"]
                    continue
                rows.append(r)
                if r["impl"] not in ("copy", "copy_nt"):
                    shape_order.setdefault(r["shape"], len(shape_order))
    with open(args.out_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["impl", "shape", "layout", "op", "status", "median_ms",
                                          "min_ms", "reps", "bytes", "err_ratio", "note"])
        w.writeheader()
        for key, value in meta.items():
            w.writerow(dict(impl="meta", shape="-", layout=key, op="-", status="ok", median_ms=0,
                            min_ms=0, reps=0, bytes=0, err_ratio=0, note=value))
        w.writerows(rows)

    def gbs(r):
        return fnum(r["bytes"]) / (fnum(r["median_ms"]) * 1e-3) / 1e9

    ok = lambda r: r["status"] == "ok" and fnum(r["median_ms"]) > 0
    copy = next((r for r in rows if r["impl"] == "copy" and ok(r)), None)
    copy_nt = next((r for r in rows if r["impl"] == "copy_nt" and ok(r)), None)
    copy_gbs = gbs(copy) if copy else None
    nt_gbs = gbs(copy_nt) if copy_nt else None

    bench = [r for r in rows if r["impl"] in IMPL_ORDER]
    onednn_best = {}
    torch_ms = {}
    for r in bench:
        if not ok(r):
            continue
        key = (r["shape"], r["op"])
        if r["impl"] == "onednn":
            ms = fnum(r["median_ms"])
            if key not in onednn_best or ms < onednn_best[key][0]:
                onednn_best[key] = (ms, r["layout"])
        elif r["impl"] == "torch":
            torch_ms[(r["shape"], r["layout"], r["op"])] = fnum(r["median_ms"])
    bench.sort(key=lambda r: (shape_order.get(r["shape"], 99), OP_ORDER.get(r["op"], 9),
                              IMPL_ORDER[r["impl"]], LAYOUT_ORDER.get(r["layout"], 9)))

    onednn_version = meta.get("onednn_version")
    torch_version = meta.get("torch_version")
    model, cpus, available, mem, isa = machine()
    threads = meta.get("threads_requested", "2")
    out = []
    out.append(f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} · command: "
               f"`{args.command}`" + (" (quick run: fewer repetitions)" if meta.get("quick") == "yes" else ""))
    out.append("")
    out.append("| machine | |")
    out.append("|---|---|")
    out.append(f"| CPU | {model}, {cpus} logical CPUs ({available} available to the run); {isa} |")
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
    if copy_gbs:
        out.append(f"| copy | {copy_gbs:.1f} GB/s median ({copy['shape']}, read + write counted, "
                   f"{copy['note']}) |")
    else:
        out.append("| copy | not measured: % copy columns empty |")
    if nt_gbs:
        out.append(f"| non-temporal copy | {nt_gbs:.1f} GB/s median ({copy_nt['note']}) |")
    if "loadavg_start" in meta:
        out.append(f"| load average | {meta['loadavg_start']} at the start of bnorm_bench, "
                   f"{meta.get('loadavg_end', '?')} at its end (other work on the machine skews "
                   f"2-thread runs) |")
    out.append("")
    out.append("GB/s over the minimum traffic (fwd: 2 x tensor bytes, bwd: 3 x); "
               "vs oneDNN best / vs PyTorch: the peer's median time over this row's (> 1: faster "
               "than the peer). Every row was validated against bnorm's fp64 reference before "
               "timing.")
    out.append("")
    out.append("| shape | layout | op | impl | median ms | min ms | GB/s | % copy | % NT copy "
               "| vs oneDNN best | vs PyTorch |")
    out.append("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    failures = []
    for r in bench:
        impl = IMPL_NAME[r["impl"]]
        cells = [r["shape"], r["layout"], r["op"], impl]
        if not ok(r):
            what = "FAILED validation" if r["status"] == "FAIL" else r["status"]
            cells += [f"**{what}**", "", "", "", "", "", ""]
            failures.append(f"- {impl} {r['shape']} {r['layout']} {r['op']}: {r['status']} "
                            f"({r['note']})")
        else:
            ms = fnum(r["median_ms"])
            g = gbs(r)
            cells += [f"{ms:.4g}", f"{fnum(r['min_ms']):.4g}", f"{g:.1f}",
                      f"{100 * g / copy_gbs:.0f} %" if copy_gbs else "",
                      f"{100 * g / nt_gbs:.0f} %" if nt_gbs and r["op"] == "fwd_infer" else ""]
            best = onednn_best.get((r["shape"], r["op"]))
            if best:
                cells.append(f"{best[0] / ms:.2f}x ({best[1]})")
            else:
                cells.append("n/a" if not onednn_version or onednn_version == "not found" else "-")
            torch_layout = "nc" if r["layout"] == "nc_as_nhwc" else r["layout"]
            t = torch_ms.get((r["shape"], torch_layout, r["op"]))
            if r["impl"] == "torch":
                cells.append("-")
            elif t:
                cells.append(f"{t / ms:.2f}x")
            else:
                cells.append("n/a" if not torch_version else "-")
        out.append("| " + " | ".join(cells) + " |")
    if "bnorm_version" in meta and "loadavg_end" not in meta:
        failures.append("- bnorm_bench did not finish (hung, crashed or timed out: see bench.log); "
                        "the rows after its last one are missing")
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
