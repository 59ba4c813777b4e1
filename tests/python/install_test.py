#!/usr/bin/env python3
"""cmake --install puts the Python package where `import bnorm.torch` loads the installed
library by itself.

Usage: install_test.py CMAKE BUILD_DIR WORK_DIR

1. `CMAKE --install BUILD_DIR --prefix WORK_DIR/prefix`; then, in a child process whose
   environment has neither BNORM_LIBRARY nor PYTHONPATH other than the installed package's
   folder (and whose working directory is WORK_DIR), `import bnorm.torch` must work, a
   converted BatchNorm2d must run, and bnorm._lib.library_path() must be inside the prefix.
2. The same install staged with DESTDIR=WORK_DIR/stage (prefix /opt/bnorm-test) and the staged
   tree then moved elsewhere: the generated path is relative to the package, so the moved tree
   must still load its own library.
"""

import os
import shutil
import subprocess
import sys

CHILD = r"""
import os, sys, torch
import bnorm, bnorm._lib, bnorm.torch
prefix = os.path.realpath(sys.argv[1])
path = os.path.realpath(bnorm._lib.library_path())
print("package:", os.path.dirname(bnorm.__file__))
print("library:", path)
assert os.path.realpath(bnorm.__file__).startswith(prefix + os.sep), \
    "bnorm imported from %s, not from the prefix %s" % (bnorm.__file__, prefix)
assert path.startswith(prefix + os.sep), "library %s is not inside the prefix %s" % (path, prefix)
import bnorm._install_paths as ip
assert not os.path.isabs(ip.LIBRARY_RELATIVE_TO_PACKAGE), ip.LIBRARY_RELATIVE_TO_PACKAGE
m = bnorm.torch.convert(torch.nn.BatchNorm2d(3))
x = torch.randn(4, 3, 5, 5)
y = m(x)
ref = torch.nn.functional.batch_norm(x, None, None, training=True)
assert float((y - ref).abs().max()) < 1e-5, float((y - ref).abs().max())
import bnorm_ctypes
assert bnorm_ctypes.library_path() == bnorm._lib.library_path()
print("ok", bnorm.version())
"""


def run(cmd, **kw):
    shown = ["<child script>" if a == CHILD else a for a in cmd]
    print("+", " ".join(shown), flush=True)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    if p.returncode != 0:
        print(p.stdout)
        raise SystemExit("FAIL: %s exited with %d" % (cmd[0], p.returncode))
    return p.stdout


def find_package_dir(root):
    for dirpath, dirnames, filenames in os.walk(root):
        if os.path.basename(dirpath) == "bnorm" and "_lib.py" in filenames:
            return os.path.dirname(dirpath)
    raise SystemExit("FAIL: no installed bnorm package (bnorm/_lib.py) under %s" % root)


def check_import(site, prefix, cwd):
    env = {k: v for k, v in os.environ.items()
           if k not in ("BNORM_LIBRARY", "PYTHONPATH", "LD_LIBRARY_PATH")}
    env["PYTHONPATH"] = site
    out = run([sys.executable, "-c", CHILD, prefix], env=env, cwd=cwd)
    print(out, end="")


def main():
    cmake, build, work = sys.argv[1:4]
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)

    prefix = os.path.join(work, "prefix")
    run([cmake, "--install", build, "--prefix", prefix])
    site = find_package_dir(prefix)
    print("installed package folder:", site)
    check_import(site, prefix, work)

    stage = os.path.join(work, "stage")
    env = dict(os.environ, DESTDIR=stage)
    run([cmake, "--install", build, "--prefix", "/opt/bnorm-test"], env=env)
    staged = os.path.join(stage, "opt", "bnorm-test")
    moved = os.path.join(work, "moved")
    shutil.move(staged, moved)
    site = find_package_dir(moved)
    check_import(site, moved, work)
    shutil.rmtree(work, ignore_errors=True)
    print("install test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
