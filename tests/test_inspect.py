"""bncli inspect: each defect in each container form, a healthy checkpoint, safety, layout.

Checkpoints are built here from a real nn.Sequential whose BatchNorm layers ran enough
train steps to converge; one defect is planted in layer "1" while layer "4" stays healthy.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from bncli import audit, engine, io, layers
from bncli.audit import DEFAULT_EPS, audit_layer
from bncli.cli import app
from bncli.errors import StateError

SAMPLES = Path(__file__).resolve().parent.parent / "sample_data"
C = 6


class Evil:
    """Unpickling this runs `touch <marker>`: proof that a loader executed code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def run(runner: CliRunner, *args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


def healthy_state() -> dict[str, torch.Tensor]:
    """conv, BN(6), ReLU, conv, BN(6) after 60 train steps: converged (0.9^60 = 0.2%). A fresh copy."""
    return {k: v.clone() for k, v in _trained().items()}


@functools.cache
def _trained() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, C, 3), nn.BatchNorm2d(C), nn.ReLU(), nn.Conv2d(C, C, 3), nn.BatchNorm2d(C))
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.1)
        net.train()
        for _ in range(60):
            net(torch.randn(4, 3, 8, 8) * 2 + 1)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _set(key: str, index: int | slice, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def plant(sd: dict[str, torch.Tensor]) -> None:
        sd[f"1.{key}"][index] = value
    return plant


def _fresh(sd: dict[str, torch.Tensor]) -> None:
    sd["1.running_mean"].zero_()
    sd["1.running_var"].fill_(1.0)
    sd["1.num_batches_tracked"].zero_()


def _counter_only(sd: dict[str, torch.Tensor]) -> None:
    sd["1.num_batches_tracked"].zero_()


def _few_steps(sd: dict[str, torch.Tensor]) -> None:
    sd["1.num_batches_tracked"].fill_(10)


def _short_var(sd: dict[str, torch.Tensor]) -> None:
    sd["1.running_var"] = sd["1.running_var"][:4].clone()


def _dead(sd: dict[str, torch.Tensor]) -> None:
    sd["1.weight"][0] = 0.0
    sd["1.weight"][5] = 1e-9


# defect name -> (plant it, code, severity, channels)
DEFECTS: dict[str, tuple[Callable[[dict[str, torch.Tensor]], None], str, str, list[int]]] = {
    "nan_var": (_set("running_var", 2, float("nan")), "non_finite_stats", "error", [2]),
    "inf_weight": (_set("weight", 4, float("inf")), "non_finite_stats", "error", [4]),
    "negative_var": (_set("running_var", 1, -0.5), "negative_var", "error", [1]),
    "tiny_var": (_set("running_var", 3, 1e-12), "var_below_eps", "error", [3]),
    "zero_var": (_set("running_var", slice(0, 2), 0.0), "var_below_eps", "error", [0, 1]),
    "fresh": (_fresh, "never_updated", "error", list(range(C))),
    "counter_zero": (_counter_only, "never_updated", "warning", list(range(C))),
    "dead": (_dead, "dead_channel", "warning", [0, 5]),
    "unconverged": (_few_steps, "unconverged", "warning", list(range(C))),
    "shape": (_short_var, "shape_mismatch", "error", [4, 5]),
}


def save_form(sd: dict[str, torch.Tensor], form: str, tmp_path: Path) -> Path:
    """Write ``sd`` in one of the container forms users meet."""
    if form == "plain.pt":
        obj: object = sd
    elif form == "model.pt":
        obj = {"model": sd, "epoch": 3}
    elif form == "state_dict.pth":
        obj = {"state_dict": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}}
    elif form == "lightning.ckpt":
        obj = {"epoch": 2, "global_step": 600, "pytorch-lightning_version": "2.4.0",
               "hyper_parameters": {"lr": 0.1}, "state_dict": {f"model.{k}": v for k, v in sd.items()},
               "optimizer_states": [{"state": {0: {"momentum_buffer": torch.zeros(3)}},
                                     "param_groups": [{"lr": 0.1, "params": [0]}]}]}
    elif form == "module.pt":
        obj = {f"module.{k}": v for k, v in sd.items()}
    elif form == "compiled.pt":
        obj = {"model_state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}}
    elif form == "flat.safetensors":
        path = tmp_path / "ckpt.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        return path
    else:
        raise AssertionError(form)
    path = tmp_path / f"ckpt-{form}"
    torch.save(obj, path)
    return path


FORMS = ["plain.pt", "model.pt", "state_dict.pth", "lightning.ckpt", "module.pt", "compiled.pt",
         "flat.safetensors"]


def inspect_json(runner: CliRunner, *args: object) -> tuple[int, list[dict[str, object]]]:
    result = run(runner, "inspect", *args, "--json")
    return result.exit_code, json.loads(result.stdout)  # type: ignore[attr-defined]


# -- every defect, every container ----------------------------------------------------------
@pytest.mark.parametrize("form", FORMS)
def test_healthy_checkpoint_has_no_finding(runner: CliRunner, tmp_path: Path, form: str) -> None:
    path = save_form(healthy_state(), form, tmp_path)
    for fail_on in ("error", "warning"):
        code, doc = inspect_json(runner, path, "--fail-on", fail_on)
        assert code == 0
        (report,) = doc
        assert report["passed"] is True and report["error"] is None
        assert [layer["name"] for layer in report["layers"]] == ["1", "4"]  # type: ignore[index]
        assert all(layer["findings"] == [] for layer in report["layers"])  # type: ignore[index]
    text = run(runner, "inspect", path)
    assert text.exit_code == 0 and text.stdout.startswith("OK ")  # type: ignore[attr-defined]
    assert "2 layers: 0 with errors, 0 with warnings only, 2 clean." in text.stdout  # type: ignore[attr-defined]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("defect", list(DEFECTS))
def test_each_defect_in_each_container(runner: CliRunner, tmp_path: Path, defect: str, form: str) -> None:
    plant, code, severity, channels = DEFECTS[defect]
    sd = healthy_state()
    plant(sd)
    path = save_form(sd, form, tmp_path)
    exit_code, (report,) = inspect_json(runner, path)
    by_name = {layer["name"]: layer for layer in report["layers"]}  # type: ignore[index]
    assert set(by_name) == {"1", "4"}
    assert by_name["4"]["findings"] == []
    findings = by_name["1"]["findings"]
    assert [f["code"] for f in findings] == [code], findings
    (f,) = findings
    assert f["severity"] == severity and f["channels"] == channels and f["count"] == len(channels)
    assert f["message"] and f["hint"]
    assert exit_code == (1 if severity == "error" else 0)
    assert inspect_json(runner, path, "--fail-on", "warning")[0] == 1
    if form not in ("plain.pt", "lightning.ckpt"):
        return  # the text is the same whatever the container
    text = run(runner, "inspect", path)
    assert f"{severity}[{code}] 1: " in text.stdout  # type: ignore[attr-defined]
    word = "channels" if len(channels) > 1 else "channel"
    text_out = " ".join(text.stdout.split())  # type: ignore[attr-defined]
    if len(channels) == C:  # a layer-wide finding
        assert f"all {C} channels" in text_out or "every channel" in text_out
    else:
        assert f"{word} {', '.join(map(str, channels))} ({len(channels)} of {C})" in text_out


def test_non_finite_numbers_are_null_in_json(runner: CliRunner, tmp_path: Path) -> None:
    sd = healthy_state()
    sd["1.running_var"].fill_(float("nan"))
    sd["1.weight"][0] = float("inf")
    code, (report,) = inspect_json(runner, save_form(sd, "plain.pt", tmp_path))
    layer = report["layers"][0]  # type: ignore[index]
    assert code == 1
    assert layer["running_var"] == {"length": C, "min": None, "max": None, "non_finite": C}
    assert layer["weight"]["non_finite"] == 1 and layer["weight"]["max"] is not None
    assert layer["findings"][0]["channels"] == list(range(C))


def test_eps_and_momentum_flags_move_the_thresholds(runner: CliRunner, tmp_path: Path) -> None:
    sd = healthy_state()
    sd["4.running_var"][2] = 5e-4
    sd["1.num_batches_tracked"].fill_(100)
    path = save_form(sd, "plain.pt", tmp_path)
    code, (report,) = inspect_json(runner, path)
    assert code == 0 and report["layers"][0]["assumed"] == ["eps", "momentum"]  # type: ignore[index]
    code, (report,) = inspect_json(runner, path, "--eps", "1e-3", "--momentum", "0.01")
    first, second = report["layers"]  # type: ignore[misc]
    assert code == 1 and first["eps"] == 1e-3 and first["momentum"] == 0.01 and first["assumed"] == []
    assert [f["code"] for f in first["findings"]] == ["unconverged"]  # 0.99^100 = 37%
    # Layer 4: 0.99^60 = 55% of the initial var 1 would still be in it; 5e-4 proves otherwise.
    assert [(f["code"], f["channels"]) for f in second["findings"]] == [("var_below_eps", [2])]
    code, (report,) = inspect_json(runner, path, "--momentum", "none")
    assert report["layers"][1]["momentum"] is None and report["layers"][1]["assumed"] == ["eps"]  # type: ignore[index]
    assert "eps 1e-05, momentum none (cumulative average) (eps assumed: PyTorch's default," in run(
        runner, "inspect", path, "--momentum", "none").stdout  # type: ignore[attr-defined]
    assert run(runner, "inspect", path, "--eps", "0").exit_code == 2  # type: ignore[attr-defined]


def test_exact_average_state_from_stats_is_not_unconverged(runner: CliRunner, tmp_path: Path) -> None:
    state = tmp_path / "data_bn.pt"
    result = run(runner, "stats", SAMPLES / "batch.npy", "--save-state", state)
    assert result.exit_code == 0  # type: ignore[attr-defined]
    code, (report,) = inspect_json(runner, state, "--fail-on", "warning")
    assert code == 0 and report["layers"][0]["num_batches_tracked"] == 1  # type: ignore[index]


# -- the audit as a library (NumPy in, no torch needed) --------------------------------------
def test_audit_layer_boundaries() -> None:
    base = {"weight": np.ones(4), "bias": np.zeros(4), "running_mean": np.full(4, 0.3),
            "running_var": np.full(4, 0.5), "num_batches_tracked": 44}
    assert audit_layer(base).findings == []
    assert [f.code for f in audit_layer({**base, "num_batches_tracked": 43}).findings] == ["unconverged"]
    var = np.array([DEFAULT_EPS, DEFAULT_EPS * 1.001, 0.5, 0.5])
    (f,) = audit_layer({**base, "running_var": var}).findings
    assert f.code == "var_below_eps" and f.channels == (0,)
    w = np.array([1.0, 0.51e-6, 0.49e-6, 1.0])  # median |w| 0.5 + 0.25e-6: the bar is 5.0e-7
    (f,) = audit_layer({**base, "weight": w}).findings
    assert f.code == "dead_channel" and f.channels == (2,)
    assert audit_layer({**base, "num_batches_tracked": 1}, momentum=None).findings == []
    # 0.9^6 = 53% > var 0.5: not a history of 6 steps at momentum 0.1, so no convergence claim.
    assert audit_layer({**base, "num_batches_tracked": 6}).findings == []
    assert [f.code for f in audit_layer({**base, "num_batches_tracked": 7}).findings] == ["unconverged"]
    # A dead channel's tiny var does not blow up anything: its output is the bias.
    dead = audit_layer({**base, "weight": np.array([0.0, 1, 1, 1]), "running_var": np.array([0.0, 1, 1, 1])})
    assert [f.code for f in dead.findings] == ["dead_channel"]


def test_audit_layer_accepts_torch_and_numpy_alike() -> None:
    sd = healthy_state()
    sd["1.running_var"][3] = 1e-12
    tensors = layers.layer_tensors(sd, "1")
    as_numpy = {k: v.numpy() for k, v in tensors.items()}
    a, b = audit_layer(tensors, prefix="1"), audit_layer(as_numpy, prefix="1")
    assert a.findings == b.findings and a.buffers == b.buffers and a.num_batches_tracked == 60
    bf16 = audit_layer({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()})
    assert [f.code for f in bf16.findings] == ["var_below_eps"]


def test_audit_module_does_not_import_torch() -> None:
    code = ("import sys, numpy as np; from bncli.audit import audit_state_dict; "
            "r = audit_state_dict({'bn.running_mean': np.zeros(2), 'bn.running_var': np.ones(2)}); "
            "assert [f.code for f in r[0].findings] == ['never_updated'], r; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_layer_keys_match_the_engine() -> None:
    assert layers.LAYER_KEYS == engine.STATE_KEYS


# -- names: one implementation for inspect --prefix and --state/--prefix --------------------
@pytest.mark.parametrize(("key", "name"), [
    ("state_dict.model.features.1", "features.1"), ("module.features.1", "features.1"),
    ("features._orig_mod.1", "features.1"), ("model_state_dict.module._orig_mod.bn", "bn"),
    ("model", ""), ("layer1.0.bn1", "layer1.0.bn1"), ("model_ema.bn", "model_ema.bn"),
])
def test_layer_name(key: str, name: str) -> None:
    assert io.layer_name(key) == name


def test_find_layer_matches_through_containers_and_refuses_ambiguity() -> None:
    sd = {f"state_dict.model.{k}": v for k, v in healthy_state().items()}
    assert layers.find_layer(sd, "1", "f") == "state_dict.model.1"
    assert layers.find_layer(sd, "module.4", "f") == "state_dict.model.4"
    both = {**sd, **{f"module.{k}": v for k, v in healthy_state().items()}}
    with pytest.raises(StateError, match="2 BatchNorm layers match prefix '1'"):
        layers.find_layer(both, "1", "f")
    assert layers.find_layer(both, "module.1", "f") == "module.1"  # exact wins


@pytest.mark.parametrize("form", ["lightning.ckpt", "compiled.pt"])
def test_state_prefix_understands_the_same_nesting(runner: CliRunner, tmp_path: Path, form: str,
                                                    batch: Path) -> None:
    sd = healthy_state()
    sd["4.running_var"][1] = 1e-12
    path = save_form(sd, form, tmp_path)
    x = np.random.default_rng(0).normal(size=(4, C, 5, 5)).astype(np.float32)
    data = tmp_path / "feat.npy"
    np.save(data, x)
    result = run(runner, "compare", data, "--state", path, "--prefix", "4", "--json")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    doc = json.loads(result.stdout)  # type: ignore[attr-defined]
    assert doc["state_findings"][0]["code"] == "var_below_eps"
    out = tmp_path / "y.npy"
    result = run(runner, "normalize", data, "--mode", "eval", "--state", path, "--prefix", "4", "-o", out)
    assert result.exit_code == 0 and out.exists()  # type: ignore[attr-defined]
    assert "error[var_below_eps]" in result.stderr  # type: ignore[attr-defined]
    code, (report,) = inspect_json(runner, path, "--prefix", "4")
    assert code == 1 and [layer["name"] for layer in report["layers"]] == ["4"]  # type: ignore[index]


def test_lightning_prefix_without_its_containers(runner: CliRunner, tmp_path: Path) -> None:
    data = tmp_path / "feat.npy"
    np.save(data, np.random.default_rng(2).normal(size=(2, 8, 4, 4)).astype(np.float32))
    result = run(runner, "normalize", data, "--mode", "eval", "--state", SAMPLES / "broken.ckpt",
                 "--prefix", "features.1", "-o", tmp_path / "y.npy", "--json")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    doc = json.loads(result.stdout)  # type: ignore[attr-defined]
    assert doc["state_source"] == f"layer 'state_dict.model.features.1' of {SAMPLES / 'broken.ckpt'}"
    assert doc["state_findings"] == []


def test_inspect_wrong_prefix_lists_layers(runner: CliRunner) -> None:
    result = run(runner, "inspect", SAMPLES / "broken.ckpt", "--prefix", "features.9")
    assert result.exit_code == 1  # type: ignore[attr-defined]
    assert "no BatchNorm layer with prefix 'features.9'" in result.stderr  # type: ignore[attr-defined]
    assert "state_dict.model.features.7 [C=8]" in result.stderr  # type: ignore[attr-defined]


# -- compare and normalize reuse the findings, decisive first --------------------------------
def test_compare_names_the_var_below_eps_channel_first(runner: CliRunner, tmp_path: Path) -> None:
    ckpt = tmp_path / "broken.ckpt"
    shutil.copy(SAMPLES / "broken.ckpt", ckpt)
    result = run(runner, "compare", SAMPLES / "batch.npy", "--state", ckpt, "--prefix", "input_bn", "--json")
    assert result.exit_code == 0  # type: ignore[attr-defined]
    doc = json.loads(result.stdout)  # type: ignore[attr-defined]
    first = doc["explanation"][0]
    assert first.startswith("error[var_below_eps]") and "channel 2 (1 of 3)" in first
    assert "Channel 2 has the largest |train - eval|" in first
    assert max(range(3), key=lambda c: doc["channels"][c]["max_abs_diff"]) == 2
    assert [f["code"] for f in doc["state_findings"]] == ["var_below_eps"]
    text = run(runner, "compare", SAMPLES / "batch.npy", "--state", ckpt, "--prefix", "input_bn")
    why = text.stdout.split("Why they differ")[1]  # type: ignore[attr-defined]
    assert why.index("var_below_eps") < why.index("Train mode") < why.index("n/(n-1)")


def _compare_doc(runner: CliRunner, tmp_path: Path, sd: dict[str, torch.Tensor]) -> dict[str, object]:
    path = save_form(sd, "model.pt", tmp_path)
    data = tmp_path / "feat.npy"
    np.save(data, np.random.default_rng(1).normal(size=(2, C, 4, 4)).astype(np.float32))
    result = run(runner, "compare", data, "--state", path, "--prefix", "1", "--json")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    return json.loads(result.stdout)  # type: ignore[attr-defined, no-any-return]


def test_compare_orders_errors_before_convergence(runner: CliRunner, tmp_path: Path) -> None:
    sd = healthy_state()
    sd["1.running_mean"][0] = float("nan")
    sd["1.num_batches_tracked"].fill_(5)
    doc = _compare_doc(runner, tmp_path, sd)
    codes = [line.split("]")[0] for line in doc["explanation"][:2]]  # type: ignore[index]
    assert codes == ["error[non_finite_stats", "warning[unconverged"]


def test_tiny_var_after_few_steps_is_not_explained_as_convergence(runner: CliRunner, tmp_path: Path) -> None:
    """The issue's case: the running_var of 1e-12 decides, not the step count."""
    sd = healthy_state()
    sd["1.running_var"][4] = 1e-12
    sd["1.num_batches_tracked"].fill_(5)
    doc = _compare_doc(runner, tmp_path, sd)
    lines = doc["explanation"]
    assert lines[0].startswith("error[var_below_eps]") and "channel 4 (1 of 6)" in lines[0]  # type: ignore[index]
    assert not any("converged" in line for line in lines)  # type: ignore[union-attr]


def test_state_the_engine_refuses_is_explained_by_the_audit(runner: CliRunner, tmp_path: Path,
                                                             batch: Path) -> None:
    sd = {k.removeprefix("1."): v for k, v in healthy_state().items() if k.startswith("1.")}
    sd = {k: v[:3] if v.ndim else v for k, v in sd.items()}
    sd["running_var"][1] = -0.5
    path = tmp_path / "bn.pt"
    torch.save(sd, path)
    result = run(runner, "normalize", batch, "--mode", "eval", "--state", path)
    assert result.exit_code == 1  # type: ignore[attr-defined]
    # Error lines wrap at the terminal width: compare with the white space folded.
    assert "running_var is negative in channel 1 (1 of 3)" in " ".join(result.stderr.split())  # type: ignore[attr-defined]


# -- what inspect refuses -------------------------------------------------------------------
def test_payload_is_live_under_a_plain_unpickle(tmp_path: Path) -> None:
    """Control: the payload used below really runs code when unpickled unsafely."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": healthy_state(), "hyper_parameters": Evil(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_pickle_payload_checkpoint_is_refused_and_runs_no_code(runner: CliRunner, tmp_path: Path,
                                                               suffix: str, batch: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    torch.save({"state_dict": healthy_state(), "hyper_parameters": Evil(marker)}, path)
    result = run(runner, "inspect", path)
    assert result.exit_code == 1 and "refused to load" in result.stderr  # type: ignore[attr-defined]
    assert "pickle" in result.stderr  # type: ignore[attr-defined]
    code, (report,) = inspect_json(runner, path)
    assert code == 1 and "refused" in report["error"]["message"]  # type: ignore[index]
    result = run(runner, "compare", batch, "--state", path)
    assert result.exit_code == 1 and "refused to load" in result.stderr  # type: ignore[attr-defined]
    assert not marker.exists(), "loading ran the payload"


def test_data_tensors_point_to_check_shape(runner: CliRunner, tmp_path: Path) -> None:
    torch.save(torch.zeros(2, 3, 4, 4), tmp_path / "x.pt")
    np.savez(tmp_path / "d.npz", a=np.zeros(3), b=np.zeros(2))
    for path in (SAMPLES / "batch.npy", tmp_path / "x.pt", tmp_path / "d.npz"):
        result = run(runner, "inspect", path)
        assert result.exit_code == 1, path  # type: ignore[attr-defined]
        assert "not a model checkpoint" in " ".join(result.stderr.split())  # type: ignore[attr-defined]
        assert f"bncli check-shape {path}" in result.stderr  # type: ignore[attr-defined]
        assert "Traceback" not in result.output  # type: ignore[attr-defined]
    torch.save(nn.Conv2d(3, 4, 3).state_dict(), tmp_path / "conv.pt")
    result = run(runner, "inspect", tmp_path / "conv.pt")
    assert result.exit_code == 1 and "no BatchNorm layer" in result.stderr  # type: ignore[attr-defined]


def test_several_files_report_each_and_fail_if_one_does(runner: CliRunner, tmp_path: Path) -> None:
    good = save_form(healthy_state(), "plain.pt", tmp_path)
    result = run(runner, "inspect", good, SAMPLES / "broken.ckpt", tmp_path / "missing.pt")
    assert result.exit_code == 1  # type: ignore[attr-defined]
    assert "1 of 3 files pass (--fail-on error)." in result.stdout  # type: ignore[attr-defined]
    assert "missing.pt: no such file" in result.stderr  # type: ignore[attr-defined]
    code, doc = inspect_json(runner, good, good)  # a file named twice is audited once, as everywhere
    assert code == 0 and [r["passed"] for r in doc] == [True]


def test_ckpt_is_read_wherever_pt_is_but_never_written(tmp_path: Path) -> None:
    torch.save({"x": torch.ones(1, 2, 3, 3)}, tmp_path / "a.ckpt")
    assert io.peek(tmp_path / "a.ckpt").shape == (1, 2, 3, 3)
    assert io.load_tensor(tmp_path / "a.ckpt")[1] == "x"
    with pytest.raises(Exception, match="cannot write '.ckpt'"):
        io.check_output(tmp_path / "out.ckpt", force=False)


# -- the sample checkpoint the README shows -------------------------------------------------
def test_sample_broken_checkpoint(runner: CliRunner) -> None:
    code, (report,) = inspect_json(runner, SAMPLES / "broken.ckpt")
    assert code == 1 and report["container"] == "state_dict.model"
    found = {layer["name"]: [(f["code"], f["channels"][:3]) for f in layer["findings"]]
             for layer in report["layers"]}  # type: ignore[index]
    assert found == {"input_bn": [("var_below_eps", [2])], "features.1": [],
                     "features.4": [("dead_channel", [5, 6])],
                     "features.7": [("never_updated", [0, 1, 2])]}
    assert inspect_json(runner, SAMPLES / "model.pt")[0] == 0  # unconverged warnings only
    assert inspect_json(runner, SAMPLES / "model.pt", "--fail-on", "warning")[0] == 1


@pytest.mark.parametrize("name", ["broken.ckpt", "model.pt"])
def test_output_fits_80_columns(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    narrow = CliRunner(env={"COLUMNS": "80", "NO_COLOR": "1", "TERM": "dumb"})
    for args in (["inspect", str(SAMPLES / name)], ["inspect", "--help"]):
        result = narrow.invoke(app, args)
        lines = (result.stdout + result.stderr).splitlines()
        assert lines and max(len(line) for line in lines) <= 80, args
    stacked = narrow.invoke(app, ["inspect", str(SAMPLES / name)]).stdout
    assert "min above max" in stacked


def test_audit_json_round_trip_of_library_objects() -> None:
    (layer,) = audit.audit_state_dict({"bn.running_mean": np.zeros(2), "bn.running_var": np.ones(2),
                                       "bn.num_batches_tracked": np.array(0)})
    doc = layer.to_dict()
    assert doc["name"] == "bn" and doc["weight"] is None and doc["num_batches_tracked"] == 0
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc
