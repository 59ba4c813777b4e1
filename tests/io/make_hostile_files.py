#!/usr/bin/env python3
"""Writes the hostile checkpoint and IDX files of issue 13 into DIR, for measuring the readers
by hand (tests/io/hostile_test.cc makes its own, smaller ones):

  make_hostile_files.py DIR [--scale S]

  deep.safetensors      valid JSON, a shape nested 100,000 levels deep
  deep_extra.safetensors  the same nesting in an unknown field of a record
  many.safetensors      a valid file of 50,000 * S one-byte tensors
  bad_big.safetensors   a 64 MiB * S header of empty arrays, cut off before its end (malformed)
  valid_big.safetensors a valid file with one F32 tensor "w" of 64 Mi * S floats (256 MiB * S)
  bomb-images.gz        an images header announcing 10^6 x 128 x 128 bytes (16 GB), then 1 GiB * S
                        of zeros (about 1 MB compressed)
  long-images.gz        an images header announcing 1000 x 28 x 28 bytes, then 1 GiB * S of zeros
"""
import gzip
import json
import os
import struct
import sys
import zlib


def safetensors(path, header: bytes, data: bytes = b""):
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        f.write(data)


def gzip_stream(path, head: bytes, zeros: int):
    """head, then `zeros` zero bytes, gzip-compressed without holding them in memory."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9) as f:
        f.write(head)
        block = bytes(1 << 24)
        while zeros > 0:
            n = min(zeros, len(block))
            f.write(block[:n])
            zeros -= n


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = sys.argv[1]
    scale = float(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[2] == "--scale" else 1.0
    os.makedirs(out, exist_ok=True)
    depth = 100_000
    nested = "[" * depth + "]" * depth
    safetensors(os.path.join(out, "deep.safetensors"),
                ('{"a":{"dtype":"F32","shape":' + nested + ',"data_offsets":[0,0]}}').encode())
    safetensors(os.path.join(out, "deep_extra.safetensors"),
                ('{"a":{"dtype":"F32","shape":[],"data_offsets":[0,4],"x":' + nested + '}}').encode(),
                bytes(4))
    n = int(50_000 * scale)
    header = {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(n)}
    safetensors(os.path.join(out, "many.safetensors"), json.dumps(header).encode(), bytes(n))
    pad = int((64 << 20) * scale) // 3
    safetensors(os.path.join(out, "bad_big.safetensors"),
                b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"pad":[' + b"[]," * pad)
    floats = int((64 << 20) * scale)
    h = json.dumps({"w": {"dtype": "F32", "shape": [floats], "data_offsets": [0, 4 * floats]}})
    with open(os.path.join(out, "valid_big.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h.encode())
        block = bytes(1 << 24)
        left = 4 * floats
        while left > 0:
            f.write(block[:min(left, len(block))])
            left -= min(left, len(block))
    zeros = int((1 << 30) * scale)
    gzip_stream(os.path.join(out, "bomb-images.gz"), struct.pack(">IIII", 0x803, 10**6, 128, 128), zeros)
    gzip_stream(os.path.join(out, "long-images.gz"), struct.pack(">IIII", 0x803, 1000, 28, 28), zeros)
    return 0


if __name__ == "__main__":
    sys.exit(main())
