"""Regenerate the sample files: ``python sample_data/make_samples.py``.

Each file exercises one command or one pitfall; all are small and deterministic.

- batch.npy          (16, 3, 32, 32) float32, channels with different means/scales: valid
- batch.safetensors  the same batch as safetensors (key "images")
- batch_nhwc.npy     (16, 32, 32, 3) float32: channels-last, needs --layout nhwc
- image.npy          (3, 32, 32) float32: one image, missing its batch dimension
- batch_uint8.npy    (16, 3, 32, 32) uint8: raw pixels, must be converted to float
- dataset.npz        "images" (16, 3, 32, 32) float32 and "labels" (16,) int64: needs --key
- model.pt           state_dict of a small CNN with 4 BatchNorm2d layers, trained a few steps
                     so its running statistics are real (input_bn, stem.bn, layer1.0.bn1, layer1.0.bn2)
- broken.ckpt        a Lightning-style checkpoint ({"state_dict": {"model.<key>": ...}, "epoch": ...})
                     of another CNN whose BatchNorm layers have the defects bncli inspect finds:
                     input_bn channel 2 running_var 1e-12 (var_below_eps), features.4 channels 5
                     and 6 pruned to weight 0 (dead_channel), features.7 never updated; features.1
                     is healthy
- model.pt2          the same model exported with torch.export (eval mode, dynamic batch axis),
                     for compare/recalibrate/fold; 20 steps with momentum 0.1 leave its running
                     stats partly at their initial values (0.9**20 = 12%): stale, as after SWA
- shards/            shard_0.npy .. shard_11.npy, (4, 32, 32, 3) uint8 each: a data set stored
                     as NHWC pixel shards (needs --layout nhwc --scale 255; natural order)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

HERE = Path(__file__).resolve().parent


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_bn = nn.BatchNorm2d(3)
        self.stem = nn.Sequential()
        self.stem.add_module("conv", nn.Conv2d(3, 8, 3, padding=1, bias=False))
        self.stem.add_module("bn", nn.BatchNorm2d(8))
        self.layer1 = nn.ModuleList([Block(8)])
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(self.input_bn(x)))
        for block in self.layer1:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_bn = nn.BatchNorm2d(3)
        layers: list[nn.Module] = []
        for c_in in (3, 8, 8):
            layers += [nn.Conv2d(c_in, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.input_bn(x)).mean(dim=(2, 3)))


def make_broken_checkpoint(path: Path) -> None:
    """Calibrate SmallCNN's running stats for 100 steps, then plant the defects listed above."""
    rng = np.random.default_rng(7)
    torch.manual_seed(1)
    model = SmallCNN()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.8, 1.2)
                m.bias.normal_(0, 0.1)
        model.train()
        for _ in range(100):
            model(torch.from_numpy(make_batch(rng, 16)))
        model.input_bn.running_var[2] = 1e-12
        model.features[4].weight[5:7] = 0.0
        model.features[7].reset_running_stats()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 4, "global_step": 400, "pytorch-lightning_version": "2.4.0",
                "hyper_parameters": {"lr": 0.05, "batch_size": 16}, "state_dict": state}, path)


def make_batch(rng: np.random.Generator, n: int = 16) -> np.ndarray:
    # Like normalized-then-shifted camera data: channel means 0.48/0.46/0.41, stds 0.23/0.22/0.25.
    mean = np.array([0.485, 0.456, 0.406])[None, :, None, None]
    std = np.array([0.229, 0.224, 0.225])[None, :, None, None]
    return (rng.normal(size=(n, 3, 32, 32)) * std + mean).astype(np.float32)


def main() -> None:
    rng = np.random.default_rng(2026)
    batch = make_batch(rng)
    np.save(HERE / "batch.npy", batch)
    save_file({"images": torch.from_numpy(batch)}, str(HERE / "batch.safetensors"))
    np.save(HERE / "batch_nhwc.npy", np.ascontiguousarray(batch.transpose(0, 2, 3, 1)))
    np.save(HERE / "image.npy", batch[0])
    np.save(HERE / "batch_uint8.npy", np.clip(batch * 255, 0, 255).astype(np.uint8))
    np.savez(HERE / "dataset.npz", images=batch, labels=rng.integers(0, 10, size=16))

    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(20):
        x = torch.from_numpy(make_batch(rng, 32))
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 10, (32,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), HERE / "model.pt")
    make_broken_checkpoint(HERE / "broken.ckpt")
    export_model(model.eval(), HERE / "model.pt2")

    # Own generator: adding files must not change the ones above.
    shard_rng = np.random.default_rng(10)
    (HERE / "shards").mkdir(exist_ok=True)
    for i in range(12):
        pixels = np.clip(np.rint(make_batch(shard_rng, 4) * 255), 0, 255).astype(np.uint8)
        np.save(HERE / "shards" / f"shard_{i}.npy", np.ascontiguousarray(pixels.transpose(0, 2, 3, 1)))


def export_model(model: nn.Module, path: Path) -> None:
    example = torch.zeros(2, 3, 32, 32)
    ep = torch.export.export(model, (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1024)}})
    ep._example_inputs = None  # keeps the file small; bncli never reads sample inputs anyway
    torch.export.save(ep, path)


if __name__ == "__main__":
    main()
