"""Small exported CNNs and malicious .pt2 payloads for the whole-model tests.

Every payload is a clean archive with one member rewritten so that a plain
``torch.export.load`` (and what users do next: ``ep.module()``, calling it) creates a
marker file. The tests prove each payload live, then prove bncli creates no marker.
"""

from __future__ import annotations

import io
import json
import pathlib
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

C = 4  # channels of the small models
HW = 6  # spatial size of their inputs


class SmallNet(nn.Module):
    """input BN (no conv before it), conv->BN (foldable), a conv whose output two nodes read."""

    def __init__(self) -> None:
        super().__init__()
        self.input_bn = nn.BatchNorm2d(3)
        self.conv1 = nn.Conv2d(3, C, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(C)
        self.conv2 = nn.Conv2d(C, C, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(C)
        self.conv3 = nn.Conv2d(C, C, 1)
        self.bn3 = nn.BatchNorm2d(C)
        self.head = nn.Linear(C, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(self.input_bn(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        y = self.conv3(x)
        x = torch.relu(self.bn3(y)) + y  # conv3's output has two users: bn3 stays
        return self.head(x.mean(dim=(2, 3)))


def small_net(seed: int = 0) -> SmallNet:
    """A SmallNet in eval mode with random weights and random (not fresh) running stats."""
    torch.manual_seed(seed)
    model = SmallNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model.eval()


def export(model: nn.Module, path: Path, *, batch: int | None = None, decompose: bool = False) -> Path:
    """Export ``model`` to ``path``: dynamic batch axis, or static ``batch``; optionally decomposed."""
    example = torch.randn(batch or 4, 3, HW, HW)
    shapes = None if batch else {"x": {0: torch.export.Dim("batch", min=1, max=256)}}
    ep = torch.export.export(model, (example,), dynamic_shapes=shapes)
    if decompose:
        with warnings.catch_warnings():  # torch's own deprecated pytree check
            warnings.simplefilter("ignore", FutureWarning)
            ep = ep.run_decompositions()
    torch.export.save(ep, path)
    return path


def data(n: int, seed: int = 1, shift: float = 0.3, scale: float = 1.5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, HW, HW, generator=gen) * scale + shift


# -- payloads -------------------------------------------------------------------------------
class Touch:
    """Unpickling this creates the marker file (the classic pickle payload)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _pickled(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


Edit = Callable[[dict[str, bytes], str, Path], None]


def rewrite(src: Path, dst: Path, edit: Edit, marker: Path) -> Path:
    """Copy archive ``src`` to ``dst`` with ``edit(members, root, marker)`` applied."""
    with zipfile.ZipFile(src) as zin:
        members = {n: zin.read(n) for n in zin.namelist()}
        root = zin.namelist()[0].split("/")[0]
    edit(members, root, marker)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for name, content in members.items():
            zout.writestr(name, content)
    return dst


def _program(members: dict[str, bytes], root: str) -> dict[str, Any]:
    return json.loads(members[f"{root}/models/model.json"])


def _set_program(members: dict[str, bytes], root: str, program: dict[str, Any]) -> None:
    members[f"{root}/models/model.json"] = json.dumps(program).encode()


def sample_inputs_pickle(members: dict[str, bytes], root: str, marker: Path) -> None:
    """Vector 1: sample inputs fail weights_only and are retried with weights_only=False."""
    members[f"{root}/data/sample_inputs/model.pt"] = _pickled(((Touch(marker),), {}))


def pickled_weight(members: dict[str, bytes], root: str, marker: Path) -> None:
    """Vector 2: a use_pickle weight is loaded with torch.load(weights_only=False)."""
    name = f"{root}/data/weights/model_weights_config.json"
    config = json.loads(members[name])
    key = next(iter(config["config"]))
    config["config"][key]["use_pickle"] = True
    members[f"{root}/data/weights/{config['config'][key]['path_name']}"] = _pickled(Touch(marker))
    members[name] = json.dumps(config).encode()


def sympy_expression(members: dict[str, bytes], root: str, marker: Path) -> None:
    """Vector 3: a size's expr_str reaches sympy.sympify, which evals it."""
    program = _program(members, root)
    sizes = program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"]
    sizes[0] = {"as_expr": {"expr_str": f"__import__('pathlib').Path({str(marker)!r}).touch() or 4",
                            "hint": {"as_int": 4}}}
    _set_program(members, root, program)


def guards_code(members: dict[str, bytes], root: str, marker: Path) -> None:
    """Vector 4: guards_code is pasted into a function exec'd by ep.module().

    The comment hides the injected lines from the parse torch does of the one-line
    error message; the real code gets the newlines and runs at exec time.
    """
    program = _program(members, root)
    program["guards_code"] = [f"0 #\n  , '')\n__import__('pathlib').Path({str(marker)!r}).touch()\n"
                              "def __(*a):\n  print(0"]
    _set_program(members, root, program)
    _with_sample_inputs(members, root)


def _with_sample_inputs(members: dict[str, bytes], root: str) -> None:
    # ep.module() builds guards only when the program has sample inputs.
    members[f"{root}/data/sample_inputs/model.pt"] = _pickled(((torch.randn(4, 3, HW, HW),), {}))


def placeholder_name(members: dict[str, bytes], root: str, marker: Path) -> None:
    """Vector 5: a graph input's name becomes torch.fx source (a default argument here)."""
    evil = f"x=__import__('pathlib').Path({str(marker)!r}).touch()"
    text = json.dumps(_program(members, root)).replace('"name": "x"', json.dumps({"name": evil})[1:-1])
    program = json.loads(text)
    values = program["graph_module"]["graph"]["tensor_values"]
    values[evil] = values.pop("x")
    _set_program(members, root, program)


def call_target(members: dict[str, bytes], root: str, marker: Path) -> None:
    """A node target resolved by name over torch.* (torch.save would write the marker).

    torch 2.13's own verifier rejects this callable after deserializing, so it is not live
    there; bncli refuses it before torch resolves anything.
    """
    program = _program(members, root)
    nodes = program["graph_module"]["graph"]["nodes"]
    nodes.insert(0, {"target": "torch.save", "inputs": [
        {"name": "obj", "arg": {"as_tensor": {"name": "x"}}, "kind": 1},
        {"name": "f", "arg": {"as_string": str(marker)}, "kind": 1}], "outputs": [{"as_none": True}],
        "metadata": {}})
    _set_program(members, root, program)


def opaque_constant(members: dict[str, bytes], root: str, marker: Path) -> None:
    """Vector 6: an opaque-object constant is pickle.loads'ed."""
    import pickle

    name = f"{root}/data/constants/model_constants_config.json"
    config = json.loads(members[name])
    config["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                "tensor_meta": None}
    members[name] = json.dumps(config).encode()
    members[f"{root}/data/constants/opaque_obj_0"] = pickle.dumps(Touch(marker))


def forward_arg_name(members: dict[str, bytes], root: str, marker: Path) -> None:
    """A forward argument name, pasted into ``def forward(self, ...)`` by ep.module()."""
    program = _program(members, root)
    signature = program["graph_module"]["module_call_graph"][0]["signature"]
    signature["forward_arg_names"] = [f"x=__import__('pathlib').Path({str(marker)!r}).touch()"]
    _set_program(members, root, program)


def aoti_member(members: dict[str, bytes], root: str, marker: Path) -> None:
    """An AOTInductor folder: torch.export.load would dlopen the shared library in it."""
    members[f"{root}/data/aotinductor/model/model.so"] = b"\x7fELF not really"


def legacy_zip(members: dict[str, bytes], root: str, marker: Path) -> None:
    """The pre-2.7 layout, whose state torch.export.load unpickles with a weights_only fallback."""
    members.clear()
    members["serialized_exported_program.json"] = b"{}"
    members["serialized_state_dict.pt"] = _pickled(Touch(marker))


# Live under torch.export.load: name -> (edit, what the victim does: "load", "module", "call").
PAYLOADS: dict[str, tuple[Edit, str]] = {
    "sample_inputs_pickle": (sample_inputs_pickle, "load"),
    "pickled_weight": (pickled_weight, "load"),
    "sympy_expression": (sympy_expression, "load"),
    "guards_code": (guards_code, "module"),
    "placeholder_name": (placeholder_name, "load"),
    "opaque_constant": (opaque_constant, "load"),
}
# Refused by bncli; not shown live here (torch rejects them later, or they need more setup).
REFUSED: dict[str, Edit] = {
    "call_target": call_target, "forward_arg_name": forward_arg_name,
    "aoti_member": aoti_member, "legacy_zip": legacy_zip,
}


def victim(path: Path, step: str) -> None:
    """What a user of torch.export would do with the file (errors after the payload ran are fine)."""
    try:
        ep = torch.export.load(path)
        if step in ("module", "call"):
            module = ep.module()
            if step == "call":
                module(torch.randn(4, 3, HW, HW))
    except Exception:  # noqa: S110 - the marker is what the test checks
        pass
