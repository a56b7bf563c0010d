"""Everything the commands print, once each: errors, notices, stats lines, tables, streamed text.

stdout carries only a command's product; everything else goes to stderr
through `err`, which Rich keeps plain (no colour, no animation) when stderr
is not a terminal or NO_COLOR is set.
"""

from __future__ import annotations

import functools
import io
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from specrun.errors import SpecrunError, UsageError
from specrun.generate import GenerationStats, Step

err = Console(stderr=True, highlight=False, soft_wrap=True)  # one-line messages stay one line in pipes

F = TypeVar("F", bound=Callable[..., Any])

EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # what a shell reports for a process killed by SIGPIPE


def print_error(e: SpecrunError) -> None:
    """One line saying what went wrong, and one dim line saying what to do about it."""
    err.print(f"[bold red]error:[/] {escape(e.message)}")
    if e.hint:
        err.print(f"[dim]hint: {escape(e.hint)}[/]")


def usage_error(e: Exception) -> UsageError:
    """Click's complaint about the command line (a bad option value, a missing argument, an
    unknown option or command) in specrun's words, without the usage block."""
    param = getattr(e, "param", None)
    opts = [o for o in getattr(param, "opts", []) if o.startswith("--")] or getattr(param, "opts", [])
    message = str(getattr(e, "message", "") or e).strip().rstrip(".")
    if param is not None and opts and message and type(e).__name__ != "MissingParameter":
        message = f"invalid value for {opts[0]}: {message.replace('Input should be', 'it must be')}"
    else:
        message = e.format_message().strip().rstrip(".")  # type: ignore[attr-defined]
    ctx = getattr(e, "ctx", None)
    where = f"{ctx.command_path} --help" if ctx is not None else "specrun --help"
    return UsageError(message[:1].lower() + message[1:], hint=f"`{where}` lists the options and what they take")


@contextmanager
def usage_errors() -> Iterator[None]:
    """Turn Click's usage errors into one `error:` line and a hint, exit 2; help asked for by
    giving no arguments stays help."""
    try:
        yield
    except Exception as e:
        click_usage = not isinstance(e, SpecrunError) and any(c.__name__ == "UsageError" for c in type(e).__mro__)
        if not click_usage or type(e).__name__ == "NoArgsIsHelpError":  # (Typer vendors Click's classes)
            raise
        print_error(usage_error(e))
        raise typer.Exit(UsageError.exit_code) from None


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null, so Python's own flush at exit has nowhere to fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor (a test's captured stdout)
        pass


@contextmanager
def writing_stdout() -> Iterator[None]:
    """Writes to stdout: a closed pipe (the reader, e.g. `head`, is gone) ends quietly; any
    other failure (a full disk) is one line and exit 1, as `cat` does."""
    try:
        yield
    except BrokenPipeError:
        _stdout_to_devnull()
        raise typer.Exit(EXIT_BROKEN_PIPE) from None
    except OSError as e:
        _stdout_to_devnull()
        print_error(SpecrunError(f"cannot write to standard output: {e.strerror or e}"))
        raise typer.Exit(1) from None


def echo(text: str) -> None:
    """A line of the command's product on stdout, flushed now so a write error shows here."""
    _write(text + "\n")


def friendly(fn: F) -> F:
    """Turn user-facing errors and Ctrl-C into one stderr line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SpecrunError as e:
            print_error(e)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("[dim]interrupted[/]")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


def notice(message: str) -> None:
    err.print(f"[dim]{escape(message)}[/]")


def warn(message: str) -> None:
    err.print(f"[yellow]warning: {escape(message)}[/]")


def human(n: int | float | None) -> str:
    """A byte count as people read it (decimal units, as disks are sold)."""
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def print_stdout(renderable: Any) -> None:
    """A table on stdout: Rich on a terminal; in a pipe, plain lines, never cut to a width,
    without the padding Rich adds."""
    with writing_stdout():
        if sys.stdout.isatty():
            Console(highlight=False).print(renderable)
            return
        buffer = io.StringIO()
        Console(file=buffer, highlight=False, width=10_000, color_system=None).print(renderable)
        sys.stdout.write("".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines()))
        sys.stdout.flush()


def stats_line(s: GenerationStats, mode: str) -> str:
    """What a generation did, in the words every command uses."""
    nodes, depth = s.tree_shape
    trees = f", trees of {nodes:.1f} nodes {depth:.1f} deep" if s.drafted_tokens else ""
    return (f"{s.generated_tokens} tokens, {s.tokens_per_s:.1f} tok/s, {s.tokens_per_call:.2f} tokens per target "
            f"call, {s.accepted_tokens}/{s.drafted_tokens} drafted tokens accepted{trees} ({mode})")


def sources_line(s: GenerationStats) -> str | None:
    """Per drafter: nodes proposed, verified and accepted (a node two drafters proposed counts for both)."""
    if not s.sources:
        return None
    return "drafters: " + "; ".join(f"{name} {c.proposed} proposed, {c.verified} verified, {c.accepted} accepted"
                                    for name, c in sorted(s.sources.items()))


def stream_line(s: GenerationStats) -> str | None:
    """What streaming the weights cost (offloaded targets): bytes per pass, a verify pass's time
    against the time its reads were in flight, and the rate the disk or link delivered."""
    if not s.streamed_passes:
        return None
    calls = max(s.target_calls - 1, 1)  # decode passes (the prefill's are longer)
    reads = (f" at {human(s.link_bps)}/s; reads in flight {s.stream_busy_s / s.streamed_passes:.3f} s per pass, "
             f"waiting for them {s.stream_wait_s / s.streamed_passes:.3f} s") if s.stream_busy_s > 0 else ""
    return (f"streamed {human(s.bytes_per_pass)} per pass over {s.streamed_passes} passes{reads}; a verify pass "
            f"took {s.verify_s / calls:.3f} s; {s.tokens_per_call:.2f} tokens per pass")


def overlap_line(s: GenerationStats) -> str | None:
    """What drafting during the target's passes did (overlap), or None where it was off."""
    share = s.prepared_share
    if share is None and s.parallel_s <= 0:
        return None
    used = f"{s.prepared_used}/{s.prepared_used + s.prepared_dropped} prepared trees used" if share is not None else \
        "no prepared tree verified"
    per_token = s.wall_s_per_token or 0.0
    return (f"overlap: the draft worked {s.parallel_s:.2f} s during target passes ({s.draft_s:.2f} s before "
            f"them); {used}; {per_token * 1000:.0f} ms wall time per token")


def overlap_json(s: GenerationStats) -> dict[str, Any]:
    share = s.prepared_share
    return {"parallel_draft_s": round(s.parallel_s, 4), "prepared_used": s.prepared_used,
            "prepared_dropped": s.prepared_dropped, "prepared_share": None if share is None else round(share, 3),
            "wall_s_per_token": None if s.wall_s_per_token is None else round(s.wall_s_per_token, 5)}


def stream_json(s: GenerationStats) -> dict[str, Any] | None:
    if not s.streamed_passes:
        return None
    return {"passes": s.streamed_passes, "bytes": s.streamed_bytes, "bytes_per_pass": round(s.bytes_per_pass),
            "busy_s": round(s.stream_busy_s, 4), "wait_s": round(s.stream_wait_s, 4),
            "bytes_per_s": round(s.link_bps), "tokens_per_pass": round(s.tokens_per_call, 3)}


def spec_json(mode: str, stats: GenerationStats) -> dict[str, Any]:
    nodes, depth = stats.tree_shape
    return {"mode": mode, "target_calls": stats.target_calls, "drafted": stats.drafted_tokens,
            "accepted": stats.accepted_tokens, "tokens_per_call": round(stats.tokens_per_call, 3),
            "nodes_per_pass": round(nodes, 2), "depth_per_pass": round(depth, 2),
            "sources": {name: {"proposed": c.proposed, "verified": c.verified, "accepted": c.accepted}
                        for name, c in sorted(stats.sources.items())}}


def timings_json(stats: GenerationStats) -> dict[str, float]:
    return {"prefill_s": round(stats.prefill_s, 4), "decode_s": round(stats.decode_s, 4),
            "draft_s": round(stats.draft_s, 4), "verify_s": round(stats.verify_s, 4),
            "tokens_per_s": round(stats.tokens_per_s, 3)}


def stream(steps: Iterable[Step], end_line: bool, stop: Callable[[], bool] = lambda: False) -> str:
    """Write each step's text to stdout as it comes, until the steps end or `stop()` says so;
    end with a newline if `end_line` and the text lacks one. A closed pipe exits quietly."""
    text: list[str] = []
    for step in steps:
        if step.text:
            text.append(step.text)
            _write(step.text)
        if stop():
            break
    if end_line and text and not text[-1].endswith("\n"):
        _write("\n")
    return "".join(text)


def _write(text: str) -> None:
    with writing_stdout():  # only the write: an error of the generation is not stdout's
        sys.stdout.write(text)
        sys.stdout.flush()


def clean_text(text: str) -> str:
    """Text as Python hands it over from bytes that were not UTF-8 (lone surrogates from
    stdin or argv), with each undecodable byte replaced by U+FFFD, as editors show it."""
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no decoder made: nothing to recover
        data = text.encode("utf-8", "replace")
    return data.decode("utf-8", "replace")


def write_report(path: Path, text: str) -> None:
    """A report file, whole or not at all; a one-line error when it cannot be written."""
    from specrun.files import write_atomic

    try:
        write_atomic(path, text)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from None
