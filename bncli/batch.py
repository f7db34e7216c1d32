"""``normalize`` over many inputs: files and folders in, one layer, one outcome per file (data).

How the statistics and the running statistics go over several inputs (each named
tensor of a file, with ``--key`` repeated, counts as one more input, in order):

* train mode: each input is its own batch, in order, through ONE layer, as the batches
  of a training loop: N inputs are N train steps; the running statistics and
  ``num_batches_tracked`` evolve step by step, and ``--save-state`` saves the state
  after the last step.
* ``dataset=True`` (``--dataset-stats``): one exact pass over every input
  (:func:`bncli.datastats.dataset_stats`, float64), then every input is normalized with
  the pooled mean and biased variance
  (:meth:`~bncli.engine.BatchNormEngine.apply_with_stats`), and the running statistics get
  ONE update, as for one batch holding every input: the outputs and the state equal
  ``nn.BatchNorm2d`` on the concatenation, within float32 rounding.
* eval mode: every input with the running statistics; the state does not change.

A bad input does not stop the others: it gets a failed :class:`FileOutcome` (with the
error and its fix) and the run goes on. Each output is atomic; ``--save-state`` is
written only when every input succeeded. An error of the layer's own options (a
``--state`` that does not fit) stops the run, since every input would fail the same way.
With ``dataset=True`` every input must be readable before anything is written (the pooled
statistics need them all).

Under torchrun (:mod:`bncli.distributed`), work that does not chain from one input to the
next (``dataset=True``, eval mode) is shared: the ranks split the statistics pass, then
each normalizes and writes its own contiguous block of files; rank 0 gathers the outcomes
and writes the state. The files are those of the one-process run, bit for bit.

No typer, no rich, no printing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bncli import core, io
from bncli.datastats import disk_bytes, finite_floats
from bncli.distributed import LOCAL, World
from bncli.errors import BncliError, InputError, KeyChoiceError, OutputError

if TYPE_CHECKING:
    import torch

    from bncli.datastats import Shard, StatsResult

ProgressFn = Callable[[str, int, int], None]


def output_paths(inputs: Sequence[io.Source], *, output: Path | None = None,
                 output_dir: Path | None = None) -> list[Path]:
    """Where each input's result goes: ``output`` (one input), ``DIR/NAME.bn.EXT``, or beside it.

    Raises:
        OutputError: Two inputs would write the same file in ``output_dir``.
        InputError: Standard input with neither (it has no folder to write beside).
    """
    if output is not None:
        return [Path(output)]
    outputs = []
    for src in inputs:
        if isinstance(src, io.MemoryFile):
            raise InputError("Standard input ('-') has no name to derive an output from.",
                             hint="Give the output: -o OUT.npy, or -o - for standard output.")
        outputs.append(Path(output_dir) / io.default_output(src).name if output_dir is not None
                       else io.default_output(src))
    seen: dict[Path, io.Source] = {}
    for src, out in zip(inputs, outputs, strict=True):
        if out in seen:
            raise OutputError(f"{out}: would be written for {seen[out]} and for {src}.",
                              hint="Give the files different names, or normalize them in separate runs.")
        seen[out] = src
    return outputs


@dataclass
class FileOutcome:
    """What happened to one input: its tensors' reports, or its error.

    Attributes:
        input: The input, as given.
        output: Its output (``-`` for stdout).
        tensors: One JSON-ready report per normalized tensor (``key``, ``shape``, ``dtype``,
            ``statistics``, ``execution``, ``channels``).
        passed_through: The file's other tensors, written through unchanged.
        dropped: What the output format could not hold; ``dropped_reason`` says why.
        error: ``{"type", "message", "hint"}`` when it failed.
    """

    input: str
    output: str
    tensors: list[dict[str, Any]] = field(default_factory=list)
    passed_through: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    dropped_reason: str = ""
    error: dict[str, Any] | None = None
    #: The full results (this process's inputs only; not sent between ranks).
    results: list[core.NormalizeResult] = field(default_factory=list, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def done(cls, results: Sequence[core.NormalizeResult]) -> FileOutcome:
        first = results[0]
        return cls(str(first.input), str(first.output), [tensor_report(r) for r in results],
                   first.passed_through, first.dropped, first.dropped_reason, results=list(results))

    @classmethod
    def failed(cls, src: io.Source, output: Path, exc: BncliError) -> FileOutcome:
        return cls(str(src), str(output), error={"type": type(exc).__name__, "message": exc.message,
                                                 "hint": exc.hint})

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "input": self.input, "output": self.output, "tensors": self.tensors,
                "passed_through": self.passed_through, "dropped": self.dropped,
                "dropped_reason": self.dropped_reason, "error": self.error}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileOutcome:
        return cls(**{k: v for k, v in d.items() if k != "ok"})


def tensor_report(r: core.NormalizeResult) -> dict[str, Any]:
    """One normalized tensor as JSON-ready data (NaN/Inf as None)."""
    channels = [{"channel": i, "mean_before": mb, "std_before": sb, "mean_after": ma, "std_after": sa}
                for i, (mb, sb, ma, sa) in enumerate(zip(finite_floats(r.mean_before), finite_floats(r.std_before),
                                                         finite_floats(r.mean_after), finite_floats(r.std_after),
                                                         strict=True))]
    return {"key": r.key, "shape": list(r.shape), "dtype": r.dtype, "statistics": r.statistics,
            "execution": r.execution, "channels": channels}


@dataclass
class BatchResult:
    """What ``normalize`` did over its inputs.

    Attributes:
        files: One outcome per input, in input order.
        mode, layout: As asked.
        statistics: ``per-input`` (train: each input its own batch), ``dataset`` (pooled,
            one update) or ``running`` (eval).
        device: Where the layer ran ("" if no input got that far).
        source: Where the layer's state came from (None if it was never built).
        state: The layer's state after the run (None if it was never built).
        save_state: The ``--save-state`` path asked for; ``state_written`` whether it was.
        dataset: The pooled statistics (``dataset=True``).
        ranks: Processes that shared the run.
    """

    files: list[FileOutcome]
    mode: str
    layout: str
    statistics: str
    device: str = ""
    source: core.LayerSource | None = None
    state: dict[str, torch.Tensor] | None = None
    save_state: Path | None = None
    state_written: bool = False
    dataset: StatsResult | None = None
    ranks: int = 1

    @property
    def failed(self) -> list[FileOutcome]:
        return [f for f in self.files if not f.ok]


def _dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)


def normalize_many(inputs: Sequence[io.Source], outputs: Sequence[Path], *, keys: Sequence[str | None],
                   mode: str, layout: str, opts: core.EngineOptions, force: bool,
                   save_state: Path | None, dataset: bool = False, execution: str = "auto",
                   chunk_bytes: int | None = None, out_format: str | None = None,
                   progress: ProgressFn | None = None, on_start: core.StartFn | None = None,
                   world: World | None = None) -> BatchResult:
    """Normalize every input into its output through one layer (see the module docstring).

    Args:
        inputs: Files (or one :class:`bncli.io.MemoryFile`), in order.
        outputs: One per input (:func:`output_paths`).
        keys: The tensors of each container to normalize; ``[None]`` for the only one.
        dataset: Pool the statistics of every input (``--dataset-stats``; train mode).
        progress: ``progress("files: NAME", done, total)`` per input, and the byte passes'
            calls (as :func:`bncli.core.normalize_file` makes them); rank 0 only.
        world: Processes sharing the run (:func:`bncli.distributed.session`).

    Raises:
        OutputError: A destination cannot be written (all are checked before any work).
        BncliError: An error of the layer's options, or (``dataset=True``) of any input.
    """
    world = world or LOCAL
    chained = mode == "train" and not dataset
    if chained and world.size > 1:
        raise InputError("normalize in train mode runs its inputs as consecutive train steps of one layer, "
                         "which cannot be split across ranks.",
                         hint="Pass --dataset-stats (one pooled batch, shared by the ranks), or run it "
                              "in one process.")
    if dataset and mode != "train":
        raise ValueError("dataset statistics are train-mode statistics")
    sizes = world.gather(lambda: [disk_bytes(p) if isinstance(p, Path) else len(p.data) for p in inputs])[0]
    mine = world.share(sizes) if not chained else range(len(inputs))
    single = len(inputs) == 1 and len(keys) == 1
    files = [p for p in inputs if isinstance(p, Path)]

    def check() -> None:
        for i in mine:
            try:
                io.require_file(inputs[i])
            except BncliError:
                if single:
                    raise  # an unreadable input is the error to report, not its output's
                continue  # it fails on its own, with that message, when its turn comes
            core.check_destinations(inputs, outputs[i], None, force=force)
        if save_state is not None and world.is_primary:
            core.check_destinations(inputs, None, save_state, force=force)
            for out in outputs:
                if not io.is_stdio(out) and Path(out).resolve() == Path(save_state).resolve():
                    raise OutputError(f"{save_state}: is also the output of an input.",
                                      hint="Give --save-state another name.")

    world.gather(check)
    engines = core.LayerEngine(opts)
    stats: core.GivenStats | None = None
    pooled = None
    if dataset:
        pooled, stats = _pool(files, keys, layout, opts, engines, chunk_bytes, progress, world)
    show = progress if world.is_primary else None
    local: list[FileOutcome] = []

    def run_mine() -> list[dict[str, Any]]:
        for n, i in enumerate(mine):
            src, out = inputs[i], outputs[i]
            if show is not None and len(inputs) > 1:
                show(f"files: {src}", n, len(mine))
            try:
                results = core.normalize_tensors(
                    src, out, keys=keys, mode=mode, layout=layout, opts=opts, force=force,
                    save_state=save_state if single else None, execution=execution, chunk_bytes=chunk_bytes,
                    progress=show, on_start=on_start, engines=engines, stats=stats, out_format=out_format,
                    protect=files)
            except BncliError as exc:
                if single or exc is engines.failed:
                    raise  # one input: its error is the run's; the layer's own: every input's
                local.append(FileOutcome.failed(src, out, exc))
                continue
            local.append(FileOutcome.done(results))
        if show is not None and len(inputs) > 1:
            show(f"files: {len(mine)} done", len(mine), len(mine))
        return [o.to_dict() for o in local]

    gathered = world.gather(run_mine)
    outcomes = local if world.size == 1 else [FileOutcome.from_dict(d) for part in gathered for d in part]
    built = engines.built
    result = BatchResult(outcomes, mode, layout, "dataset" if dataset else "per-input" if chained else "running",
                         save_state=save_state, dataset=pooled, ranks=world.size)
    if built is not None:
        engine, result.source = built
        result.device, result.state = str(engine.device), engine.state_dict()
    if save_state is not None and single:
        result.state_written = True  # committed with the output, by normalize_tensors
    elif save_state is not None and world.is_primary and result.state is not None and not result.failed:
        io.save_state_dict(result.state, save_state, force=force, protect=[*files, *outputs])
        result.state_written = True
    return result


def _pool(files: list[Path], keys: Sequence[str | None], layout: str, opts: core.EngineOptions,
          engines: core.LayerEngine, chunk_bytes: int | None, progress: ProgressFn | None,
          world: World) -> tuple[StatsResult, core.GivenStats]:
    """The exact pooled statistics of every input, and the layer's one update with them."""
    import torch

    from bncli.datastats import dataset_stats
    from bncli.outofcore import DEFAULT_CHUNK_BYTES

    if len(keys) > 1:
        npy = next((p for p in files if p.suffix.lower() == ".npy"), None)
        if npy is not None:
            raise KeyChoiceError(f"{npy}: a .npy file holds one array; {len(keys)} --key options do not apply.",
                                 hint="Pass one --key, or containers (.npz, .pt, .safetensors) only.")

    def check(shard: Shard) -> None:
        where = f"{shard.path} [{shard.key}]" if shard.key else str(shard.path)
        core.refuse_invalid(shard.shape, shard.dtype, mode="eval", layout=layout,
                            num_features=opts.num_features, where=where)

    key = [k for k in keys if k is not None] if len(keys) > 1 else keys[0]
    # Floating point only (checked above), so dtypes mix freely: float16 and float32 shards share a scale.
    pooled = dataset_stats(files, key=key, layout=layout, allow_mixed_dtypes=True,
                           chunk_bytes=chunk_bytes or DEFAULT_CHUNK_BYTES,
                           progress=progress if world.is_primary else None, world=world, check=check)
    m = pooled.moments
    mean, var = torch.from_numpy(m.mean.copy()), torch.from_numpy(m.var.copy())
    engine, _ = engines.get(data_channels=m.channels, data_dtype=_dtype(pooled.inputs[0].dtype))
    # Before any output: the update needs none of them, and a single output is then
    # committed together with the state it leads to.
    engine.update_running_stats(mean, var, m.count)
    return pooled, (mean, var)
