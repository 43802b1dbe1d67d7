"""``kvorch --help`` and every command's ``--help`` import neither torch nor transformers (nor
Ray): they start in a fraction of a second instead of 7 s. Checked on the modules a fresh process
has imported, not on the wall time. The light copies of defaults that make this possible are
held equal to their owners here."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from orchestrator.cli import COMMANDS, main, summary

HEAVY = ("torch", "transformers", "ray")


def help_paths() -> list[list[str]]:
    """``[]`` (kvorch itself), every command, and every subcommand of a group."""
    paths: list[list[str]] = [[]]
    for name in COMMANDS:
        paths.append([name])
        command = main.get_command(click.Context(main), name)
        if isinstance(command, click.Group):
            paths.extend([name, sub] for sub in command.list_commands(click.Context(command)))
    return paths


def imported_by_help(path: list[str]) -> list[str]:
    code = (
        "import json, sys\n"
        "from orchestrator.cli import main\n"
        "try:\n"
        f"    main({[*path, '--help']!r}, prog_name='kvorch')\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("path", help_paths(), ids=lambda p: " ".join(["kvorch", *p]))
def test_help_imports_neither_torch_nor_transformers(path):
    assert imported_by_help(path) == []


def test_a_heavy_import_would_be_seen():
    """The check above sees what a command's body imports when it runs (here: sql imports duckdb
    only, and submit's body imports torch)."""
    code = "import sys; import orchestrator.sweep.submission; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "True"


def test_kvorch_help_shows_every_summary_whole():
    """Each command's summary is its docstring's first paragraph, not cut with "..."."""
    result = CliRunner().invoke(main, ["--help"], terminal_width=100)
    assert result.exit_code == 0
    commands = result.output.split("Commands:")[1]
    assert "..." not in commands
    flat = " ".join(commands.split())
    for name in COMMANDS:
        command = main.get_command(click.Context(main), name)
        first = " ".join(command.help.split("\n\n")[0].split())
        assert summary(name) == first
        assert f"{name} {first}" in flat


def test_light_defaults_equal_their_owners():
    from orchestrator.heads.settings import PROBE_DEFAULTS, AnalysisSpec
    from workers.studies.head_stats import HeadStatsProbe

    probe = HeadStatsProbe()
    assert PROBE_DEFAULTS == {"n_sink": probe.n_sink, "recent": probe.recent, "min_position": probe.min_position}
    assert AnalysisSpec("m", "c").probe == probe
