"""The operation behind ``bncli compare`` on a tensor file: train mode against eval mode.

One input runs through the same layer twice (:mod:`bncli.core` builds it); the result is
data for the command to render. Nothing here prints or knows typer/rich.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bncli import io
from bncli.core import (
    EngineOptions,
    LayerSource,
    build_engine,
    channel_moments,
    channels_of,
    dtype_name,
    refuse_invalid,
    tensor_moments,
)
from bncli.engine import BatchNormConfig, validate_input
from bncli.errors import BncliError


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


def compare_file(path: io.Source | str, *, key: str | None, layout: str, opts: EngineOptions) -> CompareResult:
    """Run one input through the engine in train mode and in eval mode.

    Eval uses the running statistics as given (from ``--state`` or a fresh module), not
    those the train pass just updated; the updated ones are reported separately.
    """
    src = io.as_source(path)
    x, key = io.load_tensor(src, key)
    refuse_invalid(tuple(x.shape), dtype_name(x.dtype), mode="train", layout=layout,
                   num_features=opts.num_features, where=src)
    channels = channels_of(tuple(x.shape), layout)
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
        Path(str(src)), key, tuple(x.shape), dtype_name(x.dtype), layout, source,
        train_engine.config, bmean, bvar, get(before, "running_mean"),
        get(before, "running_var"), get(after, "running_mean"), get(after, "running_var"),
        int(nbt) if nbt is not None else None, tm, ts, em, es, diff.numpy(), count)


def compare_files(sources: Sequence[io.Source], *, key: str | None, layout: str, opts: EngineOptions
                  ) -> list[tuple[io.Source, CompareResult | None, BncliError | None]]:
    """:func:`compare_file` of each input against the same layer; a failing input gets its
    error and the others go on."""
    out: list[tuple[io.Source, CompareResult | None, BncliError | None]] = []
    for src in sources:
        try:
            out.append((src, compare_file(src, key=key, layout=layout, opts=opts), None))
        except BncliError as exc:
            out.append((src, None, exc))
    return out
