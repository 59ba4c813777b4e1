#!/usr/bin/env python3
"""Test of tools/plot_report.py on a synthetic report.json shaped like `bnorm train`'s.

Usage: plot_report_test.py PLOT_REPORT_PY [--keep DIR]
  --keep DIR  write the synthetic report and its plots to DIR and keep them (to look at them).

Checks: a full paper-mlp report gives the four PNGs and a report.md that embeds them and has the
results table; a cnn report without sigmoid_input and without a sweep gives only the plots that
apply; a small-batch study gives its plot and table only; a --precise-bn run its before/after
table; a missing or malformed report.json (study rows included) exits 1 with a one-line message. Exit 77 (skip) when
neither this interpreter nor /usr/bin/python3 has matplotlib.
"""

import json
import math
import os
import subprocess
import sys
import tempfile


def synthetic_report(preset="paper-mlp", with_sigmoid=True, with_sweep=True):
    steps = list(range(0, 50001, 1000))

    def curve(final_acc, speed, noise_phase):
        acc = [0.1 + (final_acc - 0.1) * (1 - math.exp(-s / speed)) +
               0.004 * math.sin(s / 3000 + noise_phase) for s in steps]
        train_loss = [2.3 * math.exp(-s / speed) + 0.25 + 0.02 * math.sin(s / 2000) for s in steps]
        test_loss = [2.3 * math.exp(-s / speed) + 0.35 for s in steps]
        return {"step": steps, "epoch": [s * 60 / 60000 for s in steps], "train_loss": train_loss,
                "test_loss": test_loss, "test_accuracy": acc}

    def sigmoid(bn):
        if bn:  # stable around 0
            return {"step": steps, "p15": [-1.0 - 0.05 * math.sin(s / 5000) for s in steps],
                    "p50": [0.02 * math.sin(s / 7000) for s in steps],
                    "p85": [1.0 + 0.05 * math.cos(s / 5000) for s in steps]}
        return {"step": steps, "p15": [-0.5 - 3 * (1 - math.exp(-s / 8000)) for s in steps],
                "p50": [-1.5 * (1 - math.exp(-s / 12000)) for s in steps],
                "p85": [0.5 + 1.2 * (1 - math.exp(-s / 8000)) for s in steps]}

    runs = []
    for bn, final, speed in ((True, 0.885, 4000), (False, 0.86, 12000)):
        run = {"name": "with BN" if bn else "without BN", "batch_norm": bn,
               "wall_time_s": 31.5 if bn else 22.0, "steps_per_s": 1587.3 if bn else 2272.7,
               "curve": curve(final, speed, 1.0 if bn else 0.0),
               "final": {"test_accuracy": final, "test_accuracy_train_mode": final - 0.004,
                         "train_accuracy": final + 0.03, "test_loss": 0.33},
               "checkpoint": "bn.safetensors" if bn else "plain.safetensors"}
        if with_sigmoid:
            run["sigmoid_input"] = sigmoid(bn)
        runs.append(run)
    runs[1]["curve"]["train_loss"][3] = None  # a NaN written as null must not break the plots
    report = {"tool": "bnorm train", "bnorm_version": "0.1.0", "preset": preset, "seed": 1,
              "threads": 2,
              "config": {"steps": 50000, "batch_size": 60, "lr": 0.5, "momentum": 0.0,
                         "weight_decay": 0.0, "eval_every": 1000, "data": "fashion-mnist"},
              "wall_time_s": 55.1, "started": "2024-01-01T12:00:00Z", "runs": runs}
    if with_sweep:
        report["lr_sweep"] = [
            {"lr": lr, "batch_norm": bn, "final_test_accuracy": acc, "final_train_loss": loss,
             "diverged": div, "steps": 5000}
            for lr, bn, acc, loss, div in (
                (0.1, True, 0.85, 0.4, False), (1.0, True, 0.87, 0.35, False),
                (10.0, True, 0.84, 0.45, False), (0.1, False, 0.80, 0.55, False),
                (1.0, False, 0.83, 0.5, False), (10.0, False, 0.1, None, True))]
    return report


def run_plotter(script, outdir):
    return subprocess.run([sys.executable, script, outdir], capture_output=True, text=True)


def check(condition, message):
    if not condition:
        print(f"FAIL: {message}")
        sys.exit(1)


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    script = argv[1]
    keep = argv[argv.index("--keep") + 1] if "--keep" in argv else None
    has_mpl = subprocess.run([sys.executable, "-c", "import matplotlib"],
                             capture_output=True).returncode == 0
    if not has_mpl and not (os.path.exists("/usr/bin/python3") and subprocess.run(
            ["/usr/bin/python3", "-c", "import matplotlib"], capture_output=True).returncode == 0):
        print("skipped: python3-matplotlib not installed")
        return 77

    with tempfile.TemporaryDirectory() as tmp:
        full = keep or os.path.join(tmp, "full")
        os.makedirs(full, exist_ok=True)
        with open(os.path.join(full, "report.json"), "w") as f:
            json.dump(synthetic_report(), f)
        r = run_plotter(script, full)
        check(r.returncode == 0, f"full report: exit {r.returncode}: {r.stderr}")
        for png in ("fig1a_test_accuracy.png", "fig1bc_sigmoid_input.png", "loss.png",
                    "lr_sweep.png"):
            path = os.path.join(full, png)
            check(os.path.isfile(path) and os.path.getsize(path) > 5000, f"{png} not written")
            with open(path, "rb") as f:
                check(f.read(8) == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG")
        md = open(os.path.join(full, "report.md")).read()
        for fragment in ("# bnorm train: paper-mlp", "](fig1a_test_accuracy.png)",
                         "](fig1bc_sigmoid_input.png)", "](lr_sweep.png)", "| with BN | 88.50 %",
                         "| without BN | 86.00 % | = eval (no BN) |", "-0.40 pt", "| 10 | without BN |"):
            check(fragment in md, f"report.md lacks {fragment!r}")

        cnn = os.path.join(tmp, "cnn")
        os.makedirs(cnn)
        with open(os.path.join(cnn, "report.json"), "w") as f:
            json.dump(synthetic_report("cnn", with_sigmoid=False, with_sweep=False), f)
        r = run_plotter(script, cnn)
        check(r.returncode == 0, f"cnn report: exit {r.returncode}: {r.stderr}")
        made = sorted(os.listdir(cnn))
        check(made == ["fig1a_test_accuracy.png", "loss.png", "report.json", "report.md"],
              f"cnn report wrote {made}")
        md = open(os.path.join(cnn, "report.md")).read()
        check("sigmoid" not in md and "sweep" not in md, "cnn report.md mentions absent parts")

        # A small-batch study: its plot and table instead of the per-step plots; a precise-BN
        # run's before/after table.
        study = os.path.join(tmp, "study")
        os.makedirs(study)
        report = synthetic_report(with_sigmoid=False, with_sweep=False)
        rows = []
        for b in (4, 8):
            for m, ev, tr in (("BN", 0.80, 0.75), ("BN + precise statistics", 0.81, 0.75),
                              ("ghost BN", 0.70, 0.60), ("batch renorm", 0.82, 0.81)):
                rows.append({"batch_size": b, "method": m, "steps": 1000 // b,
                             "ghost_batch": b // 2 if m == "ghost BN" else None,
                             "test_accuracy": ev, "test_accuracy_train_mode": tr,
                             "train_eval_gap": tr - ev})
        report["small_batch_study"] = {"examples_per_run": 1000, "rows": rows,
                                       "batch_renorm": {"rmax": 3, "dmax": 5, "warmup": "10 %",
                                                        "ramp": "40 %"},
                                       "precise_bn": {"samples": 4800, "aggregation": "mean"}}
        with open(os.path.join(study, "report.json"), "w") as f:
            json.dump(report, f)
        r = run_plotter(script, study)
        check(r.returncode == 0, f"study report: exit {r.returncode}: {r.stderr}")
        made = sorted(os.listdir(study))
        check(made == ["report.json", "report.md", "small_batch_study.png"], f"study wrote {made}")
        md = open(os.path.join(study, "report.md")).read()
        for fragment in ("## Small-batch study", "| 4 | ghost BN (G = 2) | 250 | 70.00 % | 60.00 % | "
                         "-10.00 pt |", "| 8 | batch renorm | 125 | 82.00 % | 81.00 % | -1.00 pt |",
                         "](small_batch_study.png)"):
            check(fragment in md, f"study report.md lacks {fragment!r}")
        precise = os.path.join(tmp, "precise")
        os.makedirs(precise)
        report = synthetic_report(with_sigmoid=False, with_sweep=False)
        report["runs"][0]["precise_bn"] = {"batches": 20, "samples": 1200, "aggregation": "mean",
                                           "test_accuracy_before": 0.8, "test_accuracy_after": 0.81,
                                           "test_loss_before": 0.5, "test_loss_after": 0.45}
        with open(os.path.join(precise, "report.json"), "w") as f:
            json.dump(report, f)
        r = run_plotter(script, precise)
        md = open(os.path.join(precise, "report.md")).read() if r.returncode == 0 else ""
        check("## Precise batch statistics" in md and "| 20 | 1200 | mean | 80.00 % | 81.00 % |" in md,
              f"precise report: exit {r.returncode}: {r.stderr} {md[-1500:]}")

        bad = os.path.join(tmp, "bad")
        os.makedirs(bad)
        r = run_plotter(script, bad)
        check(r.returncode == 1 and "no such file" in r.stderr and r.stderr.count("\n") == 1,
              f"missing report.json: exit {r.returncode}: {r.stderr!r}")
        for text, fragment in (("{not json", "not valid JSON"), ("[]", "not a JSON object"),
                               ('{"runs": []}', "\"runs\" is missing or empty"),
                               ('{"runs": [{"name": "a", "curve": {"step": [1, 2], '
                                '"test_accuracy": [0.5]}}]}', "has 1 values but"),
                               ('{"runs": [{"name": "a", "curve": {"step": [1]}}], '
                                '"small_batch_study": {"rows": [{"method": "BN"}]}}',
                                "small_batch_study.rows[0] lacks batch_size or method")):
            with open(os.path.join(bad, "report.json"), "w") as f:
                f.write(text)
            r = run_plotter(script, bad)
            check(r.returncode == 1 and fragment in r.stderr and r.stderr.count("\n") == 1,
                  f"{text!r}: exit {r.returncode}: {r.stderr!r}")
    print("plot_report.py: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
