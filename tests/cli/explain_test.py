#!/usr/bin/env python3
"""End-to-end tests of `bnorm explain` (and of the explain/ folder `bnorm train` writes).

  explain_test.py BNORM_EXECUTABLE

A short paper-mlp training run writes its checkpoints and explain/ for the BN network. Its
numbers are checked against numpy recomputations from the checkpoint and the data: the mini-batch
at the first BatchNorm layer (x W^T + b of the batch's images), its batch mean and variance, the
normalized values (mean 0, variance v / (v + eps), within tolerances derived from fp32), gamma,
beta and the running statistics (the checkpoint's), the population statistics over the 60,000
training images, and a plausible gap between running and population statistics. Then
`bnorm explain --layer 2`, a cnn (BatchNorm2d: statistics over N x H x W) trained on a small copy
of the data, and the errors: a layer out of range, a network without batch norm, a corrupt
checkpoint, each one line, non-zero, nothing written.
"""
import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

EXE = sys.argv[1]
DATA = os.environ.get("BNORM_TEST_DATA", "/usr/share/datasets/fashion-mnist")
failures = []


def run(*args):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=600)


def check(name, cond, detail=""):
    print(("ok   " if cond else "FAIL ") + name + ("" if cond else f": {detail}"))
    if not cond:
        failures.append(name)
    return cond


def expect_error(name, proc, *needles):
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    ok = proc.returncode != 0 and len(lines) == 1 and all(n in lines[0] for n in needles)
    check(name, ok, f"exit {proc.returncode}, stderr {proc.stderr!r}")


def read_safetensors(path):
    import numpy as np
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, rec in header.items():
        if name == "__metadata__":
            continue
        dtype = {"F32": "<f4", "I64": "<i8"}[rec["dtype"]]
        b, e = rec["data_offsets"]
        out[name] = np.frombuffer(data[b:e], dtype=dtype).reshape(rec["shape"])
    return out


def read_idx(path):
    import numpy as np
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    rank = raw[3]
    dims = struct.unpack(">" + "I" * rank, raw[4:4 + 4 * rank])
    return np.frombuffer(raw[4 + 4 * rank:], dtype=np.uint8).reshape(dims)


def write_idx(path, array, magic):
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape))
        f.write(array.tobytes())


def check_normalized(tag, ex):
    """Step 3: mean 0 and variance v / (v + eps) per feature, within fp32-derived tolerances."""
    import numpy as np
    F, eps = ex["features"], ex["layer"]["eps"]
    m, v = np.array(F["batch_mean"]), np.array(F["batch_var"])
    xm, xv = np.array(F["normalized_mean"]), np.array(F["normalized_var"])
    # The library's statistics are within ~1e-5 relative of exact (its documented variance
    # bound is 2.2e-5); mean(x-hat) is the mean's error over sigma, plus fp32 rounding of x-hat.
    tol_mean = 1e-5 * (1 + np.abs(m) / np.sqrt(v + eps)) + 1e-6
    check(f"{tag}: normalized mean ~ 0 per feature", bool(np.all(np.abs(xm) <= tol_mean)),
          f"worst {np.max(np.abs(xm) - tol_mean)} over tolerance")
    check(f"{tag}: normalized variance = v/(v+eps) per feature",
          bool(np.all(np.abs(xv - v / (v + eps)) <= 5e-5)), np.max(np.abs(xv - v / (v + eps))))
    check(f"{tag}: normalized variance ~ 1 (within eps/v + 5e-5)",
          bool(np.all(np.abs(xv - 1) <= eps / v + 5e-5)), (xv.min(), xv.max()))


def check_batch(tag, ex, batch):
    """Step 2 against numpy over the dumped input: per feature over N (x H x W)."""
    import numpy as np
    x = batch["input"].astype(np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    m, v = x.mean(axis=axes), x.var(axis=axes)
    F = ex["features"]
    check(f"{tag}: dumped input has the layer's input shape",
          list(x.shape) == ex["layer"]["input_shape"], x.shape)
    check(f"{tag}: batch mean matches numpy",
          bool(np.all(np.abs(np.array(F["batch_mean"]) - m) <= 1e-5 * (np.abs(m) + np.sqrt(v)) + 1e-7)),
          np.max(np.abs(np.array(F["batch_mean"]) - m)))
    check(f"{tag}: batch variance matches numpy",
          bool(np.all(np.abs(np.array(F["batch_var"]) - v) <= 3e-5 * v + 1e-9)),
          np.max(np.abs(np.array(F["batch_var"]) - v) / v))
    sel = ex["selected_features"]
    check(f"{tag}: {len(sel)} distinct features drawn", len(set(sel)) == len(sel) == min(6, x.shape[1]), sel)
    xs = np.stack([np.moveaxis(x, 1, 0)[f].reshape(-1) for f in sel])
    check(f"{tag}: selected_input is the input of those features",
          np.array_equal(xs, batch["selected_input"].astype(np.float64)))
    eps = ex["layer"]["eps"]
    ms, vs = m[sel][:, None], v[sel][:, None]
    xhat = (xs - ms) / np.sqrt(vs + eps)
    check(f"{tag}: selected_normalized = (x - mean) / sqrt(var + eps)",
          float(np.max(np.abs(batch["selected_normalized"] - xhat))) <= 1e-4 * (1 + np.max(np.abs(xhat))),
          np.max(np.abs(batch["selected_normalized"] - xhat)))
    g = np.array(F["gamma"])[sel][:, None]
    b = np.array(F["beta"])[sel][:, None]
    y = g * batch["selected_normalized"].astype(np.float64) + b
    check(f"{tag}: selected_output = gamma * x-hat + beta",
          float(np.max(np.abs(batch["selected_output"] - y))) <= 1e-5 * (1 + np.max(np.abs(y))),
          np.max(np.abs(batch["selected_output"] - y)))


def main():
    if not os.path.isdir(DATA):
        print(f"skipped: dataset-fashion-mnist not installed ({DATA} missing)")
        return 77
    try:
        import numpy as np
    except ImportError:
        # Debian's interpreter has python3-numpy (with python3-matplotlib) when this one lacks it.
        system = "/usr/bin/python3"
        if (os.path.exists(system) and os.path.realpath(sys.executable) != os.path.realpath(system)
                and not os.environ.get("BNORM_TEST_REEXEC")):
            os.environ["BNORM_TEST_REEXEC"] = "1"
            os.execv(system, [system, os.path.abspath(__file__)] + sys.argv[1:])
        print("skipped: numpy not installed (apt-get install python3-numpy)")
        return 77
    tmp = tempfile.mkdtemp(prefix="bnorm-explain-test-")
    try:
        # ----- bnorm train writes explain/ for its BN network -----
        out = os.path.join(tmp, "run")
        p = run("train", "--steps", "300", "--eval-every", "0", "--out", out)
        if not check("train runs", p.returncode == 0, p.stderr[-2000:]):
            return 1
        ed = os.path.join(out, "explain")
        for f in ("explain.json", "batch.safetensors", "explain.png", "explain.md"):
            check(f"train wrote explain/{f}", os.path.isfile(os.path.join(ed, f)))
        check("no staging directory left", not [f for f in os.listdir(ed) if f.startswith(".")],
              os.listdir(ed))
        report = json.load(open(os.path.join(out, "report.json")))
        check("report.json names explain/", report.get("explain") == "explain/explain.json",
              report.get("explain"))
        md = open(os.path.join(out, "report.md")).read()
        check("report.md shows and links it", "explain/explain.png" in md and "explain/explain.md" in md)
        emd = open(os.path.join(ed, "explain.md")).read()
        check("explain.md has the five steps",
              all(s in emd for s in ("Activations", "Mean and variance", "Normalize",
                                     "Scale and shift", "Moving average")))

        ex = json.load(open(os.path.join(ed, "explain.json")))
        batch = read_safetensors(os.path.join(ed, "batch.safetensors"))
        ck = read_safetensors(os.path.join(out, "bn.safetensors"))
        L = ex["layer"]
        check("layer 1 of 3 is module 1, BatchNorm1d(100)",
              (L["k"], L["count"], L["module_index"], L["num_features"]) == (1, 3, 1, 100) and
              L["repr"].startswith("BatchNorm1d"), L)
        check("the layer's counter is the checkpoint's (300 batches)",
              L["num_batches_tracked"] == int(ck["1.num_batches_tracked"].reshape(-1)[0]) == 300,
              L["num_batches_tracked"])
        check("the mini-batch is the training batch (60)", ex["batch"]["size"] == 60 and
              len(set(ex["batch"]["indices"])) == 60, ex["batch"]["size"])
        check_batch("mlp layer 1", ex, batch)
        check_normalized("mlp layer 1", ex)
        F = ex["features"]
        check("gamma, beta are the checkpoint's",
              F["gamma"] == ck["1.weight"].astype(float).tolist() and
              F["beta"] == ck["1.bias"].astype(float).tolist())
        check("running mean, var are the checkpoint's",
              F["running_mean"] == ck["1.running_mean"].astype(float).tolist() and
              F["running_var"] == ck["1.running_var"].astype(float).tolist())
        check("gamma and beta have moved from their init (1, 0) in 300 steps",
              max(abs(g - 1) for g in F["gamma"]) > 1e-3 and max(abs(b) for b in F["beta"]) > 1e-3)

        # The layer's input recomputed: images / 255 through Linear(784, 100).
        images = read_idx(os.path.join(DATA, "train-images-idx3-ubyte.gz"))
        X = images.reshape(len(images), -1).astype(np.float32) / np.float32(255)
        W, b = ck["0.weight"].astype(np.float32), ck["0.bias"].astype(np.float32)
        idx = np.array(ex["batch"]["indices"])
        H = X[idx] @ W.T + b
        check("dumped input = the batch's images through Linear(784, 100)",
              float(np.max(np.abs(H - batch["input"]))) <= 1e-4 * (1 + float(np.max(np.abs(H)))),
              np.max(np.abs(H - batch["input"])))
        P = (X @ W.T + b).astype(np.float64)
        pm, pv = P.mean(axis=0), P.var(axis=0)
        check("population mean matches numpy over 60000 images",
              bool(np.all(np.abs(np.array(F["population_mean"]) - pm) <= 1e-4 * np.sqrt(pv) + 1e-6)),
              np.max(np.abs(np.array(F["population_mean"]) - pm) / np.sqrt(pv)))
        check("population variance matches numpy",
              bool(np.all(np.abs(np.array(F["population_var"]) - pv) <= 1e-4 * pv)),
              np.max(np.abs(np.array(F["population_var"]) - pv) / pv))
        E = ex["summary"]["ema_vs_population"]
        gap = np.abs(np.array(F["ema_mean_gap_in_std"]))
        ratio = np.array(F["ema_var_ratio"])
        check("running vs population: a plausible gap (not zero, well under one std)",
              0 < E["mean_gap_in_std_median_abs"] < 0.5 and 0 < float(np.max(gap)) < 2, E)
        check("running vs population variance: ratio plausible (median within 0.5..2, not 1)",
              0.5 < E["var_ratio"]["median"] < 2 and float(np.max(np.abs(ratio - 1))) > 1e-4, E)
        check("gap recomputed from the json's statistics",
              np.allclose(gap, np.abs((np.array(F["running_mean"]) - pm) / np.sqrt(pv + L["eps"])),
                          rtol=1e-3, atol=1e-5))

        # ----- bnorm explain on another layer -----
        ex2d = os.path.join(tmp, "ex2")
        p = run("explain", "--checkpoint", os.path.join(out, "bn.safetensors"), "--layer", "2",
                "--out", ex2d)
        check("explain --layer 2 runs", p.returncode == 0, p.stderr[-2000:])
        if p.returncode == 0:
            ex2 = json.load(open(os.path.join(ex2d, "explain.json")))
            check("layer 2 is module 4", (ex2["layer"]["k"], ex2["layer"]["module_index"]) == (2, 4))
            check("explain.png written", os.path.getsize(os.path.join(ex2d, "explain.png")) > 10000)
            check_batch("mlp layer 2", ex2, read_safetensors(os.path.join(ex2d, "batch.safetensors")))
            check_normalized("mlp layer 2", ex2)

        # ----- errors: one line, non-zero, nothing written -----
        bn_ck = os.path.join(out, "bn.safetensors")
        for layer in ("4", "0"):
            target = os.path.join(tmp, "bad-layer-" + layer)
            expect_error(f"--layer {layer} out of range", run("explain", "--checkpoint", bn_ck,
                                                              "--layer", layer, "--out", target),
                         f"--layer {layer}", "3 BatchNorm layers")
            check(f"--layer {layer}: no output directory", not os.path.exists(target))
        keep = os.path.join(tmp, "existing")
        os.makedirs(keep)
        open(os.path.join(keep, "mine.txt"), "w").write("x")
        expect_error("network without batch norm",
                     run("explain", "--checkpoint", os.path.join(out, "plain.safetensors"), "--out", keep),
                     "no BatchNorm layer")
        check("an existing output directory is left as it was", os.listdir(keep) == ["mine.txt"],
              os.listdir(keep))
        target = os.path.join(tmp, "bad-ck")
        expect_error("corrupt checkpoint",
                     run("explain", "--checkpoint", os.path.join(DATA, "t10k-labels-idx1-ubyte.gz"),
                         "--out", target), "t10k-labels")
        check("corrupt checkpoint: no output directory", not os.path.exists(target))
        expect_error("missing checkpoint",
                     run("explain", "--checkpoint", os.path.join(tmp, "none.safetensors"), "--out", target),
                     "none.safetensors")

        # ----- BatchNorm2d: the cnn on a small copy of the data -----
        small = os.path.join(tmp, "small-data")
        os.makedirs(small)
        labels = read_idx(os.path.join(DATA, "train-labels-idx1-ubyte.gz"))
        timages = read_idx(os.path.join(DATA, "t10k-images-idx3-ubyte.gz"))
        tlabels = read_idx(os.path.join(DATA, "t10k-labels-idx1-ubyte.gz"))
        write_idx(os.path.join(small, "train-images-idx3-ubyte"), images[:600], 0x803)
        write_idx(os.path.join(small, "train-labels-idx1-ubyte"), labels[:600], 0x801)
        write_idx(os.path.join(small, "t10k-images-idx3-ubyte"), timages[:100], 0x803)
        write_idx(os.path.join(small, "t10k-labels-idx1-ubyte"), tlabels[:100], 0x801)
        cnn = os.path.join(tmp, "cnn")
        p = run("train", "--preset", "cnn", "--only", "bn", "--data", small, "--steps", "5",
                "--batch-size", "16", "--eval-every", "0", "--no-plots", "--out", cnn)
        check("cnn train runs on the small data", p.returncode == 0, p.stderr[-2000:])
        cd = os.path.join(cnn, "explain")
        if p.returncode == 0 and check("cnn: explain.json written (no figure with --no-plots)",
                                       os.path.isfile(os.path.join(cd, "explain.json")) and
                                       not os.path.exists(os.path.join(cd, "explain.png"))):
            exc = json.load(open(os.path.join(cd, "explain.json")))
            Lc = exc["layer"]
            check("cnn layer 1: BatchNorm2d(32) over 16 x 28 x 28 values per channel",
                  Lc["repr"].startswith("BatchNorm2d") and Lc["input_shape"] == [16, 32, 28, 28] and
                  Lc["values_per_feature"] == 16 * 28 * 28 and Lc["count"] == 4, Lc)
            check("cnn: population over the 600 training images of --data",
                  exc["population"]["examples"] == 600, exc["population"])
            check_batch("cnn layer 1", exc, read_safetensors(os.path.join(cd, "batch.safetensors")))
            check_normalized("cnn layer 1", exc)
            expect_error("cnn --layer 5 out of range",
                         run("explain", "--checkpoint", os.path.join(cnn, "bn.safetensors"), "--data",
                             small, "--layer", "5", "--out", os.path.join(tmp, "x5")),
                         "4 BatchNorm layers")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
