"""bncli: apply torch.nn.BatchNorm2d to tensors on disk, and explain what goes wrong around it.

The Python API (see :mod:`bncli.api`): :func:`check_shape`, :func:`dataset_stats`,
:func:`normalize_array`, :func:`inspect`, :func:`expand_inputs`, and the result types :class:`Report`, :class:`Finding`,
:class:`StatsResult`. They load on first use, so ``import bncli`` stays light (no torch,
no NumPy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it (imported on first access).
_API = {
    "check_shape": "bncli.api",
    "dataset_stats": "bncli.api",
    "expand_inputs": "bncli.api",
    "normalize_array": "bncli.api",
    "inspect": "bncli.api",
    "Finding": "bncli.api",
    "Report": "bncli.api",
    "StatsResult": "bncli.api",
    "DEFAULT_GLOB": "bncli.api",
}

__all__ = ["DEFAULT_GLOB", "Finding", "Report", "StatsResult", "__version__", "check_shape", "dataset_stats",
           "expand_inputs", "inspect", "normalize_array"]

if TYPE_CHECKING:
    from bncli.api import (
        DEFAULT_GLOB,
        Finding,
        Report,
        StatsResult,
        check_shape,
        dataset_stats,
        expand_inputs,
        inspect,
        normalize_array,
    )


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'bncli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
