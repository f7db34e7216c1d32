"""The operation behind ``bncli inspect``: a checkpoint file in, per-layer audits out (data).

Loading goes through :mod:`bncli.io` (weights_only, nothing unpickled); the findings come
from :mod:`bncli.audit`. Nothing here prints or knows typer/rich, and torch is imported
only by the loader, for ``.pt``/``.pth``/``.ckpt`` files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bncli import io
from bncli.audit import DEFAULT_EPS, DEFAULT_MOMENTUM, LayerAudit, audit_state_dict
from bncli.errors import BncliError, InputError, KeyChoiceError
from bncli.layers import bn_layers, find_layer


@dataclass
class CheckpointAudit:
    """The audit of one file: its layers, or why it could not be audited.

    Attributes:
        path: The file as given.
        layers: One :class:`~bncli.audit.LayerAudit` per BatchNorm layer, in key order.
        container: The container keys every layer's prefix starts with
            (``state_dict.model`` for a Lightning checkpoint), ``""`` if none.
        error: Why the file could not be audited (unreadable, unsafe, not a checkpoint).
        hint: The fix for ``error``.
    """

    path: str
    layers: list[LayerAudit] = field(default_factory=list)
    container: str = ""
    error: str | None = None
    hint: str | None = None

    def fails(self, fail_on: str = "error") -> bool:
        """True when the file could not be audited or a layer has a ``fail_on`` finding."""
        return self.error is not None or any(layer.fails(fail_on) for layer in self.layers)

    def display_name(self, layer: LayerAudit) -> str:
        """The layer's prefix without the shared :attr:`container` keys."""
        if self.container and layer.prefix.startswith(self.container):
            return layer.prefix[len(self.container):].lstrip(".")
        return layer.prefix

    def to_dict(self, fail_on: str = "error") -> dict[str, Any]:
        return {"path": self.path, "container": self.container or None,
                "passed": not self.fails(fail_on),
                "error": None if self.error is None else {"message": self.error, "hint": self.hint},
                "layers": [layer.to_dict() for layer in self.layers]}


def _not_a_checkpoint(path: Path, what: str) -> InputError:
    return InputError(f"{path}: {what}, not a model checkpoint; inspect audits the BatchNorm "
                      "layers of checkpoints (.pt/.pth/.ckpt/.safetensors).",
                      hint=f"To check a data tensor, run: bncli check-shape {path}")


def _load(path: Path) -> dict[str, Any]:
    """The flat state_dict, or an InputError saying the file holds data, not layers."""
    suffix = io.suffix_of(path)
    if suffix in (".npy", ".npz"):
        try:
            info = io.peek(path)
        except KeyChoiceError:
            raise _not_a_checkpoint(path, "holds NumPy data arrays") from None
        raise _not_a_checkpoint(path, f"holds a data tensor (shape {info.shape}, {info.dtype})")
    state = io.load_state_dict(path)
    if bn_layers(state):
        return state
    if len(state) == 1:
        (tensor,) = state.values()
        dtype = str(tensor.dtype).replace("torch.", "")
        raise _not_a_checkpoint(path, f"holds a data tensor (shape {tuple(tensor.shape)}, {dtype})")
    raise InputError(f"{path}: holds {len(state)} tensors but no BatchNorm layer (no *.running_mean "
                     "with *.running_var).",
                     hint="A model without BatchNorm (or built with track_running_stats=False) has "
                          f"nothing to audit. To check a data tensor in it: bncli check-shape {path} --key KEY")


def audit_file(path: Path, *, eps: float = DEFAULT_EPS, momentum: float | None = DEFAULT_MOMENTUM,
               assumed: tuple[str, ...] = (), prefix: str | None = None) -> CheckpointAudit:
    """Audit every BatchNorm layer of a checkpoint (or only the one ``prefix`` names).

    Never raises for a bad file: an unreadable or unsafe file, or one that holds data
    rather than layers, comes back with :attr:`CheckpointAudit.error` and its hint.

    Args:
        path: A ``.pt``/``.pth``, Lightning ``.ckpt`` or ``.safetensors`` state_dict or
            checkpoint (nested containers and ``module.``/``_orig_mod.`` prefixes are fine).
        eps, momentum, assumed: As for :func:`bncli.audit.audit_layer`.
        prefix: Audit only this layer, matched as ``--prefix`` is everywhere.
    """
    path = Path(path)
    report = CheckpointAudit(str(path))
    try:
        state = _load(path)
        wanted = find_layer(state, prefix, str(path)) if prefix is not None else None
    except BncliError as exc:
        report.error, report.hint = exc.message, exc.hint
        return report
    except OSError as exc:
        report.error, report.hint = f"{path}: cannot read ({exc.strerror or exc}).", \
            "Check the path and its permissions."
        return report
    layers = audit_state_dict(state, eps=eps, momentum=momentum, assumed=assumed)
    report.layers = [a for a in layers if wanted is None or a.prefix == wanted]
    containers = {io.split_container(a.prefix)[0] for a in report.layers}
    report.container = containers.pop() if len(containers) == 1 else ""
    return report
