"""bncli: apply torch.nn.BatchNorm2d to tensors on disk, and explain what goes wrong around it."""

__version__ = "0.1.0"
