"""At COLUMNS=80 every line of every command's --help and output fits, and help has no type noise.

(``--json`` output is for programs, one document whose strings are not wrapped.)
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from bncli.cli import app

SAMPLES = Path(__file__).resolve().parent.parent / "sample_data"
COMMANDS = sorted(get_command(app).commands)  # type: ignore[attr-defined]
# Labels typer's rich help used to show for every parameter, e.g. <bool>, <list[Path]>, <path>.
TYPE_NOISE = re.compile(r"<(bool|path|str|int|float|list\[[^\]]*\]|int range|float range)>", re.IGNORECASE)


@pytest.fixture
def narrow(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("NO_COLOR", "1")
    return CliRunner(env={"COLUMNS": "80", "NO_COLOR": "1", "TERM": "dumb"})


def assert_fits(text: str, width: int = 80) -> None:
    for line in text.splitlines():
        assert len(line) <= width, f"{len(line)} columns: {line!r}"
        assert "…" not in line, f"truncated: {line!r}"


@pytest.mark.parametrize("args", [["--help"], *([c, "--help"] for c in COMMANDS)])
def test_help_fits_80_columns_without_type_noise(narrow: CliRunner, args: list[str]) -> None:
    result = narrow.invoke(app, args)
    assert result.exit_code == 0
    assert_fits(result.output)
    assert not TYPE_NOISE.search(result.output), TYPE_NOISE.search(result.output)


def test_help_shows_metavars_and_groups(narrow: CliRunner) -> None:
    text = narrow.invoke(app, ["normalize", "--help"]).output
    assert "-o, --output FILE" in text and "--mode train|eval" in text and "--chunk-size SIZE" in text
    assert "BatchNorm2d layer (same names as the module's arguments):" in text
    assert "--track-running-stats / --no-track-running-stats" in text
    # Prose paragraphs are reflowed, not broken at the docstring's own line ends ("formats),").
    stats = narrow.invoke(app, ["stats", "--help"]).output
    assert "formats),\n" not in stats and "formats), with float64" in stats
    top = narrow.invoke(app, ["--help"]).output
    assert "--install-completion" in top and "--show-completion" in top
    assert "70 internal error" in " ".join(top.split())


def test_reflow_joins_prose_and_keeps_examples() -> None:
    from bncli.commands.helpfmt import reflow

    doc = """First line.

    A paragraph written
    on two lines.

    Examples:

        bncli stats a.npy
        bncli stats b.npy
    """
    assert reflow(doc) == ("First line.\n\nA paragraph written on two lines.\n\nExamples:\n\n"
                           "\b\n    bncli stats a.npy\n    bncli stats b.npy")


@pytest.fixture
def samples(tmp_path: Path) -> Path:
    dest = tmp_path / "samples"
    shutil.copytree(SAMPLES, dest, ignore=shutil.ignore_patterns("*.bn.*", "__pycache__"))
    return dest


OUTPUTS = [
    ["check-shape", "{s}/batch.npy", "{s}/image.npy", "{s}/batch_nhwc.npy", "{s}/batch_uint8.npy"],
    ["normalize", "{s}/batch.npy", "-o", "{s}/a.npy"],
    ["normalize", "{s}/batch.npy", "--mode", "eval", "--state", "{s}/model.pt", "--prefix", "input_bn",
     "-o", "{s}/b.npy", "--save-state", "{s}/c.pt"],
    ["normalize", "{s}/batch.npy", "--out-of-core", "-o", "{s}/d.npy"],
    ["normalize", "{s}/image.npy"],
    ["normalize", "{s}/batch.npy", "--state", "{s}/model.pt", "--prefix", "bn1"],
    ["compare", "{s}/batch.npy", "--state", "{s}/model.pt", "--prefix", "input_bn"],
    ["stats", "{s}/batch.npy", "{s}/batch.safetensors", "{s}/dataset.npz", "--key", "images"],
    ["stats", "{s}/batch_uint8.npy"],
    ["stats", "{s}/batch_uint8.npy", "--scale", "255", "--save-state", "{s}/e.pt"],
    ["stats", "{s}/batch_nhwc.npy", "{s}/batch.npy"],
    ["stats", "{s}/batch.npy", "--chunk-size", "999999999999"],
    ["normalize", "{s}/batch.npy", "--weight", "nan,1,1"],
    ["normalize", "{s}/batch.npy", "{s}/image.npy", "{s}/dataset.npz", "{s}/batch.safetensors", "--key", "images",
     "--output-dir", "{s}/out1", "--save-state", "{s}/f.pt"],
    ["normalize", "{s}/batch.npy", "{s}/dataset.npz", "{s}/batch.safetensors", "--key", "images",
     "--dataset-stats", "--output-dir", "{s}/out2"],
    ["normalize", "{s}/dataset.npz", "--key", "images", "-o", "{s}/g.npy"],
    ["compare", "{s}/batch.npy", "{s}/image.npy", "{s}/dataset.npz", "--key", "images"],
]


@pytest.mark.parametrize("args", OUTPUTS, ids=lambda a: " ".join(a[:3]).replace("{s}/", ""))
def test_output_fits_80_columns(narrow: CliRunner, samples: Path, args: list[str]) -> None:
    """Relative paths as in the README tour, so a line's length does not depend on tmp_path."""
    import os

    cwd = Path.cwd()
    os.chdir(samples.parent)
    try:
        result = narrow.invoke(app, [a.format(s="samples") for a in args])
    finally:
        os.chdir(cwd)
    assert result.exit_code in (0, 1, 2)
    assert_fits(result.output)
