"""The sweep behind ``bncli bench``: the engine against its baselines, row by row.

Every row times, interleaved (:func:`bncli.timing.time_cases`), the engine's own path
(:meth:`BatchNormEngine.apply`, what ``normalize`` runs), plain ``torch.nn.BatchNorm2d``, a
copy of the same bytes (the practical bandwidth ceiling) and, opt-in, ``torch.compile`` of
the module. Each variant is first checked against a float64 reference, then warmed up and
timed call by call; train rows restore the running stats before every call.

No typer, no rich, no printing: the command renders what :func:`run` returns.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

import torch
from torch import nn
from torch.nn import functional as F

from bncli import fastpath
from bncli.engine import BatchNormConfig, BatchNormEngine, resolve_device
from bncli.errors import ShapeError
from bncli.timing import TIMING_KEYS, Case, Timing, num_threads, time_cases
from bncli.wording import plural, verb

SCHEMA = "bncli.bench/1"
Shape = tuple[int, int, int, int]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
# Tensor passes of an ideal kernel, in units of the input's bytes (parameters ignored).
PASSES = {("eval", "forward"): 2, ("train", "forward"): 3,
          ("eval", "forward+backward"): 5, ("train", "forward+backward"): 8}
BYTES_MODEL = {
    ("eval", "forward"): "read x + write y",
    ("train", "forward"): "2 reads of x (statistics, normalize) + write y",
    ("eval", "forward+backward"): "forward (read x, write y) + backward (read x, read dy, write dx)",
    ("train", "forward+backward"): "forward (2 reads + 1 write) + backward (2 x read x and dy, write dx)",
}
# Generous bounds on max |y - y_float64|: they catch a wrong layout or wrong statistics, not
# rounding (nn.BatchNorm2d's own channels-last float32 path is off by ~2e-4 at 1M values).
TOLERANCE = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-3, 1e-3), torch.float16: (2e-2, 1e-2),
             torch.bfloat16: (1e-1, 4e-2)}


@dataclass(frozen=True)
class Preset:
    """A named sweep: shapes (N, C, H, W) and dtypes."""

    shapes: tuple[Shape, ...]
    dtypes: tuple[str, ...]
    about: str


RESNET50_LAYERS: tuple[tuple[int, int], ...] = (  # (C, H=W) of every distinct BatchNorm2d input
    (64, 112), (64, 56), (128, 56), (256, 56), (128, 28), (256, 28), (512, 28),
    (256, 14), (512, 14), (1024, 14), (512, 7), (2048, 7))
PRESETS: dict[str, Preset] = {
    "quick": Preset(((8, 3, 224, 224), (16, 64, 56, 56), (32, 2048, 7, 7)), ("float32", "bfloat16"),
                    "the CPU default: one stem-sized input, a mid layer, a many-channel layer"),
    "full": Preset(((8, 3, 224, 224), (32, 64, 112, 112), (128, 2048, 7, 7)),
                   ("float32", "float16", "bfloat16"),
                   "the GPU default: few channels/large images to many channels/small images"),
    "resnet50": Preset(tuple((32, c, h, h) for c, h in RESNET50_LAYERS), ("float32", "float16", "bfloat16"),
                       "every distinct BatchNorm2d input of ResNet-50 at 224x224, batch 32"),
}


# -- the sweep -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """What ``bncli bench`` sweeps and how it times (see the command's help)."""

    device: str = "cpu"
    preset: str | None = None
    shapes: tuple[Shape, ...] = ()
    batch: int | None = None
    dtypes: tuple[str, ...] = ()
    modes: tuple[str, ...] = ("train", "eval")
    layouts: tuple[str, ...] = ("nchw", "nhwc")
    backward: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    flush_l2: bool = True
    threads: int | None = None
    reps: int | None = None
    warmup: int = 3
    target_s: float = 0.3

    def resolved(self, device: torch.device) -> tuple[str, tuple[Shape, ...], tuple[str, ...]]:
        """(preset name, shapes, dtypes) after defaults: ``quick`` on CPU, ``full`` elsewhere."""
        name = self.preset or ("quick" if device.type == "cpu" and not self.shapes else "full")
        preset = PRESETS[name]
        shapes = self.shapes or preset.shapes
        if self.batch is not None and not self.shapes:
            shapes = tuple((self.batch, c, h, w) for _, c, h, w in shapes)
        return (name if not self.shapes else "custom"), shapes, self.dtypes or preset.dtypes


@dataclass
class Row:
    """One (shape, dtype, layout, mode, pass) of the sweep and what each variant measured."""

    shape: Shape
    dtype: str
    layout: str
    mode: str
    pass_: str
    engine_path: str | None = None  # fastpath.describe(): "module" or a fast path (forward rows)
    timings: dict[str, Timing] = field(default_factory=dict)
    errors: dict[str, float | None] = field(default_factory=dict)  # variant -> max |y - y_float64|
    failures: dict[str, str] = field(default_factory=dict)  # variant -> why it was not timed

    @property
    def bytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize * PASSES[(self.mode, self.pass_)]

    def gbs(self, variant: str) -> float | None:
        t = self.timings.get(variant)
        if t is None or t.median <= 0:
            return None
        moved = self.bytes if variant != "copy" else math.prod(self.shape) * DTYPES[self.dtype].itemsize * 2
        return moved / t.median / 1e9

    def pct_of_copy(self, variant: str) -> float | None:
        mine, ceiling = self.gbs(variant), self.gbs("copy")
        return None if mine is None or not ceiling else 100.0 * mine / ceiling

    @property
    def ratio(self) -> float | None:
        """engine / nn.BatchNorm2d median time (< 1: the engine is faster)."""
        if "engine" not in self.timings or "nn" not in self.timings:
            return None
        return self.timings["engine"].median / self.timings["nn"].median

    def to_json(self) -> dict[str, Any]:
        variants: dict[str, Any] = {}
        for name in ("engine", "nn", "compile", "copy"):
            if name not in self.timings and name not in self.failures:
                continue
            entry = self.timings[name].to_json() if name in self.timings else dict.fromkeys(TIMING_KEYS)
            entry.update(gbs=self.gbs(name), pct_of_copy=self.pct_of_copy(name),
                         max_abs_err=self.errors.get(name), error=self.failures.get(name))
            variants[name] = entry
        return {"shape": list(self.shape), "dtype": self.dtype, "layout": self.layout, "mode": self.mode,
                "pass": self.pass_, "bytes": self.bytes, "bytes_model": BYTES_MODEL[(self.mode, self.pass_)],
                "engine_path": self.engine_path, "ratio_engine_nn": self.ratio, "variants": variants}


@dataclass
class Report:
    """A finished sweep: the device, its environment, the rows and any notes."""

    device: str
    environment: dict[str, Any]
    settings: dict[str, Any]
    rows: list[Row]
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "device": self.device, "environment": self.environment,
                "settings": self.settings, "results": [r.to_json() for r in self.rows], "notes": self.notes}


def _supported(dtype: torch.dtype, device: torch.device) -> bool:
    if device.type == "cuda" and dtype == torch.bfloat16:
        return torch.cuda.is_bf16_supported()
    return not (device.type == "mps" and dtype == torch.float64)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple GPU (MPS)"
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {torch.backends.cpu.get_cpu_capability()} kernels"


def copy_bandwidth(device: torch.device, nbytes: int) -> tuple[float, int]:
    """GB/s of ``y.copy_(x)`` over ``nbytes`` float32 bytes, by torch.utils.benchmark.Timer."""
    from torch.utils.benchmark import Timer

    x = torch.ones(nbytes // 4, device=device)
    y = torch.empty_like(x)
    # Timer synchronizes CUDA around its blocks; the buffer dwarfs any cache, so no flush.
    m = Timer("y.copy_(x)", globals={"x": x, "y": y}, num_threads=torch.get_num_threads()
              ).blocked_autorange(min_run_time=0.15)
    return 2 * x.numel() * 4 / m.median / 1e9, x.numel() * 4


def environment(device: torch.device, copy_bytes: int) -> dict[str, Any]:
    gbs, nbytes = copy_bandwidth(device, copy_bytes)
    cudnn = torch.backends.cudnn.version() if device.type == "cuda" else None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn,
            "device_name": device_name(device), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(),
            "copy_gbs": gbs, "copy_bytes": nbytes}


def _reference(x: torch.Tensor, state: Mapping[str, torch.Tensor], mode: str, eps: float,
               momentum: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """float64 output (NCHW-indexed) and the running stats a train step leaves.

    Computed on the CPU for MPS inputs (MPS has no float64), on the input's device otherwise.
    """
    device = torch.device("cpu") if x.device.type == "mps" else x.device
    xd = x.to(device, torch.float64)
    d = {k: v.to(device, torch.float64) for k, v in state.items() if v.is_floating_point()}
    train = mode == "train"
    y = F.batch_norm(xd, None if train else d["running_mean"], None if train else d["running_var"],
                     d["weight"], d["bias"], train, 0.0, eps)
    if not train:
        return y, {}
    n = xd.numel() // xd.shape[1]
    mean, var = xd.mean((0, 2, 3)), xd.var((0, 2, 3), correction=0) * n / (n - 1)
    return y, {"running_mean": (1 - momentum) * d["running_mean"] + momentum * mean,
               "running_var": (1 - momentum) * d["running_var"] + momentum * var}


def _check(y: torch.Tensor, ref: torch.Tensor, module: nn.Module, ref_state: Mapping[str, torch.Tensor],
           dtype: torch.dtype) -> tuple[float, str | None]:
    atol, rtol = TOLERANCE[dtype]
    y = y.detach().to(ref.device).to(torch.float64)
    err = float((y - ref).abs().max())
    bad = not torch.allclose(y, ref, rtol=rtol, atol=atol)
    for key, want in ref_state.items():
        got = getattr(module, key).detach().to(want.device).to(torch.float64)
        bad = bad or not torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    return err, (f"differs from the float64 reference (max abs error {err:.3g})" if bad else None)


class _TimingOptions(TypedDict):
    """The keyword arguments every row passes to :func:`bncli.timing.time_cases`."""

    device: torch.device
    reps: int | None
    warmup: int
    target_s: float
    flush_l2: bool


def _with_backward(fn: Callable[[], torch.Tensor], dy: torch.Tensor) -> Callable[[], None]:
    """A step that runs ``fn`` and back-propagates ``dy`` through its output."""
    def step() -> None:
        fn().backward(dy)
    return step


def _bench_row(row: Row, device: torch.device, s: Settings, notes: list[str], use_compile: bool) -> None:
    """Build the variants of one row, check each against float64, then time them together."""
    n, c, h, w = row.shape
    dtype = DTYPES[row.dtype]
    gen = torch.Generator().manual_seed(0)
    logical = (torch.randn(row.shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(device, dtype)
    if row.layout == "nhwc":  # NHWC memory: what `normalize --layout nhwc` holds
        data = logical.permute(0, 2, 3, 1).contiguous()
        x = data.permute(0, 3, 1, 2)  # the same bytes as a channels_last NCHW tensor
    else:
        data = x = logical.contiguous()
    # float64 data keeps float64 state, as apply() would switch to; else float32 (mixed precision).
    param = torch.float64 if dtype == torch.float64 else torch.float32
    engine = BatchNormEngine(BatchNormConfig(c), device=device, param_dtype=param)
    engine.load_state({"weight": torch.rand(c, generator=gen) + 0.5, "bias": torch.rand(c, generator=gen) - 0.5,
                       "running_mean": torch.rand(c, generator=gen) - 0.5,
                       "running_var": torch.rand(c, generator=gen) + 0.5})
    row.engine_path = None if row.pass_ != "forward" else fastpath.describe(
        fastpath.choose(x, batch_stats=row.mode == "train"))
    state = {k: v.clone() for k, v in engine.module.state_dict().items()}
    baseline = nn.BatchNorm2d(c, device=device, dtype=param)
    baseline.load_state_dict(state)
    baseline.train(row.mode == "train")
    modules: dict[str, nn.Module] = {"engine": engine.module, "nn": baseline}
    runs: dict[str, Callable[[], torch.Tensor]] = {
        "engine": lambda: engine.apply(data, row.mode, row.layout), "nn": lambda: baseline(x)}
    if use_compile:
        compiled_module = nn.BatchNorm2d(c, device=device, dtype=param)
        compiled_module.load_state_dict(state)
        compiled_module.train(row.mode == "train")
        torch.compiler.reset()  # a fresh cache per row: no silent fallback after the recompile limit
        compiled = torch.compile(compiled_module, dynamic=False)
        modules["compile"] = compiled_module
        runs["compile"] = lambda: compiled(x)
    backward = row.pass_ == "forward+backward"
    steps: dict[str, Callable[[], object]] = dict(runs)  # what is timed: a forward, or forward+backward
    if backward:
        x.requires_grad_(True)
        dy = torch.randn(row.shape, generator=gen, dtype=torch.float64).to(device, dtype)
        # the engine is a no-grad data path
        steps = {name: _with_backward(fn, dy) for name, fn in runs.items() if name != "engine"}

    def reset(module: nn.Module) -> Callable[[], None]:
        def go() -> None:
            with torch.no_grad():
                for key in ("running_mean", "running_var", "num_batches_tracked"):
                    getattr(module, key).copy_(state[key])
            module.zero_grad(set_to_none=True)
            x.grad = None
        return go

    cases = {name: Case(fn, reset(modules[name]) if row.mode == "train" or backward else None)
             for name, fn in steps.items()}
    out = torch.empty_like(data)
    cases["copy"] = Case(lambda: out.copy_(data))

    eps, momentum = engine.config.eps, engine.config.momentum or 0.1
    ref, ref_state = _reference(x.detach(), state, row.mode, eps, momentum)
    if backward:
        xr = x.detach().to(ref.device).to(torch.float64).requires_grad_(True)
        _reference(xr, state, row.mode, eps, momentum)[0].backward(dy.to(ref.device).to(torch.float64))
        assert xr.grad is not None  # xr is a leaf that requires grad and took part in backward()
        ref, ref_state = xr.grad, {}
    for name in list(cases):
        if name == "copy":
            continue
        before = cases[name].before
        if before is not None:
            before()
        y: torch.Tensor | None
        try:
            if backward:
                cases[name].fn()
                y = x.grad
            else:
                with torch.no_grad():
                    y = runs[name]()  # the same callable as cases[name].fn, typed as returning a tensor
                y = y.permute(0, 3, 1, 2) if name == "engine" and row.layout == "nhwc" else y
        except Exception as exc:  # noqa: BLE001 - torch.compile fails in many ways; report, go on
            if name != "compile":
                raise
            row.failures[name] = f"torch.compile failed: {str(exc).strip().splitlines()[0][:200]}"
            notes.append(f"{row.shape} {row.dtype} {row.layout} {row.mode}: {row.failures[name]}")
            del cases[name]
            continue
        assert y is not None, f"{name}: backward() left no gradient on the input"
        err, bad = _check(y, ref, modules[name], ref_state, dtype)
        row.errors[name] = err if math.isfinite(err) else None  # JSON has no NaN
        if bad:
            row.failures[name] = bad
            notes.append(f"{row.shape} {row.dtype} {row.layout} {row.mode}: {name} {bad}; not timed.")
            del cases[name]
    timing: _TimingOptions = {"device": device, "reps": s.reps, "warmup": s.warmup,
                              "target_s": s.target_s, "flush_l2": s.flush_l2}
    with torch.enable_grad() if backward else torch.no_grad():
        try:
            row.timings = time_cases(cases, cuda_graphs=s.cuda_graphs, **timing)
        except RuntimeError as exc:
            if not s.cuda_graphs:
                raise
            # Not every call can be captured (e.g. momentum=None reads a count on the host).
            notes.append(f"{row.shape} {row.dtype} {row.layout} {row.mode}: CUDA-graph capture failed "
                         f"({str(exc).strip().splitlines()[0][:160]}); timed eagerly instead.")
            row.timings = time_cases(cases, cuda_graphs=False, **timing)


# Peak memory of one row per input value: the float64 draw and reference, the float64 copies
# the check makes, the input (and its NHWC copy) and every variant's output. Measured with
# /usr/bin/time on (8,4,512,512): 47 (bfloat16) to 58 (float64) bytes, 68 with --backward.
BYTES_PER_VALUE = {False: 64, True: 80}


def memory_problem(s: Settings) -> str | None:
    """Why the sweep's largest row would not fit in memory (None when it fits).

    Checked before the sweep allocates anything, so that a mistyped ``--shape`` or ``--batch``
    is an error, not minutes of swapping or the OOM killer. On a GPU the device's free
    memory counts too (only the float64 draw stays on the host).

    Raises:
        DeviceError: The device is not available (the message lists those that are).
    """
    from bncli.io import available_memory

    device = resolve_device(s.device)
    _, shapes, dtypes = s.resolved(device)
    per_value = BYTES_PER_VALUE[s.backward]
    worst = max(shapes, key=math.prod)
    need = math.prod(worst) * per_value
    limits = [("memory", available_memory(), need)]
    if device.type == "cuda":
        limits = [("host memory", available_memory(), math.prod(worst) * 16),
                  (f"memory on {device}", torch.cuda.mem_get_info(device)[0], need)]
    for where, have, needed in limits:
        if have is not None and needed > have:
            most = have // (needed // math.prod(worst))
            return (f"shape {worst} ({math.prod(worst):,} values) needs about {needed / 2**30:.1f} GiB "
                    f"for one bench row (input, outputs, float64 reference), but {have / 2**30:.1f} GiB of "
                    f"{where} is available here: allowed are shapes of up to about {most:,} values "
                    f"(N*C*H*W, for {', '.join(dtypes)}).")
    return None


def plan(s: Settings, device: torch.device) -> tuple[str, list[Row], list[str]]:
    """The rows a sweep will run (preset resolved), and notes on what was left out."""
    name, shapes, dtypes = s.resolved(device)
    rows: list[Row] = []
    notes: list[str] = []
    for dt in dtypes:
        if not _supported(DTYPES[dt], device):
            notes.append(f"{dt} is not supported on {device}; skipped.")
    passes = ("forward", "forward+backward") if s.backward else ("forward",)
    for shape in shapes:
        if len(shape) != 4 or min(shape) < 1:
            raise ShapeError(f"A bench shape must be 4 positive sizes N,C,H,W, got {shape}.",
                             hint="Pass e.g. --shape 8,3,224,224.")
        for dt in dtypes:
            if not _supported(DTYPES[dt], device):
                continue
            for layout in s.layouts:
                for mode in s.modes:
                    if mode == "train" and shape[0] * shape[2] * shape[3] == 1:
                        notes.append(f"{shape} train: one value per channel; skipped.")
                        continue
                    rows.extend(Row(shape, dt, layout, mode, p) for p in passes)
    return name, rows, notes


def _health_notes(rows: list[Row], env_copy_gbs: float, threads: int = 2, pinned: bool = False) -> list[str]:
    """Warnings about measurements a busy machine spoiled.

    ``threads`` is the thread count the rows ran with and ``pinned`` whether the user chose it
    (``--threads``): the advice to pin threads, or to use one, is only given where it is new.
    """
    notes = []
    noisy = {id(r) for r in rows for t in r.timings.values() if t.iqr > 0.1 * t.median}
    if noisy:
        advice = "Re-run on an idle machine." if pinned else "Re-run, or pin threads (--threads)."
        notes.append(f"{len(noisy)} of {plural(len(rows), 'row')} {verb(len(noisy), 'has', 'have')} a variant "
                     "whose IQR exceeds 10% of its median: "
                     f"the machine was busy. {advice}")
    # A stall can also be steady (low IQR): with several threads, a worker that another process
    # keeps off its core delays every parallel region by a scheduler tick. The copy of the same
    # bytes exposes it: it should never run far below the sweep's typical copy bandwidth.
    big = [(r, g) for r in rows if r.bytes >= 64 << 10 and (g := r.gbs("copy"))]
    if big:
        typical = max(env_copy_gbs, sorted(g for _, g in big)[len(big) // 2])
        stalled = [r for r, g in big if g < typical / 4]
        if stalled:
            advice = "Re-run on an idle machine" + (", or use --threads 1." if threads > 1 else ".")
            notes.append(f"{len(stalled)} of {plural(len(rows), 'row')} copied at under a quarter of the typical "
                         f"{typical:.1f} GB/s: the CPU was taken by another process while they ran, so their "
                         "absolute times are not representative (their ratios still are: variants run "
                         f"interleaved). {advice}")
    return notes


def run(s: Settings, progress: Callable[[int, int, str], None] | None = None) -> Report:
    """Resolve the device, run the sweep, and return everything measured.

    Raises:
        DeviceError: The device is not available (the message lists those that are).
        ShapeError: A shape is not 4 positive sizes.
    """
    device = resolve_device(s.device)
    with num_threads(s.threads):
        name, rows, notes = plan(s, device)
        largest = max((math.prod(r.shape) * DTYPES[r.dtype].itemsize for r in rows), default=0)
        env = environment(device, min(max(16 << 20, 4 * largest), 1 << 30))
        env["cache"] = ("L2 flushed before each timed call" if device.type == "cuda" and s.flush_l2
                        else "not flushed (warm-up, then repeated calls)")
        use_compile = s.compile
        for i, row in enumerate(rows):
            if progress:
                progress(i, len(rows), f"{'x'.join(map(str, row.shape))} {row.dtype} {row.layout} {row.mode}"
                         + (" fwd+bwd" if row.pass_ != "forward" else ""))
            _bench_row(row, device, s, notes, use_compile)
            if "torch.compile failed" in row.failures.get("compile", ""):
                use_compile = False
                notes.append("torch.compile is off for the remaining rows.")
        if progress:
            progress(len(rows), len(rows), "done")
    notes.extend(_health_notes(rows, env["copy_gbs"], env["threads"], pinned=s.threads is not None))
    settings = {"preset": name, "modes": list(s.modes), "layouts": list(s.layouts),
                "backward": s.backward, "compile": s.compile, "cuda_graphs": s.cuda_graphs,
                "reps": s.reps, "warmup": s.warmup, "target_s": s.target_s, "threads": env["threads"]}
    return Report(str(device), env, settings, rows, notes)
