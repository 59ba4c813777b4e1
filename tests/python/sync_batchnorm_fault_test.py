"""bnorm.torch.SyncBatchNorm when a rank fails: the others end with an error, no hang.

Three gloo processes (sync_batchnorm_test.py's launcher, a group timeout of TIMEOUT_S):
  * "exit": rank 1 exits after the group is up, before its first forward;
  * "raise": rank 1's all-reduce raises inside the library's callback; rank 1 must see that
    exception from its forward with its module's buffers untouched, then stays alive without
    taking part, so the others can only end at the group's timeout.
Every other rank must end with an error (exit 1) within TIMEOUT_S + 10 s of its call (it is
killed, and the test fails, if still running after WORKER_LIMIT_S).

Exit 0 on success, 1 on a failure, 77 when torch or gloo is missing.
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sync_batchnorm_test as base  # noqa: E402  (exits 77 without torch)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import bnorm.torch as bt  # noqa: E402

TIMEOUT_S = 10
WORKER_LIMIT_S = base.WORKER_LIMIT_S
fail = base.fail


def worker(case, rank, world, store, outdir):
    torch.set_num_threads(1)
    # Rank 1 fails in the first forward, the others must end with an error.
    base.init_group(rank, world, store, TIMEOUT_S)
    m = bt.SyncBatchNorm(3)
    x = torch.randn(4, 3, 5)
    dist.barrier()  # every rank is up; the fault comes after
    report = os.path.join(outdir, "rank%d.txt" % rank)
    if rank == 1 and case == "exit":
        os._exit(3)
    if rank == 1 and case == "raise":
        def broken(*args, **kwargs):
            raise ConnectionError("injected failure in rank 1's all-reduce")
        dist.all_reduce = broken  # what bnorm's callback calls
        before = (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        try:
            m(x)
            msg = "no exception"
        except ConnectionError as e:
            untouched = (torch.equal(before[0], m.running_mean) and
                         torch.equal(before[1], m.running_var) and
                         torch.equal(before[2], m.num_batches_tracked))
            msg = "own exception: %s; buffers untouched: %s" % (e, untouched)
        except BaseException as e:  # noqa: B902
            msg = "other exception %s: %s" % (type(e).__name__, e)
        with open(report, "w") as f:
            f.write(msg + "\n")
        time.sleep(TIMEOUT_S + 15)  # alive, out of the collective: the others time out
        os._exit(0)
    start = time.monotonic()
    try:
        for _ in range(3):
            m(x).sum().backward()
        msg = "no exception"
        code = 0
    except Exception as e:  # noqa: B902
        msg = "error after %.2f s: %s: %s" % (time.monotonic() - start, type(e).__name__,
                                              str(e).splitlines()[0] if str(e) else "")
        code = 1
    with open(report, "w") as f:
        f.write(msg + "\n")
    sys.stdout.flush()
    os._exit(code)  # without destroy_process_group: the group is broken


def check_fault(case, world, tmp):
    procs, outdir, start = base.launch(case, world, tmp, os.path.abspath(__file__))
    others = [p for r, p in enumerate(procs) if r != 1]
    codes, took = base.wait_all(others, WORKER_LIMIT_S)
    ended = time.monotonic() - start
    procs[1].kill()  # the failing rank (alive in the "raise" case)
    procs[1].wait()
    reports = {}
    for r in range(world):
        path = os.path.join(outdir, "rank%d.txt" % r)
        reports[r] = open(path).read().strip() if os.path.exists(path) else "(no report)"
    for i, r in enumerate(r for r in range(world) if r != 1):
        print("fault %s: rank %d exit %s after %.1f s: %s" % (case, r, codes[i], took[i],
                                                            reports[r]), flush=True)
        if codes[i] is None:
            fail("fault %s: rank %d hung (killed after %d s)" % (case, r, WORKER_LIMIT_S))
        elif codes[i] == 0 or not reports[r].startswith("error after"):
            fail("fault %s: rank %d did not end with an error: exit %s, %s" % (
                case, r, codes[i], reports[r]))
        else:
            secs = float(reports[r].split()[2])
            # The collective fails at a dead peer at once, at a silent one at the timeout.
            if secs > TIMEOUT_S + 10:
                fail("fault %s: rank %d took %.1f s to fail (bound %d s)" % (
                    case, r, secs, TIMEOUT_S + 10))
    if case == "raise":
        print("fault raise: rank 1: %s" % reports[1], flush=True)
        if not (reports[1].startswith("own exception: injected failure") and
                reports[1].endswith("buffers untouched: True")):
            fail("fault raise: rank 1 did not see its own exception with its buffers "
                 "untouched: %s" % reports[1])
    print("fault %s: every other rank ended in %.1f s" % (case, ended), flush=True)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        case, rank, world, store, outdir = sys.argv[2:7]
        return worker(case, int(rank), int(world), store, outdir)
    if not dist.is_available() or not dist.is_gloo_available():
        print("skipped: torch.distributed with gloo not available")
        return 77
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for case in ("exit", "raise"):
            check_fault(case, 3, tmp)
    print("%.1f s; %s" % (time.monotonic() - t0, "%d failures" % len(base.failures)
                          if base.failures else "all passed"))
    return 1 if base.failures else 0


if __name__ == "__main__":
    sys.exit(main())
