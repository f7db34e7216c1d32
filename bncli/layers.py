"""Find BatchNorm layers in a flat state_dict, and the one a user's ``--prefix`` means.

No torch: values may be torch tensors or NumPy arrays. Checkpoint containers and wrapper
prefixes are understood through :func:`bncli.io.layer_name`, the one place that knows them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bncli.errors import StateError
from bncli.io.formats import layer_name

# The keys of one layer's state_dict (the same as bncli.engine.STATE_KEYS; the engine imports torch).
LAYER_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def numel(value: Any) -> int:
    """Element count of a tensor, array or number (NumPy and torch alike)."""
    return int(np.prod(getattr(value, "shape", ()), dtype=np.int64))


def bn_layers(state: Mapping[str, Any]) -> list[tuple[str, int]]:
    """The BatchNorm layers in a flat state_dict as (prefix, num_features), in key order.

    A layer is a prefix with both ``running_mean`` and ``running_var`` (prefix ``""`` for
    a bare BatchNorm state_dict). Values may be torch tensors or NumPy arrays.
    """
    layers = []
    for key, value in state.items():
        if key == "running_mean" or key.endswith(".running_mean"):
            prefix = key[: -len("running_mean")].rstrip(".")
            if f"{prefix}.running_var" in state or (not prefix and "running_var" in state):
                layers.append((prefix, numel(value)))
    return layers


def layer_tensors(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """One layer's entries of a flat state_dict, under bare keys (``weight``, ``running_var`` ...)."""
    dot = f"{prefix}." if prefix else ""
    return {k: state[dot + k] for k in LAYER_KEYS if dot + k in state}


def layer_listing(layers: list[tuple[str, int]], limit: int = 20) -> str:
    """``a [C=3], b [C=8], ... (53 in all)`` for messages."""
    shown = ", ".join(f"{p or '(top level)'} [C={c}]" for p, c in layers[:limit])
    return shown + (f", ... ({len(layers)} in all)" if len(layers) > limit else "")


def find_layer(state: Mapping[str, Any], prefix: str, source: str) -> str:
    """The stored prefix of the BatchNorm layer a user means by ``prefix``.

    An exact prefix wins; otherwise names are compared without checkpoint containers and
    wrapper attributes (:func:`bncli.io.layer_name`), so ``features.1`` finds
    ``state_dict.model.features.1`` and ``module.features.1`` finds ``features.1``.

    Raises:
        StateError: No such layer (the message lists the layers), or several match.
    """
    layers = bn_layers(state)
    names = [p for p, _ in layers]
    prefix = prefix.rstrip(".")
    if prefix in names:
        return prefix
    want = layer_name(prefix)
    matches = [p for p in names if layer_name(p) == want]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise StateError(f"{source}: {len(matches)} BatchNorm layers match prefix {prefix!r}: "
                         f"{', '.join(matches)}.", hint="Give the full prefix of one of them.")
    near = [p for p in names if p.endswith(prefix) or prefix in p]
    hint = (f"Did you mean {near[0]!r}? " if near else "") + (
        f"BatchNorm layers in this file: {layer_listing(layers)}." if layers
        else "This file holds no BatchNorm layer (no *.running_mean/*.running_var keys).")
    raise StateError(f"{source}: no BatchNorm layer with prefix {prefix!r}.", hint=hint)
