"""Options shared by the commands on whole exported models (``.pt2``): no torch here."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

MODEL_PANEL = "Whole model (.pt2)"
# readable=False: bncli.io reports an unreadable file itself (exit 1 with a fix), not typer (exit 2).

ModelArg = Annotated[Path, typer.Argument(
    help="A model saved with torch.export.save (.pt2), read without running its code.",
    show_default=False, metavar="MODEL", readable=False)]
DataArgs = Annotated[list[Path], typer.Argument(
    help="Model inputs (.npy .npz .pt .safetensors), samples along axis 0; several files "
         "are read in a row.", show_default=False, metavar="DATA", readable=False)]
DataOpt = Annotated[list[Path] | None, typer.Option(
    "--data", metavar="FILE", show_default=False, rich_help_panel=MODEL_PANEL, readable=False,
    help="With a .pt2 INPUT: model inputs to run (.npy .npz .pt .safetensors), samples along "
         "axis 0; repeat for several files.")]
BatchSizeOpt = Annotated[int | None, typer.Option(
    "--batch-size", "-b", min=1, show_default="the export's static batch, else 32",
    rich_help_panel=MODEL_PANEL,
    help="Samples per model call; must fit the exported batch axis (a static export takes only its size).")]
DropLastOpt = Annotated[bool, typer.Option(
    "--drop-last", rich_help_panel=MODEL_PANEL,
    help="Skip a last batch shorter than --batch-size (needed when the export's batch is static).")]


class VarMode(str, Enum):
    """batchmean: mean of per-batch unbiased variances (update_bn, precise_bn); population: exact."""

    batchmean = "batchmean"
    population = "population"


def default_model_output(model: Path, tag: str) -> Path:
    """``model.pt2`` -> ``model.<tag>.pt2`` beside it."""
    return model.with_name(f"{model.stem}.{tag}.pt2")
