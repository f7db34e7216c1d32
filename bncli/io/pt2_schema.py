"""Validation of a ``.pt2`` archive's JSON before any of it reaches torch.

``torch.export.load`` trusts its file: a graph's symbolic ``expr_str`` goes to
``sympy.sympify`` (an ``eval``), ``guards_code`` goes to ``exec``, node and placeholder
names are pasted into the Python source that ``torch.fx`` generates and runs, and
operator names are resolved with ``getattr`` over ``torch``. This module walks the
program JSON (``models/model.json``) and the payload configs with the schema of
torch 2.13 (``torch/_export/serde/schema.py``, ``SCHEMA_VERSION`` 8.x) and returns a
*rebuilt* copy that holds only what bncli needs and has checked:

* call targets are ``torch.ops.aten.<op>.<overload>`` or ``_operator.getitem``;
* names are identifiers, parameter/buffer paths are dotted names (``layer1.0.bn1``);
* symbolic expressions follow a small grammar (``Symbol('s0', positive=True,
  integer=True)``, ``Add``/``Mul``/``FloorDiv`` ... of those and integers);
* no ``guards_code``, no custom/opaque objects, no subgraphs, no pickled payloads;
* node metadata is dropped (stack traces, ``source_fn_stack`` resolve names in torch),
  except an ``nn_module_stack`` whose every entry is plain dotted names.

Pure Python: no torch, no files. Every refusal raises :class:`Refusal` (the reader turns
it into an :class:`~bncli.errors.UnsafeFileError`); a file that is merely malformed
raises :class:`Malformed`.
"""

from __future__ import annotations

import json
import keyword
import re
from collections.abc import Callable
from typing import Any

from bncli.io.pt2_expr import SYMBOL_NAME, Malformed, Refusal, check_expression, show

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
FQN = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*\Z")
ATEN_TARGET = re.compile(r"torch\.ops\.aten\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)\Z")
GETITEM = "_operator.getitem"
PAYLOAD_NAME = {"weights": re.compile(r"weight_[0-9]+\Z"), "constants": re.compile(r"tensor_[0-9]+\Z")}
_MODULE_STACK_ITEM = re.compile(r"[A-Za-z0-9_.]*,[A-Za-z0-9_.]*,[A-Za-z0-9_.]*\Z")

# ScalarType values (schema.py) bncli builds tensors for; the reader maps them to torch dtypes.
SCALAR_TYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float16",
                7: "float32", 8: "float64", 12: "bool", 13: "bfloat16"}
_STRIDED = 7
_MEMORY_FORMATS = {0, 1, 2, 3, 4}
_LAYOUTS = {0, 7}
_VERIFIERS = {"", "ATEN", "TRAINING"}
MAX_STRING = 4096
MAX_TREESPEC = 1 << 16


Validator = Callable[[Any, str], Any]


# -- primitives -----------------------------------------------------------------------------
def _int(v: Any, where: str) -> int:
    if type(v) is not int:
        raise Malformed(f"{where}: expected an integer, got {type(v).__name__}")
    return v


def _nonneg(v: Any, where: str) -> int:
    if _int(v, where) < 0:
        raise Malformed(f"{where}: expected a non-negative integer, got {v}")
    return v


def _bool(v: Any, where: str) -> bool:
    if type(v) is not bool:
        raise Malformed(f"{where}: expected true/false, got {type(v).__name__}")
    return v


def _float(v: Any, where: str) -> float:
    if type(v) not in (int, float):
        raise Malformed(f"{where}: expected a number, got {type(v).__name__}")
    return float(v)


def _string(v: Any, where: str) -> str:
    if type(v) is not str or len(v) > MAX_STRING:
        raise Malformed(f"{where}: expected a string of at most {MAX_STRING} characters")
    return v


def name(v: Any, where: str) -> str:
    """A value name: a Python identifier (torch.fx pastes these into generated source)."""
    if type(v) is not str or not IDENT.match(v) or keyword.iskeyword(v):
        raise Refusal(f"{where}: name {show(v)} is not a plain identifier "
                      "(torch.fx would paste it into the Python code it runs)")
    return v


def fqn(v: Any, where: str) -> str:
    """A parameter/buffer/module path such as ``layer1.0.bn1.weight``."""
    if type(v) is not str or not FQN.match(v):
        raise Refusal(f"{where}: path {show(v)} is not a dotted name like layer1.0.bn1.weight "
                      "(torch.fx would paste it into the Python code it runs)")
    return v


def _dict(v: Any, where: str) -> dict[str, Any]:
    if type(v) is not dict:
        raise Malformed(f"{where}: expected an object, got {type(v).__name__}")
    return v


def _list(v: Any, where: str) -> list[Any]:
    if type(v) is not list:
        raise Malformed(f"{where}: expected a list, got {type(v).__name__}")
    return v


def _list_of(check: Validator) -> Validator:
    return lambda v, where: [check(x, f"{where}[{i}]") for i, x in enumerate(_list(v, where))]


def _optional(check: Validator) -> Validator:
    return lambda v, where: None if v is None else check(v, where)


def _enum(values: set[int]) -> Validator:
    def check(v: Any, where: str) -> int:
        if _int(v, where) not in values:
            raise Malformed(f"{where}: unknown value {v}")
        return v
    return check


def _fields(v: Any, where: str, required: dict[str, Validator],
            optional: dict[str, Validator] | None = None) -> dict[str, Any]:
    """A schema dataclass: required and optional fields; unknown fields are dropped."""
    d = _dict(v, where)
    out = {}
    for key, check in required.items():
        if key not in d:
            raise Malformed(f"{where}: missing field {key!r}")
        out[key] = check(d[key], f"{where}.{key}")
    for key, check in (optional or {}).items():
        if key in d:
            out[key] = check(d[key], f"{where}.{key}")
    return out


def _union(v: Any, where: str, allowed: dict[str, Validator],
           refused: dict[str, str] | None = None) -> dict[str, Any]:
    """A schema union: an object with exactly one key."""
    d = _dict(v, where)
    if len(d) != 1:
        raise Malformed(f"{where}: expected exactly one field, got {sorted(d)[:5]}")
    ((kind, value),) = d.items()
    if refused and kind in refused:
        raise Refusal(f"{where}: {refused[kind]}")
    if kind not in allowed:
        raise Refusal(f"{where}: unsupported kind {show(kind)}")
    return {kind: allowed[kind](value, f"{where}.{kind}")}


# -- schema pieces --------------------------------------------------------------------------
def _hint(v: Any, where: str) -> dict[str, Any]:
    return _union(v, where, {"as_int": _int, "as_bool": _bool, "as_float": _float})


def _sym_expr(v: Any, where: str) -> dict[str, Any]:
    return _fields(v, where, {"expr_str": check_expression}, {"hint": _optional(_hint)})


def sym_int(v: Any, where: str) -> dict[str, Any]:
    return _union(v, where, {"as_int": _int, "as_expr": _sym_expr})


def _sym_float(v: Any, where: str) -> dict[str, Any]:
    return _union(v, where, {"as_float": _float, "as_expr": _sym_expr})


def _sym_bool(v: Any, where: str) -> dict[str, Any]:
    return _union(v, where, {"as_bool": _bool, "as_expr": _sym_expr})


def _device(v: Any, where: str) -> dict[str, Any]:
    d = _fields(v, where, {"type": _string}, {"index": _optional(_nonneg)})
    if d["type"] != "cpu":
        raise Malformed(f"{where}: tensors on device {d['type']!r}; bncli runs exported models on the CPU")
    return d


def tensor_meta(v: Any, where: str, *, static: bool = False) -> dict[str, Any]:
    """A TensorMeta; ``static`` (stored weights) allows plain integer sizes only."""
    size: Validator = (lambda x, w: _union(x, w, {"as_int": _nonneg})) if static else sym_int
    meta = _fields(v, where, {
        "dtype": _enum(set(SCALAR_TYPES)), "sizes": _list_of(size), "requires_grad": _bool,
        "device": _device, "strides": _list_of(size), "storage_offset": size, "layout": _enum({_STRIDED}),
    })
    if len(meta["sizes"]) != len(meta["strides"]):
        raise Malformed(f"{where}: {len(meta['sizes'])} sizes but {len(meta['strides'])} strides")
    return meta


def _tensor_arg(v: Any, where: str) -> dict[str, Any]:
    return _fields(v, where, {"name": name})


def _sym_arg(kind: str, literal: Validator) -> Validator:
    return lambda v, where: _union(v, where, {"as_name": name, kind: literal})


def _optional_tensor(v: Any, where: str) -> dict[str, Any]:
    return _union(v, where, {"as_tensor": _tensor_arg, "as_none": _bool})


_REFUSED_ARGS = {
    "as_graph": "a subgraph argument (higher-order ops such as cond/map are not supported)",
    "as_custom_obj": "a custom (TorchScript/opaque) object, which only pickle can rebuild",
    "as_operator": "an operator passed as a value (only higher-order ops do this)",
    "as_string_to_argument": "a dictionary argument (only higher-order ops use it)",
}


def argument(v: Any, where: str) -> dict[str, Any]:
    """One node input/output value (schema ``Argument``)."""
    return _union(v, where, {
        "as_none": _bool, "as_tensor": _tensor_arg, "as_tensors": _list_of(_tensor_arg),
        "as_int": _int, "as_ints": _list_of(_int), "as_float": _float, "as_floats": _list_of(_float),
        "as_string": _string, "as_strings": _list_of(_string), "as_bool": _bool, "as_bools": _list_of(_bool),
        "as_sym_int": _sym_arg("as_int", _int), "as_sym_ints": _list_of(_sym_arg("as_int", _int)),
        "as_sym_float": _sym_arg("as_float", _float), "as_sym_floats": _list_of(_sym_arg("as_float", _float)),
        "as_sym_bool": _sym_arg("as_bool", _bool), "as_sym_bools": _list_of(_sym_arg("as_bool", _bool)),
        "as_scalar_type": _enum(set(SCALAR_TYPES) | {9, 10, 11}), "as_memory_format": _enum(_MEMORY_FORMATS),
        "as_layout": _enum(_LAYOUTS), "as_device": _device,
        "as_optional_tensors": _list_of(_optional_tensor), "as_optional_tensor": _optional_tensor,
        "as_complex": lambda x, w: _fields(x, w, {"real": _float, "imag": _float}),
        "as_int_lists": _list_of(_list_of(_int)), "as_float_lists": _list_of(_list_of(_float)),
        "as_nested_tensors": _list_of(_list_of(_tensor_arg)),
    }, _REFUSED_ARGS)


def target(v: Any, where: str) -> str:
    """A call target: ``torch.ops.aten.<op>.<overload>`` or ``_operator.getitem``, nothing else."""
    if v == GETITEM or (type(v) is str and ATEN_TARGET.match(v)):
        return v
    raise Refusal(f"{where}: call target {show(v)} is not an aten operator "
                  "(torch.export.load resolves any torch.* or math.* name and calls it)")


def _module_stack(text: Any) -> str | None:
    if type(text) is not str or len(text) > MAX_STRING:
        return None
    return text if all(_MODULE_STACK_ITEM.match(item) for item in text.split(";")) else None


def _node(v: Any, where: str) -> dict[str, Any]:
    node = _fields(v, where, {
        "target": target,
        "inputs": _list_of(lambda x, w: _fields(x, w, {"name": name, "arg": argument},
                                                {"kind": _optional(_enum({0, 1, 2}))})),
        "outputs": _list_of(argument),
    }, {"is_hop_single_tensor_return": _optional(_bool), "name": _optional(name)})
    metadata = _dict(v, where).get("metadata")
    stack = _module_stack(metadata.get("nn_module_stack")) if type(metadata) is dict else None
    node["metadata"] = {"nn_module_stack": stack} if stack else {}
    return node


def _values(check: Validator) -> Validator:
    def run(v: Any, where: str) -> dict[str, Any]:
        return {name(k, f"{where} key"): check(x, f"{where}[{k!r}]") for k, x in _dict(v, where).items()}
    return run


def _no_custom_objects(v: Any, where: str) -> dict[str, Any]:
    if _dict(v, where):
        raise Refusal(f"{where}: the graph holds custom (TorchScript/opaque) objects, which only pickle can rebuild")
    return {}


def graph(v: Any, where: str) -> dict[str, Any]:
    """The top-level graph: inputs, nodes, outputs and the metadata of every value."""
    graph_input = lambda x, w: _union(x, w, {  # noqa: E731
        "as_tensor": _tensor_arg, "as_sym_int": lambda y, ww: _union(y, ww, {"as_name": name}),
        "as_int": _int, "as_float": _float, "as_bool": _bool, "as_none": _bool, "as_string": _string,
    }, _REFUSED_ARGS)
    return _fields(v, where, {
        "inputs": _list_of(graph_input), "outputs": _list_of(argument), "nodes": _list_of(_node),
        "tensor_values": _values(tensor_meta), "sym_int_values": _values(sym_int),
        "sym_bool_values": _values(_sym_bool),
    }, {"is_single_tensor_return": _bool, "custom_obj_values": _no_custom_objects,
        "sym_float_values": _values(_sym_float)})


def _constant_value(v: Any, where: str) -> dict[str, Any]:
    return _union(v, where, {"as_none": _bool, "as_int": _int, "as_float": _float,
                             "as_string": _string, "as_bool": _bool})


def _input_spec(v: Any, where: str) -> dict[str, Any]:
    return _union(v, where, {
        "user_input": lambda x, w: _fields(x, w, {"arg": argument}),
        "parameter": lambda x, w: _fields(x, w, {"arg": _tensor_arg, "parameter_name": fqn}),
        "buffer": lambda x, w: _fields(x, w, {"arg": _tensor_arg, "buffer_name": fqn, "persistent": _bool}),
        "tensor_constant": lambda x, w: _fields(x, w, {"arg": _tensor_arg, "tensor_constant_name": fqn}),
        "constant_input": lambda x, w: _fields(x, w, {"name": name, "value": _constant_value}),
    }, {"custom_obj": "a custom (TorchScript/opaque) object input, which only pickle can rebuild",
        "token": "an effect token (side-effecting custom ops are not supported)"})


def _output_spec(v: Any, where: str) -> dict[str, Any]:
    mutation = lambda key: lambda x, w: _fields(x, w, {"arg": _tensor_arg, key: fqn})  # noqa: E731
    return _union(v, where, {
        "user_output": lambda x, w: _fields(x, w, {"arg": argument}),
        "buffer_mutation": mutation("buffer_name"),
        "parameter_mutation": mutation("parameter_name"),
        "user_input_mutation": lambda x, w: _fields(x, w, {"arg": _tensor_arg, "user_input_name": name}),
    }, {"token": "an effect token (side-effecting custom ops are not supported)"})


_TREE_TYPES = {None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict"}


def treespec(v: Any, where: str) -> str:
    """A pytree spec (JSON text): tuples/lists/dicts of leaves, dict keys identifiers."""
    if type(v) is not str or len(v) > MAX_TREESPEC:
        raise Malformed(f"{where}: expected a pytree spec of at most {MAX_TREESPEC} characters")
    try:
        protocol, root = json.loads(v)
    except (ValueError, TypeError):
        raise Malformed(f"{where}: not a pytree spec") from None
    if protocol != 1:
        raise Malformed(f"{where}: unknown pytree protocol {show(protocol)}")

    def walk(spec: Any, w: str, depth: int) -> None:
        spec = _fields(spec, w, {"type": _optional(_string), "context": _optional(_string),
                                 "children_spec": _list})
        if depth > 16 or spec["type"] not in _TREE_TYPES:
            raise Refusal(f"{w}: pytree node type {show(spec['type'])} is not a tuple, list or dict")
        if spec["type"] in ("builtins.dict", "collections.OrderedDict"):
            try:
                keys = json.loads(spec["context"] or "null")
            except ValueError:
                raise Malformed(f"{w}: bad dict keys") from None
            for k in _list(keys, w):
                name(k, f"{w} dict key")
        elif spec["context"] not in (None, "null"):
            raise Malformed(f"{w}: unexpected context for {spec['type']}")
        for i, child in enumerate(spec["children_spec"]):
            walk(child, f"{w}[{i}]", depth + 1)

    walk(root, where, 0)
    return v


def _module_call_entry(v: Any, where: str) -> dict[str, Any]:
    signature = lambda x, w: _fields(x, w, {  # noqa: E731
        "inputs": _list_of(argument), "outputs": _list_of(argument),
        "in_spec": treespec, "out_spec": treespec,
    }, {"forward_arg_names": _optional(_list_of(name))})
    entry = _fields(v, where, {"fqn": _string}, {"signature": _optional(signature)})
    if entry["fqn"]:
        fqn(entry["fqn"], f"{where}.fqn")
    return entry


def _range(v: Any, where: str) -> dict[str, Any]:
    return _fields(v, where, {"min_val": _optional(_int), "max_val": _optional(_int)})


def program(doc: Any, schema_major: int) -> dict[str, Any]:
    """Validate and rebuild ``models/model.json`` (schema ``ExportedProgram``).

    Raises:
        Refusal: Something torch.export.load would execute or unpickle.
        Malformed: Not a program of this schema.
    """
    where = "model.json"
    d = _dict(doc, where)
    guards = d.get("guards_code") or []
    if guards:
        raise Refusal(f"{where}: guards_code holds {len(_list(guards, where))} line(s) of Python source, "
                      "which ExportedProgram.module() runs through exec")
    version = _fields(d.get("schema_version"), f"{where}.schema_version", {"major": _int, "minor": _int})
    if version["major"] != schema_major:
        raise Malformed(f"{where}: schema version {version['major']}.{version['minor']}, "
                        f"but this torch reads {schema_major}.x")
    out = _fields(d, where, {
        "graph_module": lambda x, w: _fields(x, w, {
            "graph": graph,
            "signature": lambda y, ww: _fields(y, ww, {"input_specs": _list_of(_input_spec),
                                                       "output_specs": _list_of(_output_spec)}),
            "module_call_graph": _list_of(_module_call_entry),
        }, {"treespec_namedtuple_fields": _no_namedtuples}),
        "opset_version": lambda x, w: {_string(k, w): _int(n, w) for k, n in _dict(x, w).items()},
        "range_constraints": lambda x, w: {_symbol(k, w): _range(r, f"{w}[{k!r}]") for k, r in _dict(x, w).items()},
    }, {"torch_version": _string, "verifiers": _list_of(_verifier)})
    out["schema_version"] = version
    out["guards_code"] = []
    out["graph_module"]["metadata"] = {}
    return out


def _no_namedtuples(v: Any, where: str) -> dict[str, Any]:
    if _dict(v, where):
        raise Refusal(f"{where}: the program uses namedtuple types, which torch resolves by name")
    return {}


def _symbol(v: Any, where: str) -> str:
    if type(v) is not str or not SYMBOL_NAME.match(v):
        raise Refusal(f"{where}: symbol name {show(v)} is not like s0/u0")
    return v


def _verifier(v: Any, where: str) -> str:
    if v not in _VERIFIERS:
        raise Malformed(f"{where}: unknown verifier {show(v)}")
    return str(v)


def payload_config(doc: Any, kind: str) -> dict[str, dict[str, Any]]:
    """Validate ``data/<kind>/model_<kind>_config.json``: name -> raw tensor description.

    Raises:
        Refusal: A pickled payload or a custom/opaque object.
    """
    where = f"model_{kind}_config.json"
    config = _dict(_dict(doc, where).get("config"), f"{where}.config")
    out = {}
    for key, meta in config.items():
        w = f"{where}[{show(key)}]"
        fqn(key, w)
        m = _dict(meta, w)
        if m.get("use_pickle") is not False:
            raise Refusal(f"{w}: payload is pickled (use_pickle), which torch.export.load unpickles "
                          "with torch.load(weights_only=False)")
        path_name = m.get("path_name")
        if type(path_name) is not str or not PAYLOAD_NAME[kind].match(path_name):
            raise Refusal(f"{w}: payload file {show(path_name)} is not a raw tensor "
                          "(custom and opaque objects are pickled)")
        out[key] = {"path_name": path_name, "is_param": _bool(m.get("is_param"), f"{w}.is_param"),
                    "tensor_meta": tensor_meta(m.get("tensor_meta"), f"{w}.tensor_meta", static=True)}
    return out
