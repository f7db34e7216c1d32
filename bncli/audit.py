"""Audit saved BatchNorm layers: coded findings about their weights and running statistics.

The data behind ``bncli inspect`` and the state findings of ``compare``/``normalize``. No
torch, no printing, no typer/rich: tensors arrive as NumPy arrays or anything with
``.detach()`` (torch tensors), and results are dataclasses. Findings are
:class:`bncli.diagnose.Finding` objects (with the affected channels), so ``check-shape``
and ``inspect`` speak the same language.

Interface (for other model sources, such as exported programs, that know more than a
state_dict does):

- :func:`audit_layer` audits ONE layer from its tensors (``weight``, ``bias``,
  ``running_mean``, ``running_var``, ``num_batches_tracked``; any may be missing) and the
  layer's ``eps``/``momentum`` (``assumed`` defaults, given, or ``stored`` in the file, as
  an exported graph does), returning a :class:`LayerAudit`.
- :func:`audit_state_dict` finds the layers of a flat state_dict
  (:func:`bncli.layers.bn_layers`) and audits each with one ``eps``/``momentum``.

Codes (:data:`CODES`, stable): errors ``shape_mismatch``, ``non_finite_stats``,
``negative_var``, ``var_below_eps``, ``never_updated`` (mean 0 / var 1 everywhere); warnings
``dead_channel``, ``unconverged``, and ``never_updated`` when only the counter is 0. Each
finding is a :class:`ChannelFinding` naming its channels.

:mod:`bncli.layers` finds layers and resolves ``--prefix``; :mod:`bncli.checkpoint`
audits files.

A state_dict does not store ``eps`` or ``momentum``; callers that do not know them pass
PyTorch's defaults (:data:`DEFAULT_EPS`, :data:`DEFAULT_MOMENTUM`) and name them in
``assumed=("eps", "momentum")``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bncli.diagnose import Finding
from bncli.io.formats import layer_name
from bncli.layers import LAYER_KEYS, bn_layers, layer_tensors, numel

DEFAULT_EPS = 1e-5
DEFAULT_MOMENTUM = 0.1
# dead_channel: |weight| below this fraction of the layer's median |weight| (or exactly 0).
DEAD_RATIO = 1e-6
# unconverged: the initial mean 0 / var 1 still weighs more than this in the running stats.
UNCONVERGED_WEIGHT = 0.01
VECTOR_KEYS = LAYER_KEYS[:4]
# Every code, in the order findings are listed within a severity (the most decisive first).
CODES = ("shape_mismatch", "non_finite_stats", "negative_var", "var_below_eps", "never_updated",
         "dead_channel", "unconverged")
SEVERITIES = ("error", "warning")

_RECALIBRATE = ("recalibrate on representative data: torch.optim.swa_utils.update_bn(loader, "
                "model) (train-mode passes under torch.no_grad())")


@dataclass(frozen=True)
class ChannelFinding(Finding):
    """A :class:`~bncli.diagnose.Finding` about some channels of one layer.

    Attributes:
        channels: The affected channel indices, ascending (every channel for layer-wide
            findings such as ``never_updated`` and ``unconverged``).
    """

    channels: tuple[int, ...] = ()


@dataclass(frozen=True)
class BufferSummary:
    """One vector of a layer: its length, finite range, and how many values are not finite."""

    length: int
    min: float
    max: float
    non_finite: int

    def to_dict(self) -> dict[str, Any]:
        return {"length": self.length, "min": _finite(self.min), "max": _finite(self.max),
                "non_finite": self.non_finite}


@dataclass
class LayerAudit:
    """Everything :func:`audit_layer` found out about one BatchNorm layer.

    Attributes:
        prefix: The layer's key prefix in the state_dict, as stored (``""`` for a bare layer).
        channels: num_features (the running_mean's length, else the weight's), or None.
        num_batches_tracked: The counter, or None when the state has none.
        buffers: :class:`BufferSummary` per vector present (weight, bias, running_mean, running_var).
        eps: The eps the findings assume.
        momentum: The momentum they assume (None: cumulative average).
        assumed: Which of ``eps``/``momentum`` are defaults, not known values of this layer.
        findings: Errors first, then warnings, each in :data:`CODES` order.
    """

    prefix: str
    channels: int | None
    num_batches_tracked: int | None
    buffers: dict[str, BufferSummary]
    eps: float
    momentum: float | None
    assumed: tuple[str, ...] = ()
    findings: list[Finding] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The layer's name without checkpoint containers or wrappers (``features.1``)."""
        return layer_name(self.prefix)

    def count(self, severity: str) -> int:
        return sum(f.severity == severity for f in self.findings)

    def fails(self, fail_on: str = "error") -> bool:
        """Whether a finding at ``fail_on`` severity or worse is present."""
        worst = SEVERITIES[: SEVERITIES.index(fail_on) + 1]
        return any(f.severity in worst for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "name": self.name, "channels": self.channels,
                "num_batches_tracked": self.num_batches_tracked,
                **{k: s.to_dict() if (s := self.buffers.get(k)) else None for k in VECTOR_KEYS},
                "eps": self.eps, "momentum": self.momentum, "assumed": list(self.assumed),
                "findings": [finding_dict(f) for f in self.findings]}


def findings_json(audit: LayerAudit | None) -> list[dict[str, Any]]:
    """A layer's findings as JSON-ready data (none without an audit)."""
    return [] if audit is None else [finding_dict(f) for f in audit.findings]


def finding_dict(f: Finding) -> dict[str, Any]:
    """A finding as JSON-ready data (``channels`` and ``count`` for channel findings)."""
    doc = asdict(f)
    if isinstance(f, ChannelFinding):
        doc["channels"] = list(f.channels)
        doc["count"] = len(f.channels)
    return doc


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


# -- auditing one layer ---------------------------------------------------------------------
def _array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (any dtype, any device), without importing torch
        value = value.detach().to("cpu").double().numpy()
    return np.asarray(value, dtype=np.float64)


def _which(idx: np.ndarray | tuple[int, ...], total: int | None) -> str:
    """``channel 3 (1 of 8)`` / ``channels 0, 1, 2, 3, 4, ... (12 of 64)``: first few + count."""
    ids = [int(i) for i in idx]
    count = f"{len(ids)} of {total}" if total else f"{len(ids)}"
    shown = ", ".join(map(str, ids[:5])) + (", ..." if len(ids) > 5 else "")
    return f"channel{'s' if len(ids) > 1 else ''} {shown} ({count})"


def _summary(a: np.ndarray) -> BufferSummary:
    flat = a.reshape(-1)
    finite = flat[np.isfinite(flat)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (math.nan, math.nan)
    return BufferSummary(int(flat.size), lo, hi, int(flat.size - finite.size))


def _shape_finding(arrays: dict[str, np.ndarray], nbt: Any) -> ChannelFinding | None:
    problems = [f"{k} has shape {a.shape}, not a vector" for k, a in arrays.items() if a.ndim != 1]
    if nbt is not None and numel(nbt) != 1:
        problems.append(f"num_batches_tracked has shape {tuple(nbt.shape)}, not a scalar")
    elif nbt is not None and int(_array(nbt).reshape(-1)[0]) < 0:
        problems.append(f"num_batches_tracked is {int(_array(nbt).reshape(-1)[0])}, not a count")
    lengths = {k: int(a.size) for k, a in arrays.items()}
    extra: tuple[int, ...] = ()
    if len(set(lengths.values())) > 1:
        problems.insert(0, "buffers of different lengths (" +
                        ", ".join(f"{k} {n}" for k, n in lengths.items()) + ")")
        extra = tuple(range(min(lengths.values()), max(lengths.values())))
    if not problems:
        return None
    tail = f"; only some of them have {_which(extra, max(lengths.values()))}" if extra else ""
    return ChannelFinding(
        "shape_mismatch", "error",
        f"{'; '.join(problems)}{tail}. This is not one layer's state: load_state_dict refuses it.",
        "Re-export it from the model (torch.save(model.state_dict())); if the checkpoint was "
        "merged or edited, give every vector of the layer num_features entries.", extra)


def _non_finite(arrays: dict[str, np.ndarray], c: int | None) -> ChannelFinding | None:
    parts: list[str] = []
    bad: set[int] = set()
    keys: set[str] = set()
    for key, a in arrays.items():
        flat = a.reshape(-1)
        nan, inf = np.flatnonzero(np.isnan(flat)), np.flatnonzero(np.isinf(flat))
        if nan.size or inf.size:
            kinds = " and ".join(k for k, idx in (("NaN", nan), ("Inf", inf)) if idx.size)
            where = np.union1d(nan, inf)
            parts.append(f"{key} is {kinds} in {_which(where, c)}")
            bad.update(int(i) for i in where)
            keys.add(key)
    if not parts:
        return None
    modes = "in train and eval mode" if keys & {"weight", "bias"} else "in eval mode (model.eval())"
    return ChannelFinding(
        "non_finite_stats", "error",
        f"{'; '.join(parts)}: every output of these channels is NaN {modes}.",
        "Training diverged or saw NaN/Inf inputs before this was saved (a too-high learning rate, "
        "float16 overflow, a division by zero upstream): go back to an earlier checkpoint, or for "
        f"running stats alone, {_RECALIBRATE}.", tuple(sorted(bad)))


def _dead(w: np.ndarray) -> tuple[np.ndarray, float]:
    absw = np.abs(w)
    finite = np.isfinite(absw)
    median = float(np.median(absw[finite])) if finite.any() else 0.0
    return np.flatnonzero(finite & ((absw == 0) | (absw < DEAD_RATIO * median))), median


def _var_findings(v: np.ndarray, eps: float, c: int | None, dead: np.ndarray,
                  eps_assumed: bool, eps_stored: bool) -> list[ChannelFinding]:
    out = []
    finite = np.isfinite(v)
    neg = np.flatnonzero(finite & (v < 0))
    if neg.size:
        out.append(ChannelFinding(
            "negative_var", "error",
            f"running_var is negative in {_which(neg, c)}, lowest {v[neg].min():.3g}: a variance "
            "cannot be; eval takes sqrt(running_var + eps), NaN where that sum is negative and a "
            "huge factor where it is barely positive.",
            "The stats were averaged or edited outside train steps (weight averaging that mixed "
            f"buffers, as in SWA), or the file is corrupt: {_RECALIBRATE}.", tuple(int(i) for i in neg)))
    low = np.setdiff1d(np.flatnonzero(finite & (v >= 0) & (v <= eps)), dead)
    if low.size:
        smallest = float(v[low].min())
        gain = 1.0 / math.sqrt(smallest + eps)
        note = ", PyTorch's default, assumed" if eps_assumed else ""
        out.append(ChannelFinding(
            "var_below_eps", "error",
            f"running_var <= eps ({eps:g}{note}) in {_which(low, c)}, smallest {smallest:.3g}: eval "
            f"divides by sqrt(running_var + eps) = {math.sqrt(smallest + eps):.3g} there, so any "
            f"deviation from running_mean is multiplied by {gain:.3g} (times the weight) and that "
            "channel's output blows up.",
            "If its input is really constant (a dead ReLU, zero padding upstream), prune the channel "
            f"or set its weight to 0; otherwise {_RECALIBRATE}."
            + ("" if eps_stored else " Built with a larger eps? Pass --eps."),
            tuple(int(i) for i in low)))
    return out


def _count_findings(m: np.ndarray | None, v: np.ndarray | None, nbt: int | None,
                    momentum: float | None, c: int | None) -> list[ChannelFinding]:
    every = tuple(range(c or 0))
    fresh = (m is not None and v is not None and m.size > 0 and v.size > 0
             and bool((m == 0).all()) and bool((v == 1).all()))
    if fresh:
        counter = " and num_batches_tracked is 0" if nbt == 0 else ""
        return [ChannelFinding(
            "never_updated", "error",
            f"running_mean is 0 and running_var is 1 in all {c} channels{counter}, a freshly built "
            "layer's values: eval mode does not normalize here (y = x / sqrt(1 + eps) * weight + bias).",
            "The layer never ran in train mode before saving (added or reset after training, or the "
            f"wrong checkpoint was saved): load the trained state, or {_RECALIBRATE}.", every)]
    if nbt == 0:
        return [ChannelFinding(
            "never_updated", "warning",
            "num_batches_tracked is 0, but the running stats are not a fresh layer's mean 0 / var 1 "
            "(in every channel): "
            "they were set without train steps (loaded from an old checkpoint, averaged, edited), "
            "so nothing says how well they fit the data.",
            "Check them against data: bncli compare DATA --state FILE --prefix LAYER; with "
            "momentum=None the next train step replaces them outright.", every)]
    if nbt is None or nbt < 0 or momentum is None or not (0 <= momentum < 1):
        return []
    left = (1 - momentum) ** nbt
    if left <= UNCONVERGED_WEIGHT:
        return []
    finite_var = v[np.isfinite(v)] if v is not None else np.array([])
    if finite_var.size and float(finite_var.min()) < left:
        # After nbt steps at this momentum from var 1, every running_var is at least `left`
        # (the initial 1's share). A smaller one proves another history (momentum=None, as in
        # `bncli stats --save-state`, a reset counter, edited stats): no convergence claim.
        return []
    need = math.ceil(math.log(UNCONVERGED_WEIGHT) / math.log(1 - momentum)) if momentum > 0 else None
    steps = f" (it takes {need} steps to fall under 1%)" if need else ""
    return [ChannelFinding(
        "unconverged", "warning",
        f"num_batches_tracked is {nbt}: with momentum {momentum:g} the initial mean 0 / var 1 "
        f"still weighs (1 - {momentum:g})^{nbt} = {left:.1%} in the running stats of every "
        f"channel{steps}, so they "
        "have not converged to the data's statistics.",
        f"Run more train-mode batches before saving{f' (at least {need})' if need else ''}, or "
        "recalibrate with an exact average: bn.momentum = None; bn.reset_running_stats(); forward "
        "passes in model.train() under torch.no_grad().", every)]


def audit_layer(tensors: Mapping[str, Any], *, prefix: str = "", eps: float = DEFAULT_EPS,
                momentum: float | None = DEFAULT_MOMENTUM, assumed: tuple[str, ...] = (),
                stored: tuple[str, ...] = ()) -> LayerAudit:
    """Audit one BatchNorm layer's saved tensors.

    Args:
        tensors: Any of ``weight``, ``bias``, ``running_mean``, ``running_var``,
            ``num_batches_tracked`` (NumPy arrays, torch tensors, or numbers); other keys
            are ignored.
        prefix: The layer's key prefix, for the report.
        eps: The layer's eps; ``var_below_eps`` compares running_var with it.
        momentum: The layer's momentum (None: cumulative average); ``unconverged`` uses it.
        assumed: Which of ``"eps"``/``"momentum"`` are defaults rather than this layer's
            known values (a state_dict stores neither), for the report.
        stored: Which of them the model file itself stores (an exported graph's BN node),
            so the fixes do not suggest a flag to give them.

    Returns:
        The :class:`LayerAudit`; a healthy layer has no findings.

    Example:
        >>> import numpy as np
        >>> a = audit_layer({"running_mean": np.zeros(2), "running_var": np.array([1.0, 1e-12]),
        ...                  "num_batches_tracked": 500})
        >>> [(f.code, f.channels) for f in a.findings]
        [('var_below_eps', (1,))]
    """
    arrays = {k: _array(tensors[k]) for k in VECTOR_KEYS if tensors.get(k) is not None}
    raw_nbt = tensors.get("num_batches_tracked")
    nbt = None
    if raw_nbt is not None and numel(raw_nbt) == 1:
        nbt = int(_array(raw_nbt).reshape(-1)[0])
    ref = arrays.get("running_mean", arrays.get("weight"))
    c = int(ref.size) if ref is not None else None
    findings: list[Finding] = []
    vectors = {k: a.reshape(-1) for k, a in arrays.items()}
    for found in (_shape_finding(arrays, raw_nbt), _non_finite(arrays, c)):
        if found is not None:
            findings.append(found)
    w, v, m = vectors.get("weight"), vectors.get("running_var"), vectors.get("running_mean")
    dead, median = _dead(w) if w is not None and w.size else (np.array([], dtype=np.int64), 0.0)
    if v is not None:
        findings.extend(_var_findings(v, eps, c, dead, "eps" in assumed, "eps" in stored))
    findings.extend(_count_findings(m, v, nbt, momentum, c))
    if dead.size:
        findings.append(ChannelFinding(
            "dead_channel", "warning",
            f"weight is ~0 in {_which(dead, c)}: |weight| < {DEAD_RATIO:g} x the layer's median "
            f"|weight| ({median:.3g}) or exactly 0, so they output their bias whatever the input.",
            "Expected after pruning or L1-sparsity training (network slimming): remove them and the "
            "matching filters to save compute. Otherwise look for what zeroed them (weight decay on "
            "BatchNorm weights, a failed load).", tuple(int(i) for i in dead)))
    findings.sort(key=lambda f: (SEVERITIES.index(f.severity), CODES.index(f.code)))
    return LayerAudit(prefix, c, nbt, {k: _summary(a) for k, a in arrays.items()},
                      eps, momentum, assumed, findings)


def audit_state_dict(state: Mapping[str, Any], *, eps: float = DEFAULT_EPS,
                     momentum: float | None = DEFAULT_MOMENTUM, assumed: tuple[str, ...] = ()
                     ) -> list[LayerAudit]:
    """Audit every BatchNorm layer of a flat state_dict (:func:`bn_layers`), in key order."""
    return [audit_layer(layer_tensors(state, p), prefix=p, eps=eps, momentum=momentum, assumed=assumed)
            for p, _ in bn_layers(state)]
