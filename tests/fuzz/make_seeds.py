#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (tests/fuzz/) into OUT/<target>/, from real files:

  make_seeds.py OUT [--checkpoint FILE ...] [--data DIR]

  safetensors  each --checkpoint given (e.g. a bnorm train checkpoint, or one saved by
               PyTorch) cut to its header and at most 64 bytes of each tensor's data, with the
               offsets rewritten to match; plus small files in the writer's layout (F32, I64,
               F64, metadata, an empty tensor)
  idx          the first 4 images and labels of each Fashion-MNIST file of --data (default: the
               Debian package's directory, if present), plain and gzip, with the count rewritten;
               plus small synthetic files
  c_api        one input per entry point, layout and set of optional buffers
Nothing here is committed: scripts/fuzz.sh runs this at test time.
"""
import gzip
import json
import os
import struct
import sys

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_bytes(records, metadata=None):
    """records: [(name, dtype, shape, data bytes)] laid out back to back, as bnorm writes."""
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in records:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + data


def shrink_checkpoint(path):
    """A real checkpoint with each tensor cut to at most 64 bytes (shape rewritten to [k])."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        base = f.tell()
        records = []
        meta = header.pop("__metadata__", None)
        for name, rec in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            size = DTYPE_BYTES.get(rec["dtype"], 1)
            keep = min(64 // size, rec["data_offsets"][1] - rec["data_offsets"][0]) // 1
            keep = min(keep, (rec["data_offsets"][1] - rec["data_offsets"][0]) // size)
            f.seek(base + rec["data_offsets"][0])
            shape = rec["shape"] if keep * size == rec["data_offsets"][1] - rec["data_offsets"][0] else [keep]
            records.append((name, rec["dtype"], shape, f.read(keep * size)))
    return safetensors_bytes(records, meta)


def idx_head(path, images, keep=4):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        magic = f.read(4)
        rank = magic[3]
        dims = list(struct.unpack(">" + "I" * rank, f.read(4 * rank)))
        per = 1
        for d in dims[1:]:
            per *= d
        dims[0] = min(dims[0], keep)
        body = f.read(dims[0] * per)
    return magic + struct.pack(">" + "I" * rank, *dims) + body


def write(dirname, name, data):
    os.makedirs(dirname, exist_ok=True)
    with open(os.path.join(dirname, name), "wb") as f:
        f.write(data)


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = argv[1]
    checkpoints, data_dir = [], "/usr/share/datasets/fashion-mnist"
    i = 2
    while i < len(argv):
        if argv[i] == "--checkpoint":
            checkpoints.append(argv[i + 1])
        elif argv[i] == "--data":
            data_dir = argv[i + 1]
        else:
            print(f"make_seeds.py: unknown argument {argv[i]}", file=sys.stderr)
            return 2
        i += 2

    st = os.path.join(out, "fuzz_safetensors")
    f32 = struct.pack("<3f", 1.0, -2.5, 0.125)
    write(st, "f32.safetensors", safetensors_bytes([("0.weight", "F32", [3], f32)]))
    write(st, "model.safetensors", safetensors_bytes(
        [("weight", "F32", [4], struct.pack("<4f", 1, 2, 3, 4)),
         ("num_batches_tracked", "I64", [], struct.pack("<q", 7))],
        {"architecture": "paper-mlp", "bnorm_version": "0.1.0"}))
    write(st, "f64.safetensors", safetensors_bytes([("a.b", "F64", [2, 1], struct.pack("<2d", 0.1, 1e300)),
                                                    ("empty", "U8", [0], b"")]))
    for n, path in enumerate(checkpoints):
        write(st, f"real{n}.safetensors", shrink_checkpoint(path))

    idx = os.path.join(out, "fuzz_idx")
    write(idx, "images", struct.pack(">IIII", 0x803, 2, 2, 3) + bytes(range(12)))
    write(idx, "labels", struct.pack(">II", 0x801, 3) + bytes([0, 9, 4]))
    write(idx, "images.gz", gzip.compress(struct.pack(">IIII", 0x803, 1, 2, 2) + bytes(4)))
    for base in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        for name in (base + ".gz", base):
            path = os.path.join(data_dir, name)
            if os.path.exists(path):
                head = idx_head(path, "images" in base)
                write(idx, base, head)
                write(idx, base + ".gz", gzip.compress(head))
                break

    capi = os.path.join(out, "fuzz_c_api")
    n = 0
    for op in range(3):
        for layout in (0, 4):
            for present in (0x00, 0x06, 0x7e, 0x08):
                body = bytes([op | layout, 0x2b, 0, 0x09, 3, present, 0, 0x08]) + \
                    bytes((37 * k + op) & 0xff for k in range(256))
                write(capi, f"seed{n:02d}", body)
                n += 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
