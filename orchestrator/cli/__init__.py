"""The ``kvorch`` command group; one module per command.

Command modules are imported when their command runs, and import torch, transformers and Ray
only inside the command's body, so ``kvorch --help`` and every command's ``--help`` start in a
fraction of a second (``tests/test_fast_help.py`` checks what they import). ``kvorch --help``
imports no command module at all: each summary is read from its module's source.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect

import click

from orchestrator.errors import KvorchError

# Command name -> the module that defines it as ``command``.
COMMANDS = {
    "submit": "orchestrator.cli.submit",
    "report": "orchestrator.cli.report",
    "runs": "orchestrator.cli.runs",
    "sql": "orchestrator.cli.sql",
    "scores": "orchestrator.cli.scores",
    "status": "orchestrator.cli.status",
    "kvzap": "orchestrator.cli.kvzap",
    "heads": "orchestrator.cli.heads",
}


class KvorchGroup(click.Group):
    """Loads commands lazily; turns a :class:`KvorchError` below into a one-line ``Error: ...``, exit 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        from orchestrator.cli.options import finite_floats  # every float option finite, here once

        return finite_floats(importlib.import_module(COMMANDS[name]).command)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Every command with its whole summary (the first paragraph of its docstring), wrapped
        rather than cut at "...", and without importing the command modules."""
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary(name)) for name in COMMANDS])

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except KvorchError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=KvorchGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def main() -> None:
    """Measure what KV-cache compression costs: submit jobs, query the result lake."""


def summary(name: str) -> str:
    """The first paragraph of command ``name``'s docstring, read from its module's source."""
    spec = importlib.util.find_spec(COMMANDS[name])
    source = spec.loader.get_source(spec.name) if spec and spec.loader else None
    for node in ast.parse(source or "").body:
        if isinstance(node, ast.FunctionDef) and node.name == "command":
            doc = inspect.cleandoc(ast.get_docstring(node) or "")
            return " ".join(doc.split("\n\n")[0].split())
    return ""
