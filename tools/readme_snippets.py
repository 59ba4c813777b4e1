#!/usr/bin/env python3
"""Runs every ```python block of a Markdown file, each in a fresh interpreter, from the
repository root with PYTHONPATH=python (the one the README gives), and fails if one fails.

    /usr/bin/python3 tools/readme_snippets.py README.md

CI runs it after the README's first command, so the snippets stay true. A block is run as it is
written: a snippet that needs data makes its own.
"""
import os
import re
import subprocess
import sys


def blocks(text):
    """(line number, code) of each ```python fenced block."""
    out = []
    for m in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, re.S | re.M):
        out.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: readme_snippets.py FILE.md")
    path = sys.argv[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(path, encoding="utf-8") as f:
        found = blocks(f.read())
    if not found:
        sys.exit("readme_snippets: no ```python block in %s" % path)
    env = dict(os.environ, PYTHONPATH=os.path.join(root, "python"))
    env.pop("BNORM_LIBRARY", None)  # the package must find the library on its own
    failed = 0
    for line, code in found:
        r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                           capture_output=True, text=True, timeout=600)
        status = "ok" if r.returncode == 0 else "FAILED (exit %d)" % r.returncode
        print("%s:%d: python snippet %s" % (path, line, status))
        if r.returncode != 0:
            failed += 1
            sys.stdout.write(r.stdout)
            sys.stdout.write(r.stderr)
    print("readme_snippets: %d of %d snippets ran" % (len(found) - failed, len(found)))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
