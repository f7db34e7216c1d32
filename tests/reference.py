"""An independent float64 NumPy reference for ``torch.nn.BatchNorm2d`` (no torch here).

Written from the documented formula, not from PyTorch's code::

    y = (x - mean) / sqrt(var + eps) * weight + bias

* train mode (and eval mode without running stats): ``mean`` / ``var`` are the batch
  statistics per channel over (N, H, W), ``var`` biased (divided by ``n = N*H*W``);
* eval mode with running stats: ``mean`` / ``var`` are ``running_mean`` / ``running_var``;
* a train step with running stats first adds 1 to ``num_batches_tracked``, then blends with
  ``factor = momentum`` (or ``1 / num_batches_tracked`` when ``momentum is None``)::

      running_mean = (1 - factor) * running_mean + factor * mean
      running_var  = (1 - factor) * running_var  + factor * var * n / (n - 1)   # unbiased

Everything is computed in float64 on NCHW arrays; the two-pass variance keeps the
reference accurate for inputs with a large mean offset.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

AXES = (0, 2, 3)


def batch_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance of an NCHW array, in float64 (two passes)."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=AXES)
    centered = x - mean[None, :, None, None]
    var = (centered * centered).mean(axis=AXES)
    return mean, var


def normalize(x: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float,
              weight: np.ndarray | None = None, bias: np.ndarray | None = None) -> np.ndarray:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` per channel of an NCHW array, float64."""
    x = np.asarray(x, dtype=np.float64)

    def per_channel(v: np.ndarray) -> np.ndarray:
        return np.asarray(v, dtype=np.float64)[None, :, None, None]

    y = (x - per_channel(mean)) / np.sqrt(per_channel(var) + eps)
    if weight is not None:
        y = y * per_channel(weight)
    if bias is not None:
        y = y + per_channel(bias)
    return y


class ReferenceBatchNorm2d:
    """BatchNorm2d forward and running-stat update in float64, with explicit state.

    Args:
        num_features: C.
        eps, momentum, affine, track_running_stats: As for ``nn.BatchNorm2d``.
        state: Optional initial ``weight`` / ``bias`` / ``running_mean`` / ``running_var`` /
            ``num_batches_tracked`` (array-likes; anything with ``__array__`` works).
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 state: Mapping[str, object] | None = None) -> None:
        c = num_features
        self.eps = float(eps)
        self.momentum = momentum
        self.weight = np.ones(c) if affine else None
        self.bias = np.zeros(c) if affine else None
        self.running_mean = np.zeros(c) if track_running_stats else None
        self.running_var = np.ones(c) if track_running_stats else None
        self.num_batches_tracked = 0 if track_running_stats else None
        for key, value in (state or {}).items():
            if key == "num_batches_tracked":
                if track_running_stats:
                    self.num_batches_tracked = int(np.asarray(value))
            elif getattr(self, key) is not None:
                setattr(self, key, np.array(value, dtype=np.float64).reshape(c))

    @property
    def tracks(self) -> bool:
        return self.running_mean is not None

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        """Normalize an NCHW array; in training mode update the running stats first."""
        x = np.asarray(x, dtype=np.float64)
        if training or not self.tracks:
            mean, var = batch_moments(x)
            if training and self.tracks:
                self.update(mean, var, x.size // x.shape[1])
        else:
            mean, var = self.running_mean, self.running_var
        return normalize(x, mean, var, self.eps, self.weight, self.bias)

    def update(self, mean: np.ndarray, var: np.ndarray, count: int) -> None:
        """One running-stat update from a batch's mean and *biased* var over ``count`` values."""
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked += 1
        factor = 1.0 / self.num_batches_tracked if self.momentum is None else float(self.momentum)
        unbiased = np.asarray(var, dtype=np.float64) * count / (count - 1)
        self.running_mean = (1.0 - factor) * self.running_mean + factor * np.asarray(mean, np.float64)
        self.running_var = (1.0 - factor) * self.running_var + factor * unbiased

    def state(self) -> dict[str, np.ndarray | int]:
        """The non-None state, under ``nn.BatchNorm2d`` state_dict names."""
        out: dict[str, np.ndarray | int] = {}
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out
