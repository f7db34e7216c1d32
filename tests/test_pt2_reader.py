"""The safe .pt2 reader: every payload live under torch.export.load runs nothing under bncli."""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pt2_helpers as h
import pytest
import torch
from typer.testing import CliRunner

from bncli.cli import app
from bncli.errors import InputError, UnsafeFileError
from bncli.io import pt2, pt2_expr


@pytest.fixture
def model(small_pt2: Path, tmp_path: Path) -> Path:
    return Path(shutil.copy(small_pt2, tmp_path / "model.pt2"))


@pytest.fixture
def x_npy(tmp_path: Path) -> Path:
    import numpy as np

    path = tmp_path / "x.npy"
    np.save(path, h.data(8).numpy())
    return path


# -- the payloads are live under torch.export.load ...................................
@pytest.mark.parametrize("vector", sorted(h.PAYLOADS))
def test_payload_is_live_under_torch_export_load(vector: str, model: Path, tmp_path: Path) -> None:
    edit, step = h.PAYLOADS[vector]
    marker = tmp_path / "marker"
    evil = h.rewrite(model, tmp_path / "evil.pt2", edit, marker)
    h.victim(evil, step)
    assert marker.exists(), f"{vector}: the payload did not run under plain torch.export.load"


# -- ... and run nothing under bncli -------------------------------------------------
REFUSAL_WORDS = {
    "pickled_weight": "use_pickle", "sympy_expression": "symbolic expression", "guards_code": "guards_code",
    "placeholder_name": "not a plain identifier", "opaque_constant": "opaque", "call_target": "not an aten operator",
    "forward_arg_name": "not a plain identifier", "aoti_member": "shared library", "legacy_zip": "old torch.export",
}


@pytest.mark.parametrize("vector", sorted({*h.PAYLOADS, *h.REFUSED}))
@pytest.mark.parametrize("command", ["compare", "recalibrate", "fold", "inspect"])
def test_bncli_runs_no_payload(vector: str, command: str, model: Path, x_npy: Path, tmp_path: Path,
                               runner: CliRunner) -> None:
    edit = h.PAYLOADS[vector][0] if vector in h.PAYLOADS else h.REFUSED[vector]
    marker = tmp_path / "marker"
    evil = h.rewrite(model, tmp_path / "evil.pt2", edit, marker)
    out = tmp_path / "out.pt2"
    args = {"compare": ["compare", evil, "--data", x_npy], "recalibrate": ["recalibrate", evil, x_npy, "-o", out],
            "fold": ["fold", evil, "-o", out], "inspect": ["inspect", evil]}[command]
    result = runner.invoke(app, [str(a) for a in args])
    assert not marker.exists(), f"{vector}: bncli {command} ran the payload"
    if vector == "sample_inputs_pickle":
        # bncli never reads stored sample inputs: the model itself is clean and works.
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert REFUSAL_WORDS[vector] in " ".join(result.stderr.split()), result.stderr
    assert "Error:" in result.stderr and "Fix:" in result.stderr
    assert not out.exists()


def test_bncli_never_calls_torch_export_load_or_unpickles(model: Path, x_npy: Path, tmp_path: Path,
                                                         runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("bncli called an unsafe loader")

    monkeypatch.setattr(torch.export, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch._C, "_pickle_load_obj", forbidden)
    for args in (["compare", model, "--data", x_npy], ["recalibrate", model, x_npy, "-o", tmp_path / "r.pt2"],
                 ["fold", model, "-o", tmp_path / "f.pt2"], ["inspect", model]):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output


# -- reader details -----------------------------------------------------------------
def test_reader_builds_the_same_program_as_torch(model: Path) -> None:
    mine = pt2.load_program(model)
    theirs = torch.export.load(model)  # our own, trusted file
    assert mine.state_dict.keys() == theirs.state_dict.keys()
    for key, value in theirs.state_dict.items():
        torch.testing.assert_close(mine.state_dict[key], value, rtol=0, atol=0)
        assert isinstance(mine.state_dict[key], torch.nn.Parameter) == isinstance(value, torch.nn.Parameter)
    x = h.data(5)
    torch.testing.assert_close(mine.module()(x), theirs.module()(x), rtol=0, atol=0)
    assert mine.example_inputs is None and mine._guards_code == []


def _edit_json(src: Path, dst: Path, member: str, change: object) -> Path:
    def edit(members: dict[str, bytes], root: str, marker: Path) -> None:
        doc = json.loads(members[f"{root}/{member}"])
        change(doc)  # type: ignore[operator]
        members[f"{root}/{member}"] = json.dumps(doc).encode()

    return h.rewrite(src, dst, edit, dst)


def test_tensor_bounds_are_checked_against_the_member_size(model: Path, tmp_path: Path) -> None:
    def grow(doc: dict) -> None:
        meta = doc["config"]["conv1.weight"]["tensor_meta"]
        meta["sizes"][0] = {"as_int": 4000}

    bad = _edit_json(model, tmp_path / "bad.pt2", "data/weights/model_weights_config.json", grow)
    with pytest.raises(InputError, match=r"conv1.weight.*needs \d+ bytes, but member"):
        pt2.read_archive(bad)


def test_negative_stride_and_offset_are_refused(model: Path, tmp_path: Path) -> None:
    def negative(doc: dict) -> None:
        doc["config"]["conv1.weight"]["tensor_meta"]["storage_offset"] = {"as_int": -8}

    bad = _edit_json(model, tmp_path / "bad.pt2", "data/weights/model_weights_config.json", negative)
    with pytest.raises(InputError, match="non-negative"):
        pt2.read_archive(bad)


def test_compressed_members_and_non_zip_files_are_refused(model: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(model) as zin, zipfile.ZipFile(tmp_path / "deflated.pt2", "w", zipfile.ZIP_DEFLATED) as z:
        for name in zin.namelist():
            z.writestr(name, zin.read(name))
    with pytest.raises(InputError, match="compressed"):
        pt2.read_archive(tmp_path / "deflated.pt2")
    (tmp_path / "pickle.pt2").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UnsafeFileError, match="pickle"):
        pt2.read_archive(tmp_path / "pickle.pt2")
    (tmp_path / "text.pt2").write_text("hello")
    with pytest.raises(InputError, match="not a zip"):
        pt2.read_archive(tmp_path / "text.pt2")


def test_unknown_member_is_refused(model: Path, tmp_path: Path) -> None:
    def add(members: dict[str, bytes], root: str, marker: Path) -> None:
        members[f"{root}/data/weights/something_else"] = b"1234"

    with pytest.raises(InputError, match="unexpected member"):
        pt2.read_archive(h.rewrite(model, tmp_path / "x.pt2", add, tmp_path))


def test_metadata_is_dropped_but_a_plain_module_stack_is_kept(model: Path) -> None:
    program = pt2.read_archive(model).program
    nodes = program["graph_module"]["graph"]["nodes"]
    assert all(set(n["metadata"]) <= {"nn_module_stack"} for n in nodes)
    assert any(n["metadata"] for n in nodes)


# -- the expression grammar ---------------------------------------------------------
ACCEPTED = [
    "Symbol('s0', positive=True, integer=True)",
    "Add(FloorDiv(Add(Symbol('s0', positive=True, integer=True), Integer(-1)), Integer(2)), Integer(1))",
    "Mul(Integer(3), Symbol('s0', positive=True, integer=True), Symbol('s53', positive=True, integer=True))",
    "StrictLessThan(Symbol('u0', integer=True), Integer(5))", "true", "-oo",
    "Float('0.5', precision=53)", "Max(Integer(1), Symbol('s1', integer=True))",
]
REJECTED = [
    "__import__('os').system('true')", "Symbol('s0').__class__", "Integer(1)[0]", "lambda: 1",
    "Symbol('x; import os', integer=True)", "eval('1')", "Add(1, 2) + 3", "Symbol(s0)",
    "Integer(1); Integer(2)", "Float('1', evil=1)", "Add(" * 100 + "1" + ")" * 100, "a" * 5000,
]


@pytest.mark.parametrize("text", ACCEPTED)
def test_grammar_accepts_what_torch_export_writes(text: str) -> None:
    assert pt2_expr.check_expression(text, "e") == text


@pytest.mark.parametrize("text", REJECTED)
def test_grammar_rejects_code(text: str) -> None:
    with pytest.raises(pt2_expr.Refusal):
        pt2_expr.check_expression(text, "e")


def test_dynamic_expressions_of_a_real_export_load(tmp_path: Path) -> None:
    from torch import nn

    class Strided(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)).mean(dim=(2, 3))

    dims = {"x": {0: torch.export.Dim("b", min=2, max=64), 2: torch.export.Dim("h", min=4, max=64)}}
    ep = torch.export.export(Strided().eval(), (torch.randn(4, 3, 9, 9),), dynamic_shapes=dims)
    torch.export.save(ep, tmp_path / "dyn.pt2")
    text = (tmp_path / "dyn.pt2").read_bytes()
    assert b"FloorDiv" in text  # the export wrote symbolic expressions
    loaded = pt2.load_program(tmp_path / "dyn.pt2")
    x = torch.randn(3, 3, 13, 9)
    torch.testing.assert_close(loaded.module()(x), ep.module()(x))
