"""The engine's CPU fast paths (bncli/fastpath.py) against nn.BatchNorm2d, in the same run.

Usage::

    python benchmarks/fastpath.py                       # both layouts, the default grids
    python benchmarks/fastpath.py --layout nchw --dtype float32 --mode train --threads 1
    python benchmarks/fastpath.py --any-size --json-out fastpath.json

For every (layout, shape, dtype, mode) it feeds the same tensor to ``BatchNormEngine.apply``
(what ``normalize`` runs) and to a plain ``nn.BatchNorm2d`` with the same state, times both
interleaved with :func:`bncli.timing.time_cases` (for NHWC rows also the module on an NCHW
copy of the values, for reference) and prints the median times and the ratio engine /
nn.BatchNorm2d (< 1: the engine is faster), of the medians and of the fastest calls (the
latter is steadier on a shared machine). ``route`` is the path the engine took;
``--any-size`` makes it take every route that applies whatever the size or channel count
(``fastpath.choose(thresholds=False)``), which is how the thresholds were found.

Before timing, each row is checked: a route without batch statistics must be bitwise the
module; one with batch statistics must match the module on the NCHW copy of the values
(torch.testing's default tolerances, one output rounding for 16-bit types, running stats
included, to 1e-3 for 16-bit data, where the module's own sums drift) and be no further from a
float64 reference than the module is on the same memory, or within the bar (1e-6 float32,
1e-12 float64; ``err engine`` / ``err nn``: max |y - y_float64| over the output RMS). The
script exits 1 if any row fails its check.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from bncli import fastpath
from bncli.engine import BatchNormConfig, BatchNormEngine
from bncli.timing import Case, num_threads, time_cases

SHAPES = {
    "nchw": [(8, 3, 224, 224), (32, 3, 112, 112), (1, 3, 224, 224), (2, 3, 224, 224), (8, 1, 224, 224),
             (1, 3, 719, 727), (8, 8, 112, 112), (16, 16, 56, 56), (16, 64, 56, 56), (32, 256, 14, 14),
             (32, 2048, 7, 7)],
    "nhwc": [(8, 3, 224, 224), (32, 3, 112, 112), (1, 3, 719, 727), (16, 4, 112, 112), (8, 8, 112, 112),
             (16, 8, 224, 224), (8, 12, 112, 112), (16, 16, 56, 56), (16, 64, 56, 56)],
}


def make(shape: tuple[int, ...], dtype: torch.dtype, mode: str) -> tuple[BatchNormEngine, nn.BatchNorm2d, dict]:
    c = shape[1]
    param = torch.float64 if dtype == torch.float64 else torch.float32
    engine = BatchNormEngine(BatchNormConfig(c), param_dtype=param)
    gen = torch.Generator().manual_seed(1)
    engine.load_state({"weight": torch.rand(c, generator=gen) + 0.5, "bias": torch.rand(c, generator=gen) - 0.5,
                       "running_mean": torch.rand(c, generator=gen) - 0.5,
                       "running_var": torch.rand(c, generator=gen) + 0.5})
    module = nn.BatchNorm2d(c, dtype=param).train(mode == "train")
    state = {k: v.clone() for k, v in engine.module.state_dict().items()}
    module.load_state_dict(state)
    return engine, module, state


def reset(module: nn.Module, state: dict) -> None:
    with torch.no_grad():
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            getattr(module, key).copy_(state[key])


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| over each channel's output RMS (the README's precision measure)."""
    rms = ref.pow(2).mean((0, 2, 3), keepdim=True).sqrt().clamp_min(1e-300)
    return float(((y.double() - ref).abs() / rms).max())


def check(engine: BatchNormEngine, module: nn.BatchNorm2d, state: dict, x: torch.Tensor, mode: str,
          route: fastpath.Route | None) -> dict[str, Any]:
    """Equality evidence for one row (one call each, from the same starting state)."""
    nchw = nn.BatchNorm2d(x.shape[1], dtype=module.weight.dtype).train(mode == "train")
    nchw.load_state_dict(state)
    reset(engine.module, state)
    reset(module, state)
    with torch.no_grad():
        got = fastpath.forward(engine.module, x, route) if route else engine.apply(x, mode)
        mine, contiguous = module(x), nchw(x.contiguous())
    d = {k: v.to(torch.float64) for k, v in state.items() if v.is_floating_point()}
    train = mode == "train"
    ref = F.batch_norm(x.to(torch.float64), None if train else d["running_mean"],
                       None if train else d["running_var"], d["weight"], d["bias"], train, 0.0, module.eps)
    out = {"bitwise_vs_nn": bool(torch.equal(got, mine)), "err_engine": rel_error(got, ref),
           "err_nn": rel_error(mine, ref)}
    # One output rounding apart is as close as 16-bit results of two float32 computations get;
    # the module's running stats of 16-bit NCHW data come from float32 sums (up to 2.6e-4 off).
    half = x.dtype in (torch.float16, torch.bfloat16)
    tols = {torch.float16: dict(rtol=1e-3, atol=1e-3), torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}.get(x.dtype, {})
    try:
        torch.testing.assert_close(got, contiguous, **tols)
        torch.testing.assert_close(engine.module.state_dict(), nchw.state_dict(),
                                   **(dict(rtol=1e-3, atol=1e-5) if half else {}))
        out["close_to_nn_nchw"] = True
    except AssertionError:
        out["close_to_nn_nchw"] = False
    batch_stats = route is not None and route.name != "nhwc-eval"
    bar = {torch.float32: 1e-6, torch.float64: 1e-12}.get(x.dtype, float("inf"))  # 16-bit: rounding
    out["ok"] = (out["close_to_nn_nchw"] if batch_stats else out["bitwise_vs_nn"]) and (
        out["err_engine"] <= max(out["err_nn"] * 1.01 + 1e-12, bar))
    return out


def bench_row(layout: str, shape: tuple[int, ...], dtype: torch.dtype, mode: str, reps: int | None,
              any_size: bool) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) + 3).to(dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    engine, module, state = make(shape, dtype, mode)
    route = fastpath.choose(x, batch_stats=mode == "train", thresholds=not any_size)
    evidence = check(engine, module, state, x, mode, route)

    def resetter(m: nn.Module) -> Any:
        return (lambda: reset(m, state)) if mode == "train" else None

    def engine_call() -> torch.Tensor:
        return fastpath.forward(engine.module, x, route) if route else engine.apply(x, mode)

    cases = {"engine": Case(engine_call, resetter(engine.module)), "nn": Case(lambda: module(x), resetter(module))}
    if layout == "nhwc":
        contiguous = x.contiguous()
        nchw = nn.BatchNorm2d(shape[1], dtype=module.weight.dtype).train(mode == "train")
        nchw.load_state_dict(state)
        cases["nn_nchw"] = Case(lambda: nchw(contiguous), resetter(nchw))
    with torch.no_grad():
        t = time_cases(cases, reps=reps, warmup=3, target_s=0.5, min_reps=20)
    return {"layout": layout, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "mode": mode,
            "route": route.name if route else "module", "ms": {k: v.median * 1e3 for k, v in t.items()},
            "min_ms": {k: min(v.times) * 1e3 for k, v in t.items()},
            "iqr_pct": {k: 100 * v.iqr / v.median for k, v in t.items()},
            "ratio_engine_nn": t["engine"].median / t["nn"].median,
            "ratio_min": min(t["engine"].times) / min(t["nn"].times), **evidence}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layout", choices=["nchw", "nhwc", "both"], default="both")
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--mode", action="append", choices=["train", "eval"])
    parser.add_argument("--shape", action="append", help="N,C,H,W instead of the default grid (repeatable)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None, help="default: ~0.5 s of calls per row")
    parser.add_argument("--any-size", action="store_true", help="take every route that applies, at any size")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    layouts = ["nchw", "nhwc"] if args.layout == "both" else [args.layout]
    dtypes = [getattr(torch, d) for d in args.dtype or ["float32", "bfloat16"]]
    modes = args.mode or ["train", "eval"]
    rows = []
    with num_threads(args.threads) as threads:
        print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {threads} thread(s)")
        print(f"{'layout':>6} {'shape':>15} {'dtype':>8} {'mode':>5} {'route':>10} {'nn ms':>8} {'engine ms':>9} "
              f"{'eng/nn':>6} {'(min)':>6} {'nn NCHW':>8} {'err engine':>10} {'err nn':>8}")
        for layout in layouts:
            shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else SHAPES[layout]
            for shape in shapes:
                for dtype in dtypes:
                    for mode in modes:
                        if layout == "nchw" and mode == "eval":
                            continue  # no fast path: eval on NCHW is the module's, bit for bit
                        row = bench_row(layout, shape, dtype, mode, args.reps, args.any_size)
                        rows.append(row)
                        ms = row["ms"]
                        print(f"{layout:>6} {'x'.join(map(str, shape)):>15} {row['dtype']:>8} {mode:>5} "
                              f"{row['route']:>10} {ms['nn']:8.3f} {ms['engine']:9.3f} {row['ratio_engine_nn']:6.2f} "
                              f"{row['ratio_min']:6.2f} "
                              f"{ms.get('nn_nchw', float('nan')):8.3f} {row['err_engine']:10.1e} {row['err_nn']:8.1e}"
                              f"{'' if row['ok'] else '  << FAIL'}", flush=True)
    for name in sorted({r["route"] for r in rows} - {"module"}):
        ratios = sorted(r["ratio_engine_nn"] for r in rows if r["route"] == name)
        print(f"{name}: {len(ratios)} rows, engine/nn (of the medians) median {ratios[len(ratios) // 2]:.2f}, "
              f"best {ratios[0]:.2f}, worst {ratios[-1]:.2f}")
    failures = sum(not r["ok"] for r in rows)
    print(f"check failures: {failures}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"threads": threads, "torch": torch.__version__, "rows": rows}, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
