"""Every command and error path, in-process through typer's CliRunner."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from bncli import __version__
from bncli.cli import app

SAMPLES = Path(__file__).resolve().parent.parent / "sample_data"


@pytest.fixture
def samples(tmp_path: Path) -> Path:
    """A private copy of sample_data/ (tests never write into the repo)."""
    dest = tmp_path / "samples"
    shutil.copytree(SAMPLES, dest, ignore=shutil.ignore_patterns("*.bn.*", "__pycache__"))
    return dest


def run(runner: CliRunner, *args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    """Messages wrap to the terminal width: compare them with the line breaks taken out."""
    return " ".join(text.split())


def no_traceback(result: object) -> None:
    assert "Traceback" not in result.output  # type: ignore[attr-defined]
    assert result.exception is None or isinstance(result.exception, SystemExit)  # type: ignore[attr-defined]


# -- top level -----------------------------------------------------------------------------
def test_version_and_help(runner: CliRunner) -> None:
    result = run(runner, "--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"bncli {__version__}"
    result = run(runner, "--help")
    assert result.exit_code == 0
    for command in ("normalize", "check-shape", "compare"):
        assert command in result.stdout
    assert run(runner).exit_code in (0, 2)  # no args: help


def test_unknown_option_is_usage_error(runner: CliRunner, batch: Path) -> None:
    result = run(runner, "normalize", batch, "--frobnicate")
    assert result.exit_code == 2
    assert "No such option" in result.stderr


# -- normalize -----------------------------------------------------------------------------
def test_normalize_default_output_matches_module(runner: CliRunner, batch: Path) -> None:
    result = run(runner, "normalize", batch)
    assert result.exit_code == 0, result.output
    out = batch.with_name("batch.bn.npy")
    assert out.exists()
    assert "mean before" in result.stdout and f"wrote {out}" in result.stdout
    x = torch.from_numpy(np.load(batch))
    expected = torch.nn.BatchNorm2d(3)(x).detach()
    torch.testing.assert_close(torch.from_numpy(np.load(out)), expected, rtol=0, atol=0)


def test_normalize_json_is_one_document(runner: CliRunner, batch: Path, tmp_path: Path) -> None:
    result = run(runner, "normalize", batch, "-o", tmp_path / "o.npy", "--json", "--momentum", "none")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["shape"] == [8, 3, 6, 5] and doc["mode"] == "train"
    assert len(doc["channels"]) == 3
    for ch in doc["channels"]:
        assert abs(ch["mean_after"]) < 1e-5 and abs(ch["std_after"] - 1) < 1e-3
    assert doc["state"]["num_batches_tracked"] == 1
    # momentum=None after one step: running stats equal the batch stats (unbiased var).
    x = np.load(batch).astype(np.float64)
    np.testing.assert_allclose(doc["state"]["running_mean"], x.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(doc["state"]["running_var"], x.var(axis=(0, 2, 3), ddof=1), rtol=1e-5)


def test_existing_output_is_kept_unless_force(runner: CliRunner, batch: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.npy"
    out.write_bytes(b"keep me")
    result = run(runner, "normalize", batch, "-o", out)
    assert result.exit_code == 1
    assert "already exists" in result.stderr and "--force" in result.stderr
    assert out.read_bytes() == b"keep me"
    no_traceback(result)
    assert run(runner, "normalize", batch, "-o", out, "--force").exit_code == 0
    assert np.load(out).shape == (8, 3, 6, 5)


def test_input_is_never_overwritten(runner: CliRunner, batch: Path) -> None:
    before = batch.read_bytes()
    result = run(runner, "normalize", batch, "-o", batch, "--force")
    assert result.exit_code == 1
    assert "never overwrites its input" in flat(result.stderr)
    assert batch.read_bytes() == before


def test_eval_with_checkpoint_layer_and_save_state(runner: CliRunner, samples: Path, tmp_path: Path) -> None:
    out, state = tmp_path / "o.pt", tmp_path / "s.pt"
    result = run(runner, "normalize", samples / "batch.npy", "--mode", "eval", "--state", samples / "model.pt",
                 "--prefix", "input_bn", "-o", out, "--save-state", state)
    assert result.exit_code == 0, result.output
    sd = torch.load(samples / "model.pt", weights_only=True)
    bn = torch.nn.BatchNorm2d(3)
    bn.load_state_dict({k[len("input_bn."):]: v for k, v in sd.items() if k.startswith("input_bn.")})
    bn.eval()
    x = torch.from_numpy(np.load(samples / "batch.npy"))
    torch.testing.assert_close(torch.load(out, weights_only=True), bn(x).detach(), rtol=0, atol=0)
    saved = torch.load(state, weights_only=True)
    fresh = torch.nn.BatchNorm2d(3)
    fresh.load_state_dict(saved)  # strict: the file is a valid BatchNorm2d state_dict
    assert int(saved["num_batches_tracked"]) == int(sd["input_bn.num_batches_tracked"])  # eval: no update


def test_wrong_prefix_lists_layers(runner: CliRunner, samples: Path) -> None:
    result = run(runner, "normalize", samples / "batch.npy", "--state", samples / "model.pt", "--prefix", "bn1")
    assert result.exit_code == 1
    assert "no BatchNorm layer with prefix 'bn1'" in flat(result.stderr)
    assert "layer1.0.bn1" in result.stderr and "[C=8]" in result.stderr
    no_traceback(result)
    result = run(runner, "normalize", samples / "batch.npy", "--state", samples / "model.pt")
    assert result.exit_code == 1 and "holds 4 BatchNorm layers" in result.stderr


def test_layer_with_other_channel_count(runner: CliRunner, samples: Path) -> None:
    result = run(runner, "normalize", samples / "batch.npy", "--state", samples / "model.pt", "--prefix", "stem.bn")
    assert result.exit_code == 1
    assert "3 channels" in result.stderr and "num_features=8" in result.stderr


def test_nhwc_layout_round_trips(runner: CliRunner, samples: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.npy"
    result = run(runner, "normalize", samples / "batch_nhwc.npy", "--layout", "nhwc", "-o", out)
    assert result.exit_code == 0, result.output
    y = np.load(out)
    assert y.shape == (16, 32, 32, 3)
    # The module on NCHW memory: its channels-last kernel is 7e-6 off here (bncli's is 4e-7).
    x = torch.from_numpy(np.load(samples / "batch_nhwc.npy")).permute(0, 3, 1, 2).contiguous()
    expected = torch.nn.BatchNorm2d(3)(x).detach().permute(0, 2, 3, 1)
    torch.testing.assert_close(torch.from_numpy(y), expected, rtol=1e-6, atol=1e-6)


def test_weight_bias_lists(runner: CliRunner, batch: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.npy"
    result = run(runner, "normalize", batch, "-o", out, "--weight", "2,2,2", "--bias", "1,0,-1", "--json")
    assert result.exit_code == 0, result.output
    means = [c["mean_after"] for c in json.loads(result.stdout)["channels"]]
    np.testing.assert_allclose(means, [1, 0, -1], atol=1e-5)
    result = run(runner, "normalize", batch, "-o", out, "--force", "--weight", "1,2")
    assert result.exit_code == 1 and "2 values, but the layer has 3 channels" in result.stderr
    result = run(runner, "normalize", batch, "-o", out, "--force", "--no-affine", "--weight", "1,2,3")
    assert result.exit_code == 1 and "affine is off" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--momentum", "fast"], "not a number"),
    (["--momentum", "1.5"], "outside [0, 1]"),
    (["--eps", "0"], "eps must be a finite number > 0"),
    (["--mode", "inference"], "inference"),
])
def test_bad_option_values_exit_2(runner: CliRunner, batch: Path, args: list[str], message: str) -> None:
    result = run(runner, "normalize", batch, *args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_unavailable_device_is_friendly(runner: CliRunner, batch: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run(runner, "normalize", batch, "--device", "cuda")
    assert result.exit_code == 1
    assert "not available on this machine" in result.stderr and "Available here: cpu" in result.stderr
    assert not batch.with_name("batch.bn.npy").exists()
    no_traceback(result)


@pytest.mark.parametrize("name, message", [
    ("image.npy", "no batch dimension"),
    ("batch_uint8.npy", "integer dtype uint8"),
    ("dataset.npz", "holds 2 tensors"),
])
def test_invalid_inputs_exit_1_without_output(runner: CliRunner, samples: Path, name: str, message: str) -> None:
    result = run(runner, "normalize", samples / name)
    assert result.exit_code == 1
    assert "Error:" in result.stderr and "Fix:" in result.stderr
    assert message in flat(result.stderr)
    no_traceback(result)
    assert not list(samples.glob("*.bn.*"))


def test_npz_key_and_safetensors_bf16(runner: CliRunner, samples: Path, tmp_path: Path) -> None:
    result = run(runner, "normalize", samples / "dataset.npz", "--key", "images", "-o", tmp_path / "o.npz")
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "o.npz") as npz:
        assert npz["images"].shape == (16, 3, 32, 32)
    save_file({"x": torch.randn(4, 3, 2, 2).bfloat16()}, str(tmp_path / "b.safetensors"))
    result = run(runner, "normalize", tmp_path / "b.safetensors", "-o", tmp_path / "b.npy")
    assert result.exit_code == 1 and "NumPy has no bfloat16" in result.stderr
    result = run(runner, "normalize", tmp_path / "b.safetensors")
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "b.bn.safetensors"))["x"].dtype == torch.bfloat16


def test_one_value_per_channel(runner: CliRunner, npy_file: object) -> None:
    path = npy_file(np.ones((1, 3, 1, 1), np.float32))  # type: ignore[operator]
    result = run(runner, "normalize", path)
    assert result.exit_code == 1
    assert "Expected more than 1 value per channel when training" in result.stderr
    assert "--mode eval" in result.stderr
    assert run(runner, "normalize", path, "--mode", "eval").exit_code == 0


def test_unsafe_file_refused(runner: CliRunner, tmp_path: Path) -> None:
    import pickle

    path = tmp_path / "x.npy"
    path.write_bytes(pickle.dumps({"a": 1}))
    result = run(runner, "normalize", path)
    assert result.exit_code == 1 and "refused to load" in result.stderr


def test_debug_shows_traceback(runner: CliRunner, tmp_path: Path) -> None:
    result = run(runner, "--debug", "normalize", tmp_path / "missing.npy")
    assert result.exit_code == 1
    assert result.exception is not None and not isinstance(result.exception, SystemExit)


# -- check-shape ---------------------------------------------------------------------------
def test_check_shape_sample_verdicts(runner: CliRunner, samples: Path) -> None:
    result = run(runner, "check-shape", samples / "batch.npy", samples / "batch_nhwc.npy",
                 samples / "image.npy", samples / "batch_uint8.npy", "--json")
    assert result.exit_code == 1
    reports = json.loads(result.stdout)
    assert [r["valid"] for r in reports] == [True, True, False, False]
    codes = [[f["code"] for f in r["findings"]] for r in reports]
    assert codes == [[], ["channels_last"], ["not_4d"], ["not_float"]]
    for r in reports:
        assert set(r) >= {"path", "shape", "dtype", "valid", "findings"}
        for f in r["findings"]:
            assert set(f) == {"code", "severity", "message", "hint"}
    result = run(runner, "check-shape", samples / "batch.npy")
    assert result.exit_code == 0 and result.stdout.startswith("OK")


@pytest.mark.parametrize("shape, dtype, extra, code", [
    ((3, 32, 32), np.float32, [], "not_4d"),
    ((8, 16), np.float32, [], "not_4d"),
    ((2, 3, 4, 8, 8), np.float32, [], "not_4d"),
    ((), np.float32, [], "not_4d"),
    ((2, 3, 8, 8), np.float32, ["--num-features", "4"], "channel_mismatch"),
    ((1, 3, 1, 1), np.float32, [], "one_value_per_channel"),
    ((2, 3, 4, 4), np.int64, [], "not_float"),
    ((0, 3, 4, 4), np.float32, [], "empty"),
])
def test_check_shape_error_codes(runner: CliRunner, npy_file: object, shape: tuple[int, ...],
                                 dtype: type, extra: list[str], code: str) -> None:
    path = npy_file(np.zeros(shape, dtype))  # type: ignore[operator]
    result = run(runner, "check-shape", path, *extra, "--json")
    assert result.exit_code == 1
    finding = json.loads(result.stdout)[0]["findings"][0]
    assert finding["code"] == code and finding["severity"] == "error"
    assert finding["message"] and finding["hint"]


def test_check_shape_messages_name_the_right_layer(runner: CliRunner, npy_file: object) -> None:
    cases = {(8, 16): "BatchNorm1d", (2, 3, 4, 8, 8): "BatchNorm3d", (3, 32, 32): "unsqueeze(0)",
             (32, 32, 3): "--layout nhwc"}
    for shape, text in cases.items():
        path = npy_file(np.zeros(shape, np.float32), name=f"{len(shape)}_{shape[0]}.npy")  # type: ignore[operator]
        result = run(runner, "check-shape", path)
        assert text in result.stdout.replace("\n", " "), (shape, result.stdout)


def test_check_shape_warnings_keep_exit_0(runner: CliRunner, npy_file: object) -> None:
    x = np.ones((2, 3, 4, 4), np.float32)
    x[0, 0, 0, :2] = np.nan
    x[1, 2, 0, 0] = np.inf
    result = run(runner, "check-shape", npy_file(x), "--json")  # type: ignore[operator]
    assert result.exit_code == 0
    finding = json.loads(result.stdout)[0]["findings"][0]
    assert finding["code"] == "non_finite" and "2 NaN, 1 +Inf" in finding["message"]
    result = run(runner, "check-shape", npy_file(x, name="y.npy"), "--no-scan", "--json")  # type: ignore[operator]
    assert json.loads(result.stdout)[0]["findings"] == []


def test_check_shape_one_value_ok_in_eval(runner: CliRunner, npy_file: object) -> None:
    path = npy_file(np.ones((1, 3, 1, 1), np.float32))  # type: ignore[operator]
    assert run(runner, "check-shape", path, "--mode", "eval").exit_code == 0


def test_check_shape_unreadable_and_unsafe(runner: CliRunner, tmp_path: Path) -> None:
    import pickle

    (tmp_path / "p.npy").write_bytes(pickle.dumps([1, 2]))
    (tmp_path / "t.npy").write_text("not numpy")
    result = run(runner, "check-shape", tmp_path / "p.npy", tmp_path / "t.npy", tmp_path / "missing.npy", "--json")
    assert result.exit_code == 1
    codes = [r["findings"][0]["code"] for r in json.loads(result.stdout)]
    assert codes == ["unsafe", "unreadable", "unreadable"]


def test_check_shape_channel_mismatch_suggests_layout(runner: CliRunner, samples: Path) -> None:
    result = run(runner, "check-shape", samples / "batch_nhwc.npy", "--num-features", "3")
    assert result.exit_code == 1 and "try --layout nhwc" in result.stdout
    assert run(runner, "check-shape", samples / "batch_nhwc.npy", "--layout", "nhwc", "-C", "3").exit_code == 0


# -- compare -------------------------------------------------------------------------------
def test_compare_fresh_module(runner: CliRunner, batch: Path) -> None:
    result = run(runner, "compare", batch)
    assert result.exit_code == 0, result.output
    assert "train mode vs eval mode" in result.stdout
    assert "Why they differ" in result.stdout and "momentum=0.1" in result.stdout
    assert "fresh module" in result.stdout


def test_compare_json_matches_modules(runner: CliRunner, samples: Path) -> None:
    result = run(runner, "compare", samples / "batch.npy", "--state", samples / "model.pt",
                 "--prefix", "input_bn", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    sd = torch.load(samples / "model.pt", weights_only=True)
    layer = {k[len("input_bn."):]: v for k, v in sd.items() if k.startswith("input_bn.")}
    x = torch.from_numpy(np.load(samples / "batch.npy"))
    bn_train, bn_eval = torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    bn_train.load_state_dict(layer)
    bn_eval.load_state_dict(layer)
    bn_eval.eval()
    y_train, y_eval = bn_train(x).detach(), bn_eval(x).detach()
    diff = (y_train.double() - y_eval.double()).abs().amax(dim=(0, 2, 3))
    assert len(doc["channels"]) == 3
    np.testing.assert_allclose([c["max_abs_diff"] for c in doc["channels"]], diff.numpy(), rtol=1e-12)
    assert doc["max_abs_diff"] == pytest.approx(float(diff.max()))
    np.testing.assert_allclose([c["running_mean_after_train_step"] for c in doc["channels"]],
                               bn_train.running_mean.double().numpy(), rtol=0, atol=0)
    np.testing.assert_allclose([c["running_var"] for c in doc["channels"]],
                               layer["running_var"].double().numpy(), rtol=0, atol=0)
    assert doc["num_batches_tracked_after_train_step"] == int(layer["num_batches_tracked"]) + 1


def test_compare_without_running_stats_agrees(runner: CliRunner, batch: Path) -> None:
    result = run(runner, "compare", batch, "--no-track-running-stats", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["max_abs_diff"] < 1e-6
    assert any("ALSO uses batch statistics" in line for line in doc["explanation"])


def test_compare_rejects_single_value(runner: CliRunner, npy_file: object) -> None:
    result = run(runner, "compare", npy_file(np.ones((1, 3, 1, 1), np.float32)))  # type: ignore[operator]
    assert result.exit_code == 1 and "more than 1 value per channel" in result.stderr


def test_one_value_eval_without_running_stats(runner: CliRunner, npy_file: object) -> None:
    """Without running stats eval mode uses batch statistics, so one value per channel fails too."""
    path = npy_file(np.ones((1, 3, 1, 1), np.float32))  # type: ignore[operator]
    result = run(runner, "normalize", path, "--mode", "eval", "--no-track-running-stats")
    assert result.exit_code == 1
    assert "more than 1 value per channel" in result.stderr
    no_traceback(result)


def test_check_shape_on_a_checkpoint_says_what_it_is(runner: CliRunner, samples: Path) -> None:
    result = run(runner, "check-shape", samples / "model.pt", "--json")
    assert result.exit_code == 1
    finding = json.loads(result.stdout)[0]["findings"][0]
    assert finding["code"] == "ambiguous_key"
    assert "model checkpoint" in finding["hint"] and "--state" in finding["hint"]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_check_shape_value_warnings(runner: CliRunner, npy_file: object, dtype: type) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 4, 8, 8))
    x[:, 1] += 1000.0  # |mean|/std ~ 1000: ill-conditioned in 16/32-bit floats
    x[:, 2] = 0.5  # a constant channel
    result = run(runner, "check-shape", npy_file(x.astype(dtype)), "--json")  # type: ignore[operator]
    assert result.exit_code == 0  # warnings only: normalize accepts this input
    findings = {f["code"]: f for f in json.loads(result.stdout)[0]["findings"]}
    assert "channel 2" in findings["constant_channel"]["message"]
    if dtype == np.float64:
        assert "ill_conditioned" not in findings
    else:
        assert "channel 1" in findings["ill_conditioned"]["message"]
        assert "float64" in findings["ill_conditioned"]["hint"]


def test_check_shape_no_value_warnings_on_ordinary_data(runner: CliRunner, batch: Path) -> None:
    for dtype in (np.float16, np.float32):
        path = batch.with_name(f"b{np.dtype(dtype).name}.npy")
        np.save(path, np.load(batch).astype(dtype))
        result = run(runner, "check-shape", path, "--json")
        assert json.loads(result.stdout)[0]["findings"] == []
