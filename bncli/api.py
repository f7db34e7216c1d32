"""The Python API: what the commands do, as functions that return data.

Use it through the package root (``import bncli``); the names load lazily, so
``import bncli`` imports neither torch nor NumPy. The commands call these same functions.

>>> import bncli
>>> report = bncli.check_shape("batch_nhwc.npy")                    # doctest: +SKIP
>>> [(f.code, f.severity) for f in report.findings]                 # doctest: +SKIP
[('channels_last', 'warning')]
>>> r = bncli.dataset_stats("shards/", layout="nhwc", scale=255)   # doctest: +SKIP
>>> r.mean, r.std, r.count, r.normalize_line()                      # doctest: +SKIP

Planned here, once they exist: ``normalize_array(x, mode=..., layout=..., state=None,
**bn_options) -> (y, state_dict)`` and ``inspect(path)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# dataset_stats and expand_inputs are the core functions themselves, re-exported unchanged.
from bncli.datastats import StatsResult, dataset_stats
from bncli.diagnose import Finding, Report, check_array, check_file
from bncli.io.inputs import DEFAULT_GLOB, expand_inputs

__all__ = ["DEFAULT_GLOB", "Finding", "Report", "StatsResult", "check_shape", "dataset_stats", "expand_inputs"]


def check_shape(path_or_array: str | os.PathLike[str] | Any, *, key: str | None = None,
                num_features: int | None = None, mode: str = "train", layout: str = "nchw",
                scan: bool = True) -> Report:
    """Is this a valid ``BatchNorm2d`` input, and if not, what is the fix? (``bncli check-shape``)

    Never raises for bad data: every problem is a :class:`~bncli.diagnose.Finding` with a
    stable ``code`` (``not_4d``, ``channels_last``, ``not_float``, ``non_finite`` ...), a
    ``severity`` (``error`` means ``normalize`` would refuse it), a ``message`` and a
    ``hint`` (the fix).

    Args:
        path_or_array: A tensor file (.npy .npz .pt/.pth .safetensors), or an in-memory
            NumPy array or torch tensor.
        key: The tensor inside a container file that holds several.
        num_features: The layer's C, if known.
        mode: ``train`` (needs N*H*W > 1) or ``eval``.
        layout: ``nchw`` or ``nhwc``.
        scan: Also scan the values (NaN/Inf, constant and ill-conditioned channels).

    Returns:
        The report: ``valid``, ``shape``, ``dtype``, ``findings``; ``to_dict()`` for JSON.

    Example:
        >>> import numpy as np, bncli
        >>> r = bncli.check_shape(np.zeros((3, 32, 32), np.float32))
        >>> r.valid, r.findings[0].code
        (False, 'not_4d')
    """
    if isinstance(path_or_array, str | os.PathLike):
        return check_file(Path(path_or_array), key=key, num_features=num_features, mode=mode, layout=layout,
                          scan_values=scan)
    return check_array(path_or_array, num_features=num_features, mode=mode, layout=layout, scan_values=scan)

