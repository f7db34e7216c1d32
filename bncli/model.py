"""Whole exported models: the BatchNorm layers of a graph, and passes over data through them.

An exported program (``torch.export``) carries its graph; this module finds the batch-norm
nodes in it (every aten variant export emits in torch 2.13) with the conv feeding each,
and runs the model over batches of data with every BN layer in one mode:

* ``eval``: each layer normalizes with its running statistics (``model.eval()``);
* ``train``: each layer normalizes with the statistics of the batch it sees, as after
  ``model.train()`` (what ``torch.optim.swa_utils.update_bn`` and fvcore's ``precise_bn``
  run); other ops run as exported.

Every BN layer goes through a :class:`bncli.engine.BatchNormEngine` holding that layer's
weight, bias and running statistics: the engine stays the one place with BatchNorm math.
The input of every layer is observed exactly (float64 moments, :mod:`bncli.moments`).

No files, no printing: :mod:`bncli.model_ops` builds the commands' results from these.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bncli.engine import BatchNormConfig, BatchNormEngine
from bncli.errors import ShapeError, StateError
from bncli.moments import Moments, block_moments

# aten batch-norm overloads torch.export 2.13 can emit (eval/train, before/after
# run_decompositions, cudnn/miopen), by "op.overload" name.
BN_OPS = frozenset({
    "batch_norm.default", "_native_batch_norm_legit_no_training.default",
    "_native_batch_norm_legit.default", "_native_batch_norm_legit.no_stats",
    "_native_batch_norm_legit_functional.default", "native_batch_norm.default",
    "_batch_norm_with_update.default", "_batch_norm_with_update_functional.default",
    "_batch_norm_no_update.default", "cudnn_batch_norm.default", "miopen_batch_norm.default",
})
_ALWAYS_TRAINING = {"_batch_norm_with_update", "_batch_norm_with_update_functional"}
CONV_OPS = frozenset({"conv2d.default", "convolution.default"})


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Silence the FutureWarning torch 2.13 itself triggers when it deep-copies pytree specs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec")
        yield


def unlift(ep: Any) -> torch.fx.GraphModule:
    """``ep.module()``: parameters and buffers as attributes, callable on the user inputs."""
    with quiet_torch():
        return ep.module()


def op_name(target: Any) -> str | None:
    """``"batch_norm.default"`` for ``torch.ops.aten.batch_norm.default``; None for non-aten."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return f"{target._opname}.{target._overloadname}"
    return None


def bind(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """An aten call's arguments by schema name (defaults filled in)."""
    schema = target._schema.arguments
    out = {a.name: a.default_value for a in schema if a.has_default_value()}
    out.update({a.name: v for a, v in zip(schema, args, strict=False)})
    out.update(kwargs)
    return out


@dataclass
class BnLayer:
    """One batch-norm node of a graph.

    Attributes:
        index: Position among the graph's BN nodes (graph order).
        name: The module path (``layer1.0.bn1``), from its buffers or weight; else the node name.
        node: The graph node's name.
        op: The aten overload, e.g. ``batch_norm.default``.
        num_features: Channels C.
        eps, momentum: As exported.
        training: The node's own mode as exported (True for a model exported in train mode).
        params: FQN of ``weight``, ``bias``, ``running_mean``, ``running_var`` and
            ``num_batches_tracked`` (None where the layer has none).
        input_rank: Rank of the layer's input (4 for BatchNorm2d); None if unknown.
        conv: Module path of the conv2d feeding this layer (None if its input is no conv).
        conv_node: That conv's node name.
        conv_users: How many nodes use the conv's output (1: the BN alone, foldable).
    """

    index: int
    name: str
    node: str
    op: str
    num_features: int
    eps: float
    momentum: float | None
    training: bool
    params: dict[str, str | None]
    input_rank: int | None
    conv: str | None = None
    conv_node: str | None = None
    conv_users: int = 0

    @property
    def has_running_stats(self) -> bool:
        return self.params.get("running_mean") is not None and self.params.get("running_var") is not None

    @property
    def module_momentum(self) -> float | None:
        """The module's momentum as far as the graph tells: None for a 0 in an eval-mode node.

        ``nn.BatchNorm2d`` passes momentum 0.0 to aten outside training when its momentum
        is None (cumulative average), so an eval export cannot tell None from 0; None is
        the reading under which the running statistics can have moved at all. (A module
        with momentum None cannot be exported in train mode.)
        """
        return None if not self.training and self.momentum == 0 else self.momentum

    @property
    def batch_stats_when_run(self) -> bool:
        """Exported in train mode: normalizes with batch statistics and updates its running ones.

        An exported module cannot be switched with ``.eval()`` (torch 2.13 refuses it).
        Layers without running statistics always use batch statistics and are not counted.
        """
        return self.training and self.has_running_stats


def _attr(node: Any) -> str | None:
    return str(node.target) if isinstance(node, torch.fx.Node) and node.op == "get_attr" else None


def _module_of(fqn: str | None) -> str | None:
    return fqn.rsplit(".", 1)[0] if fqn and "." in fqn else fqn


def bn_layers(gm: torch.fx.GraphModule) -> list[BnLayer]:
    """The BN nodes of an unlifted exported module (``ep.module()``), in graph order."""
    layers: list[BnLayer] = []
    for node in gm.graph.nodes:
        name = op_name(node.target) if node.op == "call_function" else None
        if name not in BN_OPS:
            continue
        a = bind(node.target, node.args, node.kwargs)
        params = {k: _attr(a.get(k)) for k in ("weight", "bias", "running_mean", "running_var")}
        owner = _module_of(params["running_mean"] or params["weight"])
        nbt = f"{owner}.num_batches_tracked" if owner and params["running_mean"] else None
        params["num_batches_tracked"] = nbt if nbt and _has_attr(gm, nbt) else None
        x = a["input"]
        val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        c = _channels(gm, params, val)
        training = bool(a.get("training", name.split(".")[0] in _ALWAYS_TRAINING))
        momentum = a.get("momentum", a.get("exponential_average_factor"))
        layer = BnLayer(len(layers), owner or node.name, node.name, name, c,
                        float(a.get("eps", a.get("epsilon", 1e-5))),
                        None if momentum is None else float(momentum), training, params,
                        None if val is None else val.dim())
        if isinstance(x, torch.fx.Node) and op_name(x.target) in CONV_OPS:
            conv = bind(x.target, x.args, x.kwargs)
            w = conv.get("weight")
            val_w = w.meta.get("val") if isinstance(w, torch.fx.Node) else None
            if not conv.get("transposed", False) and (val_w is None or val_w.dim() == 4):
                layer.conv = _module_of(_attr(w)) or x.name
                layer.conv_node = x.name
                layer.conv_users = len(x.users)
        layers.append(layer)
    return layers


def _has_attr(gm: torch.nn.Module, fqn: str) -> bool:
    try:
        gm.get_buffer(fqn)
        return True
    except AttributeError:
        return False


def _channels(gm: torch.fx.GraphModule, params: dict[str, str | None], val: Any) -> int:
    for key in ("running_mean", "weight"):
        fqn = params[key]
        if fqn:
            return int(_fetch(gm, fqn).numel())
    if val is not None and val.dim() >= 2 and isinstance(val.shape[1], int):
        return int(val.shape[1])
    return 0


def _fetch(gm: torch.nn.Module, fqn: str) -> torch.Tensor:
    module, _, leaf = fqn.rpartition(".")
    value = getattr(gm.get_submodule(module) if module else gm, leaf)
    assert isinstance(value, torch.Tensor)
    return value


def layer_state(gm: torch.nn.Module, layer: BnLayer) -> dict[str, torch.Tensor]:
    """The layer's tensors under BatchNorm2d state_dict keys (weight, bias, running_mean ...)."""
    return {k: _fetch(gm, fqn).detach() for k, fqn in layer.params.items() if fqn}


def engine_for(gm: torch.nn.Module, layer: BnLayer) -> BatchNormEngine:
    """A BatchNorm2d engine holding this layer's configuration and current state."""
    state = layer_state(gm, layer)
    config = BatchNormConfig(layer.num_features, eps=layer.eps, momentum=layer.momentum,
                             affine="weight" in state, track_running_stats=layer.has_running_stats)
    dtype = next((t.dtype for k, t in state.items() if k != "num_batches_tracked"), torch.float32)
    engine = BatchNormEngine(config, param_dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    if "weight" in state and "bias" not in state:
        raise StateError(f"BN layer {layer.name!r} has a weight but no bias.",
                         hint="bncli handles affine layers with both, or neither.")
    engine.load_state(state, source=f"layer {layer.name!r}")
    return engine


def require_2d(layers: Iterable[BnLayer]) -> None:
    """Raise a clear error for BN layers bncli cannot run (inputs that are not 4D)."""
    for layer in layers:
        if layer.input_rank not in (None, 4):
            raise ShapeError(
                f"BN layer {layer.name!r} normalizes a {layer.input_rank}D input (BatchNorm1d/3d); "
                "bncli runs BatchNorm2d layers (4D inputs) only.",
                hint="`bncli inspect` still lists it; recalibrate such models in PyTorch "
                     "(torch.optim.swa_utils.update_bn).")


# -- the model's input ----------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInput:
    """The exported model's one tensor input: its shape (a dim is an int, or a (min, max) range)."""

    name: str
    shape: tuple[int | tuple[int, int | None], ...]
    dtype: torch.dtype

    @property
    def static_batch(self) -> int | None:
        first = self.shape[0] if self.shape else None
        return first if isinstance(first, int) else None

    def describe(self) -> str:
        dims = [str(d) if isinstance(d, int) else f"{d[0]}..{d[1] if d[1] is not None else ''}"
                for d in self.shape]
        return f"({', '.join(dims)}) {str(self.dtype).replace('torch.', '')}"


def model_input(ep: Any) -> ModelInput:
    """The single tensor input of an ExportedProgram, with the ranges of dynamic dims.

    Raises:
        ShapeError: The model takes several inputs, or a non-tensor.
    """
    from torch.export.graph_signature import InputKind, TensorArgument

    users = [s for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    tensors = [s for s in users if isinstance(s.arg, TensorArgument)]
    if len(users) != 1 or len(tensors) != 1:
        raise ShapeError(f"The model takes {len(users)} inputs; bncli feeds models with exactly one "
                         "tensor input (a batch of images).",
                         hint="Export a wrapper whose forward takes one tensor.")
    name = tensors[0].arg.name
    val = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == name).meta["val"]
    ranges = {str(k): (int(v.lower), None if not v.upper.is_finite else int(v.upper))
              for k, v in ep.range_constraints.items()}
    shape: list[int | tuple[int, int | None]] = []
    for d in val.shape:
        if isinstance(d, int):
            shape.append(d)
        else:
            lo, hi = ranges.get(str(d.node.expr), (0, None))
            shape.append((lo, hi))
    return ModelInput(name, tuple(shape), val.dtype)


def check_batch(inp: ModelInput, sample_shape: tuple[int, ...], batch: int, where: str) -> None:
    """Raise a clear error if batches of ``batch`` samples of ``sample_shape`` cannot run."""
    want = inp.shape[1:]
    ok = len(sample_shape) == len(want) and all(
        s == d if isinstance(d, int) else d[0] <= s and (d[1] is None or s <= d[1])
        for s, d in zip(sample_shape, want, strict=True))
    if not ok:
        static = [d for d in want if isinstance(d, int)]
        nhwc = len(sample_shape) == 3 and len(static) == 3 and sample_shape == (static[1], static[2], static[0])
        raise ShapeError(f"{where}: samples of shape {sample_shape} do not fit the model's input "
                         f"{inp.name} {inp.describe()} (axis 0 is the batch).",
                         hint="These look channels-last (N, H, W, C): save x.transpose(0, 3, 1, 2) first."
                         if nhwc else "Pass data shaped like the model's input, e.g. (N, C, H, W) images.")
    first = inp.shape[0]
    if isinstance(first, int):
        if batch != first:
            raise ShapeError(f"The model was exported with a static batch of {first} (torch.export "
                             f"specialized axis 0), so batches of {batch} cannot run.",
                             hint=f"Use --batch-size {first}, or re-export with dynamic_shapes="
                                  f"{{'{inp.name}': {{0: torch.export.Dim('batch')}}}}.")
    elif batch < max(first[0], 1) or (first[1] is not None and batch > first[1]):
        hi = "" if first[1] is None else first[1]
        raise ShapeError(f"The model's batch axis accepts {first[0]}..{hi} samples; got a batch of {batch}.",
                         hint=f"Choose --batch-size within {first[0]}..{hi} (or --drop-last for a short last batch).")


def batches(blocks: Iterable[np.ndarray], batch_size: int, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Regroup a stream of row blocks (several files in a row) into batches of ``batch_size``.

    The last batch may be shorter; the caller decides whether it can run.
    """
    pending: list[np.ndarray] = []
    have = 0
    for block in blocks:
        while block.shape[0]:
            take = min(batch_size - have, block.shape[0])
            pending.append(block[:take])
            have += take
            block = block[take:]
            if have == batch_size:
                yield torch.from_numpy(np.concatenate(pending)).to(dtype)
                pending, have = [], 0
    if have:
        yield torch.from_numpy(np.concatenate(pending)).to(dtype)


# -- passes ---------------------------------------------------------------------------------
def _as_numpy(x: torch.Tensor) -> np.ndarray:
    x = x.detach().cpu()
    return (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).numpy()


@dataclass
class LayerStats:
    """A layer's inputs over a pass: exact moments of everything, and per-batch moments.

    ``total`` is the population (every value of every batch); ``batch_mean_sum`` and
    ``batch_var_sum`` add each batch's mean and unbiased variance, for the per-batch
    average that ``update_bn`` computes (momentum=None: equal weight per batch).
    """

    channels: int
    total: Moments = field(init=False)
    batch_mean_sum: np.ndarray = field(init=False)
    batch_var_sum: np.ndarray = field(init=False)
    batches: int = 0

    def __post_init__(self) -> None:
        self.total = Moments.empty(self.channels)
        self.batch_mean_sum = np.zeros(self.channels)
        self.batch_var_sum = np.zeros(self.channels)

    def add(self, x: torch.Tensor) -> None:
        block = block_moments(_as_numpy(x), extrema=False)
        self.total.merge(block)
        self.batch_mean_sum += block.mean
        self.batch_var_sum += block.var_unbiased
        self.batches += 1

    @property
    def batch_mean(self) -> np.ndarray:
        return self.batch_mean_sum / self.batches

    @property
    def batch_var(self) -> np.ndarray:
        return self.batch_var_sum / self.batches


Observer = Callable[[BnLayer, torch.Tensor, torch.Tensor], None]


class ModelRunner(torch.fx.Interpreter):
    """Runs an unlifted exported module with every BN node routed through its engine.

    Args:
        gm: ``ep.module()`` of the exported program.
        layers: Its BN layers (:func:`bn_layers`); each gets an engine with its state.
        mode: ``"eval"`` (running statistics) or ``"train"`` (batch statistics) for every layer.
        observe: Called as ``observe(layer, input, output)`` at every BN node.

    Example:
        >>> run = ModelRunner(gm, bn_layers(gm), "train")
        >>> out = run(batch)
    """

    def __init__(self, gm: torch.fx.GraphModule, layers: list[BnLayer], mode: str,
                 observe: Observer | None = None) -> None:
        super().__init__(gm)
        self.layers = {layer.node: layer for layer in layers}
        self.engines = {layer.node: engine_for(gm, layer) for layer in layers}
        self.mode = mode
        self.observe = observe

    def __call__(self, batch: torch.Tensor) -> Any:
        with torch.no_grad():
            return self.run(batch)

    def run_node(self, n: torch.fx.Node) -> Any:
        layer = self.layers.get(n.name)
        if layer is None:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        a = bind(n.target, args, kwargs)
        x = a["input"]
        y = self.engines[n.name].apply(x, mode=self.mode)
        if self.observe is not None:
            self.observe(layer, x, y)
        returns = n.target._schema.returns  # type: ignore[union-attr]
        if len(returns) == 1:
            return y
        # Extra results: saved statistics nobody reads in an inference graph, and (functional
        # variants) the updated running stats, which stay as they were.
        extra = [a.get(r.name.removesuffix("_out")) if r.name and r.name.endswith("_out")
                 else x.new_empty(0) for r in returns[1:]]
        return (y, *extra)


def flat_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, or nested tuples/lists/dicts of them)."""
    import torch.utils._pytree as pytree

    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
