#!/usr/bin/env python3
"""End-to-end tests of the `bnorm` command-line tool (standard library only).

  cli_test.py BNORM_EXECUTABLE

A short `bnorm train` writes report.json and two checkpoints; `bnorm eval` reloads each and
prints the accuracy the report recorded. Then every bad input of the issue: unknown preset or
option, missing or corrupt data, checkpoints of another architecture or with missing, extra or
mis-shaped tensors, an unwritable output directory. Each must give a one-line error naming the
problem and a non-zero exit code, and leave no half-written file behind.
"""
import gzip
import json
import re
import os
import shutil
import struct
import subprocess
import sys
import tempfile

EXE = sys.argv[1]
DATA = os.environ.get("BNORM_TEST_DATA", "/usr/share/datasets/fashion-mnist")
failures = []


def run(*args, env=None):
    return subprocess.run([EXE, *args], capture_output=True, text=True, env=env, timeout=600)


def check(name, cond, detail=""):
    print(("ok   " if cond else "FAIL ") + name + ("" if cond else f": {detail}"))
    if not cond:
        failures.append(name)


def expect_error(name, proc, *needles):
    err = proc.stderr.strip()
    lines = [l for l in err.splitlines() if l.strip()]
    last = lines[-1] if lines else ""
    ok = proc.returncode != 0 and all(n in err for n in needles)
    check(name, ok, f"exit {proc.returncode}, stderr {err!r}")
    return last


def read_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    return header, data


def write_safetensors(path, header, data):
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def read_tensors(path):
    """The tensors of a safetensors file: name -> list of values (F32 or I64), and its metadata."""
    header, data = read_header(path)
    meta = header.pop("__metadata__", {})
    out = {}
    for name, t in header.items():
        b, e = t["data_offsets"]
        code = {"F32": "f", "I64": "q"}[t["dtype"]]
        out[name] = list(struct.unpack(f"<{(e - b) // struct.calcsize(code)}{code}", data[b:e]))
    return out, meta


def bn_extensions(tmp):
    """bnorm train's batch-norm options: each recorded in report.json's config, acting on the BN
    network as it says (checked on the checkpoint's state), bad values refused naming the option."""
    common = ["train", "--only", "bn", "--no-plots", "--eval-every", "100"]

    def train(name, *args):
        out = os.path.join(tmp, name)
        p = run(*common, "--out", out, *args)
        check(f"train {' '.join(args)}", p.returncode == 0, p.stderr[-2000:])
        if p.returncode != 0:
            return None, None, None
        report = json.load(open(os.path.join(out, "report.json")))
        state, meta = read_tensors(os.path.join(out, "bn.safetensors"))
        return report, state, meta

    base, base_state, _ = train("base", "--steps", "200")
    check("without the options, config has none of them",
          not {"ghost_batch", "batch_renorm", "freeze_bn_stats_after", "freeze_bn_affine_after",
               "precise_bn"} & set(base["config"]), base["config"])
    bn_layers = ("1", "4", "7")  # the paper MLP's BatchNorm1d indices
    check("plain BN: one running-statistics update per step",
          all(base_state[f"{i}.num_batches_tracked"] == [200] for i in bn_layers))

    # Ghost batches: one update per chunk of G, statistics per chunk (train mode differs).
    ghost, state, meta = train("ghost", "--steps", "200", "--ghost-batch", "20")
    if ghost:
        check("ghost: config records ghost_batch", ghost["config"].get("ghost_batch") == 20,
              ghost["config"])
        check("ghost: 3 chunks of 20 per batch of 60, one update each",
              all(state[f"{i}.num_batches_tracked"] == [600] for i in bn_layers),
              [state[f"{i}.num_batches_tracked"] for i in bn_layers])
        check("ghost: the checkpoint says how it was trained",
              "ghost_batch=20" in meta.get("batch_norm_training", ""), meta)
        check("ghost: trains otherwise than plain BN",
              state["1.weight"] != base_state["1.weight"])
        p = run("eval", "--checkpoint", os.path.join(tmp, "ghost", "bn.safetensors"))
        want = f"test accuracy {100 * ghost['runs'][0]['final']['test_accuracy']:.2f}%"
        check("ghost: bnorm eval reads the checkpoint (the eval-mode architecture)",
              p.returncode == 0 and want in p.stdout, p.stdout + p.stderr)

    # Batch renorm: the schedule's defaults (10 % warm-up, 40 % ramp) and given values.
    renorm, state, meta = train("renorm", "--steps", "200", "--batch-renorm")
    if renorm:
        check("renorm: config records the schedule's defaults",
              renorm["config"].get("batch_renorm") == {"rmax": 3.0, "dmax": 5.0,
                                                      "warmup_steps": 20, "ramp_steps": 80},
              renorm["config"].get("batch_renorm"))
        check("renorm: the checkpoint says how it was trained",
              "batch_renorm rmax=3 dmax=5 warmup=20 ramp=80" in meta.get("batch_norm_training", ""),
              meta)
        check("renorm: trains otherwise than plain BN", state["1.weight"] != base_state["1.weight"])
    # rmax = 1, dmax = 0 throughout (a warm-up longer than the run) is batch norm: the same
    # network up to rounding (y = xhat * 1 + 0 is computed otherwise).
    warm, state, _ = train("renorm-warm", "--steps", "200", "--batch-renorm", "--renorm-warmup",
                           "1000", "--renorm-rmax", "2", "--renorm-dmax", "1")
    if warm:
        check("renorm: given values recorded",
              warm["config"].get("batch_renorm") == {"rmax": 2.0, "dmax": 1.0,
                                                    "warmup_steps": 1000, "ramp_steps": 80},
              warm["config"].get("batch_renorm"))
        diff = max(abs(a - b) for a, b in zip(state["1.running_mean"], base_state["1.running_mean"]))
        check(f"renorm with rmax = 1, dmax = 0 is batch norm (running mean within 1e-3: {diff:.2g})",
              diff < 1e-3)

    # Freezes from a step on, orthogonal: weight and bias at step 100, statistics at 150. With
    # momentum and weight decay the frozen weight and bias must not move at all.
    opt = ["--momentum", "0.9", "--weight-decay", "0.001"]
    _, at100, _ = train("at100", "--steps", "100", *opt)
    frozen, state, meta = train("frozen", "--steps", "200", "--freeze-bn-affine-after", "100",
                                "--freeze-bn-stats-after", "150", *opt)
    if frozen and at100:
        check("freeze: config records both steps",
              frozen["config"].get("freeze_bn_affine_after") == 100
              and frozen["config"].get("freeze_bn_stats_after") == 150, frozen["config"])
        check("freeze: weight and bias are those of step 100 (bitwise)",
              all(state[f"{i}.{t}"] == at100[f"{i}.{t}"] for i in bn_layers
                  for t in ("weight", "bias")))
        check("freeze: the Linear layers kept training", state["0.weight"] != at100["0.weight"])
        check("freeze: the running statistics were updated until step 150",
              all(state[f"{i}.num_batches_tracked"] == [150] for i in bn_layers),
              [state[f"{i}.num_batches_tracked"] for i in bn_layers])

    # Precise statistics: the network of the base run, its statistics recomputed from 20
    # batches; accuracy before and after, the checkpoint with the new statistics.
    precise, state, meta = train("precise", "--steps", "200", "--precise-bn", "20")
    if precise:
        pb = precise["runs"][0].get("precise_bn", {})
        check("precise: config records batches and the default aggregation (mean)",
              precise["config"].get("precise_bn") == {"batches": 20, "aggregation": "mean"},
              precise["config"])
        check("precise: 20 batches of 60 samples", pb.get("batches") == 20 and pb.get("samples") == 1200, pb)
        check("precise: accuracy before is the base run's",
              pb.get("test_accuracy_before") == base["runs"][0]["final"]["test_accuracy"],
              (pb, base["runs"][0]["final"]))
        check("precise: final accuracy is the one after",
              pb.get("test_accuracy_after") == precise["runs"][0]["final"]["test_accuracy"], pb)
        check("precise: same weights as the base run, other running statistics",
              state["1.weight"] == base_state["1.weight"]
              and state["1.running_var"] != base_state["1.running_var"])
        check("precise: num_batches_tracked unchanged",
              state["1.num_batches_tracked"] == base_state["1.num_batches_tracked"])
        p = run("eval", "--checkpoint", os.path.join(tmp, "precise", "bn.safetensors"))
        want = f"test accuracy {100 * pb.get('test_accuracy_after', -1):.2f}%"
        check("precise: the checkpoint has the precise statistics (bnorm eval)",
              p.returncode == 0 and want in p.stdout, p.stdout + p.stderr)
        pop, pop_state, _ = train("population", "--steps", "200", "--precise-bn", "20",
                                  "--precise-bn-aggregation", "population")
        if pop:
            # Equal batches: the same mean either way; the variances are two estimates of the
            # same one (the population's adds the spread of the batch means, weights by n - 1).
            mean_diff = max(abs(a - b) for a, b in zip(pop_state["1.running_mean"], state["1.running_mean"]))
            var_rel = max(abs(a - b) / b for a, b in zip(pop_state["1.running_var"], state["1.running_var"]))
            check("precise: population aggregation recorded",
                  pop["config"]["precise_bn"]["aggregation"] == "population", pop["config"])
            check(f"precise: population mean = mean of batch means ({mean_diff:.2g})", mean_diff < 1e-5)
            check(f"precise: population variance differs from the mean of batch variances, by "
                  f"< 10 % ({var_rel:.2g})",
                  pop_state["1.running_var"] != state["1.running_var"] and var_rel < 0.1)
        report_md = os.path.join(tmp, "precise-md")
        p = run("train", "--only", "bn", "--steps", "50", "--precise-bn", "5", "--out", report_md)
        if "plots skipped: no python3 with matplotlib" in p.stderr:
            check("precise: report.md needs matplotlib, which is absent (said so)", p.returncode == 0)
        else:
            md = os.path.join(report_md, "report.md")
            check("precise: report.md has the before/after table",
                  p.returncode == 0 and "## Precise batch statistics" in open(md).read(),
                  p.stderr[-2000:])

    # Bad values: refused before anything is written, naming the option.
    bad = os.path.join(tmp, "bad-ext")
    for args, needle in (
            (["--ghost-batch", "1"], "--ghost-batch: 1 is not >= 2"),
            (["--ghost-batch", "61"], "--ghost-batch: 61 exceeds the batch size 60"),
            (["--ghost-batch", "59"], "--ghost-batch: batches of 60 in chunks of 59 leave a last chunk of 1"),
            (["--ghost-batch", "20", "--batch-renorm"], "--ghost-batch: cannot be combined with --batch-renorm"),
            (["--renorm-rmax", "2"], "--renorm-rmax: needs --batch-renorm"),
            (["--batch-renorm", "--renorm-rmax", "0.5"], "--renorm-rmax: 0.5 is not a finite value >= 1"),
            (["--batch-renorm", "--renorm-dmax", "-1"], "--renorm-dmax: -1 is not a finite value >= 0"),
            (["--batch-renorm", "--renorm-warmup", "-3"], "--renorm-warmup: -3 is not >= 0"),
            (["--batch-renorm", "--renorm-ramp", "-1"], "--renorm-ramp: -1 is not >= 0"),
            (["--steps", "100", "--freeze-bn-stats-after", "100"],
             "--freeze-bn-stats-after: 100 is not a step in [0, 100)"),
            (["--freeze-bn-affine-after", "-2"], "--freeze-bn-affine-after: -2 is not a step"),
            (["--precise-bn", "0"], "--precise-bn: 0 batches is not >= 1"),
            (["--precise-bn-aggregation", "population"], "--precise-bn-aggregation: needs --precise-bn"),
            (["--precise-bn", "5", "--precise-bn-aggregation", "median"],
             "--precise-bn-aggregation: 'median' (expected mean or population)"),
            (["--precise-bn", "5", "--freeze-bn-stats-after", "3"],
             "--precise-bn: cannot be combined with --freeze-bn-stats-after"),
            (["--only", "plain", "--ghost-batch", "4"], "--ghost-batch: acts on batch norm"),
            (["--only", "plain", "--precise-bn", "3"], "--precise-bn: acts on batch norm")):
        expect_error(f"refused: {' '.join(args)}", run("train", *args, "--out", bad), needle)
    check("nothing written for refused batch-norm options", not os.path.exists(bad))


def small_batch_study(tmp):
    """A tiny --small-batch-study: the table's structure in report.json and report.md, the plot."""
    out = os.path.join(tmp, "study")
    p = run("train", "--small-batch-study", "--study-batch-sizes", "4,8", "--study-examples", "240",
            "--out", out)
    check("study runs", p.returncode == 0, p.stderr[-2000:])
    if p.returncode != 0:
        return
    report = json.load(open(os.path.join(out, "report.json")))
    st = report.get("small_batch_study", {})
    rows = st.get("rows", [])
    methods = ["BN", "BN + precise statistics", "ghost BN", "batch renorm"]
    check("study: 4 methods at batch 4 and 8",
          [(r["batch_size"], r["method"]) for r in rows] == [(b, m) for b in (4, 8) for m in methods],
          [(r.get("batch_size"), r.get("method")) for r in rows])
    check("study: steps = examples / batch", [r["steps"] for r in rows] == [60] * 4 + [30] * 4,
          [r.get("steps") for r in rows])
    check("study: ghost batch is half the batch",
          [r["ghost_batch"] for r in rows if r["method"] == "ghost BN"] == [2, 4])
    check("study: precise statistics from 4800 samples",
          [r["precise_bn_batches"] for r in rows if r["method"] == "BN + precise statistics"] == [1200, 600])
    check("study: accuracies are fractions and the gap is train mode - eval mode",
          all(0 <= r["test_accuracy"] <= 1 and 0 <= r["test_accuracy_train_mode"] <= 1
              and abs(r["train_eval_gap"] - (r["test_accuracy_train_mode"] - r["test_accuracy"])) < 1e-12
              for r in rows), rows)
    check("study: precise statistics share the BN run's train mode",
          all(rows[k]["test_accuracy_train_mode"] == rows[k + 1]["test_accuracy_train_mode"]
              for k in (0, 4)))
    check("study: config records the study", report["config"].get("study_batch_sizes") == [4, 8]
          and report["config"].get("study_examples") == 240, report["config"])
    check("study: one run per batch size and trained method", len(report["runs"]) == 6)
    if "plots skipped: no python3 with matplotlib" in p.stderr:
        check("study: report.md needs matplotlib, which is absent (said so)", True)
    else:
        md = open(os.path.join(out, "report.md")).read()
        check("study: report.md has the table and the plot",
              "## Small-batch study" in md and "| 4 | ghost BN (G = 2) |" in md
              and "small_batch_study.png" in md
              and os.path.exists(os.path.join(out, "small_batch_study.png")), md[-3000:])
    for args, needle in ((["--batch-size", "8"], "--small-batch-study: sets --batch-size itself"),
                         (["--precise-bn", "3"], "--small-batch-study: sets --precise-bn itself"),
                         (["--study-batch-sizes", "5"], "--study-batch-sizes: 5 is not an even batch size"),
                         (["--study-examples", "10"], "--study-examples: 10 is less than one batch of 60")):
        expect_error(f"study refused: {' '.join(args)}",
                     run("train", "--small-batch-study", *args, "--out", out + "x"), needle)
    expect_error("study options need the study", run("train", "--study-examples", "100", "--out", out + "x"),
                 "--study-examples: needs --small-batch-study")
    check("nothing written by a refused study", not os.path.exists(out + "x"))


def main():
    if not os.path.isdir(DATA):
        print(f"skipped: dataset-fashion-mnist not installed ({DATA} missing)")
        return 77
    tmp = tempfile.mkdtemp(prefix="bnorm-cli-test-")
    try:
        out = os.path.join(tmp, "run")
        p = run("train", "--steps", "300", "--eval-every", "150", "--out", out, "--no-plots",
                "--lr-sweep", "0.5", "--sweep-steps", "50")
        check("train runs", p.returncode == 0, p.stderr[-2000:])
        report = json.load(open(os.path.join(out, "report.json")))
        check("report has both runs", [r["name"] for r in report["runs"]] == ["with BN", "without BN"])
        bn = report["runs"][0]
        check("curve has 3 points (steps 0, 150, 300)", bn["curve"]["step"] == [0, 150, 300],
              bn["curve"]["step"])
        check("sigmoid percentiles ordered",
              all(a <= b <= c for a, b, c in zip(bn["sigmoid_input"]["p15"], bn["sigmoid_input"]["p50"],
                                                  bn["sigmoid_input"]["p85"])))
        check("accuracy better than chance", bn["final"]["test_accuracy"] > 0.5, bn["final"])
        check("lr sweep recorded", len(report["lr_sweep"]) == 2, report.get("lr_sweep"))
        check("no temp files left", not [f for f in os.listdir(out) if "tmp" in f], os.listdir(out))

        for run_ in report["runs"]:
            ck = os.path.join(out, run_["checkpoint"])
            p = run("eval", "--checkpoint", ck)
            want = f"test accuracy {100 * run_['final']['test_accuracy']:.2f}%"
            check(f"eval reproduces {run_['name']} ({want})", p.returncode == 0 and want in p.stdout,
                  p.stdout + p.stderr)
        # eval needs only the test files: a directory holding just those will do.
        test_only = os.path.join(tmp, "test-only")
        os.mkdir(test_only)
        for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
            shutil.copy(os.path.join(DATA, f), test_only)
        ck = os.path.join(out, report["runs"][0]["checkpoint"])
        p = run("eval", "--checkpoint", ck, "--data", test_only)
        want = f"test accuracy {100 * report['runs'][0]['final']['test_accuracy']:.2f}%"
        check("eval --data DIR with only the test files", p.returncode == 0 and want in p.stdout,
              p.stdout + p.stderr)
        os.remove(os.path.join(test_only, "t10k-labels-idx1-ubyte.gz"))
        expect_error("eval without the test labels", run("eval", "--checkpoint", ck, "--data", test_only),
                     "t10k-labels-idx1-ubyte")

        # fold: the BN checkpoint folded into its Linear layers computes the same logits, and the
        # folded checkpoint (the plain architecture) evaluates to the same accuracy.
        folded = os.path.join(tmp, "folded.safetensors")
        p = run("fold", "--checkpoint", ck, "--out", folded)
        check("fold runs", p.returncode == 0 and os.path.exists(folded), p.stdout + p.stderr)
        m = re.search(r"largest logit difference (\S+) .* accuracy (\S+)% -> (\S+)%", p.stdout)
        check("fold reports the logit difference and both accuracies", m is not None, p.stdout)
        if m:
            check("folded logits within 1e-4 of the original", float(m.group(1)) < 1e-4, m.group(1))
            check("fold keeps the accuracy", m.group(2) == m.group(3), p.stdout)
        p = run("eval", "--checkpoint", folded)
        check("eval of the folded checkpoint: same accuracy, without batch norm",
              p.returncode == 0 and want in p.stdout and "without batch norm" in p.stdout,
              p.stdout + p.stderr)
        expect_error("fold of a model without batch norm",
                     run("fold", "--checkpoint", folded, "--out", os.path.join(tmp, "f2.safetensors")),
                     "without batch norm: nothing to fold")
        expect_error("fold onto its input", run("fold", "--checkpoint", ck, "--out", ck),
                     "is the input checkpoint")
        check("nothing written by a refused fold", not os.path.exists(os.path.join(tmp, "f2.safetensors")))

        # Bad command lines.
        expect_error("unknown preset", run("train", "--preset", "resnet", "--out", out + "x"),
                     "unknown preset 'resnet'")
        expect_error("unknown option", run("train", "--bogus", "--out", out + "x"), "--bogus")
        expect_error("batch size 1", run("train", "--batch-size", "1", "--out", out + "x"), "--batch-size")
        expect_error("negative lr", run("train", "--lr", "-1", "--out", out + "x"), "--lr")
        expect_error("unknown augmentation", run("train", "--augment", "rotate", "--out", out + "x"),
                     "'rotate' (expected none, flip, crop or flip+crop)")
        check("no output dir for a bad command line", not os.path.exists(out + "x"))

        # Data: missing directory, truncated file, bad label.
        expect_error("missing data", run("train", "--data", os.path.join(tmp, "nowhere"),
                                         "--out", os.path.join(tmp, "o1")), "nowhere")
        bad = os.path.join(tmp, "bad-data")
        shutil.copytree(DATA, bad)
        with gzip.open(os.path.join(DATA, "t10k-labels-idx1-ubyte.gz")) as f:
            labels = bytearray(f.read())
        labels[8 + 5] = 42
        with gzip.open(os.path.join(bad, "t10k-labels-idx1-ubyte.gz"), "wb") as f:
            f.write(bytes(labels))
        expect_error("label out of range", run("train", "--data", bad, "--out", os.path.join(tmp, "o2")),
                     "t10k-labels", "42")
        with gzip.open(os.path.join(bad, "t10k-labels-idx1-ubyte.gz"), "wb") as f:
            f.write(bytes(labels[:5000]))
        expect_error("truncated labels", run("train", "--data", bad, "--out", os.path.join(tmp, "o2")),
                     "t10k-labels")
        check("nothing written after bad data", not os.path.exists(os.path.join(tmp, "o2")))

        # Unwritable output directory (root can write anywhere: use a path under a file).
        blocker = os.path.join(tmp, "a-file")
        open(blocker, "w").close()
        expect_error("unwritable output", run("train", "--steps", "10", "--out", os.path.join(blocker, "sub")),
                     "output directory")

        # Checkpoints: another architecture, missing / extra / mis-shaped tensors, not a file.
        bn_ck = os.path.join(out, "bn.safetensors")
        plain_ck = os.path.join(out, "plain.safetensors")
        expect_error("architecture mismatch", run("eval", "--checkpoint", plain_ck, "--batch-norm", "on"),
                     "another architecture")
        header, data = read_header(bn_ck)
        meta = header.pop("__metadata__")

        def variant(name, mutate):
            h = json.loads(json.dumps(header))
            d = bytearray(data)
            h, d = mutate(h, d)
            h["__metadata__"] = meta
            path = os.path.join(tmp, name + ".safetensors")
            write_safetensors(path, h, bytes(d))
            return path

        def drop(h, d, key="1.running_var"):
            b, e = h[key]["data_offsets"]
            del h[key]
            for v in h.values():
                if v["data_offsets"][0] >= e:
                    v["data_offsets"] = [v["data_offsets"][0] - (e - b), v["data_offsets"][1] - (e - b)]
            return h, d[:b] + d[e:]

        expect_error("missing tensor", run("eval", "--checkpoint", variant("missing", drop)),
                     "missing", "1.running_var")

        def extra(h, d):
            h["99.weight"] = {"dtype": "F32", "shape": [1], "data_offsets": [len(d), len(d) + 4]}
            return h, d + b"\0\0\0\0"
        expect_error("extra tensor", run("eval", "--checkpoint", variant("extra", extra)),
                     "unexpected", "99.weight")

        def reshape(h, d):
            h["0.weight"]["shape"] = [784, 100]
            return h, d
        expect_error("mis-shaped tensor", run("eval", "--checkpoint", variant("shape", reshape)),
                     "0.weight", "[784, 100]")

        old = variant("old", lambda h, d: drop(h, d, "1.num_batches_tracked"))
        p = run("eval", "--checkpoint", old)
        check("checkpoint without num_batches_tracked loads", p.returncode == 0, p.stderr)

        expect_error("not a checkpoint", run("eval", "--checkpoint", os.path.join(DATA, "t10k-labels-idx1-ubyte.gz")),
                     "t10k-labels")
        expect_error("missing checkpoint", run("eval", "--checkpoint", os.path.join(tmp, "none.safetensors")),
                     "none.safetensors")

        bn_extensions(tmp)
        small_batch_study(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
