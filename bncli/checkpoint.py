"""The operation behind ``bncli inspect``: a model file in, per-layer audits out (data).

Checkpoints load through :mod:`bncli.io` (weights_only, nothing unpickled). An exported
program (``.pt2``) is read by the safe reader :mod:`bncli.io.pt2`, and :mod:`bncli.model`
lists its BN layers (tensors, eps and momentum from each node, the conv feeding it).
The findings come from :func:`bncli.audit.audit_layer` for both. Nothing here prints or
knows typer/rich, and torch is imported only by the loaders, for ``.pt``/``.pth``/
``.ckpt``/``.pt2`` files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bncli import io
from bncli.audit import DEFAULT_EPS, DEFAULT_MOMENTUM, LayerAudit, audit_layer, audit_state_dict
from bncli.errors import BncliError, InputError, KeyChoiceError, StateError
from bncli.io.formats import layer_name
from bncli.layers import bn_layers, find_layer, layer_listing

if TYPE_CHECKING:
    from bncli.model import BnLayer

PT2_SUFFIX = ".pt2"
KINDS = ("checkpoint", "exported_program")


@dataclass(frozen=True)
class GraphNode:
    """Where one BN layer of an exported program sits in its graph.

    Attributes:
        node: The batch-norm node's name.
        op: Its aten overload (``batch_norm.default``).
        training: The node's mode as exported.
        batch_stats: Exported in train mode with running statistics: it normalizes with
            batch statistics (and updates its running ones) whenever the program runs.
        conv: Module path of the conv2d feeding the layer, None if its input is no conv.
        conv_node: That conv's node name.
        conv_users: How many nodes read the conv's output (1: the BN alone).
        input_rank: Rank of the layer's input (4 for BatchNorm2d), None if unknown.
        momentum_arg: The momentum argument as exported (an eval export stores None as 0).
    """

    node: str
    op: str
    training: bool
    batch_stats: bool
    conv: str | None
    conv_node: str | None
    conv_users: int
    input_rank: int | None
    momentum_arg: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CheckpointAudit:
    """The audit of one file: its layers, or why it could not be audited.

    Attributes:
        path: The file as given.
        layers: One :class:`~bncli.audit.LayerAudit` per BatchNorm layer, in key order
            (graph order for an exported program).
        container: The container keys every layer's prefix starts with
            (``state_dict.model`` for a Lightning checkpoint), ``""`` if none.
        error: Why the file could not be audited (unreadable, unsafe, not a checkpoint).
        hint: The fix for ``error``.
        kind: ``"checkpoint"`` or ``"exported_program"`` (a ``.pt2``).
        nodes: For an exported program, the :class:`GraphNode` of each layer (same order).
    """

    path: str
    layers: list[LayerAudit] = field(default_factory=list)
    container: str = ""
    error: str | None = None
    hint: str | None = None
    kind: str = "checkpoint"
    nodes: list[GraphNode] = field(default_factory=list)

    def fails(self, fail_on: str = "error") -> bool:
        """True when the file could not be audited or a layer has a ``fail_on`` finding."""
        return self.error is not None or any(layer.fails(fail_on) for layer in self.layers)

    def display_name(self, layer: LayerAudit) -> str:
        """The layer's prefix without the shared :attr:`container` keys.

        A module that runs at several nodes of a graph is named with its node each time.
        """
        if self.container and layer.prefix.startswith(self.container):
            return layer.prefix[len(self.container):].lstrip(".")
        if self.nodes and sum(a.prefix == layer.prefix for a in self.layers) > 1:
            return f"{layer.prefix} ({self.node_of(layer).node})"
        return layer.prefix

    def node_of(self, layer: LayerAudit) -> GraphNode:
        """The graph node of one of :attr:`layers` (exported programs only)."""
        return self.nodes[next(i for i, a in enumerate(self.layers) if a is layer)]

    def to_dict(self, fail_on: str = "error") -> dict[str, Any]:
        graph: list[GraphNode | None] = [*self.nodes] if self.nodes else [None] * len(self.layers)
        return {"path": self.path, "kind": self.kind, "container": self.container or None,
                "passed": not self.fails(fail_on),
                "error": None if self.error is None else {"message": self.error, "hint": self.hint},
                "layers": [{**layer.to_dict(), "graph": None if node is None else node.to_dict()}
                           for layer, node in zip(self.layers, graph, strict=True)]}


def _not_a_checkpoint(path: Path, what: str) -> InputError:
    return InputError(f"{path}: {what}, not a model checkpoint; inspect audits the BatchNorm "
                      "layers of checkpoints (.pt/.pth/.ckpt/.safetensors) and exported models (.pt2).",
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
    if not state:
        raise InputError(f"{path}: holds no tensors (only other Python values, if any), so no BatchNorm "
                         "layer to audit.",
                         hint="Pass the checkpoint that holds the model's state_dict "
                              "(torch.save(model.state_dict(), PATH)).")
    raise InputError(f"{path}: holds {len(state)} tensors but no BatchNorm layer (no *.running_mean "
                     "with *.running_var).",
                     hint="A model without BatchNorm (or built with track_running_stats=False) has "
                          f"nothing to audit. To check a data tensor in it: bncli check-shape {path} --key KEY")


def _failed(report: CheckpointAudit, exc: BncliError | OSError) -> CheckpointAudit:
    """The report of a file that could not be audited, with the reason and its fix."""
    if isinstance(exc, BncliError):
        report.error, report.hint = exc.message, exc.hint
    else:
        report.error = f"{report.path}: cannot read ({exc.strerror or exc})."
        report.hint = "Check the path and its permissions."
    return report


def audit_file(path: Path, *, eps: float = DEFAULT_EPS, momentum: float | None = DEFAULT_MOMENTUM,
               assumed: tuple[str, ...] = (), prefix: str | None = None) -> CheckpointAudit:
    """Audit every BatchNorm layer of a checkpoint (or only the one ``prefix`` names).

    Never raises for a bad file: an unreadable or unsafe file, or one that holds data
    rather than layers, comes back with :attr:`CheckpointAudit.error` and its hint.

    Args:
        path: A ``.pt``/``.pth``, Lightning ``.ckpt`` or ``.safetensors`` state_dict or
            checkpoint (nested containers and ``module.``/``_orig_mod.`` prefixes are fine),
            or a ``.pt2`` exported program (:func:`audit_program`).
        eps, momentum, assumed: As for :func:`bncli.audit.audit_layer`; not used for a
            ``.pt2``, whose graph stores each layer's own.
        prefix: Audit only this layer, matched as ``--prefix`` is everywhere.
    """
    path = Path(path)
    if path.suffix.lower() == PT2_SUFFIX:
        return audit_program(path, prefix=prefix)
    report = CheckpointAudit(str(path))
    try:
        state = _load(path)
        wanted = find_layer(state, prefix, str(path)) if prefix is not None else None
    except (BncliError, OSError) as exc:
        return _failed(report, exc)
    layers = audit_state_dict(state, eps=eps, momentum=momentum, assumed=assumed)
    report.layers = [a for a in layers if wanted is None or a.prefix == wanted]
    containers = {io.split_container(a.prefix)[0] for a in report.layers}
    report.container = containers.pop() if len(containers) == 1 else ""
    return report


# -- exported programs ----------------------------------------------------------------------
def _graph_node(layer: BnLayer) -> GraphNode:
    return GraphNode(layer.node, layer.op, layer.training, layer.batch_stats_when_run, layer.conv,
                     layer.conv_node, layer.conv_users, layer.input_rank, layer.momentum)


def _pick(layers: list[BnLayer], prefix: str, source: str) -> list[BnLayer]:
    """The layers ``--prefix`` names: a module path or node name, matched as for checkpoints."""
    prefix = prefix.rstrip(".")
    exact = [a for a in layers if prefix in (a.name, a.node)]
    found = exact or [a for a in layers if layer_name(a.name) == layer_name(prefix)]
    if found:
        return found
    listing = layer_listing([(a.name, a.num_features) for a in layers])
    raise StateError(f"{source}: no BatchNorm layer named {prefix!r} in the graph.",
                     hint=f"BatchNorm layers in this model: {listing}.")


def audit_program(path: Path, *, prefix: str | None = None) -> CheckpointAudit:
    """Audit every BN layer of an exported program (``.pt2``) with its own eps and momentum.

    The file is read by the safe reader (:func:`bncli.io.pt2.load_program`: nothing of it
    is unpickled, eval'd or exec'd); :func:`bncli.model.bn_layers` lists the batch-norm
    nodes, each with its tensors, eps, momentum and the conv feeding it. eps and momentum
    are the node's arguments, so nothing is ``assumed``; a momentum of 0 in an eval-mode
    node is read as None (see :attr:`bncli.model.BnLayer.module_momentum`).

    Never raises for a bad file: it comes back with :attr:`CheckpointAudit.error`.

    Args:
        path: The ``.pt2`` archive (``torch.export.save``).
        prefix: Audit only this layer (module path such as ``layer1.0.bn1``, or node name).
    """
    from bncli import model
    from bncli.io import pt2

    path = Path(path)
    report = CheckpointAudit(str(path), kind="exported_program")
    try:
        gm = model.unlift(pt2.load_program(path))
        layers = model.bn_layers(gm)
        if not layers:
            raise InputError(f"{path}: the exported graph has no batch-norm node, so inspect has "
                             "nothing to audit.",
                             hint="Export the model before folding BatchNorm away (fold/fuse), "
                                  "or check that this is the model you meant.")
        if prefix is not None:
            layers = _pick(layers, prefix, str(path))
    except (BncliError, OSError) as exc:
        return _failed(report, exc)
    for layer in layers:
        audit = audit_layer(model.layer_state(gm, layer), prefix=layer.name, eps=layer.eps,
                            momentum=layer.module_momentum, stored=("eps", "momentum"))
        if audit.channels is None:
            audit.channels = layer.num_features or None
        report.layers.append(audit)
        report.nodes.append(_graph_node(layer))
    return report
