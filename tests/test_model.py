"""Whole-model numerics: recalibrate vs update_bn and a float64 NumPy reference, fold, compare."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pt2_helpers as h
import pytest
import torch
from torch import nn

from bncli import fold, model, model_ops
from bncli.errors import ShapeError, StateError
from bncli.io import pt2

BN_NAMES = ["input_bn", "bn1", "bn2", "bn3"]


def _npy(path: Path, x: torch.Tensor) -> Path:
    np.save(path, x.numpy())
    return path


def _bn_modules(net: nn.Module) -> dict[str, nn.BatchNorm2d]:
    return {name: m for name, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}


# -- BN layers of a graph -------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["export", "decomposed", "train-mode"])
def test_bn_layers_found_in_every_export_variant(variant: str, tmp_path: Path) -> None:
    net = h.small_net()
    if variant == "train-mode":
        net.train()
    path = h.export(net, tmp_path / "m.pt2", decompose=variant == "decomposed")
    m = model_ops.load_model(path)
    assert [layer.name for layer in m.layers] == BN_NAMES
    assert [layer.conv for layer in m.layers] == [None, "conv1", "conv2", "conv3"]
    assert [layer.conv_users for layer in m.layers] == [0, 1, 1, 2]
    assert all(layer.training == (variant == "train-mode") for layer in m.layers)
    assert [layer.num_features for layer in m.layers] == [3, h.C, h.C, h.C]


@pytest.mark.parametrize("variant", ["export", "decomposed"])
def test_eval_pass_through_the_engine_equals_the_model(variant: str, tmp_path: Path) -> None:
    net = h.small_net()
    m = model_ops.load_model(h.export(net, tmp_path / "m.pt2", decompose=variant == "decomposed"))
    x = h.data(6)
    run = model.ModelRunner(m.gm, m.layers, "eval")
    torch.testing.assert_close(run(x), net(x), rtol=1e-5, atol=1e-6)
    train = model.ModelRunner(m.gm, m.layers, "train")
    torch.testing.assert_close(train(x), copy.deepcopy(net).train()(x), rtol=1e-5, atol=1e-6)


# -- recalibrate ----------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["dynamic", "decomposed", "static"])
def test_recalibrate_equals_swa_update_bn(variant: str, tmp_path: Path) -> None:
    net = h.small_net()
    batch = 8 if variant == "static" else None
    path = h.export(net, tmp_path / "m.pt2", batch=batch, decompose=variant == "decomposed")
    x = h.data(40 if variant == "static" else 37)  # 37: a shorter last batch, as a DataLoader gives
    data = _npy(tmp_path / "x.npy", x)
    out = tmp_path / "out.pt2"
    result = model_ops.recalibrate_model(path, [data], out, batch_size=8)
    assert result.plan.batches == 5
    reference = copy.deepcopy(net)
    torch.optim.swa_utils.update_bn([x[i:i + 8] for i in range(0, len(x), 8)], reference)
    loaded = torch.export.load(out)  # our own output, trusted
    for name, bn in _bn_modules(reference).items():
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(loaded.state_dict[f"{name}.{key}"], getattr(bn, key), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loaded.module()(x[:8]), reference.eval()(x[:8]), rtol=1e-5, atol=1e-5)


def test_population_variance_equals_float64_numpy_reference(tmp_path: Path) -> None:
    net = h.small_net()
    path = h.export(net, tmp_path / "m.pt2")
    x = h.data(30)
    files = [_npy(tmp_path / "a.npy", x[:13]), _npy(tmp_path / "b.npy", x[13:])]  # batches span files
    out = tmp_path / "out.pt2"
    model_ops.recalibrate_model(path, files, out, batch_size=6, var_mode="population")
    # Reference: the eager model in train mode (every BN on batch statistics), hooks collect
    # each BN's inputs; float64 NumPy moments over all of them.
    eager = copy.deepcopy(net).train()
    seen: dict[str, list[np.ndarray]] = {name: [] for name in BN_NAMES}
    for name, bn in _bn_modules(eager).items():
        bn.register_forward_hook(lambda mod, args, y, name=name: seen[name].append(args[0].detach().numpy()))
    with torch.no_grad():
        for i in range(0, 30, 6):
            eager(x[i:i + 6])
    loaded = pt2.load_program(out)
    for name in BN_NAMES:
        values = np.concatenate(seen[name]).astype(np.float64).transpose(1, 0, 2, 3).reshape(len(seen[name][0][0]), -1)
        want_mean, want_var = values.mean(axis=1), values.var(axis=1, ddof=1)
        got_mean = loaded.state_dict[f"{name}.running_mean"].double().numpy()
        got_var = loaded.state_dict[f"{name}.running_var"].double().numpy()
        np.testing.assert_allclose(got_mean, want_mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got_var, want_var, rtol=1e-6)
        assert int(loaded.state_dict[f"{name}.num_batches_tracked"]) == 5


def test_recalibrate_save_state_holds_every_bn_layer(tmp_path: Path) -> None:
    path = h.export(h.small_net(), tmp_path / "m.pt2")
    data = _npy(tmp_path / "x.npy", h.data(16))
    result = model_ops.recalibrate_model(path, [data], tmp_path / "out.pt2", save_state=tmp_path)
    assert result.state_path == tmp_path / "out.bn_state.pt"
    state = torch.load(result.state_path, weights_only=True)
    assert sorted(state) == sorted(f"{n}.{k}" for n in BN_NAMES for k in
                                   ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"))
    bn = nn.BatchNorm2d(h.C)
    bn.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("bn1.")})
    torch.testing.assert_close(bn.running_mean, torch.export.load(tmp_path / "out.pt2").state_dict["bn1.running_mean"])


def test_static_batch_is_respected_with_a_clear_error(tmp_path: Path) -> None:
    path = h.export(h.small_net(), tmp_path / "m.pt2", batch=8)
    data = _npy(tmp_path / "x.npy", h.data(20))
    with pytest.raises(ShapeError, match="static batch of 8") as err:
        model_ops.recalibrate_model(path, [data], tmp_path / "o.pt2", batch_size=4)
    assert "--batch-size 8" in str(err.value.hint)
    with pytest.raises(ShapeError, match="last batch of 4") as err:
        model_ops.recalibrate_model(path, [data], tmp_path / "o.pt2")
    assert "--drop-last" in str(err.value.hint)
    assert not (tmp_path / "o.pt2").exists()
    result = model_ops.recalibrate_model(path, [data], tmp_path / "o.pt2", drop_last=True)
    assert (result.plan.batches, result.plan.dropped) == (2, 4)


def test_data_that_does_not_fit_the_model_is_refused_before_work(tmp_path: Path) -> None:
    path = h.export(h.small_net(), tmp_path / "m.pt2")
    wrong = _npy(tmp_path / "w.npy", torch.randn(4, 3, h.HW + 1, h.HW))
    with pytest.raises(ShapeError, match=r"samples of shape \(3, 7, 6\) do not fit"):
        model_ops.compare_model(path, [wrong])
    ints = tmp_path / "i.npy"
    np.save(ints, np.zeros((4, 3, h.HW, h.HW), dtype=np.uint8))
    with pytest.raises(Exception, match="floating point"):
        model_ops.compare_model(path, [ints])


# -- fold -----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["dynamic", "decomposed", "static"])
def test_fold_equals_the_unfolded_model(variant: str, tmp_path: Path) -> None:
    net = h.small_net()
    path = h.export(net, tmp_path / "m.pt2", batch=4 if variant == "static" else None,
                    decompose=variant == "decomposed")
    out = tmp_path / "folded.pt2"
    result = fold.fold_model(path, out)
    assert [d.folded for d in result.decisions] == [False, True, True, False]
    assert "not a conv2d output" in result.decisions[0].reason
    assert "also read by 1 other node" in result.decisions[3].reason
    assert 0 < result.max_abs_error < 1e-5
    folded = torch.export.load(out)  # our own output, trusted
    bn_nodes = [n for n in folded.graph.nodes if model.op_name(n.target) in model.BN_OPS]
    assert len(bn_nodes) == 2
    assert "bn1.running_mean" not in folded.state_dict and "conv1.bias" in folded.state_dict
    x = h.data(4)
    torch.testing.assert_close(folded.module()(x), net(x), rtol=1e-5, atol=1e-5)


def test_fold_checks_on_data_and_refuses_above_the_tolerance(tmp_path: Path) -> None:
    path = h.export(h.small_net(), tmp_path / "m.pt2")
    data = _npy(tmp_path / "x.npy", h.data(10))
    result = fold.fold_model(path, None, data=[data], batch_size=4)
    assert "10 samples" in result.check and result.max_abs_error > 0
    with pytest.raises(StateError, match="above the tolerance 1e-15; nothing was written"):
        fold.fold_model(path, tmp_path / "f.pt2", tolerance=1e-15)
    assert not (tmp_path / "f.pt2").exists()


def test_train_mode_bn_is_not_folded(tmp_path: Path) -> None:
    net = h.small_net().train()
    result = fold.fold_model(h.export(net, tmp_path / "m.pt2"), tmp_path / "f.pt2")
    assert not any(d.folded for d in result.decisions)
    assert "train mode" in result.decisions[1].reason


# -- compare --------------------------------------------------------------------------------
def _healthy(net: nn.Module, x: torch.Tensor) -> nn.Module:
    torch.optim.swa_utils.update_bn([x[i:i + 8] for i in range(0, len(x), 8)], net)
    return net.eval()


@pytest.mark.parametrize("stale", ["bn1", "bn3"])
def test_compare_names_the_layer_with_planted_stale_stats(stale: str, tmp_path: Path) -> None:
    x = h.data(32)
    net = _healthy(h.small_net(), x)
    clean = model_ops.compare_model(h.export(net, tmp_path / "clean.pt2"), [_npy(tmp_path / "x.npy", x)],
                                    batch_size=8)
    assert clean.breaks_at is None and not clean.off
    bn = _bn_modules(net)[stale]
    with torch.no_grad():
        bn.running_mean += 3 * bn.running_var.sqrt()
    result = model_ops.compare_model(h.export(net, tmp_path / "stale.pt2"), [tmp_path / "x.npy"], batch_size=8)
    assert result.breaks_at is not None and result.breaks_at.layer.name == stale
    assert [r.layer.name for r in result.off] == [stale]
    report = result.breaks_at
    assert report.worst_shift == pytest.approx(3.0, rel=0.01)
    assert result.output_max_abs_diff > 10 * clean.output_max_abs_diff


def test_compare_statistics_match_a_numpy_reference(tmp_path: Path) -> None:
    net = h.small_net()
    x = h.data(12)
    result = model_ops.compare_model(h.export(net, tmp_path / "m.pt2"), [_npy(tmp_path / "x.npy", x)],
                                     batch_size=12)
    first = result.reports[0]  # input_bn sees the data itself
    values = x.double().numpy().transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(first.mean, values.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(first.var, values.var(axis=1, ddof=1), rtol=1e-12)
    bn = net.input_bn
    want = np.abs(values.mean(axis=1) - bn.running_mean.double().numpy()) / np.sqrt(
        bn.running_var.double().numpy() + bn.eps)
    np.testing.assert_allclose(first.mean_shift, want, rtol=1e-6)


def test_shared_source_copy_is_untouched(small_pt2: Path, tmp_path: Path) -> None:
    before = small_pt2.read_bytes()
    copy_path = Path(shutil.copy(small_pt2, tmp_path / "m.pt2"))
    model_ops.recalibrate_model(copy_path, [_npy(tmp_path / "x.npy", h.data(8))], tmp_path / "o.pt2")
    assert copy_path.read_bytes() == before
