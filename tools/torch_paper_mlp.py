#!/usr/bin/env python3
"""PyTorch's steps/s on the paper-mlp preset (Ioffe & Szegedy 2015, section 4.1).

The same network as `bnorm train --preset paper-mlp`: 784-100-100-100-10, sigmoid, batch norm
before each sigmoid (or none), mini-batches of 60 from Fashion-MNIST, plain SGD. Prints one CSV
line per (batch_norm, threads): implementation,batch_norm,threads,steps,seconds,steps_per_s.
Only the training steps are timed (forward, loss, backward, SGD update), as bnorm's steps/s is.

  torch_paper_mlp.py --steps 3000 --threads 1,2 [--data DIR]
"""
import argparse
import gzip
import os
import sys
import time

try:
    import numpy as np
    import torch
except ImportError as e:  # pragma: no cover - reported by the caller as a skip
    print(f"skipped: python3-torch not importable ({e})", file=sys.stderr)
    sys.exit(77)


def load_images(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic, n, rows, cols = (int.from_bytes(raw[i:i + 4], "big") for i in range(0, 16, 4))
    if magic != 0x803 or len(raw) != 16 + n * rows * cols:
        raise SystemExit(f"{path}: not an IDX image file of the expected size")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows * cols)


def load_labels(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic, n = (int.from_bytes(raw[i:i + 4], "big") for i in range(0, 8, 4))
    if magic != 0x801 or len(raw) != 8 + n:
        raise SystemExit(f"{path}: not an IDX label file of the expected size")
    return np.frombuffer(raw, dtype=np.uint8, offset=8)


def find(data_dir, stem):
    for name in (stem, stem + ".gz"):
        p = os.path.join(data_dir, name)
        if os.path.exists(p):
            return p
    raise SystemExit(f"{data_dir}: {stem}(.gz) not found (install dataset-fashion-mnist or pass --data)")


def model(batch_norm):
    layers = []
    width = 784
    for _ in range(3):
        layers.append(torch.nn.Linear(width, 100))
        if batch_norm:
            layers.append(torch.nn.BatchNorm1d(100))
        layers.append(torch.nn.Sigmoid())
        width = 100
    layers.append(torch.nn.Linear(width, 10))
    net = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for m in net:
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, 0.1)
                m.bias.zero_()
    return net


def run(x_all, y_all, batch_norm, threads, steps, lr, seed):
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    net = model(batch_norm)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = np.random.default_rng(seed)
    n = x_all.shape[0]
    order = gen.permutation(n)
    pos = 0

    def step():
        nonlocal pos, order
        if pos + 60 > n:
            order, pos = gen.permutation(n), 0
        idx = torch.from_numpy(order[pos:pos + 60])
        pos += 60
        xb, yb = x_all[idx], y_all[idx]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(xb), yb)
        loss.backward()
        opt.step()

    for _ in range(min(200, steps)):  # warm-up
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    return seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    args = ap.parse_args()
    images = load_images(find(args.data, "train-images-idx3-ubyte"))
    labels = load_labels(find(args.data, "train-labels-idx1-ubyte"))
    x_all = torch.from_numpy(images.astype(np.float32) / 255.0)
    y_all = torch.from_numpy(labels.astype(np.int64))
    print("implementation,batch_norm,threads,steps,seconds,steps_per_s")
    for bn in (True, False):
        for t in (int(v) for v in args.threads.split(",")):
            s = run(x_all, y_all, bn, t, args.steps, args.lr, args.seed)
            print(f"pytorch-{torch.__version__},{int(bn)},{t},{args.steps},{s:.3f},{args.steps / s:.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
