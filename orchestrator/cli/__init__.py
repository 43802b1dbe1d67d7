"""The ``kvorch`` command group; one module per command."""

from __future__ import annotations

import click

from orchestrator.errors import KvorchError


class KvorchGroup(click.Group):
    """Turns a :class:`KvorchError` anywhere below into a one-line ``Error: ...`` and exit 1."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except KvorchError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=KvorchGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def main() -> None:
    """Measure what KV-cache compression costs: submit jobs, query the result lake."""


def _register() -> None:
    from orchestrator.cli import kvzap, report, scores, sql, submit

    for module in (submit, report, sql, scores, kvzap):
        main.add_command(module.command)


_register()
