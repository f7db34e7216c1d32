"""The operations behind the commands: files in, engine, results out (as data).

Commands call these and render what they return; nothing here prints or knows typer/rich.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bncli import io
from bncli.audit import LayerAudit, audit_layer
from bncli.engine import BatchNormConfig, BatchNormEngine, resolve_device, validate_input
from bncli.errors import DTypeError, OutputError, ShapeError, StateError
from bncli.layers import bn_layers, find_layer, layer_listing, layer_tensors
from bncli.moments import Moments
from bncli.wording import plural


@dataclass(frozen=True)
class EngineOptions:
    """Everything the user can say about the BatchNorm2d layer (flags of normalize/compare)."""

    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True
    num_features: int | None = None
    state: Path | None = None
    prefix: str | None = None
    weight: str | None = None
    bias: str | None = None
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
        flat = io.load_state_dict(opts.state)
        layer, prefix = select_layer(flat, opts.prefix, str(opts.state))
        where = f"layer {prefix!r} of " if prefix else ""
        audit = audit_layer(layer, prefix=prefix, eps=opts.eps, momentum=opts.momentum)
        source = LayerSource(f"{where}{opts.state}", audit=audit)
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
        raise StateError(f"{opts.state}: holds an empty state_dict (no weight, bias or running stats), "
                         "as saved by a layer with --no-affine --no-track-running-stats.",
                         hint="Use it with --no-affine --no-track-running-stats, "
                              "or pass a state that holds what this layer uses.")
    if layer:
        source.ignored_keys = engine.load_state(layer, source=source.description)
    for name, spec in (("weight", opts.weight), ("bias", opts.bias)):
        if spec is not None:
            vec = torch.from_numpy(io.parse_vector(spec, name))
            if vec.numel() != c:
                raise StateError(f"--{name} has {plural(vec.numel(), 'value')}, but the layer has "
                                 f"{plural(c, 'channel')}.",
                                 hint=f"Give exactly {plural(c, 'value')}, one per channel.")
            engine.set_affine(**{name: vec})
    return engine, source


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
                   where: Path) -> None:
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


def check_destinations(path: Path, output: Path, save_state: Path | None, *, force: bool) -> None:
    """Refuse a bad output or --save-state path before any work (the input is never touched).

    Each destination must be new (or ``force``), not an input, and in a folder this user can
    write to (probed by creating a file there), so no run fails after its work on a
    destination that was never writable.
    """
    io.check_output(output, force=force, protect=[path])
    if save_state is not None:
        if Path(save_state).resolve() == Path(output).resolve():
            raise OutputError("--save-state and the output are the same file.",
                              hint="Give them different names.")
        io.check_output(save_state, force=force, protect=[path, output], allowed=io.STATE_OUTPUT_SUFFIXES,
                        option="--save-state")


def commit_outputs(path: Path, write_output: Callable[[io.AtomicGroup], None],
                   state: Callable[[], Mapping[str, torch.Tensor]], save_state: Path | None, *,
                   force: bool) -> None:
    """Stage the output (``write_output(group)``), then the state (``state()``, asked for after
    the output is written), and rename both into place, or neither.
    """
    with io.AtomicGroup(force=force, protect=[path]) as group:
        write_output(group)
        if save_state is not None:
            group.write(save_state, io.state_writer(state(), save_state), allowed=io.STATE_OUTPUT_SUFFIXES,
                        option="--save-state")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _channels(shape: tuple[int, ...], layout: str) -> int | None:
    if len(shape) != 4:
        return None
    return shape[3] if layout == "nhwc" else shape[1]


@dataclass(kw_only=True)
class NormalizePlan:
    """What ``normalize`` is about to do, known before the work starts (for a header)."""

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


@dataclass(kw_only=True)
class NormalizeResult(NormalizePlan):
    """What ``normalize`` did, for rendering."""

    mean_before: np.ndarray
    std_before: np.ndarray
    mean_after: np.ndarray
    std_after: np.ndarray
    state: dict[str, torch.Tensor]


#: Called once with the plan, after every check and before the passes over the data.
StartFn = Callable[[NormalizePlan], None]


def normalize_file(path: Path, output: Path, *, key: str | None, mode: str, layout: str,
                   opts: EngineOptions, force: bool, save_state: Path | None,
                   execution: str = "auto", chunk_bytes: int | None = None,
                   progress: Callable[[str, int, int], None] | None = None,
                   on_start: StartFn | None = None) -> NormalizeResult:
    """Load, normalize through the engine, write atomically; the input is never touched.

    ``execution`` is ``auto``, ``in-memory`` or ``out-of-core``; a large ``.npy`` is
    streamed in two passes by :func:`bncli.outofcore.normalize_streamed` (see
    :func:`bncli.outofcore.use_out_of_core`), with ``chunk_bytes`` and ``progress``.
    Every destination is checked before any work, and the output and ``save_state`` are
    committed together (:class:`bncli.io.AtomicGroup`): both are written, or neither.
    ``on_start`` gets the :class:`NormalizePlan` once the input is validated.
    """
    path, output = Path(path), Path(output)
    io.require_file(path)  # an unreadable input is the error to report, not the output's
    check_destinations(path, output, save_state, force=force)
    if execution != "in-memory":
        from bncli import outofcore

        if outofcore.use_out_of_core(path, output, key=key, execution=execution):
            return outofcore.normalize_streamed(
                path, output, key=key, mode=mode, layout=layout, opts=opts, force=force,
                save_state=save_state, chunk_bytes=chunk_bytes or outofcore.DEFAULT_CHUNK_BYTES,
                progress=progress, on_start=on_start)
    x, key = io.load_tensor(path, key)
    # Without running stats, eval mode also normalizes with batch statistics (train's rule).
    refuse_invalid(tuple(x.shape), _dtype_name(x.dtype), mode=mode if opts.track_running_stats else "train",
                   layout=layout, num_features=opts.num_features, where=path)
    engine, source = build_engine(opts, data_channels=_channels(tuple(x.shape), layout),
                                  data_dtype=x.dtype)
    validate_input(tuple(x.shape), x.dtype, engine.config.num_features, mode, layout)
    plan = NormalizePlan(input=path, output=output, key=key, shape=tuple(x.shape), dtype=_dtype_name(x.dtype),
                         mode=mode, layout=layout, device=str(engine.device), source=source,
                         state_path=save_state)
    if on_start is not None:
        on_start(plan)
    mean_b, std_b = channel_moments(x, layout)
    y = engine.apply(x, mode=mode, layout=layout)
    mean_a, std_a = channel_moments(y, layout)
    state = engine.state_dict()
    commit_outputs(path, lambda group: group.write(output, io.tensor_writer(y, output, key=key)),
                   lambda: state, save_state, force=force)
    return NormalizeResult(**vars(plan), mean_before=mean_b, std_before=std_b, mean_after=mean_a,
                           std_after=std_a, state=state)


@dataclass
class CompareResult:
    """Train-mode versus eval-mode outputs of the same input, per channel."""

    input: Path
    key: str | None
    shape: tuple[int, ...]
    dtype: str
    layout: str
    source: LayerSource
    config: BatchNormConfig
    batch_mean: np.ndarray
    batch_var: np.ndarray
    running_mean: np.ndarray | None
    running_var: np.ndarray | None
    running_mean_after: np.ndarray | None
    running_var_after: np.ndarray | None
    num_batches_tracked_after: int | None
    train_mean: np.ndarray
    train_std: np.ndarray
    eval_mean: np.ndarray
    eval_std: np.ndarray
    max_abs_diff: np.ndarray
    count: int

    @property
    def overall_max_abs_diff(self) -> float:
        return float(np.nanmax(self.max_abs_diff)) if self.max_abs_diff.size else 0.0


def compare_file(path: Path, *, key: str | None, layout: str, opts: EngineOptions) -> CompareResult:
    """Run one input through the engine in train mode and in eval mode.

    Eval uses the running statistics as given (from ``--state`` or a fresh module), not
    those the train pass just updated; the updated ones are reported separately.
    """
    x, key = io.load_tensor(Path(path), key)
    refuse_invalid(tuple(x.shape), _dtype_name(x.dtype), mode="train", layout=layout,
                   num_features=opts.num_features, where=Path(path))
    channels = _channels(tuple(x.shape), layout)
    train_engine, source = build_engine(opts, data_channels=channels, data_dtype=x.dtype)
    eval_engine, _ = build_engine(opts, data_channels=channels, data_dtype=x.dtype)
    validate_input(tuple(x.shape), x.dtype, train_engine.config.num_features, "train", layout)
    before = eval_engine.state_dict()
    y_eval = eval_engine.apply(x, mode="eval", layout=layout)
    y_train = train_engine.apply(x, mode="train", layout=layout)
    after = train_engine.state_dict()
    dims = (0, 1, 2) if layout == "nhwc" else (0, 2, 3)
    diff = (y_train.to("cpu", torch.float64) - y_eval.to("cpu", torch.float64)).abs().amax(dim=dims)
    batch = tensor_moments(x, layout)
    bmean, bvar = batch.mean, batch.var
    tm, ts = channel_moments(y_train, layout)
    em, es = channel_moments(y_eval, layout)
    count = int(x.numel() // train_engine.config.num_features)

    def get(state: dict[str, torch.Tensor], k: str) -> np.ndarray | None:
        return state[k].double().numpy() if k in state else None

    nbt = after.get("num_batches_tracked")
    return CompareResult(
        Path(path), key, tuple(x.shape), _dtype_name(x.dtype), layout, source,
        train_engine.config, bmean, bvar, get(before, "running_mean"),
        get(before, "running_var"), get(after, "running_mean"), get(after, "running_var"),
        int(nbt) if nbt is not None else None, tm, ts, em, es, diff.numpy(), count)
