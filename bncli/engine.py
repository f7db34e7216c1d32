"""The shared BatchNorm2d engine: one configuration + state, applied in train or eval mode.

Every command (``normalize``, ``compare``, ``bench``, ``stats``) goes through
:class:`BatchNormEngine`. It owns an :class:`torch.nn.BatchNorm2d` so that outputs and
running statistics are *the module's own*, bit for bit; what the engine adds is input
validation with useful errors, layouts, devices, dtype handling and a streaming path
(statistics computed elsewhere, applied chunk by chunk).

This module reads no files, prints nothing and imports nothing of the CLI.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from bncli import fastpath
from bncli.errors import DeviceError, DTypeError, ShapeError, StateError

Mode = Literal["train", "eval"]
Layout = Literal["nchw", "nhwc"]
MODES: tuple[str, ...] = ("train", "eval")
LAYOUTS: tuple[str, ...] = ("nchw", "nhwc")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# PyTorch's own words, quoted so users can search for them.
TORCH_ONE_VALUE_ERROR = "Expected more than 1 value per channel when training, got input size {}"


@dataclass(frozen=True)
class BatchNormConfig:
    """The constructor arguments of :class:`torch.nn.BatchNorm2d`.

    Attributes:
        num_features: C, the number of channels (axis 1 of an NCHW input).
        eps: Added to the variance before the square root.
        momentum: Weight of the new batch in the running stats; ``None`` means the
            cumulative moving average (factor ``1 / num_batches_tracked``).
        affine: Learnable per-channel ``weight`` and ``bias``.
        track_running_stats: Keep ``running_mean`` / ``running_var`` /
            ``num_batches_tracked``; without them eval mode uses batch statistics.
    """

    num_features: int
    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True

    def __post_init__(self) -> None:
        if self.num_features < 1:
            raise ShapeError(
                f"num_features must be at least 1, got {self.num_features}.",
                hint="Pass the channel count C of an (N, C, H, W) input.",
            )
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise StateError(f"eps must be a positive finite number, got {self.eps}.",
                             hint="The PyTorch default is --eps 1e-5.")
        if self.momentum is not None and not (0.0 <= self.momentum <= 1.0):
            raise StateError(f"momentum must lie in [0, 1] or be None, got {self.momentum}.",
                             hint="The PyTorch default is --momentum 0.1; "
                                  "--momentum none gives a cumulative average.")


def available_devices() -> list[str]:
    """Names of the devices torch can use here, best last (``cpu`` is always there)."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(name: str) -> torch.device:
    """Turn ``cpu`` / ``cuda`` / ``cuda:1`` / ``mps`` / ``auto`` into an available device.

    Raises:
        DeviceError: The device is not available here; the message lists those that are.
    """
    available = available_devices()
    if name == "auto":
        return torch.device("cuda" if "cuda" in available else available[-1])
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(
            f"Unknown device {name!r}.",
            hint=f"Use one of: {', '.join([*available, 'auto'])}.",
        ) from None
    if device.type not in available:
        reason = {
            "cuda": "torch.cuda.is_available() is False (no NVIDIA GPU/driver, or a CPU-only torch build)",
            "mps": "torch.backends.mps.is_available() is False (not an Apple-silicon Mac)",
        }.get(device.type, "torch does not support it here")
        raise DeviceError(
            f"Device {name!r} is not available on this machine: {reason}.",
            hint=f"Available here: {', '.join(available)} (or --device auto to pick the best).",
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(
            f"Device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s).",
            hint="Use --device cuda (device 0) or an index below the device count.",
        )
    return device


def validate_input(shape: tuple[int, ...], dtype: torch.dtype, num_features: int,
                   mode: str, layout: str = "nchw", *, running_stats: bool = True) -> None:
    """Raise a helpful error when a tensor of this shape/dtype is no BatchNorm2d input.

    The full diagnosis with warnings lives in :mod:`bncli.diagnose`; this is the
    engine's own guard so that no caller can reach an opaque PyTorch error.
    ``running_stats=False`` (a layer without them) makes eval mode use batch statistics,
    so it needs more than one value per channel, as train mode does.
    """
    if len(shape) != 4:
        raise ShapeError(
            f"BatchNorm2d needs a 4D (N, C, H, W) input, got {len(shape)}D shape {tuple(shape)}.",
            hint="Run `bncli check-shape FILE` for what this shape is and how to fix it.",
        )
    if dtype not in FLOAT_DTYPES:
        raise DTypeError(
            f"BatchNorm2d needs a floating-point input, got dtype {str(dtype).replace('torch.', '')}.",
            hint="Convert first, e.g. x.astype('float32') / 255 for uint8 images.",
        )
    channels = shape[3] if layout == "nhwc" else shape[1]
    if channels != num_features:
        axis = "last axis (NHWC)" if layout == "nhwc" else "axis 1 (NCHW)"
        raise ShapeError(
            f"The input has {channels} channels on its {axis} (shape {tuple(shape)}), "
            f"but the BatchNorm2d layer has num_features={num_features}.",
            hint="Check --layout (nchw vs nhwc), --num-features, or the --state/--prefix layer.",
        )
    if 0 in shape:
        raise ShapeError(f"The input is empty: shape {tuple(shape)} has a zero-size axis.",
                         hint="Check how the file was written; there is nothing to normalize.")
    n, h, w = (shape[0], shape[1], shape[2]) if layout == "nhwc" else (shape[0], shape[2], shape[3])
    if mode == "eval" and not running_stats and n * h * w == 1:
        raise ShapeError(
            f"Without running statistics, eval mode also uses batch statistics, which need more than "
            f"one value per channel; shape {tuple(shape)} has N*H*W = 1.",
            hint="Use --track-running-stats with a --state holding running stats, or a batch with N*H*W > 1.",
        )
    if mode == "train" and n * h * w == 1:
        nchw = (n, channels, h, w)
        raise ShapeError(
            "Train mode needs more than one value per channel to compute batch statistics; "
            f"PyTorch raises: {TORCH_ONE_VALUE_ERROR.format('torch.Size(' + str(list(nchw)) + ')')}.",
            hint="Use --mode eval (running statistics), or a batch with N*H*W > 1.",
        )


def _module_forward(module: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` without nn.Module's per-call Python (hooks dispatch, forward, F.batch_norm).

    The same ``torch.batch_norm`` call with the same arguments that ``_BatchNorm.forward``
    and ``F.batch_norm`` make (unchanged from torch 2.2 to 2.13), so the output and the
    running statistics are the module's, bit for bit (tests/test_engine.py checks it against
    ``nn.BatchNorm2d``). It saves ~7 us per call, ~25 us after a large kernel has evicted
    the interpreter's caches: on sub-millisecond inputs that was 3-10% (``bncli bench``).
    The engine's module is private, so it has no hooks to skip. ``x`` is already validated.
    """
    factor = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        factor = 1.0 / float(module.num_batches_tracked) if module.momentum is None else module.momentum
    batch_stats = module.training or (module.running_mean is None and module.running_var is None)
    keep = not module.training or module.track_running_stats
    return torch.batch_norm(x, module.weight, module.bias, module.running_mean if keep else None,
                            module.running_var if keep else None, batch_stats, factor, module.eps,
                            torch.backends.cudnn.enabled)


class BatchNormEngine:
    """A BatchNorm2d configuration and its state, applied to 4D tensors.

    Args:
        config: The module's constructor arguments.
        device: Where the state lives and the work runs (a resolved torch.device).
        param_dtype: dtype of weight/bias/running stats. float32 (PyTorch's default)
            also serves float16/bfloat16 inputs, as in mixed precision; float64 inputs
            switch the state to float64 because BatchNorm2d does not mix float64 input
            with float32 parameters.

    Example:
        >>> eng = BatchNormEngine(BatchNormConfig(3))
        >>> y = eng.apply(torch.randn(8, 3, 4, 4), mode="train")
        >>> int(eng.state_dict()["num_batches_tracked"])
        1
    """

    def __init__(self, config: BatchNormConfig, *, device: torch.device | str = "cpu",
                 param_dtype: torch.dtype = torch.float32) -> None:
        self.config = config
        self.device = torch.device(device)
        self.module = nn.BatchNorm2d(
            config.num_features, eps=config.eps, momentum=config.momentum,
            affine=config.affine, track_running_stats=config.track_running_stats,
            device=self.device, dtype=param_dtype,
        )
        # The dtype of weight/bias/running stats, which only _match_dtype changes: a cheap
        # check per apply() (reading it from the module costs a microsecond, 5% of a tiny call).
        self._state_dtype = param_dtype
        self._routes: dict[tuple, fastpath.Route | None] = {}  # see apply()
        self._cpu = self.device.type == "cpu"

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The module's state_dict, on the CPU, loadable by ``nn.BatchNorm2d.load_state_dict``."""
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def load_state(self, state: Mapping[str, torch.Tensor], *, source: str = "the state") -> list[str]:
        """Take weight / bias / running stats from ``state`` (keys without prefix).

        Only the keys this configuration uses are read; others are reported back.

        Returns:
            The keys of ``state`` that were ignored (e.g. weight with ``--no-affine``).

        Raises:
            StateError: A tensor has the wrong shape or is not a tensor.
        """
        own = self.module.state_dict()
        ignored = [k for k in state if k not in own]
        c = self.config.num_features
        # Check everything before copying anything: a bad running_var must not leave the
        # weight and bias of the same file already loaded.
        updates: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for key, target in own.items():
                if key not in state:
                    continue
                value = state[key]
                if not isinstance(value, torch.Tensor):
                    raise StateError(f"{source}: {key!r} is a {type(value).__name__}, not a tensor.",
                                     hint="Pass a state_dict saved with torch.save(module.state_dict()).")
                if key == "num_batches_tracked":
                    if value.numel() != 1:
                        raise StateError(f"{source}: num_batches_tracked has shape {tuple(value.shape)}, "
                                         "expected a scalar.", hint="Was this saved from a BatchNorm layer?")
                    if int(value.reshape(()).item()) < 0:
                        # With momentum=None the next step would divide by zero (1 / 0 batches).
                        raise StateError(f"{source}: num_batches_tracked is {int(value.reshape(()).item())}, "
                                         "but a count of batches cannot be negative.",
                                         hint="The file is corrupt or holds something else under that name.")
                    updates.append((target, value.reshape(())))
                    continue
                if tuple(value.shape) != (c,):
                    raise StateError(
                        f"{source}: {key!r} has shape {tuple(value.shape)}, but the input has "
                        f"{c} channels (expected shape ({c},)).",
                        hint="This layer does not belong to this data: pick the layer whose "
                             "num_features matches (--prefix), or check --layout.",
                    )
                if key == "running_var" and bool((value < 0).any()):
                    raise StateError(f"{source}: running_var has negative entries.",
                                     hint="A variance cannot be negative: the file is corrupt or "
                                          "holds something else under that name.")
                updates.append((target, value))
            for target, value in updates:
                target.copy_(value.to(device=target.device, dtype=target.dtype))
        return ignored

    def set_affine(self, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
        """Overwrite weight and/or bias (each shape (C,)).

        Raises:
            StateError: ``affine`` is off, or a shape does not fit.
        """
        for name, value in (("weight", weight), ("bias", bias)):
            if value is None:
                continue
            if not self.config.affine:
                raise StateError(f"--{name} was given, but affine is off (--no-affine).",
                                 hint=f"Drop --{name}, or use --affine.")
            self.load_state({name: value}, source=f"--{name}")

    # -- apply ---------------------------------------------------------------------------
    def _match_dtype(self, x: torch.Tensor) -> None:
        want = torch.float64 if x.dtype == torch.float64 else torch.float32
        if want != self._state_dtype:
            # Keep num_batches_tracked a long: Module.to(dtype) only casts floating tensors.
            # (A layer without weight or running stats has no floating state: a no-op.)
            self.module.to(dtype=want)
            self._state_dtype = want

    def apply(self, x: torch.Tensor, mode: str = "train", layout: str = "nchw") -> torch.Tensor:
        """Normalize ``x`` as ``nn.BatchNorm2d`` would, updating running stats in train mode.

        Args:
            x: A 4D floating tensor, NCHW (or NHWC with ``layout="nhwc"``), on any device.
            mode: ``"train"`` (batch statistics, running stats updated) or ``"eval"``.
            layout: ``"nchw"``, or ``"nhwc"`` for channels-last arrays (e.g. from NumPy/PIL);
                the output has the same layout as the input.

        Returns:
            The normalized tensor, same shape, dtype and layout, on the engine's device.

        Raises:
            ShapeError, DTypeError: ``x`` is not a valid input (see :func:`validate_input`).
        """
        # Validation and the choice of path depend only on the input's shape, strides and dtype
        # (and the thread count): remembered per engine, so a repeated call skips them. After a
        # large kernel has evicted the interpreter's caches, every Python step costs 2-4 us:
        # that was 5% of a 0.5 ms call (bncli bench, NHWC eval rows).
        key = (x.shape, x.stride(), x.dtype, mode, layout, torch.get_num_threads())
        try:
            route = self._routes[key]
        except KeyError:
            route = self._check_and_route(x, mode, layout)
            if len(self._routes) >= 64:
                self._routes.clear()
            self._routes[key] = route
        if not (x.is_cpu and self._cpu):
            x = x.to(self.device)
        self._match_dtype(x)
        if layout == "nhwc":
            # A permuted view is a channels_last NCHW tensor; no copy.
            x = x.permute(0, 3, 1, 2)
        # Per-call Python is what a small input pays for (bncli bench): skip what is a no-op.
        if self.module.training != (mode == "train"):
            self.module.train(mode == "train")
        if torch.is_grad_enabled():
            with torch.no_grad():
                y = self._forward(x, route)
        else:
            y = self._forward(x, route)
        if layout == "nhwc":
            y = y.permute(0, 2, 3, 1)
        return y

    def _check_and_route(self, x: torch.Tensor, mode: str, layout: str) -> fastpath.Route | None:
        """Validate an input of this kind (raising the engine's errors) and pick its path."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        running_stats = self.config.track_running_stats  # the module has running_mean iff so
        validate_input(tuple(x.shape), x.dtype, self.config.num_features, mode, layout,
                       running_stats=running_stats)
        if not self._cpu:
            return None  # the fast paths are CPU paths
        moved = x if x.is_cpu else x.to(self.device)  # .to() keeps the strides choose() reads
        # Where PyTorch's CPU kernels are slow, a fast path (bncli.fastpath) computes the
        # statistics itself and feeds the module's eval kernel; elsewhere the module runs.
        return fastpath.choose(moved.permute(0, 3, 1, 2) if layout == "nhwc" else moved,
                               batch_stats=mode == "train" or not running_stats)

    def _forward(self, x: torch.Tensor, route: fastpath.Route | None) -> torch.Tensor:
        return _module_forward(self.module, x) if route is None else fastpath.forward(self.module, x, route)

    # -- streaming: statistics computed elsewhere (exactly, in float64) ------------------
    def apply_with_stats(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                         layout: str = "nchw") -> torch.Tensor:
        """Normalize one chunk with given per-channel statistics (no state change).

        Used by the out-of-core path: pass 1 computes the exact batch ``mean`` and biased
        ``var`` of the whole file, pass 2 calls this on each chunk. The formula and the
        eps/affine handling are those of ``F.batch_norm``.
        """
        # Always validate: a channel mismatch would otherwise reach F.batch_norm's opaque
        # "running_mean should contain C elements" RuntimeError. Eval rules: the stats are given.
        validate_input(tuple(x.shape), x.dtype, self.config.num_features, "eval", layout)
        self._check_stats(mean, var)
        x = x.to(self.device)
        self._match_dtype(x)
        param = torch.float64 if x.dtype == torch.float64 else torch.float32
        if layout == "nhwc":
            x = x.permute(0, 3, 1, 2)
        with torch.no_grad():
            y = F.batch_norm(
                x, mean.to(self.device, param), var.to(self.device, param),
                self.module.weight, self.module.bias, training=False, eps=self.config.eps,
            )
        if layout == "nhwc":
            y = y.permute(0, 2, 3, 1)
        return y

    def _check_stats(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Per-channel statistics must have shape (C,): a (1,) or () tensor would silently
        broadcast into every channel."""
        c = self.config.num_features
        for name, stat in (("mean", mean), ("var", var)):
            if tuple(stat.shape) != (c,):
                raise StateError(f"The batch {name} has shape {tuple(stat.shape)}, but the layer has "
                                 f"num_features={c} (expected shape ({c},)).",
                                 hint="Pass per-channel statistics computed over (N, H, W).")

    def update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """Apply one train step's running-stat update for a batch of ``count`` values/channel.

        ``var`` is the biased batch variance; the running variance gets the unbiased
        one (``var * n / (n - 1)``), and the momentum rule (a float, or the cumulative
        average when ``momentum is None``) is the module's own.
        """
        m = self.module
        if not self.config.track_running_stats or m.running_mean is None or m.running_var is None:
            return
        if count < 2:
            raise ShapeError(TORCH_ONE_VALUE_ERROR.format(count),
                             hint="Use --mode eval, or more data per channel.")
        self._check_stats(mean, var)
        assert m.num_batches_tracked is not None
        with torch.no_grad():
            m.num_batches_tracked.add_(1)
            factor = (1.0 / float(m.num_batches_tracked.item()) if self.config.momentum is None
                      else self.config.momentum)
            dtype = m.running_mean.dtype
            unbiased = var.to(torch.float64) * (count / (count - 1))
            m.running_mean.mul_(1 - factor).add_(mean.to(m.running_mean.device, dtype), alpha=factor)
            m.running_var.mul_(1 - factor).add_(unbiased.to(m.running_var.device, dtype), alpha=factor)
