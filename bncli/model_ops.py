"""What ``compare``/``recalibrate`` do to a whole exported model, as data.

Files in through :mod:`bncli.io` (models through the safe reader :mod:`bncli.io.pt2`),
passes through :mod:`bncli.model`, results out as dataclasses; nothing here prints.
Folding lives in :mod:`bncli.fold`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bncli import io, model
from bncli.errors import DTypeError, InputError, OutputError, ShapeError, StateError
from bncli.io import pt2
from bncli.model import BnLayer, LayerStats, ModelInput

ProgressFn = Callable[[str, int, int], None]

#: A layer whose input mean sits this many running standard deviations away, or whose
#: variance is off by this factor, has running statistics that do not describe its inputs.
MEAN_SHIFT_LIMIT = 0.5
VAR_RATIO_LIMIT = 2.0
VAR_MODES = ("batchmean", "population")


@dataclass
class Loaded:
    """A model read through the safe reader, unlifted, with its BN layers and input."""

    path: Path
    ep: Any
    gm: torch.fx.GraphModule
    layers: list[BnLayer]
    input: ModelInput


def load_model(path: Path) -> Loaded:
    """Read a ``.pt2`` safely and find its BN layers (see :func:`bncli.io.pt2.load_program`)."""
    ep = pt2.load_program(Path(path))
    gm = model.unlift(ep)
    return Loaded(Path(path), ep, gm, model.bn_layers(gm), model.model_input(ep))


# -- data -----------------------------------------------------------------------------------
@dataclass
class DataPlan:
    """How DATA files become model batches."""

    paths: list[Path]
    key: str | None
    samples: int
    sample_shape: tuple[int, ...]
    dtype: str
    batch_size: int
    batches: int
    dropped: int
    sample_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.sample_bytes * (self.samples - self.dropped)


_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


def plan_data(paths: Sequence[Path], key: str | None, inp: ModelInput, batch_size: int | None,
              *, drop_last: bool = False) -> DataPlan:
    """Check DATA files against the model's input before any work; choose the batch size.

    Raises:
        InputError, DTypeError, ShapeError: No data, integer data, shapes that do not fit,
            a batch size the export does not accept, or a last batch too short to run.
    """
    if not paths:
        raise InputError("No data given.", hint="Pass one or more .npy/.npz/.pt/.safetensors files of model inputs.")
    infos = [io.peek(Path(p), key) for p in paths]
    first = infos[0]
    for info in infos:
        if info.dtype not in _FLOAT_NAMES:
            raise DTypeError(f"{info.path}: model inputs must be floating point, got {info.dtype}.",
                             hint="Convert first, e.g. x.astype('float32') / 255 for uint8 images.")
        if len(info.shape) < 1 or info.shape[1:] != first.shape[1:]:
            raise ShapeError(f"{info.path}: shape {info.shape} does not continue {first.path} {first.shape} "
                             "(all DATA files must hold samples of one shape).",
                             hint="Pass files of the same kind of samples, stacked along axis 0.")
    samples = sum(i.shape[0] for i in infos)
    if samples == 0:
        raise InputError(f"{first.path}: holds no samples (shape {first.shape})"
                         + (", nor do the other DATA files." if len(infos) > 1 else "."),
                         hint="Pass files that hold model inputs along axis 0.")
    if batch_size is None:
        lead = inp.shape[0]
        batch_size = lead if isinstance(lead, int) else max(lead[0], min(32, lead[1] or 32, samples))
    model.check_batch(inp, first.shape[1:], batch_size, str(first.path))
    full, rest = divmod(samples, batch_size)
    dropped = 0
    if rest:
        try:
            model.check_batch(inp, first.shape[1:], rest, str(first.path))
        except ShapeError:
            if not drop_last:
                raise ShapeError(f"{samples} samples make {full} batches of {batch_size} and a last batch "
                                 f"of {rest}, which the model cannot take.",
                                 hint=f"Pass --drop-last to skip those {rest} samples, or choose a "
                                      "--batch-size that divides the number of samples.") from None
            dropped = rest
    if rest == 1 and not dropped and int(np.prod(first.shape[2:], dtype=np.int64)) == 1:
        raise ShapeError("The last batch holds one sample of 1x1 pixels: batch statistics need more.",
                         hint="Pass --drop-last, or another --batch-size.")
    batches = full + (1 if rest and not dropped else 0)
    if batches == 0:
        raise ShapeError(f"{samples} samples do not fill one batch of {batch_size}.",
                         hint="Pass more data or a smaller --batch-size.")
    itemsize = 2 if first.dtype in ("float16", "bfloat16") else 4 if first.dtype == "float32" else 8
    per_sample = int(np.prod(first.shape[1:], dtype=np.int64)) * itemsize
    return DataPlan([Path(p) for p in paths], key, samples, tuple(first.shape[1:]), first.dtype,
                    batch_size, batches, dropped, per_sample)


def iter_batches(plan: DataPlan, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """The model batches of a plan (bounded memory: files are read in blocks).

    Raises:
        InputError: A file holds NaN or Inf: every statistic and output after it would be
            NaN, and fold's check would compare NaN with NaN (and pass).
    """
    def blocks() -> Iterator[np.ndarray]:
        for path in plan.paths:
            for block in io.iter_chunks(path, plan.key, max_bytes=16 << 20):
                if not np.isfinite(block).all():
                    raise InputError(f"{path}: holds NaN or Inf values: every BN layer after them would "
                                     "see NaN statistics and the model would output NaN.",
                                     hint=f"Find them with bncli check-shape {path} (it counts them), then "
                                          "clean the data or drop those samples.")
                yield block

    for i, batch in enumerate(model.batches(blocks(), plan.batch_size, dtype)):
        if i == plan.batches:
            return
        yield batch


# -- compare --------------------------------------------------------------------------------
def farthest_from_one(ratio: np.ndarray) -> float:
    """The per-channel ratio farthest from 1 on a log scale (NaN counts as farthest)."""
    if not ratio.size:
        return 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.abs(np.log(ratio))
    return float(ratio[int(np.argmax(np.where(np.isnan(score), np.inf, score)))])


@dataclass
class LayerReport:
    """One BN layer: its inputs' statistics (train-BN pass) against its running statistics."""

    layer: BnLayer
    count: int
    mean: np.ndarray
    var: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    mean_shift: np.ndarray
    var_ratio: np.ndarray
    max_abs_diff: float

    @property
    def worst_shift(self) -> float:
        return float(np.max(self.mean_shift)) if self.mean_shift.size else 0.0

    @property
    def worst_ratio(self) -> float:
        return farthest_from_one(self.var_ratio)

    @property
    def reasons(self) -> list[str]:
        """Why the layer is off, in words (empty when it is not)."""
        out = []
        if not self.worst_shift <= MEAN_SHIFT_LIMIT:
            out.append(f"its inputs' mean sits {self.worst_shift:.3g} running std from running_mean")
        ratio = self.worst_ratio
        if not 1 / VAR_RATIO_LIMIT <= ratio <= VAR_RATIO_LIMIT:
            out.append(f"its inputs' variance is {ratio:.3g} x running_var")
        return out

    @property
    def off(self) -> bool:
        return bool(self.reasons)


@dataclass
class CompareModelResult:
    """Eval versus train-BN mode of a whole model over some data, per BN layer."""

    model: Path
    plan: DataPlan
    input: ModelInput
    reports: list[LayerReport]
    without_stats: list[BnLayer]
    output_max_abs_diff: float
    output_max_abs: float

    @property
    def off(self) -> list[LayerReport]:
        return [r for r in self.reports if r.off]

    @property
    def breaks_at(self) -> LayerReport | None:
        """The first layer (graph order) whose running statistics do not fit its inputs."""
        return next(iter(self.off), None)


def _max_abs_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return max((float((x.double() - y.double()).abs().max()) for x, y in zip(a, b, strict=True)
                if x.numel()), default=0.0)


def compare_model(path: Path, data: Sequence[Path], *, key: str | None = None,
                  batch_size: int | None = None, drop_last: bool = False,
                  progress: ProgressFn | None = None) -> CompareModelResult:
    """Run the model over ``data`` in eval and in train-BN mode; report every BN layer.

    The statistics of a layer's inputs come from the train-BN pass, where every upstream
    layer normalizes with batch statistics, so a layer with stale running stats does not
    make the layers after it look stale too: the layers flagged are the ones to fix.
    The output difference of a layer is max |eval - train| at its output (accumulated
    from every layer before it).
    """
    m = load_model(path)
    model.require_2d(m.layers)
    plan = plan_data(data, key, m.input, batch_size, drop_last=drop_last)
    tracked = [layer for layer in m.layers if layer.has_running_stats]
    stats = {layer.node: LayerStats(layer.num_features) for layer in tracked}
    eval_out: dict[str, torch.Tensor] = {}
    diffs = dict.fromkeys(stats, 0.0)

    def keep_eval(layer: BnLayer, x: torch.Tensor, y: torch.Tensor) -> None:
        eval_out[layer.node] = y

    def observe_train(layer: BnLayer, x: torch.Tensor, y: torch.Tensor) -> None:
        if layer.node in stats:
            stats[layer.node].add(x)
            diffs[layer.node] = max(diffs[layer.node], _max_abs_diff([y], [eval_out[layer.node]]))

    run_eval = model.ModelRunner(m.gm, m.layers, "eval", keep_eval)
    run_train = model.ModelRunner(m.gm, m.layers, "train", observe_train)
    out_diff = out_abs = 0.0
    done = 0
    for batch in iter_batches(plan, m.input.dtype):
        y_eval = model.flat_tensors(run_eval(batch))
        y_train = model.flat_tensors(run_train(batch))
        eval_out.clear()
        out_diff = max(out_diff, _max_abs_diff(y_train, y_eval))
        out_abs = max([out_abs, *(float(t.abs().max()) for t in y_eval if t.numel())])
        done += batch.shape[0] * plan.sample_bytes
        if progress is not None:
            progress("compare", done, plan.total_bytes)
    reports = []
    for layer in tracked:
        s = stats[layer.node]
        state = model.layer_state(m.gm, layer)
        rm = state["running_mean"].double().numpy()
        rv = state["running_var"].double().numpy()
        mean, var = s.total.mean, s.total.var_unbiased
        with np.errstate(divide="ignore", invalid="ignore"):
            shift = np.abs(mean - rm) / np.sqrt(rv + layer.eps)
            ratio = var / rv
        reports.append(LayerReport(layer, s.total.count, mean, var, rm, rv, shift, ratio, diffs[layer.node]))
    return CompareModelResult(m.path, plan, m.input, reports,
                              [layer for layer in m.layers if not layer.has_running_stats], out_diff, out_abs)


# -- recalibrate ----------------------------------------------------------------------------
@dataclass
class LayerUpdate:
    """One layer's running statistics before and after recalibration."""

    layer: BnLayer
    old_mean: np.ndarray
    old_var: np.ndarray
    new_mean: np.ndarray
    new_var: np.ndarray


@dataclass
class RecalibrateResult:
    """What ``recalibrate`` wrote."""

    model: Path
    output: Path
    plan: DataPlan
    var_mode: str
    updates: list[LayerUpdate]
    without_stats: list[BnLayer]
    state_path: Path | None
    state: dict[str, torch.Tensor] = field(repr=False)


def state_destination(save_state: Path | None, output: Path) -> Path | None:
    """``--save-state``: a file as given, or (a directory) ``DIR/<output stem>.bn_state.pt``."""
    if save_state is None:
        return None
    save_state = Path(save_state)
    if save_state.is_dir() or str(save_state).endswith(("/", "\\")):
        if not save_state.is_dir():
            raise OutputError(f"{save_state}: folder does not exist.", hint=f"Create it first (mkdir -p {save_state}).")
        return save_state / f"{Path(output).stem}.bn_state.pt"
    return save_state


def recalibrate_model(path: Path, data: Sequence[Path], output: Path, *, key: str | None = None,
                      batch_size: int | None = None, var_mode: str = "batchmean",
                      save_state: Path | None = None, force: bool = False, drop_last: bool = False,
                      progress: ProgressFn | None = None) -> RecalibrateResult:
    """Re-estimate every BN layer's running statistics over ``data``; write a new ``.pt2``.

    One pass in train-BN mode (every layer normalizes with batch statistics, as
    ``torch.optim.swa_utils.update_bn`` runs it) observes each layer's inputs exactly:

    * ``batchmean`` (default): running mean/var = the mean over batches of each batch's
      mean and unbiased variance, what ``update_bn`` (momentum=None) and fvcore's
      ``precise_bn`` compute, here accumulated in float64;
    * ``population``: the exact mean and unbiased variance of all the layer's inputs.

    ``num_batches_tracked`` becomes the number of batches. Both outputs (model and
    ``save_state``) are written all or nothing, after the model is read back.
    """
    if var_mode not in VAR_MODES:
        raise ValueError(f"var_mode must be one of {VAR_MODES}, got {var_mode!r}")
    path, output = Path(path), Path(output)
    state_path = state_destination(save_state, output)
    io.check_output(output, force=force, protect=[path, *data], allowed=pt2.PT2_SUFFIXES)
    if state_path is not None:
        io.check_output(state_path, force=force, protect=[path, output, *data], allowed=io.STATE_OUTPUT_SUFFIXES,
                        option="--save-state")
    m = load_model(path)
    model.require_2d(m.layers)
    tracked = [layer for layer in m.layers if layer.has_running_stats]
    owners: dict[str, str] = {}
    for layer in tracked:
        prev = owners.setdefault(str(layer.params["running_mean"]), layer.node)
        if prev != layer.node:
            raise StateError(f"BN layer {layer.name!r} runs more than once in the graph (nodes {prev} "
                             f"and {layer.node}), so its inputs have no single set of statistics.",
                             hint="Recalibrate such a model in PyTorch (update_bn), where a "
                                  "shared module averages over both calls.")
    plan = plan_data(data, key, m.input, batch_size, drop_last=drop_last)
    stats = {layer.node: LayerStats(layer.num_features) for layer in tracked}

    def observe(layer: BnLayer, x: torch.Tensor, y: torch.Tensor) -> None:
        if layer.node in stats:
            stats[layer.node].add(x)

    run = model.ModelRunner(m.gm, m.layers, "train", observe)
    done = 0
    for batch in iter_batches(plan, m.input.dtype):
        run(batch)
        done += batch.shape[0] * plan.sample_bytes
        if progress is not None:
            progress("recalibrate", done, plan.total_bytes)
    updates, bn_state = _apply_stats(m, tracked, stats, var_mode, plan.batches)
    with io.AtomicGroup(force=force, protect=[path, *data]) as group:
        pt2.stage_program(group, m.ep, output)
        if state_path is not None:
            group.write(state_path, io.state_writer(bn_state, state_path), allowed=io.STATE_OUTPUT_SUFFIXES,
                        option="--save-state")
    return RecalibrateResult(path, output, plan, var_mode, updates,
                             [layer for layer in m.layers if not layer.has_running_stats], state_path, bn_state)


def _apply_stats(m: Loaded, tracked: list[BnLayer], stats: dict[str, LayerStats], var_mode: str,
                 batches: int) -> tuple[list[LayerUpdate], dict[str, torch.Tensor]]:
    """Write the new statistics into the program's buffers; return them and every BN's state."""
    store = m.ep.state_dict
    constants = m.ep.constants
    updates = []
    for layer in tracked:
        s = stats[layer.node]
        new_mean = s.batch_mean if var_mode == "batchmean" else s.total.mean
        new_var = s.batch_var if var_mode == "batchmean" else s.total.var_unbiased
        if not (np.isfinite(new_mean).all() and np.isfinite(new_var).all()):
            raise StateError(f"BN layer {layer.name!r}: its inputs hold NaN or Inf, so no running "
                             "statistics can be computed.",
                             hint="Check the data (bncli stats DATA) and the layers before it.")
        old = model.layer_state(m.gm, layer)
        updates.append(LayerUpdate(layer, old["running_mean"].double().numpy(), old["running_var"].double().numpy(),
                                   new_mean, new_var))
        for name, value in (("running_mean", new_mean), ("running_var", new_var)):
            fqn = str(layer.params[name])
            target = store if fqn in store else constants
            target[fqn] = torch.from_numpy(value).to(target[fqn].dtype)
        count = layer.params["num_batches_tracked"]
        if count is not None:
            target = store if count in store else constants
            target[count] = torch.tensor(batches, dtype=target[count].dtype)
    bn_state: dict[str, torch.Tensor] = {}
    for layer in m.layers:
        for key, where in layer.params.items():
            if where is not None:
                value = store[where] if where in store else constants[where]
                bn_state[f"{layer.name}.{key}"] = value.detach().clone()
    return updates, bn_state
