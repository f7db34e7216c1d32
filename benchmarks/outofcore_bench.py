"""Out-of-core ``normalize`` and ``stats`` on a big .npy, against the naive script and a copy.

Usage::

    python benchmarks/outofcore_bench.py                    # 2 GiB file, every variant
    python benchmarks/outofcore_bench.py --size-gib 13 --variants copy,ooc,stats
    python benchmarks/outofcore_bench.py --json-out results.json --repeat 3

Creates a float32 (N, 3, 256, 256) file of ``--size-gib`` in a fresh temporary folder
(``--dir`` picks its parent), runs each variant in its own subprocess ``--repeat``
times, reports the median wall time and the peak RSS of that subprocess (from
``wait4``: the child's own high-water mark), the ratios to the naive script and to the
copy, then deletes everything it wrote.

Variants (each reads the same input, writes to a fresh output):

* ``copy``        shutil.copyfile: the I/O floor of a normalize (read + write the bytes)
* ``copy_fsync``  the same, then fsync, as bncli does before its atomic rename
* ``read``        read the file once into a 16 MiB buffer: the I/O floor of stats
* ``naive``       np.load, nn.BatchNorm2d (train mode, no_grad), np.save: what users write
* ``ooc``         bncli normalize --out-of-core (two passes)
* ``ooc_eval``    bncli normalize --out-of-core --mode eval (one pass)
* ``in_memory``   bncli normalize --in-memory
* ``naive_stats`` np.load, then x.mean/x.std over (0, 2, 3): the usual dataset-stats snippet
* ``stats``       bncli stats (exact float64)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HW = 256
CHANNELS = 3

NAIVE = """
import sys, numpy as np, torch
x = torch.from_numpy(np.load(sys.argv[1]))
bn = torch.nn.BatchNorm2d(x.shape[1])
with torch.no_grad():
    y = bn(x)
np.save(sys.argv[2], y.numpy())
"""

NAIVE_STATS = """
import sys, numpy as np
x = np.load(sys.argv[1])
print(x.mean(axis=(0, 2, 3)).tolist(), x.std(axis=(0, 2, 3)).tolist())
"""

COPY = "import shutil, sys; shutil.copyfile(sys.argv[1], sys.argv[2])"
COPY_FSYNC = """
import os, shutil, sys
shutil.copyfile(sys.argv[1], sys.argv[2])
fd = os.open(sys.argv[2], os.O_RDONLY); os.fsync(fd); os.close(fd)
"""
READ = """
import sys
buf = bytearray(16 << 20)
with open(sys.argv[1], 'rb', buffering=0) as fh:
    while fh.readinto(buf):
        pass
"""

BNCLI = [sys.executable, "-m", "bncli"]


def commands(src: Path, dst: Path, chunk: str | None) -> dict[str, list[str]]:
    chunk_args = ["--chunk-size", chunk] if chunk else []
    py = [sys.executable, "-c"]
    return {
        "copy": [*py, COPY, str(src), str(dst)],
        "copy_fsync": [*py, COPY_FSYNC, str(src), str(dst)],
        "read": [*py, READ, str(src)],
        "naive": [*py, NAIVE, str(src), str(dst)],
        "ooc": [*BNCLI, "normalize", str(src), "-o", str(dst), "--out-of-core", "--json", *chunk_args],
        "ooc_eval": [*BNCLI, "normalize", str(src), "-o", str(dst), "--out-of-core", "--mode", "eval", "--json",
                     *chunk_args],
        "in_memory": [*BNCLI, "normalize", str(src), "-o", str(dst), "--in-memory", "--json"],
        "naive_stats": [*py, NAIVE_STATS, str(src)],
        "stats": [*BNCLI, "stats", str(src), "--json", *chunk_args],
    }


def run(cmd: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS bytes of the child (wait4), and its stdout."""
    # Peak RSS comes from /usr/bin/time (%M, KiB): its child is forked from a tiny process.
    # wait4 on our own child would also count this (bigger) process's RSS at fork time,
    # which Linux carries into the child's high-water mark across exec.
    timer = shutil.which("time") or "/usr/bin/time"
    with tempfile.TemporaryDirectory() as tmp:
        rss_file = Path(tmp) / "rss"
        wrapped = [timer, "-f", "%M", "-o", str(rss_file), *cmd] if Path(timer).exists() else cmd
        with Path(tmp, "out").open("w+b") as out, Path(tmp, "err").open("w+b") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(wrapped, stdout=out, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
            code = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            if code != 0:
                raise RuntimeError(f"{cmd[:4]} failed ({code}): {err.read().decode()[-2000:]}")
            kib = int(rss_file.read_text().split()[-1]) if rss_file.exists() else usage.ru_maxrss
            return wall, kib * 1024, out.read().decode()


def make_input(path: Path, size_gib: float, seed: int = 0) -> tuple[int, ...]:
    """Write a float32 (N, 3, 256, 256) .npy of at least ``size_gib`` in 64 MiB pieces."""
    from bncli.io import NpyWriter

    sample = CHANNELS * HW * HW * 4
    n = max(2, -(-int(size_gib * 2**30) // sample))
    shape = (n, CHANNELS, HW, HW)
    rng = np.random.default_rng(seed)
    offset = np.array([0.485, 0.456, 0.406], np.float32)[None, :, None, None]
    scale = np.array([0.229, 0.224, 0.225], np.float32)[None, :, None, None]
    step = max(1, (64 << 20) // sample)
    with NpyWriter(path, shape, "<f4") as w:
        for start in range(0, n, step):
            rows = min(step, n - start)
            block = rng.standard_normal((rows, CHANNELS, HW, HW), dtype=np.float32)
            block *= scale
            block += offset
            w.write(block)
    return shape


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=float, default=2.0, help="input size (default 2)")
    parser.add_argument("--variants", default="copy,copy_fsync,read,naive,ooc,ooc_eval,in_memory,naive_stats,stats")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant; the median is reported")
    parser.add_argument("--chunk-size", default=None, help="bncli --chunk-size (default: bncli's)")
    parser.add_argument("--dir", default=None, help="parent of the temporary folder (default: the system temp)")
    parser.add_argument("--json-out", default=None, help="also write the results as JSON here")
    parser.add_argument("--make-input", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_input:
        make_input(Path(args.make_input), args.size_gib)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]

    work = Path(tempfile.mkdtemp(prefix="bncli-bench-", dir=args.dir))
    try:
        src, dst = work / "input.npy", work / "output.npy"
        free = shutil.disk_usage(work).free
        need = args.size_gib * 2**30 * 2.1
        if free < need:
            sys.exit(f"not enough disk space in {work}: need {fmt_bytes(need)}, {fmt_bytes(free)} free")
        t0 = time.perf_counter()
        # In a subprocess: this process stays small (its RSS is no part of any measurement).
        subprocess.run([sys.executable, __file__, "--make-input", str(src), "--size-gib", str(args.size_gib)],
                       check=True)
        shape = tuple(np.load(src, mmap_mode="r").shape)
        size = src.stat().st_size
        print(f"input {src} shape {shape} float32 {fmt_bytes(size)} (written in {time.perf_counter() - t0:.1f} s)",
              file=sys.stderr)
        cmds = commands(src, dst, args.chunk_size)
        results: dict[str, dict[str, float]] = {}
        for round_ in range(args.repeat):
            for name in variants:
                dst.unlink(missing_ok=True)
                wall, rss, _ = run(cmds[name])
                results.setdefault(name, {"walls": [], "rss": []})  # type: ignore[dict-item]
                results[name]["walls"].append(wall)  # type: ignore[attr-defined]
                results[name]["rss"].append(rss)  # type: ignore[attr-defined]
                print(f"  round {round_ + 1}: {name:12s} {wall:7.2f} s  peak RSS {fmt_bytes(rss)}",
                      file=sys.stderr, flush=True)
        dst.unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = {name: {"wall_s": statistics.median(r["walls"]), "walls": r["walls"],  # type: ignore[arg-type]
                      "peak_rss_bytes": max(r["rss"])} for name, r in results.items()}  # type: ignore[type-var]
    base = {k: summary[k]["wall_s"] for k in ("naive", "copy", "naive_stats", "read") if k in summary}
    print(f"\n{fmt_bytes(size)} float32 {shape}; median of {args.repeat}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}\n")
    print("| variant | wall (s) | peak RSS | vs naive | vs copy |")
    print("|---|---:|---:|---:|---:|")
    for name, s in summary.items():
        naive = base.get("naive_stats" if "stats" in name or name == "read" else "naive")
        vs_naive = f"{s['wall_s'] / naive:.2f}x" if naive else "-"
        vs_copy = f"{s['wall_s'] / base['copy']:.2f}x" if "copy" in base else "-"
        print(f"| {name} | {s['wall_s']:.2f} | {fmt_bytes(s['peak_rss_bytes'])} | {vs_naive} | {vs_copy} |")
    if args.json_out:
        doc = {"size_bytes": size, "shape": list(shape), "repeat": args.repeat, "chunk_size": args.chunk_size,
               "cpus": os.cpu_count(), "python": platform.python_version(), "results": summary}
        Path(args.json_out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
