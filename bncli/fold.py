"""Fold eval-mode BatchNorm layers into the conv2d before them, in an exported program.

For a BN in eval mode, ``bn(conv(x)) = conv'(x)`` with ``conv'`` 's weight scaled per
output channel by ``gamma / sqrt(running_var + eps)`` and its bias shifted
(``torch.nn.utils.fusion.fuse_conv_bn_weights`` computes both). This module rewrites
the *lifted* graph of the program (parameters are graph inputs), so dynamic shapes,
the input/output signature and every other node stay as exported:

* the conv's weight (and bias, added as a new parameter if the conv had none) get the
  folded values; the BN node and its now-unused parameters and buffers are removed;
* a BN is folded only when that is exact algebra: eval mode with running statistics,
  fed by a non-transposed conv2d whose output nothing else reads and whose weight and
  bias no other node reads. Every other BN is kept and reported with the reason.

The result is checked numerically against the original by :mod:`bncli.model_ops`
callers (``fold_model``): folding changes rounding only.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils.fusion import fuse_conv_bn_weights

from bncli import io, model
from bncli.errors import StateError
from bncli.io import pt2
from bncli.model import BnLayer
from bncli.model_ops import iter_batches, load_model, plan_data

DEFAULT_TOLERANCE = 1e-4


@dataclass
class FoldDecision:
    """Whether one BN layer was folded, into which conv, and if not, why."""

    layer: BnLayer
    folded: bool
    reason: str


@dataclass
class FoldResult:
    """What ``fold`` did and how close the folded model is to the original."""

    model: Path
    output: Path | None
    decisions: list[FoldDecision]
    check: str
    max_abs_error: float
    max_abs_output: float
    tolerance: float

    @property
    def relative_error(self) -> float:
        return self.max_abs_error / max(self.max_abs_output, 1.0)

    @property
    def folded(self) -> list[FoldDecision]:
        return [d for d in self.decisions if d.folded]


def _reason(layer: BnLayer) -> str | None:
    """Why this layer cannot be folded (None: it can, as far as the layer tells)."""
    if layer.training:
        return "exported in train mode: it normalizes with batch statistics"
    if not layer.has_running_stats:
        return "no running statistics (track_running_stats=False)"
    if layer.conv is None:
        return "its input is not a conv2d output"
    if layer.conv_users != 1:
        return f"the conv's output is also read by {layer.conv_users - 1} other node(s)"
    if layer.input_rank not in (None, 4):
        return f"{layer.input_rank}D input"
    return None


def _nodes(graph: torch.fx.Graph) -> dict[str, torch.fx.Node]:
    return {n.name: n for n in graph.nodes}


def _set_arg(node: torch.fx.Node, index: int, name: str, value: Any) -> None:
    if name in node.kwargs:
        node.update_kwarg(name, value)
    elif len(node.args) > index:
        node.update_arg(index, value)
    else:
        node.args = (*node.args, *([None] * (index - len(node.args))), value)


class _Folder:
    """Rewrites one ExportedProgram; :meth:`fold` per layer, :meth:`program` at the end."""

    def __init__(self, ep: Any) -> None:
        self.ep = ep
        self.gm = ep.graph_module
        self.specs = list(ep.graph_signature.input_specs)
        self.state = dict(ep.state_dict)
        self.param_of = dict(ep.graph_signature.inputs_to_parameters)
        self.buffer_of = dict(ep.graph_signature.inputs_to_buffers)
        mutated = {s.target for s in ep.graph_signature.output_specs if s.target is not None}
        self.mutated = mutated

    def fold(self, layer: BnLayer) -> str | None:
        """Fold ``layer`` into its conv; return why not (nothing changed) or None when done."""
        nodes = _nodes(self.gm.graph)
        bn, conv = nodes.get(layer.node), nodes.get(str(layer.conv_node))
        if bn is None or conv is None:
            return "not found in the lifted graph"
        c = model.bind(conv.target, conv.args, conv.kwargs)
        w_node, b_node = c.get("weight"), c.get("bias")
        if not isinstance(w_node, torch.fx.Node) or w_node.name not in self.param_of or len(w_node.users) != 1:
            return "the conv's weight is not a parameter of its own (shared or computed)"
        if b_node is not None and (not isinstance(b_node, torch.fx.Node) or b_node.name not in self.param_of
                                   or len(b_node.users) != 1):
            return "the conv's bias is not a parameter of its own (shared or computed)"
        returns = bn.target._schema.returns  # type: ignore[union-attr]
        if len(returns) > 1 and any(
                u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in bn.users):
            return "other results of the BN node (saved statistics) are used"
        a = model.bind(bn.target, bn.args, bn.kwargs)
        inputs = {k: a.get(k) for k in ("weight", "bias", "running_mean", "running_var")}
        if any(k in self.mutated for k in (self.buffer_of.get(getattr(v, "name", "")) for v in inputs.values())):
            return "its running statistics are updated by the graph"
        tensor = {k: self._tensor(v) for k, v in inputs.items()}
        rm, rv = tensor["running_mean"], tensor["running_var"]
        if rm is None or rv is None:
            return "no running statistics"
        w_fqn = self.param_of[w_node.name]
        conv_b = self.state[self.param_of[b_node.name]] if b_node is not None else None
        new_w, new_b = fuse_conv_bn_weights(self.state[w_fqn], conv_b, rm, rv, layer.eps,
                                            tensor["weight"], tensor["bias"])
        self.state[w_fqn] = new_w
        if b_node is not None:
            self.state[self.param_of[b_node.name]] = new_b
        else:
            _set_arg(conv, 2, "bias", self._new_param(w_node, w_fqn.rsplit(".", 1)[0] + ".bias", new_b))
        out = bn if len(returns) == 1 else next((u for u in bn.users if u.args[1] == 0), None)
        if out is not None:
            out.replace_all_uses_with(conv)
        for user in list(bn.users):
            self.gm.graph.erase_node(user)
        self.gm.graph.erase_node(bn)
        for node in inputs.values():
            self._drop_if_unused(node)
        nbt = layer.params.get("num_batches_tracked")
        spare = [n for n in self.gm.graph.nodes if n.op == "placeholder" and self.buffer_of.get(n.name) == nbt]
        for node in spare:
            self._drop_if_unused(node)
        return None

    def _tensor(self, node: Any) -> torch.Tensor | None:
        if node is None:
            return None
        fqn = self.param_of.get(node.name) or self.buffer_of.get(node.name)
        if fqn is None:
            raise StateError(f"BN input {node.name!r} is neither a parameter nor a buffer.")
        return self.state[fqn] if fqn in self.state else self.ep.constants[fqn]

    def _new_param(self, after: torch.fx.Node, fqn: str, value: torch.Tensor) -> torch.fx.Node:
        from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

        name = "p_" + fqn.replace(".", "_")
        taken = {n.name for n in self.gm.graph.nodes}
        while name in taken:
            name += "_"
        with self.gm.graph.inserting_after(after):
            node = self.gm.graph.placeholder(name)
        node.meta["val"] = after.meta["val"].fake_mode.from_tensor(value.detach())
        index = next(i for i, s in enumerate(self.specs) if s.arg.name == after.name) + 1
        self.specs.insert(index, InputSpec(kind=InputKind.PARAMETER, arg=TensorArgument(name=name), target=fqn))
        self.param_of[name] = fqn
        self.state[fqn] = value
        return node

    def _drop_if_unused(self, node: Any) -> None:
        if not isinstance(node, torch.fx.Node) or node.op != "placeholder" or node.users:
            return
        fqn = self.param_of.get(node.name) or self.buffer_of.get(node.name)
        if fqn is None or fqn in self.mutated:
            return
        self.specs = [s for s in self.specs if s.arg.name != node.name]
        self.state.pop(fqn, None)
        self.gm.graph.erase_node(node)

    def program(self) -> Any:
        from torch.export.graph_signature import ExportGraphSignature

        self.gm.graph.lint()
        self.gm.recompile()
        signature = ExportGraphSignature(self.specs, list(self.ep.graph_signature.output_specs))
        with model.quiet_torch():
            new = self.ep._update(self.gm, signature, state_dict=self.state)
        new._guards_code = []
        return new


def _random_batch(inp: model.ModelInput, seed: int = 0) -> torch.Tensor:
    shape = [d if isinstance(d, int) else max(d[0], min(4, d[1] or 4)) for d in inp.shape]
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(inp.dtype)


def fold_model(path: Path, output: Path | None, *, data: Sequence[Path] = (), key: str | None = None,
               batch_size: int | None = None, tolerance: float = DEFAULT_TOLERANCE,
               force: bool = False) -> FoldResult:
    """Fold every foldable BN of ``path`` into its conv; check and write ``output``.

    The folded model is compared with the original (both in eval mode, as exported) on
    ``data`` (all of it, in batches) or on one seeded random batch. The output is written
    only if ``max |folded - original| <= tolerance * max(1, max |original|)``.

    Raises:
        StateError: The error is above the tolerance (nothing is written).
    """
    path = Path(path)
    if output is not None:
        io.check_output(Path(output), force=force, protect=[path, *data], allowed=pt2.PT2_SUFFIXES)
    m = load_model(path)
    reference = m.gm
    folder = _Folder(m.ep)
    decisions = []
    for layer in m.layers:
        why = _reason(layer) or folder.fold(layer)
        decisions.append(FoldDecision(layer, why is None, why or f"into {layer.conv}"))
    folded_ep = folder.program()
    folded = model.unlift(folded_ep)
    if data:
        plan = plan_data(data, key, m.input, batch_size, drop_last=True)
        inputs = iter_batches(plan, m.input.dtype)
        check = f"{plan.samples - plan.dropped} samples of {', '.join(str(p) for p in plan.paths)}"
    else:
        inputs = iter([_random_batch(m.input)])
        check = "a random normal batch of shape " + str(tuple(_random_batch(m.input).shape))
    err = top = 0.0
    with torch.no_grad():
        for batch in inputs:
            want = model.flat_tensors(reference(batch))
            got = model.flat_tensors(folded(batch))
            for w, g in zip(want, got, strict=True):
                if w.numel():
                    if not torch.isfinite(w).all():
                        # NaN - NaN is NaN and max(err, nan) is err: the check would pass unseen.
                        raise StateError(f"{path}: the original model outputs NaN or Inf on the check batch "
                                         f"({check}), so folding cannot be checked; nothing was written.",
                                         hint=f"Look for non-finite running stats or weights: bncli inspect "
                                              f"{path}; recalibrate or fix them first.")
                    diff = float((w.double() - g.double()).abs().max())
                    err = max(err, diff if math.isfinite(diff) else math.inf)
                    top = max(top, float(w.abs().max()))
    result = FoldResult(path, None, decisions, check, err, top, tolerance)
    if not result.relative_error <= tolerance:
        raise StateError(f"The folded model differs from the original by up to {err:.3g} "
                         f"({result.relative_error:.3g} relative to max(1, max |output|) = {max(top, 1.0):.3g}), "
                         f"above the tolerance {tolerance:g}; nothing was written.",
                         hint="Check the model on real data (--data) or raise --tolerance if that "
                              "error is acceptable for it.")
    if output is not None:
        pt2.save_program(folded_ep, Path(output), force=force, protect=(path, *data))
        result.output = Path(output)
    return result
