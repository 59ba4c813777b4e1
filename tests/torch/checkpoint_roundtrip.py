#!/usr/bin/env python3
"""Checkpoints between bnorm and PyTorch, both ways, through safetensors files.

Usage: checkpoint_roundtrip.py CHECKPOINT_TOOL   (tests/io/checkpoint_tool.cc, built)

For each preset network (paper-mlp and cnn, with and without batch norm):
  1. bnorm -> torch: the tool builds the network, trains it a few steps on random data (so the
     running statistics and num_batches_tracked are not their initial values), saves a
     checkpoint and the logits of a fixed batch in eval mode. Here: the safetensors header is
     parsed by hand (8-byte length + JSON, no extra package), the equivalent torch.nn.Sequential
     is built from the "architecture" metadata, load_state_dict(strict=True), and the eval-mode
     logits must agree.
  2. torch -> bnorm: a torch network of the same architecture is trained a few steps, its
     state_dict written as safetensors by hand, loaded by the tool, and the logits compared; the
     state the tool loaded must equal torch's bit for bit.
  3. An old-style torch checkpoint without num_batches_tracked loads, the counters read 0.
  4. Bad checkpoints (a tensor missing, one mis-shaped, another architecture) make the tool
     fail with a one-line message naming the problem.

Tolerance. Both sides compute the logits in fp32; they differ only by rounding (GEMM summation
order and blocking, and batch norm's eval form: bnorm applies y = a*x + b with
a = w / sqrt(var + eps), torch (x - mean) / sqrt(var + eps) * w + b). So the oracle is the same
torch network evaluated in fp64, and bnorm's error against it must be of the order of torch's own
fp32 error against it, e32 = max|torch32 - torch64|, which this script measures:
    |bnorm - torch64| <= tol = 8 * e32 + 64 * u * max|torch64|,   u = 2^-24 (fp32 unit roundoff)
The factor 8 allows another summation order (the error of a length-K sum grows like sqrt(K) u
times the sum of magnitudes for random-order rounding, and differs by a small factor between
blockings); the second term, 64 ulps of the largest logit, keeps the bound meaningful when torch
happens to be very accurate. Typical measured values are printed.

Exit status: 0 all passed, 1 a failure, 77 torch missing (skipped).
"""

import copy
import json
import os
import struct
import subprocess
import sys
import tempfile

try:
    import torch
    from torch import nn
except ImportError:
    print("skipped: python3-torch not installed")
    sys.exit(77)

U32 = 2.0 ** -24
DTYPES = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64}
NAMES = {v: k for k, v in DTYPES.items()}


def read_safetensors(path):
    """(dict name -> tensor in file order, metadata dict) from a safetensors file."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    data = blob[8 + n:]
    metadata = header.pop("__metadata__", {})
    tensors = {}
    for name, rec in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        b, e = rec["data_offsets"]
        dtype = DTYPES[rec["dtype"]]
        if e > b:
            t = torch.frombuffer(bytearray(data[b:e]), dtype=dtype)
        else:
            t = torch.empty(0, dtype=dtype)
        tensors[name] = t.reshape(rec["shape"]).clone()
    return tensors, metadata


def write_safetensors(path, tensors, metadata):
    """Writes tensors (dict name -> tensor) and string metadata as the format specifies."""
    header = {"__metadata__": metadata} if metadata else {}
    chunks, offset = [], 0
    for name, t in tensors.items():
        raw = t.detach().cpu().contiguous().numpy().tobytes()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def build_torch(arch):
    """torch.nn.Sequential from bnorm's architecture JSON (a list of layer descriptions)."""
    layers = []
    for d in arch:
        if isinstance(d, list):
            layers.append(build_torch(d))
            continue
        kind = d["type"]
        if kind == "Linear":
            layers.append(nn.Linear(d["in"], d["out"], bias=d["bias"]))
        elif kind == "Conv2d":
            layers.append(nn.Conv2d(d["in"], d["out"], d["kernel"], stride=d["stride"],
                                    padding=d["padding"], bias=d["bias"]))
        elif kind == "MaxPool2d":
            layers.append(nn.MaxPool2d(d["kernel"], stride=d["stride"]))
        elif kind in ("ReLU", "Sigmoid", "Flatten"):
            layers.append(getattr(nn, kind)())
        elif kind in ("BatchNorm1d", "BatchNorm2d"):
            layers.append(getattr(nn, kind)(d["num_features"], eps=d["eps"],
                                            momentum=d["momentum"], affine=d["affine"],
                                            track_running_stats=d["track_running_stats"]))
        else:
            raise ValueError(f"architecture: unknown layer type {kind!r}")
    return nn.Sequential(*layers)


class Checker:
    def __init__(self):
        self.failures = 0

    def check(self, ok, message):
        print(("ok    " if ok else "FAIL  ") + message)
        if not ok:
            self.failures += 1

    def logits(self, label, bnorm_logits, model, x):
        """Compares bnorm's logits with torch's, fp64 torch as the oracle (see the docstring)."""
        model = copy.deepcopy(model).eval()
        with torch.no_grad():
            t32 = model(x)
            t64 = copy.deepcopy(model).double()(x.double())
        e32 = (t32.double() - t64).abs().max().item()
        eb = (bnorm_logits.double() - t64).abs().max().item()
        tol = 8 * e32 + 64 * U32 * t64.abs().max().item()
        diff = (bnorm_logits - t32).abs().max().item()
        self.check(bnorm_logits.shape == t32.shape and eb <= tol,
                   f"{label}: |bnorm - torch64| = {eb:.2e} <= tol {tol:.2e} "
                   f"(torch32 error {e32:.2e}, |bnorm - torch32| = {diff:.2e}, "
                   f"max |logit| {t64.abs().max().item():.2f})")


def run_tool(tool, *args):
    # A bounded wait: a hang is reported as a failure naming the command, not a ctest timeout.
    return subprocess.run([tool] + list(args), capture_output=True, text=True, timeout=120)


def roundtrip(tool, tmp, preset, bn, seed, c):
    tag = f"{preset} {'with' if bn else 'without'} BN"
    flag = "1" if bn else "0"
    ckpt, io = os.path.join(tmp, "bnorm.safetensors"), os.path.join(tmp, "io.safetensors")

    # 1. bnorm -> torch.
    r = run_tool(tool, "save", "--preset", preset, "--bn", flag, "--seed", str(seed), "--steps",
                 "5", "--checkpoint", ckpt, "--io", io)
    if r.returncode != 0:
        c.check(False, f"{tag}: checkpoint_tool save failed: {r.stderr.strip()}")
        return
    state, meta = read_safetensors(ckpt)
    outputs, _ = read_safetensors(io)
    c.check(meta.get("preset") == preset and "bnorm_version" in meta,
            f"{tag}: metadata has preset and bnorm_version")
    arch = json.loads(meta["architecture"])
    model = build_torch(arch)
    try:
        model.load_state_dict(state, strict=True)
        c.check(True, f"{tag}: bnorm checkpoint loads into torch (strict)")
    except RuntimeError as e:
        c.check(False, f"{tag}: load_state_dict: {e}")
        return
    if bn:
        counters = [v.item() for k, v in state.items() if k.endswith("num_batches_tracked")]
        c.check(counters and all(n == 5 for n in counters),
                f"{tag}: num_batches_tracked = 5 after 5 steps ({counters})")
        means = [v for k, v in state.items() if k.endswith("running_mean")]
        c.check(all(m.abs().max().item() > 0 for m in means), f"{tag}: running means moved")
    x = outputs["input"]
    c.logits(f"{tag}: bnorm -> torch", outputs["logits"], model, x)

    # 2. torch -> bnorm: another network of the same architecture, trained a few steps.
    torch.manual_seed(seed + 100)
    model = build_torch(arch)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(3):
        xb = torch.rand_like(x)
        loss = nn.functional.cross_entropy(model(xb), torch.randint(0, 10, (x.shape[0],)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tckpt, tio = os.path.join(tmp, "torch.safetensors"), os.path.join(tmp, "tio.safetensors")
    write_safetensors(tckpt, torch_state, {"architecture": json.dumps(arch), "preset": preset})
    r = run_tool(tool, "load", "--preset", preset, "--bn", flag, "--checkpoint", tckpt,
                 "--input", io, "--io", tio)
    if r.returncode != 0:
        c.check(False, f"{tag}: checkpoint_tool load of a torch checkpoint failed: "
                       f"{r.stderr.strip()}")
        return
    loaded, _ = read_safetensors(tio)
    same = all(torch.equal(loaded["state." + k], v) for k, v in torch_state.items())
    c.check(same and len(loaded) == len(torch_state) + 2,
            f"{tag}: the state bnorm loaded equals torch's bit for bit")
    c.logits(f"{tag}: torch -> bnorm", loaded["logits"], model, x)

    # 3. An old checkpoint without num_batches_tracked.
    if bn:
        old = {k: v for k, v in torch_state.items() if not k.endswith("num_batches_tracked")}
        ockpt, oio = os.path.join(tmp, "old.safetensors"), os.path.join(tmp, "oio.safetensors")
        write_safetensors(ockpt, old, {})
        r = run_tool(tool, "load", "--preset", preset, "--bn", flag, "--checkpoint", ockpt,
                     "--input", io, "--io", oio)
        if r.returncode != 0:
            c.check(False, f"{tag}: old checkpoint without num_batches_tracked: {r.stderr.strip()}")
        else:
            got, _ = read_safetensors(oio)
            counters = [v.item() for k, v in got.items() if k.endswith("num_batches_tracked")]
            c.check(counters and all(n == 0 for n in counters)
                    and torch.equal(got["logits"], loaded["logits"]),
                    f"{tag}: old checkpoint without num_batches_tracked loads, counters 0")

    # 4. Bad checkpoints: the tool fails with a message naming the problem.
    names = list(torch_state)
    first_weight = next(k for k in names if k.endswith("weight"))
    bad_cases = [
        ({k: v for k, v in torch_state.items() if k != first_weight}, "missing tensors: " +
         first_weight),
        (dict(torch_state, **{first_weight: torch_state[first_weight].reshape(-1)}),
         f"\"{first_weight}\" has shape"),
        (dict(torch_state, **{"99.weight": torch.zeros(2)}), "unexpected tensors: 99.weight"),
    ]
    for bad_state, fragment in bad_cases:
        bckpt = os.path.join(tmp, "bad.safetensors")
        write_safetensors(bckpt, bad_state, {})
        r = run_tool(tool, "load", "--preset", preset, "--bn", flag, "--checkpoint", bckpt,
                     "--input", io, "--io", os.path.join(tmp, "bio.safetensors"))
        c.check(r.returncode == 1 and fragment in r.stderr and r.stderr.count("\n") == 1,
                f"{tag}: bad checkpoint rejected: {r.stderr.strip()[:150]}")


def main(argv):
    if len(argv) != 2:
        print(__doc__)
        return 2
    tool = argv[1]
    torch.set_num_threads(1)
    c = Checker()
    with tempfile.TemporaryDirectory() as tmp:
        for seed, (preset, bn) in enumerate([("paper-mlp", True), ("paper-mlp", False),
                                             ("cnn", True), ("cnn", False)], start=1):
            roundtrip(tool, tmp, preset, bn, seed, c)
        # A checkpoint of another architecture: paper-mlp with BN into the one without.
        ckpt = os.path.join(tmp, "bn.safetensors")
        run_tool(tool, "save", "--preset", "paper-mlp", "--bn", "1", "--seed", "1", "--steps", "1",
                 "--checkpoint", ckpt, "--io", os.path.join(tmp, "x.safetensors"))
        r = run_tool(tool, "load", "--preset", "paper-mlp", "--bn", "0", "--checkpoint", ckpt,
                     "--input", os.path.join(tmp, "x.safetensors"),
                     "--io", os.path.join(tmp, "y.safetensors"))
        c.check(r.returncode == 1 and "does not match the model" in r.stderr,
                f"another architecture rejected: {r.stderr.strip()[:200]}")
    print(f"checkpoint round trip: {'all passed' if c.failures == 0 else f'{c.failures} failed'}")
    return 0 if c.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
