#!/usr/bin/env python3
"""Plots a `bnorm train` report: reads OUTDIR/report.json, writes PNGs and OUTDIR/report.md.

Usage: python3 tools/plot_report.py OUTDIR

Writes into OUTDIR:
  fig1a_test_accuracy.png  test accuracy (eval mode) vs training step, each run (paper Fig. 1a)
  fig1bc_sigmoid_input.png 15th/50th/85th percentiles of one sigmoid's input over training,
                           without BN (1b) and with BN (1c), same y-scale; only for runs that
                           recorded "sigmoid_input" (paper-mlp)
  loss.png                 train and test loss vs step, log y
  lr_sweep.png             final test accuracy vs learning rate, both networks, diverged runs
                           marked; only when report.json has a non-empty "lr_sweep"
  small_batch_study.png    the small-batch study (--small-batch-study): test accuracy in eval
                           mode and the train-mode minus eval-mode gap vs batch size, one line
                           per method; only when report.json has "small_batch_study"
  report.md                title, configuration, a table of results, the precise statistics'
                           before/after (--precise-bn), the small-batch study's table, the images
                           with captions, and a link to explain/ (bnorm explain's figure) when
                           report.json names it

Accuracies in report.json are fractions in [0, 1]. Missing parts (no sigmoid_input, no sweep,
a run without curve points) are skipped, not errors. Exit status: 0 on success, 1 if
report.json is missing or malformed (one line on stderr naming the problem), 2 on bad usage.

Needs matplotlib (Debian: python3-matplotlib); if the interpreter running this script lacks it,
the script re-runs itself with /usr/bin/python3 when that one has it.
"""

import json
import math
import os
import subprocess
import sys

PROG = "plot_report.py"
SYSTEM_PYTHON = "/usr/bin/python3"


class ReportError(Exception):
    """report.json is missing or malformed: the message says what and where."""


def fail(message, code=1):
    print(f"{PROG}: {message}", file=sys.stderr)
    sys.exit(code)


def import_matplotlib():
    """Returns pyplot with the Agg backend, re-running under /usr/bin/python3 if needed."""
    try:
        import matplotlib
    except ImportError:
        here = os.path.realpath(sys.executable or "")
        if (os.path.exists(SYSTEM_PYTHON) and here != os.path.realpath(SYSTEM_PYTHON)
                and not os.environ.get("BNORM_PLOT_REEXEC")):
            probe = subprocess.run([SYSTEM_PYTHON, "-c", "import matplotlib"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if probe.returncode == 0:
                env = dict(os.environ, BNORM_PLOT_REEXEC="1")
                os.execve(SYSTEM_PYTHON, [SYSTEM_PYTHON, os.path.abspath(__file__)] + sys.argv[1:],
                          env)
        fail("matplotlib is not installed for this Python (Debian: apt-get install "
             "python3-matplotlib)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ---------------------------------------------------------------------------------------------
# Reading and checking report.json


def number_list(obj, key, where):
    """obj[key] as a list of floats (None and null become NaN: a diverged run writes them)."""
    value = obj.get(key)
    if not isinstance(value, list):
        raise ReportError(f"{where}.{key} is missing or not a list")
    out = []
    for i, v in enumerate(value):
        if v is None:
            out.append(math.nan)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(float(v))
        else:
            raise ReportError(f"{where}.{key}[{i}] is {v!r}, not a number")
    return out


def series(obj, keys, where):
    """The named lists of obj (a "curve" or "sigmoid_input"), all of one length."""
    if not isinstance(obj, dict):
        raise ReportError(f"{where} is not an object")
    out = {k: number_list(obj, k, where) for k in keys if k in obj}
    if "step" not in out:
        raise ReportError(f"{where}.step is missing")
    n = len(out["step"])
    for k, v in out.items():
        if len(v) != n:
            raise ReportError(f"{where}.{k} has {len(v)} values but {where}.step has {n}")
    return out


def load_report(outdir):
    path = os.path.join(outdir, "report.json")
    if not os.path.isfile(path):
        raise ReportError(f"{path}: no such file (run `bnorm train --out {outdir}` first)")
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(report, dict):
        raise ReportError(f"{path}: not a JSON object")
    runs = report.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ReportError(f"{path}: \"runs\" is missing or empty")
    try:
        for i, run in enumerate(runs):
            where = f"runs[{i}]"
            if not isinstance(run, dict):
                raise ReportError(f"{where} is not an object")
            if not isinstance(run.get("name"), str):
                raise ReportError(f"{where}.name is missing or not a string")
            where = f"runs[{i}] ({run['name']})"
            run["_curve"] = series(run.get("curve", {}), ("step", "epoch", "train_loss",
                                                           "test_loss", "test_accuracy"),
                                   where + ".curve")
            if "sigmoid_input" in run and run["sigmoid_input"] is not None:
                run["_sigmoid"] = series(run["sigmoid_input"], ("step", "p15", "p50", "p85"),
                                         where + ".sigmoid_input")
                for k in ("p15", "p50", "p85"):
                    if k not in run["_sigmoid"]:
                        raise ReportError(f"{where}.sigmoid_input.{k} is missing")
            if not isinstance(run.get("final", {}), dict):
                raise ReportError(f"{where}.final is not an object")
        sweep = report.get("lr_sweep") or []
        if not isinstance(sweep, list):
            raise ReportError("lr_sweep is not a list")
        for i, point in enumerate(sweep):
            if not isinstance(point, dict):
                raise ReportError(f"lr_sweep[{i}] is not an object")
            lr = point.get("lr")
            if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
                raise ReportError(f"lr_sweep[{i}].lr is {lr!r}, not a positive number")
        report["_sweep"] = sweep
        study_rows(report)
    except ReportError as e:
        raise ReportError(f"{path}: {e}") from None
    return report


# ---------------------------------------------------------------------------------------------
# Formatting


def num(v):
    """A finite float, or None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def pct(v):
    v = num(v)
    return "–" if v is None else f"{100 * v:.2f} %"


def fmt(v, digits=4):
    v = num(v)
    return "–" if v is None else f"{v:.{digits}g}"


def run_style(run, index):
    """Colour per network: BN blue, plain orange, as in most BN figures; others cycle."""
    bn = run.get("batch_norm")
    if bn is True:
        return "tab:blue"
    if bn is False:
        return "tab:orange"
    return f"C{index % 10}"


# ---------------------------------------------------------------------------------------------
# Plots


def plot_accuracy(plt, report, path):
    if report.get("small_batch_study"):  # one point per run: the study's own plot says it
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    drawn = False
    for i, run in enumerate(report["runs"]):
        c = run["_curve"]
        if "test_accuracy" not in c or not c["step"]:
            continue
        ax.plot(c["step"], [100 * a for a in c["test_accuracy"]], color=run_style(run, i),
                label=run["name"], linewidth=1.6)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy (%, eval mode)")
    ax.set_title(f"(a) test accuracy, {report.get('preset', '?')}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_sigmoid_input(plt, report, path):
    runs = [r for r in report["runs"] if "_sigmoid" in r and r["_sigmoid"]["step"]]
    if not runs:
        return False
    # Without BN first (panel b), then with BN (panel c), as in the paper.
    runs.sort(key=lambda r: r.get("batch_norm") is True)
    fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 4.2), sharey=True,
                             squeeze=False)
    letters = "bcdefgh"
    for k, (ax, run) in enumerate(zip(axes[0], runs)):
        s = run["_sigmoid"]
        color = run_style(run, k)
        ax.plot(s["step"], s["p85"], color=color, linewidth=1.0, alpha=0.8, label="85th percentile")
        ax.plot(s["step"], s["p50"], color=color, linewidth=1.8, label="median")
        ax.plot(s["step"], s["p15"], color=color, linewidth=1.0, alpha=0.8, linestyle="--",
                label="15th percentile")
        ax.fill_between(s["step"], s["p15"], s["p85"], color=color, alpha=0.12)
        ax.set_title(f"({letters[k]}) {run['name']}")
        ax.set_xlabel("training step")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[0][0].set_ylabel("input to one last-layer sigmoid")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_loss(plt, report, path):
    if report.get("small_batch_study"):  # one point per run: the study's own plot says it
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    drawn = False
    for i, run in enumerate(report["runs"]):
        c = run["_curve"]
        color = run_style(run, i)
        for key, style, label in (("train_loss", "-", "train"), ("test_loss", "--", "test")):
            if key in c and any(num(v) and v > 0 for v in c[key]):
                ax.plot(c["step"], [v if v > 0 else math.nan for v in c[key]], color=color,
                        linestyle=style, linewidth=1.4, label=f"{run['name']}, {label}")
                drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_yscale("log")
    # Label 2x and 5x between the powers of ten: a loss spans only a decade or two.
    from matplotlib.ticker import FuncFormatter, LogLocator
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(4.0, 6.0, 7.0, 8.0, 9.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("loss: train (solid) and test in eval mode (dashed)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_sweep(plt, report, path):
    sweep = report["_sweep"]
    if not sweep:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    groups = {}
    for p in sweep:
        groups.setdefault(p.get("batch_norm"), []).append(p)
    for bn, points in sorted(groups.items(), key=lambda kv: str(kv[0])):
        points.sort(key=lambda p: p["lr"])
        name = "with BN" if bn is True else "without BN" if bn is False else "runs"
        color = run_style({"batch_norm": bn}, 2)
        lrs = [p["lr"] for p in points]
        acc = [100 * num(p.get("final_test_accuracy")) if num(p.get("final_test_accuracy"))
               is not None and not p.get("diverged") else math.nan for p in points]
        ax.plot(lrs, acc, marker="o", color=color, label=name, linewidth=1.6)
        bad = [p for p in points if p.get("diverged")]
        if bad:
            # A diverged run has no meaningful accuracy: mark it at chance level (10 %).
            ax.scatter([p["lr"] for p in bad], [10.0] * len(bad), marker="x", s=80, color=color,
                       linewidths=2.2, zorder=5, label=f"{name}: diverged")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("learning-rate sweep (x: diverged, drawn at chance)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


STUDY_METHODS = ("BN", "BN + precise statistics", "ghost BN", "batch renorm")


def study_rows(report):
    """The small-batch study's rows (batch_size, method and the accuracies), or []."""
    study = report.get("small_batch_study")
    if not isinstance(study, dict):
        return []
    rows = study.get("rows")
    if not isinstance(rows, list):
        raise ReportError("small_batch_study.rows is missing or not a list")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("batch_size"), int) \
                or not isinstance(r.get("method"), str):
            raise ReportError(f"small_batch_study.rows[{i}] lacks batch_size or method")
    return rows


def plot_study(plt, report, path):
    rows = study_rows(report)
    if not rows:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = [m for m in STUDY_METHODS if any(r["method"] == m for r in rows)]
    methods += sorted({r["method"] for r in rows} - set(methods))
    for k, method in enumerate(methods):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["batch_size"])
        sizes = [r["batch_size"] for r in mine]
        ev = [100 * num(r.get("test_accuracy")) if num(r.get("test_accuracy")) is not None
              else math.nan for r in mine]
        gap = [100 * num(r.get("train_eval_gap")) if num(r.get("train_eval_gap")) is not None
               else math.nan for r in mine]
        left.plot(sizes, ev, marker="o", color=f"C{k}", label=method, linewidth=1.6)
        right.plot(sizes, gap, marker="o", color=f"C{k}", label=method, linewidth=1.6)
    sizes = sorted({r["batch_size"] for r in rows})
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(b) for b in sizes])
        ax.set_xlabel("batch size")
        ax.grid(True, alpha=0.3)
    left.set_ylabel("test accuracy (%, eval mode)")
    left.set_title("(a) eval-mode test accuracy")
    left.legend(loc="lower right", fontsize="small")
    right.axhline(0, color="black", linewidth=0.8)
    right.set_ylabel("train mode − eval mode (points)")
    right.set_title("(b) gap: batch statistics vs running statistics")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# report.md


def precise_lines(report):
    """The before/after table of the runs with precise statistics (--precise-bn)."""
    runs = [r for r in report["runs"] if isinstance(r.get("precise_bn"), dict)]
    if not runs or report.get("small_batch_study"):
        return []
    lines = ["", "## Precise batch statistics", "",
             "After training, each BatchNorm layer's running statistics recomputed from K "
             "training batches with the weights fixed (Wu & Johnson 2021); the checkpoint has "
             "them.", "",
             "| run | batches | samples | aggregation | test accuracy before | after | "
             "test loss before | after |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        p = r["precise_bn"]
        lines.append(f"| {r['name']} | {p.get('batches', '–')} | {p.get('samples', '–')} | "
                     f"{p.get('aggregation', '–')} | {pct(p.get('test_accuracy_before'))} | "
                     f"{pct(p.get('test_accuracy_after'))} | {fmt(p.get('test_loss_before'))} | "
                     f"{fmt(p.get('test_loss_after'))} |")
    return lines


def study_lines(report):
    """The small-batch study's table, by batch size then method."""
    rows = study_rows(report)
    if not rows:
        return []
    study = report["small_batch_study"]
    renorm = study.get("batch_renorm") or {}
    precise = study.get("precise_bn") or {}
    lines = ["", "## Small-batch study", "",
             f"The BN network trained at each batch size on {study.get('examples_per_run')} "
             "training examples (steps = examples / batch). Ghost BN: G = batch / 2. Batch "
             f"renorm: rmax {renorm.get('rmax')}, dmax {renorm.get('dmax')}, warm-up "
             f"{renorm.get('warmup')}, ramp {renorm.get('ramp')}. Precise statistics: the BN "
             f"run's network, its running statistics recomputed from {precise.get('samples')} "
             f"training samples ({precise.get('aggregation')}). Train mode: test batches of the "
             "training batch size normalized by their own statistics (ghost chunks for ghost BN).",
             "", "| batch | method | steps | test accuracy (eval) | test accuracy (train mode) "
             "| gap (train − eval) |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ev, tr = num(r.get("test_accuracy")), num(r.get("test_accuracy_train_mode"))
        gap = f"{100 * (tr - ev):+.2f} pt" if ev is not None and tr is not None else "–"
        method = r["method"]
        if r.get("ghost_batch"):
            method += f" (G = {r['ghost_batch']})"
        lines.append(f"| {r['batch_size']} | {method} | {r.get('steps', '–')} | {pct(ev)} | "
                     f"{pct(tr)} | {gap} |")
    return lines




def write_markdown(report, images, path):
    preset = report.get("preset", "?")
    lines = [f"# bnorm train: {preset}", ""]
    facts = [("tool", report.get("tool")), ("bnorm version", report.get("bnorm_version")),
             ("started", report.get("started")), ("seed", report.get("seed")),
             ("threads", report.get("threads")),
             ("total wall time", f"{fmt(report.get('wall_time_s'), 4)} s"
              if num(report.get("wall_time_s")) is not None else None)]
    config = report.get("config")
    if isinstance(config, dict):
        facts += [(k, config[k]) for k in config]
    lines += ["| setting | value |", "| --- | --- |"]
    for k, v in facts:
        if v is not None:
            lines.append(f"| {k} | {v if not isinstance(v, (dict, list)) else json.dumps(v)} |")
    lines += ["", "## Results", "",
              "Test accuracy in eval mode uses the running statistics; in train mode each test "
              "batch is normalized by its own statistics; a network without BN has no such "
              "difference.", "",
              "| run | test accuracy (eval) | test accuracy (train mode) | gap (train − eval) "
              "| train accuracy "
              "| test loss | steps/s | wall time |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in report["runs"]:
        final = run.get("final") or {}
        ev, tr = num(final.get("test_accuracy")), num(final.get("test_accuracy_train_mode"))
        if run.get("batch_norm") is False:  # no batch statistics: train mode is eval mode
            train_mode, gap = "= eval (no BN)", "–"
        else:
            train_mode = pct(tr)
            gap = f"{100 * (tr - ev):+.2f} pt" if ev is not None and tr is not None else "–"
        wall = num(run.get("wall_time_s"))
        lines.append(f"| {run['name']} | {pct(ev)} | {train_mode} | {gap} | "
                     f"{pct(final.get('train_accuracy'))} | {fmt(final.get('test_loss'))} | "
                     f"{fmt(run.get('steps_per_s'), 5)} | "
                     f"{'–' if wall is None else f'{wall:.1f} s'} |")
    checkpoints = [(r["name"], r["checkpoint"]) for r in report["runs"]
                   if isinstance(r.get("checkpoint"), str)]
    if checkpoints:
        lines += ["", "Checkpoints: " + ", ".join(f"{n}: `{c}`" for n, c in checkpoints)]
    if report["_sweep"]:
        lines += ["", "### Learning-rate sweep", "",
                  "| learning rate | network | final test accuracy | final train loss | steps "
                  "| diverged |", "| --- | --- | --- | --- | --- | --- |"]
        for p in sorted(report["_sweep"], key=lambda p: (str(p.get("batch_norm")), p["lr"])):
            net = ("with BN" if p.get("batch_norm") is True else "without BN"
                   if p.get("batch_norm") is False else "?")
            lines.append(f"| {p['lr']:g} | {net} | {pct(p.get('final_test_accuracy'))} | "
                         f"{fmt(p.get('final_train_loss'))} | {p.get('steps', '–')} | "
                         f"{'yes' if p.get('diverged') else 'no'} |")
    lines += precise_lines(report)
    lines += study_lines(report)
    lines += ["", "## Plots", ""]
    for file, caption in images:
        lines += [f"![{file[:-4]}]({file})", "", f"*{caption}*", ""]
    # bnorm explain's figure for the BN network (report.json's "explain": explain/explain.json).
    explain = report.get("explain")
    if isinstance(explain, str):
        folder = os.path.dirname(explain)
        png, md = os.path.join(folder, "explain.png"), os.path.join(folder, "explain.md")
        if os.path.isfile(os.path.join(os.path.dirname(path), png)):
            lines += ["## Batch norm explained", "",
                      "The five steps of batch norm on the BN network's first BatchNorm layer, on "
                      f"one training mini-batch (numbers: [{md}]({md})):", "",
                      f"![batch norm explained]({png})", ""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines).rstrip() + "\n")


def main(argv):
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        print(f"usage: python3 tools/{PROG} OUTDIR   (reads OUTDIR/report.json)", file=sys.stderr)
        return 2
    outdir = argv[1]
    try:
        report = load_report(outdir)
    except ReportError as e:
        fail(str(e))
    plt = import_matplotlib()
    images = []
    jobs = [
        ("fig1a_test_accuracy.png", plot_accuracy,
         "Test accuracy (eval mode, running statistics) vs training step, with and without "
         "batch norm (the paper's Fig. 1a)."),
        ("fig1bc_sigmoid_input.png", plot_sigmoid_input,
         "15th, 50th and 85th percentiles of the input to one sigmoid of the last hidden layer "
         "over training, on the test batch: without BN (b), with BN (c)."),
        ("loss.png", plot_loss, "Training loss (solid) and test loss (dashed), log scale."),
        ("lr_sweep.png", plot_sweep,
         "Final test accuracy vs learning rate; x marks a diverged run."),
        ("small_batch_study.png", plot_study,
         "The small-batch study: (a) test accuracy in eval mode (running statistics) and (b) "
         "train-mode minus eval-mode test accuracy, against the batch size, per method."),
    ]
    for file, plot, caption in jobs:
        target = os.path.join(outdir, file)
        try:
            if plot(plt, report, target):
                images.append((file, caption))
            elif os.path.exists(target):
                os.remove(target)  # a stale plot of an earlier report would mislead
        except OSError as e:
            fail(f"cannot write {target}: {e}")
    try:
        write_markdown(report, images, os.path.join(outdir, "report.md"))
    except OSError as e:
        fail(f"cannot write {os.path.join(outdir, 'report.md')}: {e}")
    print(f"{PROG}: wrote {os.path.join(outdir, 'report.md')} and {len(images)} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
