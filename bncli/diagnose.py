"""Shape / dtype / value checks of BatchNorm2d inputs. Returns findings (data, not text).

No torch here: ``check-shape`` on a ``.npy`` must stay fast. The rules mirror
:func:`bncli.engine.validate_input` exactly (a property test holds them together):
a file has an *error* finding if and only if ``normalize`` would refuse it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bncli import io
from bncli.errors import BncliError, KeyChoiceError, UnsafeFileError
from bncli.moments import Moments
from bncli.wording import plural, verb

FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
CHANNEL_LIKE = (1, 3, 4)


@dataclass(frozen=True)
class Finding:
    """One problem (or risk) with an input.

    Attributes:
        code: Stable identifier (``not_4d``, ``channels_last``, ...), for scripts.
        severity: ``error`` (normalize would refuse it) or ``warning``.
        message: What is wrong, with the shape/dtype seen and what was expected.
        hint: The concrete fix.
    """

    code: str
    severity: str
    message: str
    hint: str


@dataclass
class Report:
    """The findings for one input file."""

    path: str
    shape: list[int] | None = None
    dtype: str | None = None
    key: str | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def to_dict(self) -> dict[str, object]:
        return {"path": self.path, "key": self.key, "shape": self.shape, "dtype": self.dtype,
                "valid": self.valid, "findings": [asdict(f) for f in self.findings]}


def _err(code: str, message: str, hint: str) -> Finding:
    return Finding(code, "error", message, hint)


def not_4d(shape: tuple[int, ...]) -> Finding:
    """The ``not_4d`` error: PyTorch's rule first (what users search for), then what the shape is."""
    nd = len(shape)
    s = tuple(shape)
    rule = f"BatchNorm2d expects 4D input (N, C, H, W), got {nd}D input"
    if nd == 0:
        return _err("not_4d", f"{rule}: a 0D scalar (a single number), not a batch of images.",
                    "BatchNorm2d needs (N, C, H, W); save the whole tensor, not a reduced value.")
    rule += f" of shape {s}"
    if nd == 1:
        return _err("not_4d", f"{rule}: a vector, such as a layer's per-channel "
                    "weight, bias or running stats, not a batch of images.",
                    "BatchNorm2d needs (N, C, H, W). If this is a state vector, pass it with "
                    "--weight/--bias or --state instead.")
    if nd == 2:
        return _err("not_4d", f"{rule}: (N, C) features belong to nn.BatchNorm1d.",
                    "Use nn.BatchNorm1d for (N, C); for images, keep the (N, C, H, W) tensor "
                    "before it is flattened.")
    if nd == 3:
        c0, _, c2 = s
        if c2 in CHANNEL_LIKE and c0 not in CHANNEL_LIKE:
            return _err("not_4d", f"{rule}: it looks like a single (H, W, C) "
                        "image (channels last) with no batch dimension.",
                        "Add the batch axis and use channels-last: x[np.newaxis] in NumPy (shape "
                        f"(1, {s[0]}, {s[1]}, {s[2]})), then bncli normalize --layout nhwc.")
        if c0 in CHANNEL_LIKE:
            lead = "it looks like a single (C, H, W) image with no batch dimension"
        else:
            lead = ("it is either a single (C, H, W) image with no batch dimension, or an "
                    "(N, C, L) sequence batch, which belongs to nn.BatchNorm1d")
        return _err("not_4d", f"{rule}: {lead}.",
                    f"Add the batch axis: x.unsqueeze(0) in torch or x[np.newaxis] in NumPy, giving "
                    f"shape (1, {s[0]}, {s[1]}, {s[2]}). In train mode a batch of one image is "
                    "normalized with its own statistics; --mode eval uses running stats.")
    if nd == 5:
        return _err("not_4d", f"{rule}: (N, C, D, H, W) volumes or video belong to nn.BatchNorm3d.",
                    "Use nn.BatchNorm3d, or fold depth into the batch "
                    "(x.transpose(1, 2).reshape(N*D, C, H, W)) to apply BatchNorm2d per frame.")
    return _err("not_4d", f"{rule}.", "Reshape to (N, C, H, W) before normalizing.")


def _non_float(dtype: str) -> tuple[str, str]:
    """What kind of dtype ``dtype`` is, and how to convert it to float32."""
    if dtype == "uint8":
        return "integer", "x.astype(np.float32) / 255 (NumPy) or x.float() / 255 (torch) for 8-bit images"
    plain = "x.astype(np.float32) (NumPy) or x.float() (torch)"
    if dtype == "bool":
        return "boolean", plain
    if dtype.startswith("complex"):
        return "complex", "keep the part you mean: x.real.astype(np.float32) (NumPy) or x.abs().float() (torch)"
    if dtype.startswith(("float8", "float4")):  # torch's 8-bit (and 4-bit) float formats
        return "low-precision floating-point", "x.float() (torch); BatchNorm2d has no 8-bit kernels"
    if dtype.startswith(("qint", "quint")):
        return "quantized", "x.dequantize() (torch)"
    if dtype.startswith(("int", "uint")):
        return "integer", plain
    return "non-numeric", "save the numbers as a float array (np.save(path, x.astype(np.float32)))"


def check_shape(shape: tuple[int, ...], dtype: str, *, num_features: int | None = None,
                mode: str = "train", layout: str = "nchw") -> list[Finding]:
    """Findings about a tensor's shape and dtype alone (no values needed).

    Args:
        shape: The tensor's shape as stored.
        dtype: Its dtype name (``float32``, ``uint8`` ...).
        num_features: The layer's C, if known; axis 1 (or the last, NHWC) must match.
        mode: ``train`` or ``eval``; train needs N*H*W > 1.
        layout: ``nchw`` or ``nhwc``.

    Returns:
        Errors first, then warnings. Empty means a valid input.
    """
    shape = tuple(int(s) for s in shape)
    out: list[Finding] = []
    if len(shape) != 4:
        out.append(not_4d(shape))
    if dtype not in FLOAT_NAMES:
        kind, fix = _non_float(dtype)
        out.append(_err("not_float", f"The input has {kind} dtype {dtype}; BatchNorm2d needs "
                        "float16, bfloat16, float32 or float64.", f"Convert it: {fix}."))
    if len(shape) == 4:
        n, c, h, w = (shape[0], shape[3], shape[1], shape[2]) if layout == "nhwc" else shape
        if num_features is not None and c != num_features:
            other = shape[1] if layout == "nhwc" else shape[3]
            switch = "nchw" if layout == "nhwc" else "nhwc"
            hint = (f"The {'axis 1' if layout == 'nhwc' else 'last axis'} has {plural(other, 'value')}: "
                    f"try --layout {switch}." if other == num_features else
                    "Use the layer whose num_features matches (--prefix), or check the data.")
            axis = "last axis (NHWC)" if layout == "nhwc" else "axis 1 (NCHW)"
            out.append(_err("channel_mismatch", f"The input has {plural(c, 'channel')} on its {axis} "
                            f"(shape {shape}), but the layer expects num_features={num_features}.",
                            hint))
        if 0 in shape:
            out.append(_err("empty", f"The input is empty: shape {shape} has a zero-size axis.",
                            "Check how the file was written; there is nothing to normalize."))
        elif mode == "train" and n * h * w == 1:
            size = f"torch.Size([{n}, {c}, {h}, {w}])"
            out.append(_err("one_value_per_channel",
                            f"Shape {shape} has one value per channel (N*H*W = 1); in train mode "
                            "PyTorch raises: ValueError: Expected more than 1 value per channel "
                            f"when training, got input size {size}.",
                            "Use --mode eval (model.eval() in PyTorch) so running statistics are "
                            "used, or normalize a larger batch (N*H*W > 1)."))
        if layout == "nchw" and shape[3] in CHANNEL_LIKE and shape[1] not in CHANNEL_LIKE \
                and not (num_features is not None and shape[1] == num_features):
            out.append(Finding("channels_last", "warning",
                               f"The last axis has {plural(shape[3], 'value')} and axis 1 has {shape[1]}: "
                               f"shape {shape} looks like channels-last (N, H, W, C) data, as "
                               "NumPy/PIL produce, read as NCHW it would have "
                               f"{plural(shape[1], 'channel')}.",
                               "If so, pass --layout nhwc (or x.permute(0, 3, 1, 2) in torch)."))
    return out


# Unit roundoff of each dtype: a BatchNorm computed in it loses |mean|/std times this.
_UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}
# Warn when centering costs more than two decimal digits beyond the dtype's own rounding
# (|mean| > 100 std; measured in float32: mean 1000 x std gives 3e-5..3e-3 relative error).
ILL_CONDITIONED_RATIO = 100.0


def _channel_list(idx: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(int(i)) for i in idx[:limit])
    return shown + (f", ... ({len(idx)} in all)" if len(idx) > limit else "")


def value_findings(chunks: Iterable[np.ndarray], *, dtype: str = "float32",
                   layout: str | None = None) -> list[Finding]:
    """Findings from the values themselves, read block by block (bounded memory).

    ``non_finite``: NaN or +-Inf counted by kind. With ``layout`` (valid 4D data), also
    per-channel moments: ``constant_channel`` (zero variance) and ``ill_conditioned``
    (a mean so large against the std that float arithmetic loses digits).
    """
    nan = pos = neg = 0
    total = 0
    moments: Moments | None = None
    for block in chunks:
        total += block.size
        nan += int(np.isnan(block).sum())
        inf = np.isinf(block)
        if inf.any():
            pos += int((inf & (block > 0)).sum())
            neg += int((inf & (block < 0)).sum())
        if layout is not None and block.ndim == 4 and block.size:
            if moments is None:
                moments = Moments.empty(int(block.shape[3] if layout == "nhwc" else block.shape[1]))
            moments.update(block, layout, extrema=False)
    out: list[Finding] = []
    bad = nan + pos + neg
    if bad:
        out.append(Finding("non_finite", "warning",
                           f"{bad:,} of {plural(total, 'value')} {verb(bad, 'is', 'are')} not finite "
                           f"({nan:,} NaN, {pos:,} +Inf, {neg:,} -Inf); "
                           "every output of an affected channel becomes NaN, and in train mode the "
                           "running stats are poisoned too.",
                           "Find where they come from (division by zero, log of 0, overflow in float16), "
                           "or clean them: np.nan_to_num(x) / torch.nan_to_num(x)."))
    if moments is None or moments.count < 2:
        return out
    mean, std = moments.mean, moments.std
    finite = np.isfinite(mean) & np.isfinite(std)
    constant = np.flatnonzero(finite & (std == 0))
    if constant.size:
        out.append(Finding(
            "constant_channel", "warning",
            f"{constant.size} of {plural(moments.channels, 'channel')} {verb(constant.size, 'holds', 'hold')} "
            "one constant value (channel "
            f"{_channel_list(constant)}): in train mode BatchNorm maps them to exactly their bias "
            "(0 by default), so they carry no information.",
            "Look for a dead, padded or zero-filled channel upstream (e.g. an alpha channel of 255s, "
            "or a mask), or drop it before the layer."))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(finite & (std > 0), np.abs(mean) / np.where(std > 0, std, 1.0), 0.0)
    u = _UNIT_ROUNDOFF.get(dtype, 2.0**-24)
    # float64 keeps 16 digits: only a ratio past 1e7 costs it more than 1e-9.
    limit = 1e7 if dtype == "float64" else ILL_CONDITIONED_RATIO
    bad_ch = np.flatnonzero(ratio > limit)
    if bad_ch.size:
        worst = int(bad_ch[np.argmax(ratio[bad_ch])])
        out.append(Finding(
            "ill_conditioned", "warning",
            f"{bad_ch.size} of {plural(moments.channels, 'channel')} {verb(bad_ch.size, 'has', 'have')} a mean "
            f"far larger than {verb(bad_ch.size, 'its', 'their')} spread "
            f"(channel {worst}: mean {mean[worst]:.6g}, std {std[worst]:.3g}, |mean|/std = "
            f"{ratio[worst]:.3g}). Normalizing in {dtype} subtracts two nearly equal numbers: "
            f"expect a relative output error near {ratio[worst] * u:.1g}, in nn.BatchNorm2d too.",
            "Center the data before storing it (subtract a per-channel offset), or normalize in "
            "float64 (x.astype(np.float64))."))
    return out


def check_file(path: Path, *, key: str | None = None, num_features: int | None = None,
               mode: str = "train", layout: str = "nchw", scan_values: bool = True) -> Report:
    """Diagnose one file: header checks, then (for valid float data) a value scan.

    Never raises for a bad file: unreadable and unsafe files become findings.
    """
    report = Report(path=str(path))
    try:
        info = io.peek(Path(path), key)
    except UnsafeFileError as exc:
        report.findings.append(_err("unsafe", exc.message, exc.hint or ""))
        return report
    except KeyChoiceError as exc:
        hint = exc.hint or ""
        if "running_mean" in hint and key is None:
            # A model checkpoint passed where data was expected: say what it is for.
            hint = ("This looks like a model checkpoint (it holds BatchNorm running stats): audit it "
                    f"with bncli inspect {path}, or pass it to normalize/compare as --state FILE "
                    "--prefix LAYER, and check the data file. " + hint)
        report.findings.append(_err("ambiguous_key", exc.message, hint))
        return report
    except BncliError as exc:
        report.findings.append(_err("unreadable", exc.message, exc.hint or ""))
        return report
    except OSError as exc:
        report.findings.append(_err("unreadable", f"{path}: cannot read ({exc.strerror or exc}).",
                                    "Check the path and its permissions."))
        return report
    report.shape, report.dtype, report.key = list(info.shape), info.dtype, info.key
    return _complete(report, lambda: io.iter_chunks(Path(path), key), num_features=num_features,
                     mode=mode, layout=layout, scan_values=scan_values)


def _complete(report: Report, chunks: Callable[[], Iterable[np.ndarray]], *, num_features: int | None,
              mode: str, layout: str, scan_values: bool) -> Report:
    """Header findings for ``report.shape``/``dtype``, then (valid float data) the value scan."""
    assert report.shape is not None and report.dtype is not None
    shape, dtype = tuple(report.shape), report.dtype
    report.findings.extend(check_shape(shape, dtype, num_features=num_features, mode=mode, layout=layout))
    if scan_values and dtype in FLOAT_NAMES and 0 not in shape:
        try:
            valid_4d = len(shape) == 4 and report.valid
            report.findings.extend(value_findings(chunks(), dtype=dtype, layout=layout if valid_4d else None))
        except BncliError as exc:
            report.findings.append(_err("unreadable", exc.message, exc.hint or ""))
    report.findings.sort(key=lambda f: f.severity != "error")
    return report


def check_array(array: Any, *, name: str = "<array>", num_features: int | None = None,
                mode: str = "train", layout: str = "nchw", scan_values: bool = True) -> Report:
    """Diagnose an in-memory NumPy array (or torch tensor) exactly as :func:`check_file` a file.

    torch is not imported: a tensor is recognised by its type's module and read through
    ``.detach().cpu()`` (bfloat16 values widened to float32 for the scan, exactly).

    Args:
        array: The data.
        name: What to call it in the report's ``path``.
        num_features, mode, layout, scan_values: As for :func:`check_file`.
    """
    if type(array).__module__.split(".")[0] == "torch":
        tensor = array.detach()
        dtype, shape = str(tensor.dtype).removeprefix("torch."), list(tensor.shape)
        if tensor.is_meta:  # shape and dtype, but no values to scan
            scan_values = False
        else:
            tensor = tensor.cpu()
            if str(tensor.layout) != "torch.strided":
                tensor = tensor.to_dense()  # a sparse tensor's values are its dense ones
    else:
        tensor = np.asarray(array)
        # dtype.name: a big-endian '>f4' array is float32 all the same.
        dtype, shape = tensor.dtype.name, list(tensor.shape)

    def values() -> list[np.ndarray]:
        if isinstance(tensor, np.ndarray):
            return [tensor]
        return [(tensor.float() if dtype == "bfloat16" else tensor).numpy()]

    report = Report(path=name, shape=[int(s) for s in shape], dtype=dtype)
    return _complete(report, values, num_features=num_features, mode=mode, layout=layout,
                     scan_values=scan_values)
