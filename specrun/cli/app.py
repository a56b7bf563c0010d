"""The Typer application every command module registers with."""

from __future__ import annotations

import sys
from typing import Any

import typer
from typer.core import TyperGroup

from specrun import __version__
from specrun.cli.console import usage_errors, writing_stdout


class SpecrunGroup(TyperGroup):
    """The command group, with Click's usage errors in specrun's style: a bad value for any
    option of any command is one `error:` line and a hint, exit 2, not a usage block; and
    stdout flushed before exit, so a full disk is one line too."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        with usage_errors():  # `specrun --bogus`
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        try:
            with usage_errors():  # the command's own options and arguments, an unknown command
                return super().invoke(ctx)
        finally:
            with writing_stdout():
                sys.stdout.flush()


app = typer.Typer(
    name="specrun",
    cls=SpecrunGroup,
    help="Fast local LLM inference through speculative decoding.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        print(f"specrun {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Fast local LLM inference through speculative decoding."""
