"""The operations behind the commands: files in, engine, results out (as data).

Commands call these and render what they return; nothing here prints or knows typer/rich.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bncli import io
from bncli.audit import LayerAudit, audit_layer
from bncli.engine import BatchNormConfig, BatchNormEngine, resolve_device, validate_input
from bncli.errors import DTypeError, InputError, OutputError, ShapeError, StateError
from bncli.layers import bn_layers, find_layer, layer_listing, layer_tensors
from bncli.moments import Moments
from bncli.wording import plural


@dataclass(frozen=True)
class EngineOptions:
    """Everything the user can say about the BatchNorm2d layer (flags of normalize/compare).

    ``state`` is a state_dict or checkpoint file (``--state``), or a state_dict itself (the
    Python API's ``state=``).
    """

    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True
    num_features: int | None = None
    state: Path | Mapping[str, torch.Tensor] | None = None
    prefix: str | None = None
    weight: str | Sequence[float] | np.ndarray | None = None
    bias: str | Sequence[float] | np.ndarray | None = None
    device: str = "cpu"


@dataclass
class LayerSource:
    """Where the engine's state came from, for the report."""

    description: str
    ignored_keys: list[str] = field(default_factory=list)
    # The checkpoint layer's findings (bncli.audit), with this run's eps and momentum.
    audit: LayerAudit | None = None


def select_layer(state: Mapping[str, torch.Tensor], prefix: str | None,
                 source: str) -> tuple[dict[str, torch.Tensor], str]:
    """Pick one BatchNorm layer's tensors out of a state_dict or whole-model checkpoint.

    ``prefix`` is matched by :func:`bncli.layers.find_layer` (containers and wrapper
    prefixes understood); without one, a file with a single layer needs none.

    Returns:
        The layer's tensors under bare keys (``weight``, ``running_mean`` ...) and its prefix.

    Raises:
        StateError: No such layer; the message lists the layers the file holds.
    """
    layers = bn_layers(state)
    names = [p for p, _ in layers]
    if prefix is not None:
        prefix = find_layer(state, prefix, source)
    elif "" in names or any(k in state for k in ("weight", "bias")) and not layers or not state:
        # An empty state_dict is what nn.BatchNorm2d(affine=False, track_running_stats=False)
        # saves (and load_state_dict accepts): a bare layer with nothing to load.
        prefix = ""
    elif len(layers) == 1:
        prefix = layers[0][0]
    elif not layers:
        raise StateError(f"{source}: holds no BatchNorm layer (no running_mean/running_var keys).",
                         hint="Pass a BatchNorm2d state_dict or a model checkpoint, "
                              "or use --weight/--bias for the affine parameters only.")
    else:
        raise StateError(f"{source}: holds {len(layers)} BatchNorm layers; which one?",
                         hint=f"Choose with --prefix, one of: {layer_listing(layers)}.")
    return layer_tensors(state, prefix), prefix


def build_engine(opts: EngineOptions, *, data_channels: int | None, data_dtype: torch.dtype
                 ) -> tuple[BatchNormEngine, LayerSource]:
    """Build the engine from flags, a ``--state`` file and ``--weight``/``--bias``.

    ``num_features`` comes from ``--num-features``, else the state's layer, else the data.
    """
    layer: dict[str, torch.Tensor] = {}
    source = LayerSource("a fresh nn.BatchNorm2d (weight 1, bias 0, running mean 0, var 1)")
    if opts.state is not None:
        given = isinstance(opts.state, Mapping)
        name = "the given state_dict" if given else str(opts.state)
        flat = dict(opts.state) if isinstance(opts.state, Mapping) else io.load_state_dict(opts.state)
        layer, prefix = select_layer(flat, opts.prefix, name)
        where = f"layer {prefix!r} of " if prefix else ""
        audit = audit_layer(layer, prefix=prefix, eps=opts.eps, momentum=opts.momentum)
        source = LayerSource(f"{where}{name}", audit=audit)
        # The engine refuses these too; the audit's words name the channels.
        refused = next((f for f in audit.findings if f.code in ("shape_mismatch", "negative_var")), None)
        if refused is not None:
            raise StateError(f"{source.description}: {refused.message}", hint=refused.hint)
    elif opts.prefix is not None:
        raise StateError("--prefix was given without --state.",
                         hint="Pass the checkpoint with --state FILE --prefix NAME.")
    c = opts.num_features
    if c is None and "running_mean" in layer:
        c = int(layer["running_mean"].numel())
    elif c is None and "weight" in layer:
        c = int(layer["weight"].numel())
    if c is None:
        c = data_channels
    if c is None:
        raise ShapeError("Cannot tell the number of channels.", hint="Pass --num-features C.")
    config = BatchNormConfig(num_features=c, eps=opts.eps, momentum=opts.momentum,
                             affine=opts.affine, track_running_stats=opts.track_running_stats)
    device = resolve_device(opts.device)
    param_dtype = torch.float64 if data_dtype == torch.float64 else torch.float32
    engine = BatchNormEngine(config, device=device, param_dtype=param_dtype)
    if opts.state is not None and not layer and (opts.affine or opts.track_running_stats):
        raise StateError(f"{source.description}: holds an empty state_dict (no weight, bias or running stats), "
                         "as saved by a layer with --no-affine --no-track-running-stats.",
                         hint="Use it with --no-affine --no-track-running-stats, "
                              "or pass a state that holds what this layer uses.")
    if layer:
        source.ignored_keys = engine.load_state(layer, source=source.description)
    for name, spec in (("weight", opts.weight), ("bias", opts.bias)):
        if spec is not None:
            # A comma list or a tensor file (the flags), or numbers (the Python API).
            vec = torch.from_numpy(io.parse_vector(spec, name) if isinstance(spec, str)
                                   else np.asarray(spec, dtype=np.float64).reshape(-1))
            if vec.numel() != c:
                raise StateError(f"--{name} has {plural(vec.numel(), 'value')}, but the layer has "
                                 f"{plural(c, 'channel')}.",
                                 hint=f"Give exactly {plural(c, 'value')}, one per channel.")
            engine.set_affine(**{name: vec})
    return engine, source


class LayerEngine:
    """The one BatchNorm2d layer of a run, built on first use and then shared.

    Built from the options and the first input that needs it (C and the parameter dtype
    may come from the data), then reused, so several inputs are consecutive steps of one
    layer, as the batches of a training loop are.

    Attributes:
        opts: The layer's options.
        failed: The error building the layer raised, if it did (an error of the options,
            such as a ``--state`` that does not fit, not of one input).
    """

    def __init__(self, opts: EngineOptions) -> None:
        self.opts = opts
        self.failed: BaseException | None = None
        self._built: tuple[BatchNormEngine, LayerSource] | None = None

    @property
    def built(self) -> tuple[BatchNormEngine, LayerSource] | None:
        """The engine and where its state came from, once built."""
        return self._built

    def get(self, *, data_channels: int | None, data_dtype: torch.dtype) -> tuple[BatchNormEngine, LayerSource]:
        """The engine (see :func:`build_engine` for ``data_channels`` and ``data_dtype``)."""
        if self._built is None:
            try:
                self._built = build_engine(self.opts, data_channels=data_channels, data_dtype=data_dtype)
            except BaseException as exc:
                self.failed = exc
                raise
        return self._built


def tensor_moments(x: torch.Tensor, layout: str, *, chunk_bytes: int = 8 << 20) -> Moments:
    """Exact per-channel moments of a tensor, float64 accumulation in bounded pieces.

    Walks axis 0 in blocks of about ``chunk_bytes`` (bfloat16 widened per block), so no
    full-size float64 copy is made: the report of a 2 GiB normalize costs no extra 4 GiB.
    """
    x = x.detach().cpu()
    c = int(x.shape[3] if layout == "nhwc" else x.shape[1])
    moments = Moments.empty(c)
    rows = max(1, chunk_bytes // max(1, x[0].numel() * x.element_size())) if x.shape[0] else 1
    for start in range(0, x.shape[0], rows):
        block = x[start:start + rows]
        if block.dtype == torch.bfloat16:
            block = block.float()
        moments.update(block.numpy(), layout, extrema=False)
    return moments


def channel_moments(x: torch.Tensor, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (biased) std in float64, the check tutorials do by hand."""
    if x.numel() == 0:
        c = x.shape[3 if layout == "nhwc" else 1]
        return np.full(c, np.nan), np.full(c, np.nan)
    m = tensor_moments(x, layout)
    return m.mean, m.std


def refuse_invalid(shape: tuple[int, ...], dtype: str, *, mode: str, layout: str, num_features: int | None,
                   where: object) -> None:
    """Raise the check-shape diagnosis (message and fix) for an input the engine cannot take.

    Runs before the engine is built (from a header alone, for a streamed file) so that
    e.g. a 3D image gets "add the batch axis", not "cannot tell the number of channels".
    """
    from bncli.diagnose import check_shape

    errors = [f for f in check_shape(shape, dtype, num_features=num_features, mode=mode, layout=layout)
              if f.severity == "error"]
    if errors:
        first = errors[0]
        cls = DTypeError if first.code == "not_float" else ShapeError
        raise cls(f"{where}: {first.message}", hint=first.hint)


def _files(paths: Sequence[io.Source]) -> list[Path]:
    return [p for p in paths if isinstance(p, Path)]


def check_destinations(inputs: Sequence[io.Source], output: Path | None, save_state: Path | None, *,
                       force: bool) -> None:
    """Refuse a bad output or --save-state path before any work (no input is ever touched).

    Each destination must be new (or ``force``), not an input, and in a folder this user can
    write to (probed by creating a file there), so no run fails after its work on a
    destination that was never writable. ``-`` (stdout) must not be a terminal; None is
    no output (checked elsewhere).
    """
    protect = _files(inputs)
    if output is not None and io.is_stdio(output):
        io.check_stdout()
    elif output is not None:
        io.check_output(output, force=force, protect=protect)
    if save_state is not None:
        if output is not None and Path(save_state).resolve() == Path(output).resolve():
            raise OutputError("--save-state and the output are the same file.",
                              hint="Give them different names.")
        io.check_output(save_state, force=force, protect=[*protect, *([output] if output else [])],
                        allowed=io.STATE_OUTPUT_SUFFIXES, option="--save-state")


def commit_outputs(inputs: Sequence[io.Source], write_output: Callable[[io.AtomicGroup], None],
                   state: Callable[[], Mapping[str, torch.Tensor]], save_state: Path | None, *,
                   force: bool) -> None:
    """Stage the output (``write_output(group)``), then the state (``state()``, asked for after
    the output is written), and rename both into place, or neither.

    Output to stdout happens inside ``write_output``: if it fails, no state is written.
    """
    with io.AtomicGroup(force=force, protect=_files(inputs)) as group:
        write_output(group)
        if save_state is not None:
            group.write(save_state, io.state_writer(state(), save_state), allowed=io.STATE_OUTPUT_SUFFIXES,
                        option="--save-state")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def channels_of(shape: tuple[int, ...], layout: str) -> int | None:
    if len(shape) != 4:
        return None
    return shape[3] if layout == "nhwc" else shape[1]


@dataclass(kw_only=True)
class NormalizePlan:
    """What ``normalize`` is about to do with one tensor, known before the work starts (for a header)."""

    input: Path
    output: Path
    key: str | None
    shape: tuple[int, ...]
    dtype: str
    mode: str
    layout: str
    device: str
    source: LayerSource
    state_path: Path | None
    # How it runs: {"path": "in-memory"}, or out-of-core passes/chunk size (bncli.outofcore).
    execution: dict[str, Any] = field(default_factory=lambda: {"path": "in-memory"})
    # The input's other tensors written through unchanged, and what the output cannot hold.
    passed_through: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    dropped_reason: str = ""
    # The statistics it is normalized with: "batch" (its own), "running", or "given"
    # (pooled over several inputs by normalize --dataset-stats).
    statistics: str = "batch"


@dataclass(kw_only=True)
class NormalizeResult(NormalizePlan):
    """What ``normalize`` did with one tensor, for rendering."""

    mean_before: np.ndarray
    std_before: np.ndarray
    mean_after: np.ndarray
    std_after: np.ndarray
    state: dict[str, torch.Tensor]


#: Called once with the plan, after every check and before the passes over the data.
StartFn = Callable[[NormalizePlan], None]
#: Given per-channel statistics (float64 mean and biased variance) to normalize with.
GivenStats = tuple[torch.Tensor, torch.Tensor]


def statistics_kind(mode: str, opts: EngineOptions, stats: GivenStats | None) -> str:
    """Which statistics a tensor is normalized with (:attr:`NormalizePlan.statistics`)."""
    if stats is not None:
        return "given"
    return "batch" if mode == "train" or not opts.track_running_stats else "running"


def prepare_tensor(x: torch.Tensor, *, mode: str, layout: str, engines: LayerEngine,
                   stats: GivenStats | None = None, where: str = "<array>") -> tuple[BatchNormEngine, LayerSource]:
    """Check ``x`` as ``check-shape`` would (its diagnosis and fix), then get the layer for it.

    Raises:
        ShapeError, DTypeError: ``x`` is no input for this layer. StateError: The layer's
            options (see :class:`LayerEngine`).
    """
    kind = statistics_kind(mode, engines.opts, stats)
    # Batch statistics need N*H*W > 1 (train's rule); given and running ones do not.
    refuse_invalid(tuple(x.shape), dtype_name(x.dtype), mode="train" if kind == "batch" else "eval",
                   layout=layout, num_features=engines.opts.num_features, where=where)
    engine, source = engines.get(data_channels=channels_of(tuple(x.shape), layout), data_dtype=x.dtype)
    try:
        validate_input(tuple(x.shape), x.dtype, engine.config.num_features, "eval" if stats else mode, layout)
    except (ShapeError, DTypeError) as exc:  # e.g. the channels of a later input: name it
        raise type(exc)(f"{where}: {exc.message}", hint=exc.hint) from None
    return engine, source


def apply_tensor(engine: BatchNormEngine, x: torch.Tensor, *, mode: str, layout: str,
                 stats: GivenStats | None = None) -> torch.Tensor:
    """One step of the layer on ``x``: ``mode``'s statistics, or the ``stats`` given (no state change)."""
    if stats is None:
        return engine.apply(x, mode=mode, layout=layout)
    return engine.apply_with_stats(x, stats[0], stats[1], layout=layout)


def normalize_file(path: io.Source | str, output: Path, *, key: str | None = None, **kwargs: Any
                   ) -> NormalizeResult:
    """:func:`normalize_tensors` of one tensor (``key``, or the only one the file holds)."""
    return normalize_tensors(path, output, keys=[key], **kwargs)[0]


def normalize_tensors(path: io.Source | str, output: Path, *, keys: Sequence[str | None], mode: str,
                      layout: str, opts: EngineOptions, force: bool, save_state: Path | None,
                      execution: str = "auto", chunk_bytes: int | None = None,
                      progress: Callable[[str, int, int], None] | None = None,
                      on_start: StartFn | None = None, engines: LayerEngine | None = None,
                      stats: GivenStats | None = None, out_format: str | None = None,
                      protect: Sequence[Path] = ()) -> list[NormalizeResult]:
    """Load, normalize each of ``keys`` through the engine, write atomically; no input is touched.

    Every other tensor of the file is written through unchanged, as far as the output
    format can hold it (:func:`bncli.io.plan_output`). Each key is one step of the layer,
    in order (``[None]``: the file's only tensor).

    ``execution`` is ``auto``, ``in-memory`` or ``out-of-core``; a large ``.npy`` is
    streamed in two passes by :func:`bncli.outofcore.normalize_streamed` (see
    :func:`bncli.outofcore.use_out_of_core`), with ``chunk_bytes`` and ``progress``.
    Every destination is checked before any work, and the output and ``save_state`` are
    committed together (:class:`bncli.io.AtomicGroup`): both are written, or neither.
    ``on_start`` gets each tensor's :class:`NormalizePlan` once it is validated.

    Args:
        path: The input file, or standard input's bytes (:class:`bncli.io.MemoryFile`).
        output: The output file, or ``-`` for stdout (in ``out_format``, default the input's).
        engines: The run's layer (shared by several inputs); default a new one from ``opts``.
        stats: Normalize with these statistics instead of each tensor's own, and update
            no running statistics (``normalize --dataset-stats`` does that once).
        protect: More files that must not be overwritten (the run's other inputs).
    """
    src, output = io.as_source(path), Path(output)
    to_stdout = io.is_stdio(output)
    io.require_file(src)  # an unreadable input is the error to report, not the output's
    check_destinations([*protect, src], output, save_state, force=force)
    engines = engines or LayerEngine(opts)
    in_file = isinstance(src, Path) and not to_stdout
    if execution == "out-of-core" and not in_file:
        raise InputError("Cannot normalize out of core: standard input and output are read and written "
                         "whole, in memory.", hint="Pass files (-o OUT.npy), or drop --out-of-core.")
    if execution != "in-memory" and in_file and len(keys) == 1 and isinstance(src, Path):
        from bncli import outofcore

        key = None if src.suffix.lower() == ".npy" else keys[0]
        if outofcore.use_out_of_core(src, output, key=key, execution=execution):
            return [outofcore.normalize_streamed(
                src, output, key=key, mode=mode, layout=layout, opts=opts, force=force,
                save_state=save_state, chunk_bytes=chunk_bytes or outofcore.DEFAULT_CHUNK_BYTES,
                progress=progress, on_start=on_start, engines=engines, stats=stats, protect=protect)]
    container = io.load_container(src)
    chosen = container.choose(keys)
    dest_suffix = (out_format or container.suffix) if to_stdout else output.suffix.lower()
    carry = io.plan_output(container, chosen, dest_suffix, "standard output" if to_stdout else str(output))
    kind = statistics_kind(mode, opts, stats)
    results: list[NormalizeResult] = []
    replaced: dict[str, torch.Tensor] = {}
    for k in chosen:
        x = container.tensors[k]
        engine, source = prepare_tensor(x, mode=mode, layout=layout, engines=engines, stats=stats,
                                        where=f"{src} [{k}]" if k else str(src))
        plan = NormalizePlan(input=Path(str(src)), output=output, key=k or None, shape=tuple(x.shape),
                             dtype=dtype_name(x.dtype), mode=mode, layout=layout, device=str(engine.device),
                             source=source, state_path=save_state, passed_through=carry.passed_through,
                             dropped=carry.dropped, dropped_reason=carry.reason, statistics=kind)
        if on_start is not None:
            on_start(plan)
        mean_b, std_b = channel_moments(x, layout)
        y = apply_tensor(engine, x, mode=mode, layout=layout, stats=stats)
        mean_a, std_a = channel_moments(y, layout)
        replaced[k] = y
        results.append(NormalizeResult(**vars(plan), mean_before=mean_b, std_before=std_b, mean_after=mean_a,
                                       std_after=std_a, state=engine.state_dict()))
    writer = io.container_writer(container, replaced, dest_suffix)

    def write_output(group: io.AtomicGroup) -> None:
        if to_stdout:
            io.write_stdout(writer)
        else:
            group.write(output, writer)

    commit_outputs([*protect, src], write_output, lambda: results[-1].state, save_state, force=force)
    return results
