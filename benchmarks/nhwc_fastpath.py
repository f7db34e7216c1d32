"""The engine's CPU channels-last fast path against nn.BatchNorm2d, in the same run.

Usage::

    python benchmarks/nhwc_fastpath.py                  # the default grid, torch's threads
    python benchmarks/nhwc_fastpath.py --threads 1 --dtype float32 --reps 50
    python benchmarks/nhwc_fastpath.py --json-out fastpath.json

For every (shape, dtype, mode) it feeds the same channels_last tensor to
``BatchNormEngine.apply`` and to a plain ``nn.BatchNorm2d`` with the same state, times
both interleaved with :func:`bncli.timing.time_cases` (plus the module on an NCHW copy
of the values, for reference), and prints the median times and the ratio
engine / nn.BatchNorm2d (< 1: the engine is faster). Before timing it checks equality:
eval outputs must be bitwise equal to the module's; train outputs and running stats are
compared with the module on the NCHW copy (torch.testing default tolerances), and the
largest error against a float64 reference is shown for the engine and for the module.

The last rows are controls the fast path does not take (16 and 64 channels, NCHW input):
their ratio shows the engine's own per-call overhead.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn
from torch.nn import functional as F

from bncli.engine import BatchNormConfig, BatchNormEngine, channels_last_fast_path
from bncli.timing import Case, num_threads, time_cases

SHAPES = [(8, 3, 224, 224), (32, 3, 112, 112), (16, 4, 112, 112), (8, 8, 112, 112), (8, 12, 112, 112),
          (16, 16, 56, 56), (16, 64, 56, 56)]


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


def check(engine: BatchNormEngine, module: nn.BatchNorm2d, state: dict, x: torch.Tensor, mode: str) -> dict:
    """Equality evidence for one row (one call each, from the same starting state)."""
    reference = nn.BatchNorm2d(x.shape[1], dtype=module.weight.dtype).train(mode == "train")
    reference.load_state_dict(state)
    reset(engine.module, state)
    reset(module, state)
    with torch.no_grad():
        got, cl, nchw = engine.apply(x, mode), module(x), reference(x.contiguous())
    xd = x.to(torch.float64)
    d = {k: v.to(torch.float64) for k, v in state.items() if v.is_floating_point()}
    train = mode == "train"
    ref = F.batch_norm(xd, None if train else d["running_mean"], None if train else d["running_var"],
                       d["weight"], d["bias"], train, 0.0, module.eps)
    out = {"bitwise_vs_nn": bool(torch.equal(got, cl)),
           "max_diff_vs_nn": float((got.double() - cl.double()).abs().max()),
           "err_engine": float((got.double() - ref).abs().max()),
           "err_nn": float((cl.double() - ref).abs().max())}
    try:
        torch.testing.assert_close(got, nchw)
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(engine.module.state_dict()[key], value)
        out["close_to_nn_nchw"] = True
    except AssertionError:
        out["close_to_nn_nchw"] = False
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--mode", action="append", choices=["train", "eval"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None, help="default: ~0.5 s of calls per row")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    dtypes = args.dtype or ["float32", "bfloat16", "float16"]
    modes = args.mode or ["train", "eval"]
    rows, failures = [], 0
    with num_threads(args.threads) as threads:
        print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {threads} thread(s)")
        print(f"{'shape':>16} {'dtype':>9} {'mode':>5} {'path':>5} {'nn CL ms':>9} {'engine ms':>9} "
              f"{'eng/nn':>6} {'nn NCHW':>8}  equality")
        for shape in SHAPES:
            for dt in dtypes:
                dtype = getattr(torch, dt)
                for mode in modes:
                    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 2 + 0.5).to(dtype)
                    x = x.contiguous(memory_format=torch.channels_last)
                    xc = x.contiguous()
                    engine, module, state = make(shape, dtype, mode)
                    nchw_module = nn.BatchNorm2d(shape[1], dtype=module.weight.dtype).train(mode == "train")
                    nchw_module.load_state_dict(state)
                    fast = channels_last_fast_path(x, mode) > 0
                    evidence = check(engine, module, state, x, mode)
                    ok = evidence["bitwise_vs_nn"] if (mode == "eval" or not fast) else evidence["close_to_nn_nchw"]
                    ok = ok and evidence["err_engine"] <= evidence["err_nn"] * 1.01 + 1e-12
                    failures += not ok

                    def resetter(m: nn.Module, s: dict = state, train: bool = mode == "train") -> object:
                        return (lambda: reset(m, s)) if train else None

                    cases = {
                        "engine": Case(lambda e=engine, m=mode, t=x: e.apply(t, m), resetter(engine.module)),
                        "nn": Case(lambda m=module, t=x: m(t), resetter(module)),
                        "nn_nchw": Case(lambda m=nchw_module, t=xc: m(t), resetter(nchw_module)),
                    }
                    with torch.no_grad():
                        t = time_cases(cases, reps=args.reps, warmup=3, target_s=0.5, min_reps=20)
                    ratio = t["engine"].median / t["nn"].median
                    equality = ("bitwise" if evidence["bitwise_vs_nn"] else
                                f"max|diff| {evidence['max_diff_vs_nn']:.1e}, err vs f64 engine "
                                f"{evidence['err_engine']:.1e} / nn {evidence['err_nn']:.1e}")
                    print(f"{'x'.join(map(str, shape)):>16} {dt:>9} {mode:>5} {'fast' if fast else 'nn':>5} "
                          f"{t['nn'].median * 1e3:9.3f} {t['engine'].median * 1e3:9.3f} {ratio:6.2f} "
                          f"{t['nn_nchw'].median * 1e3:8.3f}  {equality}{'' if ok else '  << FAIL'}", flush=True)
                    rows.append({"shape": list(shape), "dtype": dt, "mode": mode, "fast_path": fast,
                                 "nn_ms": t["nn"].median * 1e3, "engine_ms": t["engine"].median * 1e3,
                                 "nn_nchw_ms": t["nn_nchw"].median * 1e3, "ratio_engine_nn": ratio,
                                 "iqr_pct": {k: 100 * v.iqr / v.median for k, v in t.items()}, **evidence})
    fast_rows = [r for r in rows if r["fast_path"]]
    if fast_rows:
        ratios = sorted(r["ratio_engine_nn"] for r in fast_rows)
        print(f"fast-path rows: engine/nn median {ratios[len(ratios) // 2]:.2f}, best {ratios[0]:.2f}, "
              f"worst {ratios[-1]:.2f}; equality failures: {failures}")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:  # noqa: PTH123 - a script's own output
            json.dump({"threads": threads, "torch": torch.__version__, "rows": rows}, fh, indent=2)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
