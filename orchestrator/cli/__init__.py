"""The ``kvorch`` command group; one module per command.

Command modules are imported when their command runs, so ``kvorch report`` does not pay for
importing torch, transformers and Ray (seconds) that only ``kvorch submit`` needs.
"""

from __future__ import annotations

import importlib

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
        return importlib.import_module(COMMANDS[name]).command

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except KvorchError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=KvorchGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def main() -> None:
    """Measure what KV-cache compression costs: submit jobs, query the result lake."""
