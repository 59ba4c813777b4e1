#!/usr/bin/env python3
"""Compares data-parallel `bnorm train` runs with the 1-process run of the same global batch.

  compare_runs.py OUT_DIR BASE_DIR RUN_DIR [RUN_DIR ...]

Each *_DIR holds a report.json of `bnorm train --only bn` (BASE_DIR: one process; the others:
mpirun -np K ... --sync-bn). Writes OUT_DIR/comparison.json and OUT_DIR/comparison.md (the
curves side by side, the largest differences, the step times and the all-reduce figures) and,
when matplotlib imports, OUT_DIR/loss_curves.png. Exits 1 if a run leaves the stated tolerance:
train loss within LOSS_REL_TOL of the base at every evaluation, final test accuracy within
ACC_TOL.
"""
import json
import os
import sys

LOSS_REL_TOL = 0.02   # relative, at every evaluation
ACC_TOL = 0.01        # absolute (1 point), at the end


def load(d):
    with open(os.path.join(d, "report.json")) as f:
        r = json.load(f)
    run = r["runs"][0]
    ranks = r.get("distributed", {}).get("ranks", 1)
    return {"dir": d, "ranks": ranks, "report": r, "run": run}


def main():
    if len(sys.argv) < 4:
        print(__doc__)
        return 2
    out, base_dir, others = sys.argv[1], sys.argv[2], sys.argv[3:]
    base = load(base_dir)
    runs = [load(d) for d in others]
    rows, verdicts = [], []
    bcurve = base["run"]["curve"]
    for r in runs:
        c = r["run"]["curve"]
        worst_loss = 0.0
        for a, b in zip(c["train_loss"], bcurve["train_loss"]):
            if a is not None and b is not None:
                worst_loss = max(worst_loss, abs(a - b) / abs(b))
        worst_acc = max(abs(a - b) for a, b in zip(c["test_accuracy"], bcurve["test_accuracy"]))
        final_acc = abs(r["run"]["final"]["test_accuracy"] - base["run"]["final"]["test_accuracy"])
        ok = worst_loss <= LOSS_REL_TOL and final_acc <= ACC_TOL
        d = r["run"].get("distributed", {})
        verdicts.append({
            "ranks": r["ranks"], "within_tolerance": ok,
            "max_train_loss_rel_diff": worst_loss, "max_test_accuracy_diff": worst_acc,
            "final_test_accuracy_diff": final_acc,
            "final_test_accuracy": r["run"]["final"]["test_accuracy"],
            "steps_per_s": r["run"]["steps_per_s"],
            "allreduce_calls": d.get("allreduce_calls"), "allreduce_bytes": d.get("allreduce_bytes"),
            "allreduce_seconds": d.get("allreduce_seconds"),
            "replica_checks_passed": d.get("replica_checks_passed"),
        })
    summary = {
        "tolerance": {"train_loss_relative": LOSS_REL_TOL, "final_test_accuracy_absolute": ACC_TOL},
        "base": {"ranks": 1, "final_test_accuracy": base["run"]["final"]["test_accuracy"],
                 "steps_per_s": base["run"]["steps_per_s"]},
        "runs": verdicts,
        "config": base["report"]["config"],
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "comparison.json"), "w") as f:
        json.dump(summary, f, indent=1)

    cfg = base["report"]["config"]
    md = [f"# Data-parallel training with synchronized batch norm vs one process\n",
          f"Preset `{base['report']['preset']}`, {cfg['steps']} steps, global batch "
          f"{cfg['batch_size']}, seed {base['report']['seed']}; the K-rank runs are "
          f"`mpirun -np K bnorm train --sync-bn` with the same global batch, split across the "
          f"ranks. Tolerance: train loss within {LOSS_REL_TOL:.0%} (relative) at every "
          f"evaluation, final test accuracy within {ACC_TOL * 100:.0f} point.\n",
          "| ranks | final test accuracy | largest train-loss difference | largest test-accuracy "
          "difference | steps/s | all-reduce calls | all-reduce MB | within tolerance |",
          "|---:|---:|---:|---:|---:|---:|---:|---|",
          f"| 1 (one process) | {100 * base['run']['final']['test_accuracy']:.2f} % | – | – | "
          f"{base['run']['steps_per_s']:.1f} | – | – | – |"]
    for v in verdicts:
        md.append(f"| {v['ranks']} | {100 * v['final_test_accuracy']:.2f} % | "
                  f"{100 * v['max_train_loss_rel_diff']:.3f} % | "
                  f"{100 * v['max_test_accuracy_diff']:.2f} points | {v['steps_per_s']:.1f} | "
                  f"{v['allreduce_calls']} | {v['allreduce_bytes'] / 1e6:.0f} | "
                  f"{'yes' if v['within_tolerance'] else 'NO'} |")
    md.append("\n## Curves (train loss over the last interval / test accuracy)\n")
    head = "| step | 1 process |" + "".join(f" {v['ranks']} ranks |" for v in verdicts)
    md += [head, "|---:|---:|" + "---:|" * len(verdicts)]
    for i, step in enumerate(bcurve["step"]):
        def cell(c):
            loss = c["train_loss"][i] if i < len(c["train_loss"]) else None
            acc = c["test_accuracy"][i] if i < len(c["test_accuracy"]) else None
            return (f" {loss:.4f} / {100 * acc:.2f} % |" if loss is not None else
                    f" – / {100 * acc:.2f} % |" if acc is not None else " – |")
        md.append(f"| {step} |" + cell(bcurve) + "".join(cell(r["run"]["curve"]) for r in runs))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        for r, label in [(base, "1 process")] + [(r, f"{r['ranks']} ranks, sync BN") for r in runs]:
            c = r["run"]["curve"]
            pts = [(s, l) for s, l in zip(c["step"], c["train_loss"]) if l is not None]
            ax[0].plot([p[0] for p in pts], [p[1] for p in pts], label=label)
            ax[1].plot(c["step"], [100 * a for a in c["test_accuracy"]], label=label)
        ax[0].set_xlabel("step"); ax[0].set_ylabel("train loss"); ax[0].legend()
        ax[1].set_xlabel("step"); ax[1].set_ylabel("test accuracy (%)"); ax[1].legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "loss_curves.png"), dpi=100)
        md.append("\n![loss and accuracy curves](loss_curves.png)")
    except ImportError:
        md.append("\n(no plot: matplotlib is not installed)")
    with open(os.path.join(out, "comparison.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md[:6 + len(verdicts)]))
    return 0 if all(v["within_tolerance"] for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
