"""Every command has help text and a section in the README (sqlite-utils' test_docs idea)."""

from __future__ import annotations

import re
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
