"""Every command has help text and a section in the README (sqlite-utils' test_docs idea)."""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer
from typer.main import get_command

from bncli.cli import app

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
CLICK_APP = get_command(app)
COMMANDS = sorted(CLICK_APP.commands)  # type: ignore[attr-defined]


def test_there_are_commands() -> None:
    assert {"normalize", "check-shape", "compare"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_command_has_help_and_readme_section(name: str) -> None:
    command = CLICK_APP.commands[name]  # type: ignore[attr-defined]
    assert command.help and len(command.help) > 40
    for param in command.params:
        if param.param_type_name == "option" and param.name != "help":
            assert param.help, f"{name} {param.opts} has no help"
    assert re.search(rf"^###? .*`bncli {re.escape(name)}", README, re.MULTILINE), f"README lacks {name}"


def test_readme_states_exit_codes_and_commands() -> None:
    assert "Exit codes" in README
    assert "pip install" in README and "constraints.txt" in README


def test_ci_runs_the_readme_test_command() -> None:
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text(encoding="utf-8")
    test_line = next(line for line in ci.splitlines() if "pytest" in line and not line.startswith("#"))
    assert test_line.strip() in README


def test_typer_app_is_importable() -> None:
    assert isinstance(app, typer.Typer)


# -- the README tour runs, in order, as written ---------------------------------------------
# (issue 11, defect 9). Each ```console block is a list of `$ bncli ...` lines, each followed by
# the output it prints. They run in order, in one temp folder holding a copy of sample_data/
# (as a fresh clone would), in-process at COLUMNS=80. An example expects exit 1 when its output
# shows an `Error:` line, or the code a following `$ echo $?` prints; 0 otherwise. Outputs are
# compared line by line (trailing spaces ignored; numbers in scientific notation, which are
# rounding noise such as a mean of 8.90e-08 after normalization, compared by form only; a
# line `...` stands for any lines), so the README can only show what the commands print.
SAMPLES = Path(__file__).resolve().parent.parent / "sample_data"
TOUR_COLUMNS = "80"
NOISE = re.compile(r"-?\d\.\d+e[-+]\d\d")
_TENSOR = (".npy", ".npz", ".pt", ".pth", ".ckpt", ".safetensors", ".pt2")
_SHELL = {"|", ">", "2>", ";", "&&", "||", "<"}
_OUTPUT_FLAGS = {"-o", "--output", "--save-state"}
_PATTERN_FLAGS = {"--glob"}  # a file-name pattern, not a file the example needs


@dataclass
class Example:
    command: str
    output: list[str] = field(default_factory=list)
    exit_code: int | None = None


def tour() -> list[Example]:
    examples: list[Example] = []
    for block in re.findall(r"^```console\n(.*?)^```", README, re.MULTILINE | re.DOTALL):
        for line in block.splitlines():
            if line.startswith("$ echo $?"):
                examples[-1].exit_code = -1  # the next output line is the code
            elif line.startswith("$ "):
                examples.append(Example(line[2:]))
            elif examples and examples[-1].exit_code == -1:
                examples[-1].exit_code = int(line)
            elif examples:
                examples[-1].output.append(line)
    return examples


def skip_reason(example: Example, cwd: Path) -> str | None:
    args = shlex.split(example.command, comments=True)
    if args[:1] != ["bncli"]:
        return "not a bncli command"
    if _SHELL & set(shlex.split(example.command.replace(";", " ; "), comments=True)):
        return "uses the shell (a pipe, a redirection or a second command)"
    if args[1:2] == ["bench"]:
        return "bench prints timings of this machine; tests/test_bench.py runs it"
    for flag, arg in zip(["", *args], args, strict=False):
        if arg.endswith(_TENSOR) and flag not in _OUTPUT_FLAGS | _PATTERN_FLAGS and not (cwd / arg).exists():
            return f"needs {arg}, which is not in sample_data/ (the text says how it was made)"
    return None


def same_lines(expected: list[str], got: list[str]) -> bool:
    """``expected`` matches ``got`` line by line; a ``...`` line matches any run of lines."""
    if not expected:
        return not got
    if expected[0].strip() == "...":
        return any(same_lines(expected[1:], got[i:]) for i in range(len(got) + 1))
    return bool(got) and NOISE.sub("N", expected[0].rstrip()) == NOISE.sub("N", got[0].rstrip()) \
        and same_lines(expected[1:], got[1:])


def test_readme_tour_runs_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    shutil.copytree(SAMPLES, tmp_path / "sample_data", ignore=shutil.ignore_patterns("*.bn.*", "__pycache__"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", TOUR_COLUMNS)
    runner = CliRunner(env={"COLUMNS": TOUR_COLUMNS, "NO_COLOR": "1", "TERM": "dumb"})
    examples = tour()
    ran, skipped = [], []
    for example in examples:
        reason = skip_reason(example, tmp_path)
        if reason:
            skipped.append((example.command, reason))
            continue
        args = shlex.split(example.command, comments=True)[1:]
        result = runner.invoke(app, args)
        expected_code = example.exit_code if example.exit_code is not None else \
            int(any(line.startswith("Error:") for line in example.output))
        shown = (result.stdout + result.stderr).splitlines()
        assert result.exit_code == expected_code, f"$ {example.command}\n{result.output}"
        assert same_lines(example.output, shown), (f"$ {example.command}: the README shows\n"
                                                   + "\n".join(example.output) + "\n\nbut it prints\n"
                                                   + "\n".join(shown))
        ran.append(example.command)
    assert len(ran) >= 10, (ran, skipped)
    # The tour writes only into the folder it runs in (never into the repo).
    assert not list(SAMPLES.glob("*.bn.*"))


def test_readme_tour_parser(tmp_path: Path) -> None:
    examples = tour()
    # A --glob pattern ending in a tensor suffix is no file the example needs: it runs.
    assert skip_reason(Example('bncli stats folder --glob "*.pt"'), tmp_path) is None
    assert skip_reason(Example("bncli stats missing.pt"), tmp_path) is not None
    first = examples[0]
    assert first.command.startswith("bncli check-shape") and first.exit_code == 1
    assert same_lines(["a", "...", "d 1.0e-07"], ["a", "b", "c", "d 2.5e-08"])
    assert not same_lines(["a", "b"], ["a", "c"])
