"""bncli inspect MODEL.pt2: the BN layers of an exported graph, audited as checkpoints are.

Models are tests/pt2_helpers.SmallNet (input_bn with no conv before it, conv1 -> bn1,
conv2 -> bn2, conv3 -> bn3 where conv3's output has a second user), exported with a
dynamic batch axis. Defects are planted in the module before export, so the graph's
buffers carry them exactly as a user's exported model would.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pt2_helpers as h
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bncli.cli import app

SAMPLES = Path(__file__).resolve().parent.parent / "sample_data"
NAMES = ["input_bn", "bn1", "bn2", "bn3"]
CONVS = {"input_bn": None, "bn1": "conv1", "bn2": "conv2", "bn3": "conv3"}


def run(runner: CliRunner, *args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


def inspect_json(runner: CliRunner, *args: object) -> tuple[int, list[dict]]:
    result = run(runner, "inspect", *args, "--json")
    return result.exit_code, json.loads(result.stdout)  # type: ignore[attr-defined]


def by_name(report: dict) -> dict[str, dict]:
    return {layer["name"]: layer for layer in report["layers"]}


def trained_net(steps: int = 60) -> h.SmallNet:
    """A SmallNet whose BN layers ran ``steps`` train steps (converged at 60: 0.9^60 = 0.2%)."""
    net = h.small_net()
    for bn in (net.input_bn, net.bn1, net.bn2, net.bn3):
        bn.reset_running_stats()
    net.train()
    with torch.no_grad():
        for i in range(steps):
            net(h.data(8, seed=i))
    return net.eval()


@pytest.fixture(scope="module")
def healthy_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return h.export(trained_net(), tmp_path_factory.mktemp("healthy") / "healthy.pt2")


def fits(text: str, width: int = 80) -> None:
    wide = [line for line in text.splitlines() if len(line) > width]
    assert not wide, f"lines wider than {width}: {wide}"


@pytest.fixture
def narrow(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("NO_COLOR", "1")
    return CliRunner(env={"COLUMNS": "80", "NO_COLOR": "1", "TERM": "dumb"})


# -- a healthy model, and what the graph adds -----------------------------------------------
def test_healthy_exported_model_has_no_finding(runner: CliRunner, healthy_pt2: Path) -> None:
    for fail_on in ("error", "warning"):
        code, (report,) = inspect_json(runner, healthy_pt2, "--fail-on", fail_on)
        assert code == 0
        assert report["kind"] == "exported_program" and report["passed"] and report["error"] is None
        assert [layer["name"] for layer in report["layers"]] == NAMES
        assert all(layer["findings"] == [] for layer in report["layers"])
    for layer in report["layers"]:
        graph = layer["graph"]
        assert graph["conv"] == CONVS[layer["name"]]
        assert layer["eps"] == 1e-5 and layer["momentum"] == 0.1 and layer["assumed"] == []
        assert layer["num_batches_tracked"] == 60
        assert graph["training"] is False and graph["batch_stats"] is False and graph["input_rank"] == 4
        assert graph["op"] == "batch_norm.default" and graph["node"].startswith("batch_norm")
    layers = by_name(report)
    assert layers["bn1"]["graph"]["conv_users"] == 1 and layers["bn3"]["graph"]["conv_users"] == 2
    assert layers["input_bn"]["graph"]["conv_node"] is None and layers["bn1"]["graph"]["conv_node"] == "conv2d"
    assert layers["bn1"]["channels"] == h.C and layers["input_bn"]["channels"] == 3
    text = run(runner, "inspect", healthy_pt2)
    assert text.exit_code == 0 and text.stdout.startswith("OK ")  # type: ignore[attr-defined]
    out = text.stdout  # type: ignore[attr-defined]
    assert "4 BatchNorm layers in the exported graph" in out
    assert "eps 1e-05, momentum 0.1, from the graph's BN nodes" in out and "assumed" not in out
    assert "4 layers: 0 with errors, 0 with warnings only, 4 clean." in out
    assert "recalibrate" not in out and "train mode" not in out
    rows = {line.split()[0]: line.split()[2] for line in out.splitlines() if line.startswith(("input_bn ", "bn"))}
    assert rows == {"input_bn": "-", **{f"bn{i}": f"conv{i}" for i in (1, 2, 3)}}  # the wide table's conv column


def test_warnings_only_where_true(runner: CliRunner, small_pt2: Path) -> None:
    """small_net's running stats were set by hand, never by a train step: counter 0."""
    code, (report,) = inspect_json(runner, small_pt2)
    assert code == 0
    for layer in report["layers"]:
        assert [(f["code"], f["severity"]) for f in layer["findings"]] == [("never_updated", "warning")]
    assert inspect_json(runner, small_pt2, "--fail-on", "warning")[0] == 1


def test_audit_equals_the_checkpoint_audit_of_the_same_model(runner: CliRunner, tmp_path: Path) -> None:
    """One audit: a .pt2 and its model's state_dict give the same numbers and findings."""
    net = trained_net(steps=12)
    with torch.no_grad():
        net.bn2.running_var[1] = 1e-12
        net.bn1.weight[0] = 0.0
        net.input_bn.running_mean[2] = float("nan")
    pt2 = h.export(net, tmp_path / "m.pt2")
    torch.save(net.state_dict(), tmp_path / "m.pt")
    code2, (graph,) = inspect_json(runner, pt2)
    code1, (ckpt,) = inspect_json(runner, tmp_path / "m.pt", "--eps", "1e-5", "--momentum", "0.1")
    assert code1 == code2 == 1
    assert len(graph["layers"]) == len(ckpt["layers"]) == 4
    for g, c in zip(graph["layers"], ckpt["layers"], strict=True):
        assert g["graph"] is not None and c["graph"] is None
        g.pop("graph"), c.pop("graph")
        for f in c["findings"]:  # only a checkpoint's eps can be given with --eps
            f["hint"] = f["hint"].removesuffix(" Built with a larger eps? Pass --eps.")
        assert g == c
    assert any(f["code"] == "var_below_eps" for a in graph["layers"] for f in a["findings"])


# -- planted defects: codes, channels, exit codes -------------------------------------------
def _set(layer: str, key: str, index: int, value: float) -> Callable[[nn.Module], None]:
    def plant(net: nn.Module) -> None:
        getattr(getattr(net, layer), key)[index] = value
    return plant


# defect -> (plant it, layer, code, severity, channels)
DEFECTS = {
    "var_below_eps": (_set("bn2", "running_var", 1, 1e-12), "bn2", "var_below_eps", "error", [1]),
    "zero_var": (_set("bn1", "running_var", 3, 0.0), "bn1", "var_below_eps", "error", [3]),
    "negative_var": (_set("bn1", "running_var", 2, -0.5), "bn1", "negative_var", "error", [2]),
    "nan_var": (_set("bn3", "running_var", 0, math.nan), "bn3", "non_finite_stats", "error", [0]),
    "inf_mean": (_set("input_bn", "running_mean", 1, math.inf), "input_bn", "non_finite_stats", "error", [1]),
    "dead_channel": (_set("bn2", "weight", 3, 0.0), "bn2", "dead_channel", "warning", [3]),
}


@pytest.fixture(scope="module")
def defect_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("defects")
    out = {}
    for name, (plant, *_) in DEFECTS.items():
        net = trained_net()
        with torch.no_grad():
            plant(net)
        out[name] = h.export(net, folder / f"{name}.pt2")
    return out


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_planted_defect_is_found(runner: CliRunner, narrow: CliRunner, defect_models: dict[str, Path],
                                 defect: str) -> None:
    _, layer, code, severity, channels = DEFECTS[defect]
    path = defect_models[defect]
    exit_code, (report,) = inspect_json(runner, path)
    layers = by_name(report)
    for name in NAMES:
        if name != layer:
            assert layers[name]["findings"] == [], name
    (f,) = layers[layer]["findings"]
    assert (f["code"], f["severity"], f["channels"], f["count"]) == (code, severity, channels, len(channels))
    assert report["passed"] is (severity != "error")
    assert exit_code == (1 if severity == "error" else 0)
    assert inspect_json(runner, path, "--fail-on", "warning")[0] == 1
    text = run(narrow, "inspect", path)
    assert text.exit_code == exit_code  # type: ignore[attr-defined]
    out = text.stdout  # type: ignore[attr-defined]
    fits(out)
    assert out.startswith("FAIL " if severity == "error" else "OK ")
    assert f"{severity}[{code}] {layer}: " in out
    flat = " ".join(out.split())
    assert f"channel {channels[0]} (1 of {layers[layer]['channels']})" in flat
    if code == "var_below_eps":  # eps is known: the audit neither says it assumed it nor asks for --eps
        assert "(1e-05)" in flat and "assumed" not in flat and "--eps" not in flat
    stale = code != "dead_channel"
    assert ("bncli recalibrate" in flat) is stale
    if stale:
        assert f"bncli recalibrate {path} DATA... -o OUT.pt2" in flat


def test_eps_and_momentum_come_from_each_node(runner: CliRunner, tmp_path: Path) -> None:
    """bn3 eps 1e-3 flags a running_var of 5e-4; momentum None (bn2) claims no convergence."""
    net = h.small_net()
    for bn in (net.input_bn, net.bn1, net.bn2, net.bn3):
        bn.num_batches_tracked.fill_(10)  # 0.9^10 = 35%, below every running_var (>= 0.5)
    net.bn2.momentum = None
    net.bn3.eps = 1e-3
    net.bn3.running_var[2] = 5e-4
    path = h.export(net, tmp_path / "per_node.pt2")
    code, (report,) = inspect_json(runner, path)
    layers = by_name(report)
    assert code == 1
    assert layers["bn3"]["eps"] == 1e-3 and layers["bn1"]["eps"] == 1e-5
    # (No unconverged claim for bn3: its 5e-4 proves another history than 10 steps from var 1.)
    assert [(f["code"], f["channels"]) for f in layers["bn3"]["findings"]] == [("var_below_eps", [2])]
    assert layers["bn2"]["momentum"] is None and layers["bn2"]["graph"]["momentum_arg"] == 0.0
    assert layers["bn2"]["findings"] == []
    assert [f["code"] for f in layers["bn1"]["findings"]] == ["unconverged"]
    assert "momentum 0.1" in layers["bn1"]["findings"][0]["message"]
    assert all(layer["assumed"] == [] for layer in report["layers"])
    # --eps/--momentum are for checkpoints: a note, and the graph's values still decide.
    flagged = run(runner, "inspect", path, "--eps", "1e-1", "--momentum", "none", "--json")
    assert flagged.exit_code == 1  # type: ignore[attr-defined]
    assert json.loads(flagged.stdout) == [report]  # type: ignore[attr-defined]
    assert "--eps/--momentum apply to checkpoints" in flagged.stderr  # type: ignore[attr-defined]
    out = " ".join(run(runner, "inspect", path).stdout.split())  # type: ignore[attr-defined]
    assert "eps 1e-05, momentum 0.1, from the graph's BN nodes; except" in out
    assert "bn2: momentum none (stored as 0: an eval export cannot tell None from 0)" in out
    assert "bn3: eps 0.001" in out


def test_train_mode_export_is_reported_without_changing_exit_codes(runner: CliRunner, tmp_path: Path) -> None:
    net = trained_net()
    eval_path = h.export(net, tmp_path / "eval.pt2")
    train_path = h.export(net.train(), tmp_path / "train.pt2", decompose=True)
    code, (report,) = inspect_json(runner, train_path, "--fail-on", "warning")
    assert code == 0
    assert all(layer["graph"]["training"] and layer["graph"]["batch_stats"] for layer in report["layers"])
    assert {layer["graph"]["op"] for layer in report["layers"]} == {"_native_batch_norm_legit_functional.default"}
    _, (evaluated,) = inspect_json(runner, eval_path)
    assert [a["findings"] for a in report["layers"]] == [a["findings"] for a in evaluated["layers"]]
    out = " ".join(run(runner, "inspect", train_path).stdout.split())  # type: ignore[attr-defined]
    assert ("Exported in train mode: input_bn, bn1, bn2, bn3 normalize with batch statistics "
            "(and update the running stats) whenever the program runs") in out
    assert "export after model.eval()" in out
    assert "train mode" not in run(runner, "inspect", eval_path).stdout  # type: ignore[attr-defined]


class Mixed(nn.Module):
    """A BN without running stats, a BatchNorm1d head, and one BN module used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.free = nn.BatchNorm2d(4, track_running_stats=False)
        self.shared = nn.BatchNorm2d(4)
        self.head = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shared(self.shared(self.free(self.conv(x))))
        return self.head(x.mean(dim=(2, 3)))


def test_layers_without_stats_1d_layers_and_shared_modules(runner: CliRunner, narrow: CliRunner,
                                                           tmp_path: Path) -> None:
    net = Mixed().eval()
    with torch.no_grad():
        net.shared.running_var.fill_(0.5)
        net.shared.num_batches_tracked.fill_(100)
        net.head.running_var.fill_(0.7)
        net.head.num_batches_tracked.fill_(100)
    path = h.export(net, tmp_path / "mixed.pt2")
    code, (report,) = inspect_json(runner, path, "--fail-on", "warning")
    assert code == 0, report
    free, first, second, head = report["layers"]
    assert free["name"] == "free" and free["running_mean"] is None and free["num_batches_tracked"] is None
    assert free["channels"] == 4 and free["graph"]["conv"] == "conv"
    assert free["graph"]["training"] is True and free["graph"]["batch_stats"] is False  # always batch stats
    assert first["name"] == second["name"] == "shared" and first["graph"]["node"] != second["graph"]["node"]
    assert first["graph"]["conv"] is None and head["graph"]["input_rank"] == 2
    out = run(narrow, "inspect", path).stdout  # type: ignore[attr-defined]
    fits(out)
    assert f"shared ({first['graph']['node']})" in out and f"shared ({second['graph']['node']})" in out
    assert "train mode" not in out


# -- --prefix, mixed inputs, files inspect cannot audit -------------------------------------
def test_prefix_names_a_module_or_a_node(runner: CliRunner, healthy_pt2: Path) -> None:
    code, (report,) = inspect_json(runner, healthy_pt2, "--prefix", "bn2")
    assert code == 0 and [layer["name"] for layer in report["layers"]] == ["bn2"]
    node = report["layers"][0]["graph"]["node"]
    assert [a["name"] for a in inspect_json(runner, healthy_pt2, "--prefix", node)[1][0]["layers"]] == ["bn2"]
    assert [a["name"] for a in inspect_json(runner, healthy_pt2, "--prefix", "module.bn2")[1][0]["layers"]] == ["bn2"]
    wrong = run(runner, "inspect", healthy_pt2, "--prefix", "bn9")
    assert wrong.exit_code == 1  # type: ignore[attr-defined]
    assert "no BatchNorm layer named 'bn9' in the graph" in wrong.stderr  # type: ignore[attr-defined]
    assert "input_bn [C=3], bn1 [C=4], bn2 [C=4], bn3 [C=4]" in wrong.stderr  # type: ignore[attr-defined]


def test_mixed_checkpoints_and_exported_models(runner: CliRunner, narrow: CliRunner, healthy_pt2: Path,
                                               defect_models: dict[str, Path], tmp_path: Path) -> None:
    good_ckpt = tmp_path / "good.pt"
    torch.save(trained_net().state_dict(), good_ckpt)
    args = [good_ckpt, healthy_pt2, SAMPLES / "broken.ckpt", defect_models["negative_var"]]
    code, doc = inspect_json(runner, *args)
    assert code == 1
    assert [(r["kind"], r["passed"]) for r in doc] == [
        ("checkpoint", True), ("exported_program", True), ("checkpoint", False), ("exported_program", False)]
    assert doc[0]["layers"][0]["assumed"] == ["eps", "momentum"] and doc[1]["layers"][0]["assumed"] == []
    assert inspect_json(runner, good_ckpt, healthy_pt2)[0] == 0
    text = run(narrow, "inspect", *args)
    assert text.exit_code == 1  # type: ignore[attr-defined]
    out = text.stdout  # type: ignore[attr-defined]
    fits(out)
    assert "2 of 4 files pass (--fail-on error)." in out
    assert "(assumed: PyTorch's defaults, not in a state_dict)" in out and "from the graph's BN nodes" in out
    assert "error[negative_var] bn1:" in out


def test_files_inspect_cannot_audit(runner: CliRunner, tmp_path: Path) -> None:
    no_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    ep = torch.export.export(no_bn, (torch.randn(2, 3, 6, 6),))
    torch.export.save(ep, tmp_path / "conv.pt2")
    (tmp_path / "text.pt2").write_text("not a zip")
    for name, why in (("conv.pt2", "the exported graph has no batch-norm node"),
                      ("text.pt2", "not a torch.export archive bncli can read: it is not a zip"),
                      ("missing.pt2", "no such file")):
        result = run(runner, "inspect", tmp_path / name)
        assert result.exit_code == 1, name  # type: ignore[attr-defined]
        assert why in " ".join(result.stderr.split()) and "Fix:" in result.stderr  # type: ignore[attr-defined]
        assert "Traceback" not in result.output  # type: ignore[attr-defined]
        code, (report,) = inspect_json(runner, tmp_path / name)
        assert code == 1 and why in report["error"]["message"] and report["layers"] == []


@pytest.mark.parametrize("vector", ["pickled_weight", "guards_code", "opaque_constant"])
def test_unsafe_model_is_refused_and_runs_no_code(runner: CliRunner, small_pt2: Path, tmp_path: Path,
                                                  vector: str) -> None:
    edit, step = h.PAYLOADS[vector]
    live, marker = tmp_path / "live-marker", tmp_path / "marker"
    h.victim(h.rewrite(small_pt2, tmp_path / "live.pt2", edit, live), step)
    assert live.exists(), "control: the payload runs under a plain torch.export.load"
    evil = h.rewrite(small_pt2, tmp_path / "evil.pt2", edit, marker)
    code, (report,) = inspect_json(runner, evil)
    assert code == 1 and report["passed"] is False and report["layers"] == []
    assert report["error"]["message"].startswith(f"{evil}: refused to load: ")
    assert "torch.export.load" in report["error"]["hint"]
    text = run(runner, "inspect", evil, small_pt2)
    assert text.exit_code == 1  # type: ignore[attr-defined]
    assert "refused to load" in text.stderr and "Fix:" in text.stderr  # type: ignore[attr-defined]
    assert "1 of 2 files pass" in text.stdout  # type: ignore[attr-defined]
    assert not marker.exists(), f"{vector}: inspect ran the payload"


# -- the sample the README shows ------------------------------------------------------------
def test_sample_model_pt2(runner: CliRunner, narrow: CliRunner) -> None:
    code, (report,) = inspect_json(runner, SAMPLES / "model.pt2")
    assert code == 0
    found = {a["name"]: (a["graph"]["conv"], [f["code"] for f in a["findings"]]) for a in report["layers"]}
    assert found == {"input_bn": (None, ["unconverged"]), "stem.bn": ("stem.conv", ["unconverged"]),
                     "layer1.0.bn1": ("layer1.0.conv1", ["unconverged"]),
                     "layer1.0.bn2": ("layer1.0.conv2", ["unconverged"])}
    assert inspect_json(runner, SAMPLES / "model.pt2", "--fail-on", "warning")[0] == 1
    # The same model as sample_data/model.pt: the same numbers.
    _, (ckpt,) = inspect_json(runner, SAMPLES / "model.pt")
    for g, c in zip(report["layers"], ckpt["layers"], strict=True):
        assert {k: g[k] for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")} == \
               {k: c[k] for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    text = run(narrow, "inspect", SAMPLES / "model.pt2")
    assert text.exit_code == 0  # type: ignore[attr-defined]
    out = text.stdout  # type: ignore[attr-defined]
    fits(out)
    assert "layer ← conv" in out and "← stem.conv" in out and "← layer1.0.conv2" in out
    assert "min above max" in out
    assert f"bncli recalibrate {SAMPLES / 'model.pt2'} DATA... -o OUT.pt2" in " ".join(out.split())


def test_help_mentions_pt2_and_fits(narrow: CliRunner) -> None:
    result = run(narrow, "inspect", "--help")
    assert result.exit_code == 0  # type: ignore[attr-defined]
    assert ".pt2" in result.stdout and "bncli inspect model.pt2" in result.stdout  # type: ignore[attr-defined]
    fits(result.stdout)  # type: ignore[attr-defined]


class LongNames(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone_stage4_downsample = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone_stage4_downsample(x)


def test_narrow_table_elides_the_parent_a_conv_shares_with_its_layer(narrow: CliRunner, runner: CliRunner,
                                                                     tmp_path: Path) -> None:
    path = h.export(LongNames().eval(), tmp_path / "long.pt2")
    out = run(narrow, "inspect", path).stdout  # type: ignore[attr-defined]
    fits(out)
    assert "backbone_stage4_downsample.1" in out and "← ….0 " in out
    wide = run(runner, "inspect", path).stdout  # type: ignore[attr-defined]
    assert "backbone_stage4_downsample.0" in wide  # the full path where there is room


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.bn(x) + y


def test_a_model_with_two_inputs_is_audited(runner: CliRunner, tmp_path: Path) -> None:
    """inspect runs nothing, so it needs no single tensor input (compare/recalibrate/fold do)."""
    ep = torch.export.export(TwoInputs().eval(), (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)))
    torch.export.save(ep, tmp_path / "two.pt2")
    code, (report,) = inspect_json(runner, tmp_path / "two.pt2")
    assert code == 1 and report["error"] is None
    assert [(a["name"], [f["code"] for f in a["findings"]]) for a in report["layers"]] == [("bn", ["never_updated"])]


def test_stored_eps_is_not_asked_for_but_a_given_one_is() -> None:
    import numpy as np

    from bncli.audit import audit_layer

    tensors = {"running_mean": np.zeros(2), "running_var": np.array([1.0, 1e-12]), "num_batches_tracked": 500}
    given, stored = audit_layer(tensors), audit_layer(tensors, stored=("eps", "momentum"))
    assert given.findings[0].hint.endswith("Pass --eps.")  # compare/normalize take --eps
    assert "--eps" not in stored.findings[0].hint
    assert given.findings[0].message == stored.findings[0].message
