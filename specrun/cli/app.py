"""The Typer application every command module registers with."""

from __future__ import annotations

import typer

from specrun import __version__

app = typer.Typer(
    name="specrun",
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
