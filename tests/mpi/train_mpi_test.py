#!/usr/bin/env python3
"""Data-parallel `bnorm train` under mpirun, and how it fails (standard library only).

  train_mpi_test.py BNORM_EXECUTABLE

Runs (each short, on the paper-mlp preset, one on cnn):
  * 1 process, then 2 and 3 MPI ranks with --sync-bn and the same global batch: the K-rank runs
    follow the 1-process run within the stated tolerance, the replicas stay identical (checked
    by the trainer), only rank 0 writes, and the checkpoint reloads with `bnorm eval`;
  * 2 ranks with --sync-bn --precise-bn (pooled precise statistics) against 1 process, and
    --ghost-batch / --batch-renorm refused with --sync-bn;
  * 2 ranks without --sync-bn (local batch norm, rank 0's running statistics kept);
  * faults, each of which must end every rank with a clear error within 60 s and leave no
    half-written file: a rank whose data is corrupt (setup), a rank that fails mid-run, a rank
    that exits abruptly, a rank killed with SIGKILL, a rank that hangs (BNORM_COMM_TIMEOUT).
Exits 77 ("skipped: ...") when mpirun or Fashion-MNIST is absent.
"""
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

EXE = sys.argv[1]
DATA = os.environ.get("BNORM_TEST_DATA", "/usr/share/datasets/fashion-mnist")
MPIRUN = shutil.which("mpirun") or shutil.which("mpiexec")
FAULT_DEADLINE = 60.0  # seconds from the fault to every rank's end
# A K-rank run with sync BN follows the 1-process run with the same global batch: the steps
# differ only by the rounding of the gradient sums (split across ranks), which grows over the
# run. After 200 steps of paper-mlp we require the losses within 2 % and the test accuracies
# within 1.5 points.
LOSS_REL_TOL = 0.02
ACC_TOL = 0.015
failures = []


def check(name, cond, detail=""):
    print(("ok   " if cond else "FAIL ") + name + ("" if cond else f": {detail}"), flush=True)
    if not cond:
        failures.append(name)


def mpi_flags():
    flags = ["--oversubscribe"]
    if os.getuid() == 0:
        flags.append("--allow-run-as-root")
    return flags


def mpirun(np, args, env_vars=(), extra_apps=()):
    """The mpirun command line for np ranks of `bnorm args` (plus MPMD apps ': -np 1 ...')."""
    cmd = [MPIRUN, *mpi_flags()]
    for v in env_vars:
        cmd += ["-x", v]
    cmd += ["-np", str(np), EXE, *args]
    for app in extra_apps:
        cmd += [":", "-np", "1", EXE, *app]
    return cmd


def run(cmd, env=None, timeout=300):
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    return p, time.monotonic() - t0


def train_args(out, preset="paper-mlp", steps=200, extra=()):
    return ["train", "--preset", preset, "--steps", str(steps), "--eval-every", str(steps // 2),
            "--only", "bn", "--no-plots", "--threads", "1", "--data", DATA, "--out", out, *extra]


def report(out):
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def leftovers(out):
    """Temporary or partial files a failed run must not leave."""
    if not os.path.isdir(out):
        return []
    return [n for n in os.listdir(out) if ".tmp" in n or n.startswith(".bnorm-write-test")]


def check_checkpoint(name, out):
    path = os.path.join(out, "bn.safetensors")
    if not os.path.exists(path):
        return
    # A checkpoint that exists must be whole: bnorm eval loads it.
    p, _ = run([EXE, "eval", "--checkpoint", path, "--data", DATA])
    check(name + ": a checkpoint left behind is whole", p.returncode == 0, p.stderr)


def main():
    if MPIRUN is None:
        print("skipped: mpirun not found")
        return 77
    if not os.path.exists(os.path.join(DATA, "train-images-idx3-ubyte.gz")):
        print(f"skipped: Fashion-MNIST not found in {DATA} (apt-get install dataset-fashion-mnist)")
        return 77
    env = dict(os.environ, BNORM_NUM_THREADS="1")
    tmp = tempfile.mkdtemp(prefix="bnorm-mpi-train-")
    try:
        # --- Data parallel with sync BN follows one process -------------------------------
        one = os.path.join(tmp, "one")
        p, _ = run([EXE, *train_args(one)], env=env)
        check("1 process trains", p.returncode == 0, p.stderr[-2000:])
        base = report(one)["runs"][0]
        for k in (2, 3):
            out = os.path.join(tmp, f"np{k}")
            p, secs = run(mpirun(k, train_args(out, extra=["--sync-bn"])), env=env)
            check(f"{k} ranks with --sync-bn train", p.returncode == 0, p.stderr[-2000:])
            if p.returncode != 0:
                continue
            r = report(out)
            run0 = r["runs"][0]
            d = r.get("distributed", {})
            check(f"{k} ranks: the report names {k} MPI ranks and sync BN",
                  d.get("ranks") == k and d.get("communicator") == "mpi" and d.get("sync_bn"), d)
            rd = run0.get("distributed", {})
            check(f"{k} ranks: replicas checked identical at start, each evaluation and the end",
                  rd.get("replica_checks_passed", 0) >= 4, rd)
            progress_lines = [l for l in p.stderr.splitlines() if l.startswith("with BN: step")]
            check(f"{k} ranks: only rank 0 prints progress",
                  len(progress_lines) == len(set(progress_lines)), progress_lines[:6])
            for i, (a, b) in enumerate(zip(run0["curve"]["train_loss"], base["curve"]["train_loss"])):
                if a is None or b is None:
                    continue
                check(f"{k} ranks: train loss at evaluation {i} within {LOSS_REL_TOL:.0%} of 1 "
                      f"process ({a:.5f} vs {b:.5f})", abs(a - b) <= LOSS_REL_TOL * abs(b))
            a, b = run0["final"]["test_accuracy"], base["final"]["test_accuracy"]
            check(f"{k} ranks: test accuracy within {ACC_TOL * 100:.1f} points of 1 process "
                  f"({a:.4f} vs {b:.4f})", abs(a - b) <= ACC_TOL)
            p2, _ = run([EXE, "eval", "--checkpoint", os.path.join(out, "bn.safetensors"),
                         "--data", DATA])
            check(f"{k} ranks: rank 0's checkpoint reloads with the reported accuracy",
                  p2.returncode == 0 and f"{100 * a:.2f}%" in p2.stdout, p2.stdout + p2.stderr)

        # --- Precise statistics with sync BN: pooled over the ranks ------------------------
        # The synchronized layers see the global batch: 2 ranks recompute the 1-process
        # statistics (up to the ranks' rounding), and the checkpoint has them.
        one_p = os.path.join(tmp, "one-precise")
        p, _ = run([EXE, *train_args(one_p, extra=["--precise-bn", "10"])], env=env)
        check("1 process with --precise-bn trains", p.returncode == 0, p.stderr[-2000:])
        out = os.path.join(tmp, "np2-precise")
        p, _ = run(mpirun(2, train_args(out, extra=["--sync-bn", "--precise-bn", "10"])), env=env)
        check("2 ranks with --sync-bn --precise-bn train", p.returncode == 0, p.stderr[-2000:])
        if p.returncode == 0 and os.path.exists(os.path.join(one_p, "report.json")):
            a = report(out)["runs"][0].get("precise_bn", {})
            b = report(one_p)["runs"][0].get("precise_bn", {})
            check("2 ranks: precise statistics from 10 global batches of 60 samples",
                  a.get("batches") == 10 and a.get("samples") == 600, a)
            check(f"2 ranks: accuracy after precise statistics within {ACC_TOL * 100:.1f} points "
                  f"of 1 process ({a.get('test_accuracy_after')} vs {b.get('test_accuracy_after')})",
                  abs(a.get("test_accuracy_after", 9) - b.get("test_accuracy_after", -9)) <= ACC_TOL)
            p2, _ = run([EXE, "eval", "--checkpoint", os.path.join(out, "bn.safetensors"),
                         "--data", DATA])
            want = f"{100 * a.get('test_accuracy_after', -1):.2f}%"
            check("2 ranks: the checkpoint has the precise statistics",
                  p2.returncode == 0 and want in p2.stdout, p2.stdout + p2.stderr)
        # Synchronized batch norm has no ghost batches or batch renorm: refused at setup.
        for extra, needle in ((["--ghost-batch", "10"], "--ghost-batch: cannot be combined with --sync-bn"),
                              (["--batch-renorm"], "--batch-renorm: cannot be combined with --sync-bn")):
            out = os.path.join(tmp, "refused")
            p, _ = run(mpirun(2, train_args(out, extra=["--sync-bn", *extra])), env=env)
            check(f"2 ranks: --sync-bn {' '.join(extra)} refused",
                  p.returncode != 0 and needle in p.stderr, p.stderr[-2000:])
            check(f"2 ranks: --sync-bn {' '.join(extra)} writes nothing", not os.path.exists(out))

        # --- Without sync BN: local statistics, rank 0's buffers ---------------------------
        out = os.path.join(tmp, "local")
        p, _ = run(mpirun(2, train_args(out, steps=60)), env=env)
        check("2 ranks without --sync-bn train (replicas identical)", p.returncode == 0,
              p.stderr[-2000:])

        # --- cnn: the convolutional layers' sync BN over 2 ranks ---------------------------
        out = os.path.join(tmp, "cnn")
        p, _ = run(mpirun(2, train_args(out, preset="cnn", steps=6, extra=["--sync-bn"])), env=env)
        check("cnn on 2 ranks with --sync-bn trains", p.returncode == 0, p.stderr[-2000:])

        # --- Faults -------------------------------------------------------------------------
        # A rank whose data is corrupt: every rank ends at setup, naming the rank.
        bad = os.path.join(tmp, "bad-data")
        os.makedirs(bad)
        for name in os.listdir(DATA):
            shutil.copy(os.path.join(DATA, name), bad)
        with gzip.open(os.path.join(bad, "train-labels-idx1-ubyte.gz"), "wb") as f:
            f.write(b"\x00\x00\x08\x01 truncated")
        out = os.path.join(tmp, "fault-setup")
        bad_app = [a if a != DATA else bad for a in train_args(out)]
        p, secs = run(mpirun(1, train_args(out), extra_apps=[bad_app]), env=env, timeout=120)
        err = p.stdout + p.stderr
        # Rank 1 names its file and aborts the job; rank 0, if it gets there first, names rank 1.
        check("corrupt data on rank 1: the job ends with an error naming the rank and the file",
              p.returncode != 0 and "bnorm: rank 1: " in err and "train-labels" in err,
              f"exit {p.returncode}: {err[-1500:]}")
        check(f"corrupt data on rank 1: ends within {FAULT_DEADLINE:.0f} s ({secs:.1f} s)",
              secs < FAULT_DEADLINE)
        check("corrupt data on rank 1: no file left half-written", not leftovers(out), leftovers(out))

        faults = [
            ("error", "a rank that fails mid-run",
             re.escape("bnorm: rank 1: bad input (fault injection) on rank 1 at step 40")),
            ("exit", "a rank that exits abruptly", "rank 1 exits at step 40"),
            ("hang", "a rank that hangs", "waited [0-9.]+ s for the other ranks"),
        ]
        for kind, what, needle in faults:
            out = os.path.join(tmp, f"fault-{kind}")
            fenv = dict(env, BNORM_FAULT_INJECT=f"{kind}:1:40", BNORM_COMM_TIMEOUT="5")
            p, secs = run(mpirun(2, train_args(out, extra=["--sync-bn"]),
                                 env_vars=["BNORM_FAULT_INJECT", "BNORM_COMM_TIMEOUT"]),
                          env=fenv, timeout=120)
            err = p.stdout + p.stderr
            check(f"{what}: the job fails with a clear message",
                  p.returncode != 0 and re.search(needle, err) is not None,
                  f"exit {p.returncode}: {err[-1500:]}")
            check(f"{what}: every rank ends within {FAULT_DEADLINE:.0f} s ({secs:.1f} s)",
                  secs < FAULT_DEADLINE)
            check(f"{what}: no file left half-written", not leftovers(out), leftovers(out))
            check_checkpoint(what, out)

        # A rank killed with SIGKILL once training has started.
        out = os.path.join(tmp, "fault-kill")
        proc = subprocess.Popen(mpirun(2, train_args(out, steps=200000, extra=["--sync-bn"])),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, start_new_session=True)
        started = time.monotonic()
        ranks = []
        while time.monotonic() - started < 60 and len(ranks) < 2:
            time.sleep(0.5)
            ps = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
            ranks = [int(x) for x in ps.stdout.split()]
        time.sleep(3)  # into the training loop
        killed_at = time.monotonic()
        if ranks:
            os.kill(ranks[-1], signal.SIGKILL)
        try:
            output, _ = proc.communicate(timeout=FAULT_DEADLINE + 30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        secs = time.monotonic() - killed_at
        check("a rank killed with SIGKILL: the job fails", bool(ranks) and proc.returncode != 0,
              f"ranks {ranks}, exit {proc.returncode}: {output[-1500:]}")
        check(f"a rank killed with SIGKILL: every rank ends within {FAULT_DEADLINE:.0f} s "
              f"({secs:.1f} s)", secs < FAULT_DEADLINE)
        check("a rank killed with SIGKILL: no file left half-written", not leftovers(out),
              leftovers(out))
        check_checkpoint("a rank killed with SIGKILL", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{len(failures)} failed" if failures else "all passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
