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


def test_samples_beyond_the_stated_ceiling_are_one_line_before_any_probe_is_built(tmp_path):
    """Issue 38, 8: --samples 100000000 grew memory silently."""
    result = CliRunner().invoke(main, ["submit", "--task", "needle", "--samples", "100000000", "--lake", str(tmp_path)])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "makes 1500000000 probes" in result.output and "at most 100000 probes" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("below", ["", "sub/dir"])
def test_a_compile_cache_that_cannot_be_a_directory_is_one_line_before_the_model_loads(tmp_path, below):
    """Issue 38, 17: a --compile-cache that is a file failed in the workers, hinting --model/--device."""
    (tmp_path / "cache").write_text("a file")
    cache = str(tmp_path / "cache" / below) if below else str(tmp_path / "cache")
    result = CliRunner().invoke(main, ["submit", "--compile-cache", cache, "--lake", str(tmp_path / "lake")])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert f"--compile-cache {cache}: {tmp_path / 'cache'} is a file, not a directory" in result.output
    assert not (tmp_path / "lake").exists()


def test_a_sql_result_larger_than_the_memory_limit_is_one_line_and_not_printed(tmp_path):
    """Issue 38, 10: SELECT repeat('x', 400000000) under --memory-limit 200MB was fetched and printed
    (2.9 GB): DuckDB's limit bounds what it holds, not the result handed to Python."""
    from orchestrator.lake.store import Lake

    lake = Lake(str(tmp_path / "lake"))
    lake.write_spec("r1", {"model": "m"})

    def sql(query: str):
        return CliRunner().invoke(main, ["sql", "--lake", lake.uri, "--memory-limit", "10MB", query])

    big = sql("SELECT repeat('x', 20000000)")
    assert big.exit_code == 1 and big.output.count("\n") == 1 and len(big.output) < 300, big.output[:300]
    assert "larger than --memory-limit 10MB" in big.output
    many = sql("SELECT range AS i, repeat('y', 100) AS s FROM range(200000)")  # 20 MB in many small rows
    assert "larger than --memory-limit 10MB" in many.output
    small = sql("SELECT 41 + 1 AS answer")
    assert small.exit_code == 0 and small.output.split() == ["answer", "------", "42"], small.output
    import kvorch
    from orchestrator.errors import KvorchError

    with kvorch.open_lake(lake.uri) as nb:  # the notebook API fetches through the same bound
        with pytest.raises(KvorchError, match="larger than memory_limit= 10MB"):
            nb.sql("SELECT repeat('x', 20000000)", memory_limit="10MB")
        assert nb.sql("SELECT sum(range) AS n FROM range(10)", memory_limit="10MB").to_pylist() == [{"n": 45}]
