#!/usr/bin/env python3
"""Draws `bnorm explain`: batch norm's five steps on one BatchNorm layer of a trained network.

Usage: python3 tools/plot_explain.py DIR   (reads DIR/explain.json and DIR/batch.safetensors)

Writes DIR/explain.png, one figure of five columns in the order of the seed document's steps
(1 activations, 2 mean and variance, 3 normalize, 4 scale and shift, 5 moving average). The top
row follows a handful of features of one mini-batch through the steps, the bottom row shows
every feature of the layer. DIR/explain.md gives the numbers.

Every number comes from bnorm explain (C++); this script only draws and formats them.
Exit status 0 on success, 1 on a missing or malformed input (one line on stderr), 2 on bad usage.
Needs matplotlib and numpy (Debian: python3-matplotlib).
"""

import json
import math
import os
import struct
import sys

PROG = "plot_explain.py"
STEPS = ["Step 1: Activations", "Step 2: Calculate mean and variance", "Step 3: Normalize",
         "Step 4: Scale and shift", "Step 5: Moving average"]


def fail(message, code=1):
    print(f"{PROG}: {message}", file=sys.stderr)
    sys.exit(code)


def read_safetensors(path):
    """{name: float32 array} of a safetensors file of F32 tensors."""
    import numpy as np
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, rec in header.items():
        if name == "__metadata__":
            continue
        if rec["dtype"] != "F32":
            raise ValueError(f"{name}: dtype {rec['dtype']}, expected F32")
        b, e = rec["data_offsets"]
        out[name] = np.frombuffer(data[b:e], dtype="<f4").reshape(rec["shape"])
    return out


def fmt(v, digits=3):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}g}"


def fixed(v, places=4):
    return "–" if v is None else f"{v:.{places}f}"


# ---------------------------------------------------------------------------------------------
# The figure


def draw(plt, ex, batch, path):
    import numpy as np
    F = ex["features"]
    L = ex["layer"]
    sel = ex["selected_features"]
    C = L["num_features"]
    k = len(sel)
    colors = [plt.get_cmap("tab10")(i) for i in range(k)]
    # Bottom row: every feature, sorted by its batch mean (the order Step 1 shows them in).
    order = sorted(range(C), key=lambda f: F["batch_mean"][f])
    pos = {f: i for i, f in enumerate(order)}
    xs = np.arange(C)

    def arr(key):
        return np.array([np.nan if v is None else v for v in F[key]], dtype=float)[order]

    fig, axes = plt.subplots(2, 5, figsize=(25, 10.5),
                             gridspec_kw={"height_ratios": [1.15, 1.0]})
    n_values = L["values_per_feature"]
    dim = "N×H×W" if len(L["input_shape"]) > 2 else "N"
    fig.suptitle(
        f"Batch norm explained on {ex['preset']}'s BatchNorm layer {L['k']} of {L['count']} "
        f"(module {L['module_index']}: {L['repr'].split('(')[0]}, {C} features, after "
        f"{L['after'] or 'the input'}) on one training mini-batch of {ex['batch']['size']} "
        f"images: {n_values} values per feature ({dim})",
        fontsize=14, y=0.995)
    rng = np.random.default_rng(0)  # jitter of the dots only
    rows = np.arange(k)[::-1]  # first selected feature (lowest mean) at the top

    def strips(ax, values, title, xlabel, marks=None, note=None):
        """One row per selected feature: its values over the mini-batch."""
        for r, (row, vals) in enumerate(zip(rows, values)):
            v = np.asarray(vals, dtype=float)
            if v.size > 2000:  # BatchNorm2d: too many for dots, draw the distribution
                parts = ax.violinplot([v], positions=[row], vert=False, widths=0.8,
                                      showextrema=False)
                for body in parts["bodies"]:
                    body.set_facecolor(colors[r])
                    body.set_alpha(0.45)
            else:
                ax.scatter(v, row + rng.uniform(-0.28, 0.28, v.size), s=9, color=colors[r],
                           alpha=0.6, linewidths=0)
            if marks is not None:
                marks(ax, r, row)
        ax.set_yticks(rows)
        ax.set_yticklabels([f"feature {f}" for f in sel])
        ax.set_ylim(-0.7, k - 0.3)
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=11)
        ax.grid(True, axis="x", alpha=0.3)
        if note:
            ax.text(0.02, 0.98, note, transform=ax.transAxes, va="top", fontsize=9,
                    bbox=dict(boxstyle="round", facecolor="white", alpha=0.85, linewidth=0.5))

    def boxes(ax, prefix, ylabel, title, note=None):
        """Per feature: 5th-95th percentile (thin), 25th-75th (thick), median (dot)."""
        lo, q1, med, q3, hi = (arr(f"{prefix}_{q}") for q in ("p05", "p25", "p50", "p75", "p95"))
        ax.vlines(xs, lo, hi, color="0.6", linewidth=0.8)
        ax.vlines(xs, q1, q3, color="0.35", linewidth=2.2)
        ax.scatter(xs, med, s=6, color="black", zorder=3)
        for r, f in enumerate(sel):
            i = pos[f]
            ax.vlines(i, lo[i], hi[i], color=colors[r], linewidth=1.2, zorder=4)
            ax.vlines(i, q1[i], q3[i], color=colors[r], linewidth=3.2, zorder=4)
        ax.set_xlim(-1, C)
        ax.set_xlabel(f"the {C} features, sorted by batch mean")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=11)
        ax.grid(True, axis="y", alpha=0.3)
        if note:
            bottom, top = ax.get_ylim()
            ax.set_ylim(bottom, top + 0.4 * (top - bottom))  # room for the note above the boxes
            ax.text(0.02, 0.98, note, transform=ax.transAxes, va="top", fontsize=9,
                    bbox=dict(boxstyle="round", facecolor="white", alpha=0.85, linewidth=0.5))

    s_in, s_xhat, s_y = (batch[n] for n in ("selected_input", "selected_normalized",
                                             "selected_output"))
    mean = [F["batch_mean"][f] for f in sel]
    var = [F["batch_var"][f] for f in sel]

    # Step 1: the activations, one vector per feature.
    strips(axes[0][0], s_in, STEPS[0] + "\nthe layer's input, one activation vector per feature",
           "activation (input of the batch norm)")
    boxes(axes[1][0], "input", "activation",
          "every feature (coloured: the ones above): its own location\nand spread (5-95 %, 25-75 %, median)")

    # Step 2: mean and variance of each vector.
    def mean_var(ax, r, row):
        m, s = mean[r], math.sqrt(var[r])
        ax.errorbar([m], [row], xerr=[[s], [s]], fmt="|", color="black", markersize=22,
                    markeredgewidth=2.5, capsize=6, elinewidth=1.6, zorder=5)
        ax.annotate(f"μ={m:.3g}  σ²={var[r]:.3g}", (m, row + 0.33), ha="center", fontsize=8.5)
    strips(axes[0][1], s_in, STEPS[1] + "\nper feature over the mini-batch: μ (bar) ± σ",
           "activation", marks=mean_var)
    ax = axes[1][1]
    bm, bv = np.array(F["batch_mean"]), np.array(F["batch_var"])
    ax.scatter(bm, bv, s=10, color="0.45", label="a feature")
    for r, f in enumerate(sel):
        ax.scatter([bm[f]], [bv[f]], s=60, color=colors[r], edgecolors="black", zorder=4)
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("batch mean μ")
    ax.set_ylabel("batch variance σ² (biased, log scale)")
    ax.set_title(f"every feature: its mean and variance ({C} points)", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)

    # Step 3: normalized values, zero mean and unit variance.
    xm = [F["normalized_mean"][f] for f in sel]
    xv = [F["normalized_var"][f] for f in sel]

    def measured(ax, r, row):
        ax.text(1.0, row, f"mean {xm[r]:+.1e}\nvar {xv[r]:.5f}", transform=ax.get_yaxis_transform(),
                ha="right", va="center", fontsize=8.5, color=colors[r],
                bbox=dict(facecolor="white", alpha=0.7, linewidth=0))
    strips(axes[0][2], s_xhat, STEPS[2] + "\nx̂ = (x − μ) / √(σ² + ε): measured",
           "normalized value x̂", marks=measured)
    lo, hi = axes[0][2].get_xlim()
    axes[0][2].set_xlim(lo, hi + 0.35 * (hi - lo))  # room for the measured numbers
    axes[0][2].axvline(0, color="black", linewidth=0.8)
    for x in (-1, 1):
        axes[0][2].axvline(x, color="black", linewidth=0.6, linestyle=":")
    S = ex["summary"]
    boxes(axes[1][2], "normalized", "normalized value x̂",
          "every feature: now mean 0 and variance 1 (the shapes stay)\n(5-95 %, 25-75 %, median)",
          note=f"measured over all {C} features:\n|mean| ≤ {S['normalized_mean_max_abs']:.1e}\n"
               f"variance {S['normalized_var']['min']:.5f} – {S['normalized_var']['max']:.5f}\n"
               f"(σ²/(σ²+ε): ε = {L['eps']:g})")

    # Step 4: scale by gamma, shift by beta.
    g = [F["gamma"][f] for f in sel]
    b = [F["beta"][f] for f in sel]

    def gb(ax, r, row):
        ax.errorbar([b[r]], [row], xerr=[[abs(g[r])], [abs(g[r])]], fmt="|", color="black",
                    markersize=22, markeredgewidth=2.5, capsize=6, elinewidth=1.6, zorder=5)
        ax.annotate(f"γ={g[r]:.3g}  β={b[r]:+.3g}", (b[r], row + 0.33), ha="center", fontsize=8.5)
    strips(axes[0][3], s_y, STEPS[3] + "\ny = γ·x̂ + β (the layer's output): bar at β ± γ",
           "output y", marks=gb)
    ax = axes[1][3]
    ax.scatter(xs, arr("gamma"), s=10, color="tab:purple", label="γ (gamma, scale)")
    ax.scatter(xs, arr("beta"), s=10, color="tab:green", label="β (beta, shift)")
    for r, f in enumerate(sel):
        i = pos[f]
        ax.scatter([i, i], [F["gamma"][f], F["beta"][f]], s=55, color=colors[r],
                   edgecolors="black", zorder=4)
    ax.axhline(1, color="tab:purple", linewidth=0.6, linestyle=":")
    ax.axhline(0, color="tab:green", linewidth=0.6, linestyle=":")
    ax.set_xlim(-1, C)
    ax.set_xlabel(f"the {C} features, sorted by batch mean")
    ax.set_ylabel("learned value")
    ax.set_title("every feature: its learned γ and β (at initialization: γ = 1, β = 0)",
                 fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9)

    # Step 5: the moving averages kept for inference, against the training set's statistics.
    ax = axes[0][4]
    E = S.get("ema_vs_population")
    if E is None:
        for a in (axes[0][4], axes[1][4]):
            a.text(0.5, 0.5, "no running statistics\n(track_running_stats=False)",
                   ha="center", va="center", transform=a.transAxes)
            a.set_title(STEPS[4], fontsize=11)
    else:
        for r, (row, f) in enumerate(zip(rows, sel)):
            for dy, m, v, style, label in (
                    (0.22, F["running_mean"][f], F["running_var"][f], dict(color=colors[r]),
                     "running (EMA): what inference uses"),
                    (0.0, F["population_mean"][f], F["population_var"][f],
                     dict(color="black"), "population: all training images"),
                    (-0.22, F["batch_mean"][f], F["batch_var"][f],
                     dict(color="0.6"), "this mini-batch")):
                ax.errorbar([m], [row + dy], xerr=[[math.sqrt(v)], [math.sqrt(v)]], fmt="o",
                            markersize=5, capsize=4, elinewidth=1.6,
                            label=label if r == 0 else None, **style)
        ax.set_yticks(rows)
        ax.set_yticklabels([f"feature {f}" for f in sel])
        ax.set_ylim(-0.7, k + 0.75)  # room for the legend above the rows
        ax.set_xlabel("mean ± standard deviation of the feature")
        ax.set_title(STEPS[4] + "\nrunning mean/var (EMA, kept for inference) vs population",
                     fontsize=11)
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(loc="upper center", fontsize=8.5, ncol=2)
        ax = axes[1][4]
        gap = arr("ema_mean_gap_in_std")
        ratio = arr("ema_var_ratio")
        ax.scatter(xs, gap, s=10, color="tab:blue",
                   label="(running mean − population mean) / population σ")
        ax.scatter(xs, ratio - 1, s=10, marker="s", color="tab:red",
                   label="running var / population var − 1")
        for r, f in enumerate(sel):
            i = pos[f]
            ax.scatter([i], [gap[i]], s=55, marker="o", color=colors[r], edgecolors="black", zorder=4)
            ax.scatter([i], [ratio[i] - 1], s=55, marker="s", color=colors[r], edgecolors="black",
                       zorder=4)
        ax.axhline(0, color="black", linewidth=0.8)
        # Symmetric, with room for the legend above and the summary below the points.
        lim = 1.8 * max(np.nanmax(np.abs(gap)), np.nanmax(np.abs(ratio - 1)),
                        E.get("noise_mean_gap_in_std", 0), 1e-6)
        ax.set_ylim(-lim, lim)
        if "noise_mean_gap_in_std" in E:
            nm = E["noise_mean_gap_in_std"]
            ax.axhspan(-nm, nm, color="tab:blue", alpha=0.08,
                       label=f"± EMA sampling noise of the mean ({nm:.3f})")
        ax.set_xlim(-1, C)
        ax.set_xlabel(f"the {C} features, sorted by batch mean")
        ax.set_ylabel("relative gap")
        ax.set_title("every feature: how far the EMA is from the population", fontsize=11)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", fontsize=8.5)
        ax.text(0.98, 0.03,
                f"|mean gap|: median {E['mean_gap_in_std_median_abs']:.3f} σ, "
                f"max {E['mean_gap_in_std_max_abs']:.3f} σ\n"
                f"var ratio: median {E['var_ratio']['median']:.3f}, "
                f"{E['var_ratio']['min']:.3f} – {E['var_ratio']['max']:.3f}",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=9,
                bbox=dict(boxstyle="round", facecolor="white", alpha=0.85, linewidth=0.5))
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# explain.md


def write_markdown(ex, path):
    F, L, S, B = ex["features"], ex["layer"], ex["summary"], ex["batch"]
    sel = ex["selected_features"]
    C = L["num_features"]
    E = S.get("ema_vs_population")
    lines = [
        f"# Batch norm explained: {ex['preset']}, BatchNorm layer {L['k']} of {L['count']}", "",
        f"Checkpoint `{ex['checkpoint']}`"
        + (f" ({ex['trained_steps']} training steps)" if "trained_steps" in ex else "")
        + f"; layer `{L['name']}`: `{L['repr']}`, after `{L['after']}`"
        + (f", before `{L['before']}`" if L.get("before") else "") + ".", "",
        f"One mini-batch of {B['size']} training images (the first that `bnorm train --seed "
        f"{B['seed']}` draws); the modules before the layer run in training mode, as in "
        f"training. Input shape {L['input_shape']}: {L['values_per_feature']} values per "
        f"feature. Features drawn one by one: {', '.join(map(str, sel))} "
        f"({ex['selection']}).", "",
        "![the five steps](explain.png)", "",
        "## The five steps, in numbers", "",
        f"1. **Activations**: the layer's input, one activation vector per feature. Over the "
        f"{C} features the medians run from {fmt(min(F['input_p50']))} to "
        f"{fmt(max(F['input_p50']))}.",
        f"2. **Mean and variance** of each vector over the mini-batch: batch means "
        f"{fmt(S['batch_mean']['min'])} to {fmt(S['batch_mean']['max'])} (median "
        f"{fmt(S['batch_mean']['median'])}), variances {fmt(S['batch_var']['min'])} to "
        f"{fmt(S['batch_var']['max'])} (median {fmt(S['batch_var']['median'])}).",
        f"3. **Normalize**: x̂ = (x − μ) / √(σ² + ε), measured: |mean| ≤ "
        f"{S['normalized_mean_max_abs']:.1e} and variance {S['normalized_var']['min']:.6f} to "
        f"{S['normalized_var']['max']:.6f} for every feature (exactly σ²/(σ² + ε), ε = "
        f"{L['eps']:g}: at most {S['normalized_var_eps_effect_max']:.1e} below 1).",
        f"4. **Scale and shift**: y = γ·x̂ + β with the learned γ {fmt(S['gamma']['min'])} to "
        f"{fmt(S['gamma']['max'])} (median {fmt(S['gamma']['median'])}) and β "
        f"{fmt(S['beta']['min'])} to {fmt(S['beta']['max'])} (median "
        f"{fmt(S['beta']['median'])}); so y has mean β and variance ≈ γ² per feature "
        f"(measured output means {fmt(S['output_mean']['min'])} to "
        f"{fmt(S['output_mean']['max'])}, variances {fmt(S['output_var']['min'])} to "
        f"{fmt(S['output_var']['max'])}).",
    ]
    if E is not None:
        noise = (f" EMA sampling noise alone would give about {E['noise_mean_gap_in_std']:.3f} σ "
                 f"and a ratio within ± {E['noise_var_ratio']:.3f} of 1 (independent values)."
                 if "noise_mean_gap_in_std" in E else "")
        lines.append(
            f"5. **Moving average**: the running mean and variance (EMA over training, momentum "
            f"{L['momentum']}, {L['num_batches_tracked']} batches) against the population "
            f"statistics of the layer's input over all {ex['population']['examples']} training "
            f"images ({ex['population']['mode']}): the running mean is "
            f"{E['mean_gap_in_std_median_abs']:.3f} population standard deviations off for the "
            f"median feature, {E['mean_gap_in_std_max_abs']:.3f} at most; running / population "
            f"variance {E['var_ratio']['min']:.3f} to {E['var_ratio']['max']:.3f} (median "
            f"{E['var_ratio']['median']:.3f}).{noise}")
    else:
        lines.append("5. **Moving average**: none, the layer does not track running statistics.")
    lines += ["", "## The features drawn", "",
              "| feature | batch mean μ | batch var σ² | x̂ mean | x̂ var | γ | β | y mean | y var "
              "| running mean | population mean | running var | population var | mean gap (σ) "
              "| var ratio |",
              "|" + " --- |" * 15]
    for f in sel:
        row = [str(f), fmt(F["batch_mean"][f], 4), fmt(F["batch_var"][f], 4),
               f"{F['normalized_mean'][f]:+.1e}", fixed(F["normalized_var"][f], 6),
               fmt(F["gamma"][f], 4), fmt(F["beta"][f], 4), fmt(F["output_mean"][f], 4),
               fmt(F["output_var"][f], 4), fmt(F["running_mean"][f], 4),
               fmt(F["population_mean"][f], 4), fmt(F["running_var"][f], 4),
               fmt(F["population_var"][f], 4), fmt(F["ema_mean_gap_in_std"][f], 3),
               fmt(F["ema_var_ratio"][f], 4)]
        lines.append("| " + " | ".join(row) + " |")
    K = ex["checks"]
    lines += ["", "Checks: the library's output y differs from γ·x̂ + β by at most "
              f"{K['output_vs_gamma_xhat_plus_beta_max_abs']:.1e}; its batch mean and variance "
              f"from an fp64 two-pass recomputation by at most {K['batch_mean_vs_fp64_max_abs']:.1e} "
              f"(absolute) and {K['batch_var_vs_fp64_max_rel']:.1e} (relative).", "",
              "Every per-feature number is in `explain.json`; the mini-batch at the layer in "
              "`batch.safetensors` (`input`, and `selected_input`, `selected_normalized`, "
              "`selected_output` for the features drawn)."]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main(argv):
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        print(f"usage: python3 tools/{PROG} DIR   (reads DIR/explain.json)", file=sys.stderr)
        return 2
    d = argv[1]
    try:
        with open(os.path.join(d, "explain.json"), encoding="utf-8") as f:
            ex = json.load(f)
        batch = read_safetensors(os.path.join(d, "batch.safetensors"))
        for key in ("features", "layer", "summary", "selected_features", "batch"):
            if key not in ex:
                raise ValueError(f"explain.json: \"{key}\" is missing")
    except (OSError, ValueError, KeyError) as e:
        fail(f"{d}: {e}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    try:
        draw(plt, ex, batch, os.path.join(d, "explain.png"))
        write_markdown(ex, os.path.join(d, "explain.md"))
    except OSError as e:
        fail(f"cannot write into {d}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
