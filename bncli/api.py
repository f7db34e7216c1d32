"""The Python API: what the commands do, as functions that return data.

Use it through the package root (``import bncli``); the names load lazily, so
``import bncli`` imports neither torch nor NumPy. The commands call these same functions.

>>> import bncli
>>> report = bncli.check_shape("batch_nhwc.npy")                    # doctest: +SKIP
>>> [(f.code, f.severity) for f in report.findings]                 # doctest: +SKIP
[('channels_last', 'warning')]
>>> r = bncli.dataset_stats("shards/", layout="nhwc", scale=255)   # doctest: +SKIP
>>> r.mean, r.std, r.count, r.normalize_line()                      # doctest: +SKIP
>>> y, state = bncli.normalize_array(x, mode="train")               # doctest: +SKIP
>>> audit = bncli.inspect("model.pt")                               # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

# dataset_stats and expand_inputs are the core functions themselves, re-exported unchanged.
from bncli.datastats import StatsResult, dataset_stats
from bncli.diagnose import Finding, Report, check_array, check_file
from bncli.io.inputs import DEFAULT_GLOB, expand_inputs

if TYPE_CHECKING:
    import torch

    from bncli.checkpoint import CheckpointAudit

__all__ = ["DEFAULT_GLOB", "Finding", "Report", "StatsResult", "check_shape", "dataset_stats", "expand_inputs",
           "inspect", "normalize_array"]

#: ``inspect(momentum=...)`` when the layers' momentum is not known: PyTorch's default,
#: reported as assumed (``None`` means the cumulative average, as in ``nn.BatchNorm2d``).
ASSUMED = "assumed"


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


def normalize_array(x: Any, *, mode: str = "train", layout: str = "nchw",
                    state: Mapping[str, torch.Tensor] | str | os.PathLike[str] | None = None,
                    **bn_options: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Apply ``nn.BatchNorm2d`` to an array, as ``bncli normalize`` does to a file.

    The same checks (the ``check-shape`` diagnosis and fix as an exception), the same
    engine and the same layer options as the command.

    Args:
        x: A 4D NumPy array (or array-like) or torch tensor, float16/bfloat16/float32/float64.
        mode: ``train`` (batch statistics; the running ones updated) or ``eval``.
        layout: ``nchw``, or ``nhwc`` for channels-last arrays (the output is NHWC too).
        state: The layer's state to start from: a state_dict (bare keys, or a model's with
            ``prefix=``), or a state_dict/checkpoint file; default a fresh layer.
        **bn_options: ``eps``, ``momentum`` (a float, or None for the cumulative average),
            ``affine``, ``track_running_stats``, ``num_features``, ``weight`` and ``bias``
            (per-channel numbers), ``prefix``, ``device``.

    Returns:
        The output (a NumPy array for a NumPy input, else a tensor on the layer's device;
        shape, dtype and layout kept) and the layer's state_dict after the step, loadable
        by ``nn.BatchNorm2d.load_state_dict``.

    Raises:
        ShapeError, DTypeError: ``x`` is no BatchNorm2d input (the message says why, the
            hint how to fix it; object/str arrays and integers are DTypeError). InputError:
            A meta tensor (no values). StateError: The state does not fit. TypeError: An
            unknown option.

    Example:
        >>> import numpy as np, bncli
        >>> x = np.random.default_rng(0).normal(3, 2, (8, 3, 4, 4)).astype(np.float32)
        >>> y, state = bncli.normalize_array(x)
        >>> y.shape, y.dtype, int(state["num_batches_tracked"])
        ((8, 3, 4, 4), dtype('float32'), 1)

    A big-endian array is normalized in native byte order (same values; the output is
    native); a sparse tensor as its dense values (the output is dense).
    """
    import numpy as np
    import torch

    from bncli import core

    if isinstance(state, str | os.PathLike):
        state = Path(state)
    opts = core.EngineOptions(state=state, **bn_options)
    if mode not in ("train", "eval") or layout not in ("nchw", "nhwc"):
        raise ValueError(f"mode must be 'train' or 'eval' and layout 'nchw' or 'nhwc', got {mode!r}, {layout!r}")
    numpy_in = not isinstance(x, torch.Tensor)
    tensor = torch.from_numpy(_native_numeric(np.asarray(x))) if numpy_in else x
    if tensor.layout != torch.strided:  # sparse: the values are its dense ones, as io reads them
        tensor = tensor.to_dense()
    if tensor.is_meta:
        from bncli.errors import InputError

        raise InputError("<array>: a meta tensor has a shape and a dtype but no values to normalize.",
                         hint="Pass the tensor with its data (e.g. after model.to_empty(device='cpu') and "
                              "loading weights), or check its shape with bncli.check_shape.")
    engine, _ = core.prepare_tensor(tensor, mode=mode, layout=layout, engines=core.LayerEngine(opts))
    y = core.apply_tensor(engine, tensor, mode=mode, layout=layout)
    return (y.cpu().numpy() if numpy_in else y), engine.state_dict()


def _native_numeric(array: Any) -> Any:
    """A NumPy array torch can take: contiguous and in native byte order; no object/str data.

    Raises:
        DTypeError: The array holds no numbers (object, str, bytes or structured data).
    """
    import numpy as np

    from bncli.errors import DTypeError

    if array.dtype.kind not in "biufc":
        raise DTypeError(f"<array>: The input has dtype {array.dtype.name} ({array.dtype.str}); "
                         "BatchNorm2d needs float16, bfloat16, float32 or float64 numbers.",
                         hint="Convert it first, e.g. x.astype(np.float32) (for an object array of "
                              "equal-shaped arrays: np.stack(x)).")
    if not array.dtype.isnative:  # a big-endian '>f4' file's array: same values, native order
        array = array.astype(array.dtype.newbyteorder("="))
    return np.ascontiguousarray(array)


def inspect(path: str | os.PathLike[str], *, prefix: str | None = None, eps: float | None = None,
            momentum: float | str | None = ASSUMED) -> CheckpointAudit:
    """Audit every BatchNorm layer of a checkpoint or exported model, as ``bncli inspect`` does.

    Never raises for a bad file: one that cannot be read safely, or holds data rather
    than layers, comes back with ``error`` and ``hint`` set.

    Args:
        path: A ``.pt``/``.pth``, Lightning ``.ckpt`` or ``.safetensors`` state_dict or
            checkpoint (nested containers and ``module.``/``_orig_mod.`` prefixes are fine),
            or a ``.pt2`` exported model (read safely; each BN node's own eps/momentum).
        prefix: Audit only this layer (named as ``--prefix`` names it).
        eps: The layers' eps (a state_dict does not store it); default 1e-5, assumed.
            Not used for a ``.pt2``.
        momentum: Their momentum (None: cumulative average); default 0.1, assumed.

    Returns:
        The audit: ``layers`` (each with ``prefix``, ``channels``, ``findings`` ...),
        ``error``/``hint``, ``fails(fail_on)`` and ``to_dict()`` (an ``inspect --json``
        entry).
    """
    from bncli.audit import DEFAULT_EPS, DEFAULT_MOMENTUM
    from bncli.checkpoint import audit_file

    assumed = tuple(name for name, known in (("eps", eps is not None), ("momentum", momentum != ASSUMED))
                    if not known)
    m = DEFAULT_MOMENTUM if momentum == ASSUMED else momentum
    if isinstance(m, str):
        raise ValueError(f"momentum must be a number, None or {ASSUMED!r}, got {momentum!r}")
    return audit_file(Path(path), eps=DEFAULT_EPS if eps is None else eps, momentum=m, assumed=assumed,
                      prefix=prefix)
