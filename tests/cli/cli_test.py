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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
