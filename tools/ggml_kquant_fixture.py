#!/usr/bin/env python3
"""Writes the fixture that pins lfm2d's Q4_K and Q6_K quantizers (and the Q8_K activation
blocks) to ggml's own: it runs ggml's reference quantizers from a built libggml-base on a fixed
set of rows and stores the input and ggml's bytes.

usage: python3 tools/ggml_kquant_fixture.py LIBGGML_BASE_SO OUT
  e.g. LIBGGML_BASE_SO = <llama.cpp>/build/bin/libggml-base.so (any llama.cpp build; the
  fixture in lfm2-audio/tests/data/ggml_kquants.bin was made with the llama.cpp vendored in
  llama-cpp-python 0.3.36), OUT = lfm2-audio/tests/data/ggml_kquants.bin

Output (little-endian): b"GKQ1", u32 rows, u32 cols, rows*cols f32 inputs, then ggml's Q4_K
blocks, Q6_K blocks and Q8_K blocks (f32 d, 256 i8, 16 i16 sums) of all rows.
Standard library only (ctypes, struct, random), so any python3 runs it.
"""
import ctypes
import random
import struct
import sys

QK = 256
ROWS, COLS = 24, 512


def rows():
    rng = random.Random(20261206)
    out = []
    for r in range(ROWS):
        kind = r % 8
        row = []
        for b in range(COLS):
            g = rng.gauss(0.0, 1.0)
            if kind == 0:
                v = g
            elif kind == 1:  # outliers, as trained weights have
                v = g * (8.0 if rng.random() < 0.02 else 1.0)
            elif kind == 2:  # all positive (the min is 0 in Q4_K)
                v = abs(g) + 0.1
            elif kind == 3:  # all negative
                v = -abs(g) * 3.0 - 0.5
            elif kind == 4:  # a zero sub-block and a constant sub-block
                v = 0.0 if b % 64 < 32 else (0.25 if b % 128 < 64 else g)
            elif kind == 5:  # small weights of a trained layer's magnitude
                v = g * 0.02
            elif kind == 6:  # scales that differ per sub-block of 16
                v = g * (1.0 + (b // 16) % 7) ** 2 * 0.01
            else:  # a whole zero super-block, then tiny values
                v = 0.0 if b < QK else g * 1e-6
            row.append(v)
        # round to f32 so that what ggml sees is what is stored
        row = list(struct.unpack(f"<{COLS}f", struct.pack(f"<{COLS}f", *row)))
        out.append(row)
    return out


def main():
    lib = ctypes.CDLL(sys.argv[1])
    data = rows()
    flat = [v for r in data for v in r]
    n = len(flat)
    src = (ctypes.c_float * n)(*flat)
    blobs = []
    for name, size in [("q4_K", 144), ("q6_K", 210), ("q8_K", 4 + QK + 32)]:
        fn = getattr(lib, f"quantize_row_{name}_ref")
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = None
        dst = ctypes.create_string_buffer(n // QK * size)
        fn(src, dst, n)
        blobs.append(dst.raw)
    with open(sys.argv[2], "wb") as f:
        f.write(b"GKQ1" + struct.pack("<II", ROWS, COLS))
        f.write(struct.pack(f"<{n}f", *flat))
        for b in blobs:
            f.write(b)


if __name__ == "__main__":
    main()
