"""Issue 38's bounds on options: every float option finite (one rule, applied to every command),
resources bounded before any work starts."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from orchestrator.cli import COMMANDS, main


def float_options() -> list[tuple[str, click.Option]]:
    """(command path, option) of every float option of every kvorch command and subcommand."""
    found = []

    def walk(path: str, command: click.Command) -> None:
        found.extend((path, p) for p in command.params if isinstance(p.type, click.types.FloatParamType))
        for name, sub in getattr(command, "commands", {}).items():
            walk(f"{path} {name}", sub)

    ctx = click.Context(main)
    for name in COMMANDS:
        walk(name, main.get_command(ctx, name))
    return found


def test_every_float_option_is_found():
    names = {p.opts[0] for _, p in float_options()}
    assert {"--timeout", "--actor-timeout", "--connect-timeout"} <= names, names


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity"])
def test_every_float_option_refuses_nan_and_infinities(value):
    for path, option in float_options():
        with pytest.raises(click.BadParameter, match="not a finite number"):
            option.type.convert(value, option, None)
        assert option.type.convert("2.5", option, None) == 2.5, path


@pytest.mark.parametrize(
    "args",
    [
        ["submit", "--actor-timeout", "nan"],
        ["submit", "--connect-timeout", "inf"],
        ["sql", "--timeout", "nan", "SELECT 1"],
    ],
)
def test_a_float_option_at_nan_or_inf_is_one_usage_line(args, tmp_path):
    result = CliRunner().invoke(main, [*args[:1], "--lake", str(tmp_path / "lake"), *args[1:]])
    assert result.exit_code == 2 and "is not a finite number" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "lake").exists()
