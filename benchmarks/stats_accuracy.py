"""How wrong are the usual dataset mean/std recipes? ``bncli stats`` against them, same data.

Usage::

    python benchmarks/stats_accuracy.py [--images 50000] [--shards 5] [--batch 128]

Writes a synthetic CIFAR-like dataset (uint8, NHWC, 32x32x3; every image has its own
brightness offset, as real photos do) as ``--shards`` .npy files in a temporary folder,
then compares with the exact statistics (integer sums, as fractions) over all of it:

* ``bncli stats``: the library call behind the command (``--scale 255``), at three
  chunk sizes (the result must not depend on them);
* ``mean of per-image std``: the recipe behind the widely copied CIFAR-10 std
  (0.2023, 0.1994, 0.2010) -- it drops the spread *between* images;
* ``mean of per-batch std``: a DataLoader loop that averages each batch's std, the
  short last batch weighted like the others;
* ``float32 E[x^2] - E[x]^2``: one pass with float32 sums;
* ``float64 NumPy``: ``x.mean()``/``x.std()`` of the whole array in memory (NumPy sums
  strided axes without pairwise summation).

Prints relative errors of the std per channel (max over channels), then deletes its files.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

from bncli.datastats import dataset_stats

MEAN = np.array([125.3, 123.0, 113.9])
BETWEEN = np.array([40.0, 40.0, 45.0])  # spread of per-image brightness
WITHIN = np.array([49.0, 48.0, 51.0])  # spread of pixels inside an image


def make(folder: Path, images: int, shards: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i, part in enumerate(np.array_split(np.arange(images), shards)):
        n = len(part)
        offset = rng.normal(size=(n, 1, 1, 3)) * BETWEEN
        x = MEAN + offset + rng.normal(size=(n, 32, 32, 3)) * WITHIN
        path = folder / f"train_{i}.npy"
        np.save(path, np.clip(np.rint(x), 0, 255).astype(np.uint8))
        paths.append(path)
    return paths


def _size(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--shards", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bncli-accuracy-"))
    try:
        paths = make(work, args.images, args.shards)
        raw = np.concatenate([np.load(p) for p in paths])  # in memory: the reference only
        # Exact reference: the data are integers, so integer sums give the mean and the
        # variance as exact fractions (a float64 reduction over 51M strided values is
        # itself off by ~1e-11).
        counts = raw.shape[0] * 32 * 32
        s1 = [int(v) for v in raw.sum(axis=(0, 1, 2), dtype=np.int64)]
        s2 = [int(v) for v in (raw.astype(np.int64) ** 2).sum(axis=(0, 1, 2))]
        ref_mean = np.array([Fraction(a, counts * 255) for a in s1], dtype=np.float64)
        ref_std = np.sqrt(np.array([Fraction(counts * q - a * a, counts * counts * 255 * 255)
                                    for a, q in zip(s1, s2, strict=True)], dtype=np.float64))
        data = raw.astype(np.float64) / 255

        runs = {size: dataset_stats(paths, layout="nhwc", scale=255.0, chunk_bytes=size)
                for size in (64 << 10, 8 << 20, 256 << 20)}
        f32 = data.astype(np.float32)
        f1 = f32.sum(axis=(0, 1, 2), dtype=np.float32)
        f2 = (f32 * f32).sum(axis=(0, 1, 2), dtype=np.float32)
        one_pass = np.sqrt(np.maximum(f2 / counts - (f1 / counts) ** 2, 0))
        recipes = {
            **{f"bncli stats, chunk {_size(size)}": (r.mean, r.std) for size, r in runs.items()},
            "mean of per-image std": (data.mean(axis=(0, 1, 2)), data.std(axis=(1, 2)).mean(axis=0)),
            f"mean of per-batch std (batch {args.batch})": (
                np.mean([b.mean(axis=(0, 1, 2)) for b in np.array_split(data, range(args.batch, len(data),
                                                                                     args.batch))], axis=0),
                np.mean([b.std(axis=(0, 1, 2)) for b in np.array_split(data, range(args.batch, len(data),
                                                                                   args.batch))], axis=0)),
            "float32 E[x^2] - E[x]^2": (f1 / counts, one_pass),
            "float64 NumPy x.mean(), x.std()": (data.mean(axis=(0, 1, 2)), data.std(axis=(0, 1, 2))),
        }
        print(f"{args.images} images 32x32x3 uint8 in {args.shards} shards; reference: exact (integer sums)\n")
        print(f"reference mean {np.round(ref_mean, 4).tolist()}  std {np.round(ref_std, 4).tolist()}\n")
        print("| recipe | std reported | max rel. error of std | max rel. error of mean |")
        print("|---|---|---:|---:|")
        for name, (mean, std) in recipes.items():
            err_s = np.max(np.abs(std / ref_std - 1))
            err_m = np.max(np.abs(mean / ref_mean - 1))
            shown = ", ".join(f"{v:.4f}" for v in std)
            print(f"| {name} | [{shown}] | {err_s:.1e} | {err_m:.1e} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
