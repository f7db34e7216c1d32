"""The Python API at the package root: bncli.check_shape, bncli.dataset_stats, and a light `import bncli`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import bncli
from bncli import api, datastats
from bncli.cli import app


def test_import_bncli_is_light() -> None:
    code = ("import sys, bncli; light = not ({'torch', 'numpy'} & set(sys.modules)); "
            "f = bncli.check_shape; print(light, 'torch' in sys.modules, sorted(bncli.__all__) == sorted("
            "n for n in dir(bncli) if n in bncli.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "False", "True"], out.stderr


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'normalise'"):
        bncli.normalise  # noqa: B018


def test_check_shape_of_a_file_is_what_the_cli_reports(runner: CliRunner, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((4, 32, 32, 3), np.float32))
    report = bncli.check_shape(tmp_path / "x.npy")
    assert isinstance(report, bncli.Report) and report.valid
    assert [(f.code, f.severity) for f in report.findings] == [("channels_last", "warning"),
                                                                 ("constant_channel", "warning")]
    res = runner.invoke(app, ["check-shape", str(tmp_path / "x.npy"), "--json"])
    assert json.loads(res.stdout) == [report.to_dict()]
    assert bncli.check_shape(str(tmp_path / "x.npy"), layout="nhwc", scan=False).findings == []


@pytest.mark.parametrize(("array", "codes"), [
    (np.zeros((3, 32, 32), np.float32), ["not_4d"]),
    (np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4), ["not_float"]),
    (np.full((1, 3, 1, 1), 2.0), ["one_value_per_channel"]),
    (np.array([[[[np.nan, 1.0], [2.0, 3.0]]]]), ["non_finite"]),
    (np.random.default_rng(0).normal(size=(2, 3, 4, 4)), []),
])
def test_check_shape_of_an_array_equals_check_shape_of_its_file(tmp_path: Path, array: np.ndarray,
                                                                 codes: list[str]) -> None:
    from_array = bncli.check_shape(array)
    assert [f.code for f in from_array.findings] == codes
    assert from_array.valid == (codes in ([], ["non_finite"]))
    np.save(tmp_path / "a.npy", array)
    from_file = bncli.check_shape(tmp_path / "a.npy")
    assert {**from_array.to_dict(), "path": None} == {**from_file.to_dict(), "path": None}
    assert from_array.path == "<array>"


def test_check_shape_of_a_torch_tensor() -> None:
    t = torch.randn(2, 3, 4, 4).bfloat16()
    t[0, 0, 0, 0] = float("inf")
    report = bncli.check_shape(t, mode="eval", num_features=3)
    assert report.dtype == "bfloat16" and report.shape == [2, 3, 4, 4]
    assert [f.code for f in report.findings] == ["non_finite"]
    wrong = bncli.check_shape(torch.zeros(2, 4, 4, 3), num_features=3)
    assert [f.code for f in wrong.findings][0] == "channel_mismatch"
    assert "--layout nhwc" in wrong.findings[0].hint


def test_dataset_stats(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    (tmp_path / "d").mkdir()
    parts = [rng.integers(0, 256, (n, 6, 6, 3), dtype=np.uint8) for n in (3, 1, 4)]
    for i, p in enumerate(parts):
        np.save(tmp_path / "d" / f"part_{i}.npy", p)
    r = bncli.dataset_stats(tmp_path / "d", layout="nhwc", scale=255)
    assert isinstance(r, bncli.StatsResult)
    whole = np.concatenate(parts) / 255.0
    np.testing.assert_allclose(r.mean, whole.mean(axis=(0, 1, 2)), rtol=1e-14)
    np.testing.assert_allclose(r.var, whole.var(axis=(0, 1, 2)), rtol=1e-13)
    np.testing.assert_allclose(r.std, whole.std(axis=(0, 1, 2)), rtol=1e-13)
    np.testing.assert_allclose(r.var_unbiased, whole.var(axis=(0, 1, 2), ddof=1), rtol=1e-13)
    assert r.count == 8 * 36 and r.channels == 3
    assert r.normalize_line() == ("transforms.Normalize(mean=[" + ", ".join(f"{v:.6g}" for v in r.mean)
                                  + "], std=[" + ", ".join(f"{v:.6g}" for v in r.std) + "])")
    same = bncli.dataset_stats([str(tmp_path / "d" / f"part_{i}.npy") for i in range(3)], layout="nhwc", scale=255)
    np.testing.assert_array_equal(same.moments.pack(), r.moments.pack())
    with pytest.raises(ValueError, match="layout must be 'nchw' or 'nhwc'"):
        bncli.dataset_stats(tmp_path / "d", layout="NHWC")
    assert bncli.dataset_stats is datastats.dataset_stats  # the function the command calls


def test_dataset_stats_json_is_the_cli_json(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    np.save(tmp_path / "a.npy", np.random.default_rng(2).normal(size=(3, 2, 4, 4)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    cli = json.loads(runner.invoke(app, ["stats", "a.npy", "--json"]).stdout)
    assert cli == {**bncli.dataset_stats("a.npy").to_dict(), "save_state": None}


def test_the_cli_calls_the_api(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 4, 4), np.float32))
    calls: list[str] = []

    def spy(name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(api, "check_shape", spy("check_shape", api.check_shape))
    monkeypatch.setattr(datastats, "dataset_stats", spy("dataset_stats", datastats.dataset_stats))
    assert runner.invoke(app, ["check-shape", str(tmp_path / "a.npy"), str(tmp_path / "a.npy")]).exit_code == 0
    assert runner.invoke(app, ["stats", str(tmp_path)]).exit_code == 0
    assert calls == ["check_shape", "dataset_stats"]  # the duplicate input is checked once


def test_readme_api_example_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python API session, run as a doctest from the repo root (it only reads)."""
    import doctest
    import re

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Python API"):]
    block = re.search(r"```pycon\n(.*?)```", section, re.DOTALL)
    assert block is not None
    monkeypatch.chdir(root)
    test = doctest.DocTestParser().get_doctest(block.group(1), {}, "README", "README.md", 0)
    results = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE).run(test)
    assert results.attempted >= 10 and results.failed == 0


# -- normalize_array and inspect ----------------------------------------------------------------
def nchw(seed: int = 0, shape: tuple[int, ...] = (5, 3, 4, 6)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * rng.uniform(0.5, 3, shape[1])[None, :, None, None] + 2).astype(np.float32)


@pytest.mark.parametrize("options", [{}, {"momentum": None}, {"eps": 1e-3, "weight": [0.5, 2, -1], "bias": [1, 0, 0]},
                                     {"affine": False}, {"track_running_stats": False}])
def test_normalize_array_is_batchnorm2d(options: dict[str, Any]) -> None:
    from reference import ReferenceBatchNorm2d

    x = nchw()
    y, state = bncli.normalize_array(x, **options)
    weights = {k: options.pop(k) for k in ("weight", "bias") if k in options}
    module = torch.nn.BatchNorm2d(3, **options)
    if weights:
        with torch.no_grad():
            module.weight.copy_(torch.tensor(weights["weight"], dtype=torch.float32))
            module.bias.copy_(torch.tensor(weights["bias"], dtype=torch.float32))
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == x.shape
    torch.testing.assert_close(torch.from_numpy(y), module(torch.from_numpy(x)).detach(), rtol=0, atol=0)
    ref = ReferenceBatchNorm2d(3, **options, state=weights or None)
    np.testing.assert_allclose(y, ref.forward(x, training=True), rtol=1e-5, atol=1e-5)
    assert state.keys() == module.state_dict().keys()
    for k, v in module.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    torch.nn.BatchNorm2d(3, **options).load_state_dict(state)  # loadable as it is


def test_normalize_array_chains_states_and_takes_tensors_and_files(tmp_path: Path) -> None:
    a, b = torch.from_numpy(nchw(1)), torch.from_numpy(nchw(2)).bfloat16()
    module = torch.nn.BatchNorm2d(3)
    y1, s1 = bncli.normalize_array(a)
    y2, s2 = bncli.normalize_array(b, state=s1)  # the next train step starts from the last state
    assert isinstance(y2, torch.Tensor) and y2.dtype == torch.bfloat16
    torch.testing.assert_close(y1, module(a).detach(), rtol=0, atol=0)
    torch.testing.assert_close(y2, module(b.float()).detach().bfloat16(), rtol=2e-2, atol=2e-2)
    assert int(s2["num_batches_tracked"]) == 2
    torch.save({"model": {"bn": s2}}, tmp_path / "ckpt.pt")
    y3, s3 = bncli.normalize_array(a.numpy(), mode="eval", state=tmp_path / "ckpt.pt", prefix="bn")
    module.eval()
    torch.testing.assert_close(torch.from_numpy(y3), module(a).detach(), rtol=1e-6, atol=1e-6)
    assert int(s3["num_batches_tracked"]) == 2
    nhwc = np.ascontiguousarray(nchw(3).transpose(0, 2, 3, 1))
    y4, _ = bncli.normalize_array(nhwc, layout="nhwc")
    torch.testing.assert_close(torch.from_numpy(y4).permute(0, 3, 1, 2),
                               torch.nn.BatchNorm2d(3)(torch.from_numpy(nhwc).permute(0, 3, 1, 2)).detach(),
                               rtol=1e-6, atol=1e-6)


def test_normalize_array_errors_are_check_shape_s(runner: CliRunner) -> None:
    from bncli.errors import DTypeError, ShapeError

    with pytest.raises(ShapeError, match="got 3D input of shape") as err:
        bncli.normalize_array(np.zeros((3, 8, 8), np.float32))
    assert err.value.hint == bncli.check_shape(np.zeros((3, 8, 8), np.float32)).findings[0].hint
    with pytest.raises(DTypeError, match="uint8"):
        bncli.normalize_array(np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(TypeError):
        bncli.normalize_array(nchw(), epsilon=1e-3)
    with pytest.raises(ValueError, match="mode must be"):
        bncli.normalize_array(nchw(), mode="training")


def test_normalize_array_equals_the_cli_bit_for_bit(runner: CliRunner, tmp_path: Path) -> None:
    x = nchw(4)
    np.save(tmp_path / "x.npy", x)
    res = runner.invoke(app, ["normalize", str(tmp_path / "x.npy"), "--momentum", "none", "--json"])
    assert res.exit_code == 0, res.output
    y, state = bncli.normalize_array(x, momentum=None)
    assert np.load(tmp_path / "x.bn.npy").tobytes() == y.tobytes()
    doc = json.loads(res.stdout)
    assert doc["state"]["running_var"] == state["running_var"].tolist()


def test_inspect_is_the_cli_audit(runner: CliRunner, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent / "sample_data"
    audit = bncli.inspect(root / "broken.ckpt")
    res = runner.invoke(app, ["inspect", str(root / "broken.ckpt"), "--json"])
    assert json.loads(res.stdout) == [audit.to_dict()]
    assert audit.fails() and {f.code for layer in audit.layers for f in layer.findings} >= {"var_below_eps"}
    assert audit.layers[0].to_dict()["assumed"] == ["eps", "momentum"]
    given = bncli.inspect(root / "broken.ckpt", eps=1e-3, momentum=None, prefix="features.1")
    assert [layer.prefix for layer in given.layers] == ["state_dict.model.features.1"]
    assert given.layers[0].to_dict()["assumed"] == []
    cli = runner.invoke(app, ["inspect", str(root / "broken.ckpt"), "--eps", "1e-3", "--momentum", "none",
                              "--prefix", "features.1", "--json"])
    assert json.loads(cli.stdout) == [given.to_dict()]
    bad = bncli.inspect(root / "batch.npy")
    assert bad.error and "not a model checkpoint" in bad.error and bad.fails()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_normalize_array_on_cuda() -> None:
    x = torch.from_numpy(nchw(5)).cuda()
    y, state = bncli.normalize_array(x, device="cuda")
    assert y.device.type == "cuda" and all(v.device.type == "cpu" for v in state.values())
    module = torch.nn.BatchNorm2d(3).cuda()
    torch.testing.assert_close(y, module(x).detach(), rtol=1e-5, atol=1e-5)


def test_normalize_array_takes_what_the_file_readers_take() -> None:
    """Big-endian arrays and sparse tensors, which the io layer reads from files, work here too."""
    x = np.random.default_rng(3).normal(2, 3, (4, 3, 5, 5)).astype(np.float32)
    y, state = bncli.normalize_array(x)
    y_be, state_be = bncli.normalize_array(x.astype(">f4"))
    assert y_be.dtype == np.float32 and y_be.dtype.isnative and np.array_equal(y_be, y)
    assert all(torch.equal(state[k], state_be[k]) for k in state)
    t = torch.from_numpy(x)
    y_sparse, _ = bncli.normalize_array(t.to_sparse())
    assert y_sparse.layout == torch.strided and torch.equal(y_sparse, torch.from_numpy(y))
    y_list, _ = bncli.normalize_array(x.astype(np.float64).tolist())
    assert y_list.dtype == np.float64 and y_list.shape == x.shape


@pytest.mark.parametrize(("x", "error", "message"), [
    (np.zeros((2, 3, 4, 4), object), "DTypeError", "dtype object"),
    (np.zeros((2, 3, 4, 4), "U3"), "DTypeError", "dtype str96"),
    (torch.empty(2, 3, 4, 4, device="meta"), "InputError", "a meta tensor has a shape and a dtype but no values"),
])
def test_normalize_array_refuses_what_has_no_numbers(x: Any, error: str, message: str) -> None:
    from bncli.errors import BncliError

    with pytest.raises(BncliError, match=message) as info:
        bncli.normalize_array(x)
    assert type(info.value).__name__ == error and info.value.hint
