"""The `specrun` command line: Typer commands, Rich output on stderr.

Unix manners: stdout carries only what the command produces (model text for
`run`, the table for `list`); progress, stats, warnings and errors go to
stderr. User mistakes end in one line plus a hint and a non-zero exit.

One module per command family: `models` (pull, list, rm, add, and resolving
which files a command uses), `run`, `chat` (the REPL), `bench`, `inspect`
(calibrate, info); `console` prints, `options` holds the shared options.
"""

from __future__ import annotations

from specrun.cli import bench, chat, inspect, models, run, serve, worker  # noqa: F401 - each registers its commands
from specrun.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
