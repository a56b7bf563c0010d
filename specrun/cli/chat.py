"""`specrun chat`: the read-reply loop around `specrun.chat.Chat`, with slash commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from specrun.chat import Chat, ChatConfig, ChatTemplate
from specrun.cli import options as O
from specrun.cli.app import app
from specrun.cli.console import clean_text, err, friendly, notice, print_error, stats_line, stream
from specrun.cli.models import resolve, use_corpus
from specrun.errors import UsageError
from specrun.generate import GenerationConfig
from specrun.sampling import SamplingConfig

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
    temperature: float = typer.Option(0.7, "--temperature", "-t", help="0 = greedy."),
    top_p: float = O.TOP_P,
    seed: Optional[int] = O.SEED,
    threads: Optional[int] = O.THREADS,
    ctx: Optional[int] = typer.Option(None, "--ctx", min=64, help="Context size in tokens (default 4096)."),
    gpu_layers: Optional[int] = O.GPU_LAYERS,
    draft_threads: Optional[int] = O.DRAFT_THREADS,
    draft_gpu_layers: Optional[int] = O.DRAFT_GPU_LAYERS,
    engine: str = O.ENGINE,
    device: Optional[str] = O.DEVICE,
    quant: Optional[str] = O.QUANT,
    exact: bool = O.EXACT,
    offload: str = O.OFFLOAD,
    ram: Optional[str] = O.RAM,
    gpu_memory: Optional[str] = O.GPU_MEMORY,
    rpc: Optional[str] = O.RPC,
    spec: str = O.SPEC,
    draft: Optional[str] = O.DRAFT,
    no_draft: bool = O.NO_DRAFT,
    corpus: Optional[Path] = O.CORPUS,
    budget: str = O.BUDGET,
    depth: Optional[int] = O.DEPTH,
    overlap: str = O.OVERLAP,
) -> None:
    """Talk with a model. Piped stdin: each line is one turn, and only replies reach stdout."""
    spec_cfg = O.spec_config(spec, budget, depth, draft, no_draft, overlap)
    O.check_sampling(top_p, temperature)
    places = O.placements(threads, gpu_layers, draft_threads, draft_gpu_layers, engine, device, quant,
                          offload=offload, ram=ram, gpu_memory=gpu_memory, rpc=rpc, exact=exact)
    models = resolve(model, draft, spec, no_draft)
    with models.session([spec_cfg], *places, ctx=ctx) as session:
        template = ChatTemplate.of_model(models.target, session.target.vocab)
        session.open(session.n_ctx)
        use_corpus(session, corpus, models.store)
        config = ChatConfig(spec_cfg, GenerationConfig(max_tokens, SamplingConfig(temperature, top_p, seed)), system)
        conversation = Chat(session, template, config, notice=notice)
        interactive = sys.stdin.isatty()
        if interactive:
            notice(f"chatting with {models.label} (speculation: {conversation.mode}, "
                   f"{conversation.cache.n_ctx}-token context); /help for commands, Ctrl-D to leave")
        _chat_loop(conversation, interactive, models.store.root / "chat_history")


def _chat_loop(conversation: Chat, interactive: bool, history_file: Path) -> None:
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
                notice("stopped")
            except UsageError as e:  # e.g. a message longer than the context: say so and go on
                print_error(e)
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
        try:
            history_file.parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # a read-only store: history is not kept, the chat goes on
            pass
    return readline


def _read_turn(interactive: bool) -> str | None:
    """One line of input, None at end of input. The prompt goes to the terminal, never into a
    redirected stdout."""
    if not interactive:
        line = sys.stdin.buffer.readline()
        return line.decode("utf-8", "replace") if line else None
    try:
        if sys.stdout.isatty():
            return clean_text(input(">>> "))
        err.print(">>> ", end="")
        return clean_text(input())
    except EOFError:
        if sys.stdout.isatty():
            sys.stdout.write("\n")
        return None


def _slash_command(conversation: Chat, text: str) -> bool:
    """Run a /command; False when the chat should end."""
    name, _, arg = text.partition(" ")
    if name in ("/exit", "/quit", "/bye"):
        return False
    if name == "/help":
        err.print(CHAT_HELP, markup=False)
    elif name == "/reset":
        conversation.reset()
        notice("conversation cleared")
    elif name == "/system":
        if arg.strip():
            conversation.system = arg.strip()
            notice("system message set")
        else:
            notice(f"system message: {conversation.system or '(the template default)'}")
    elif name == "/stats":
        totals, n_ctx = conversation.totals, conversation.cache.n_ctx
        t = totals.stats
        notice(f"{totals.turns} replies, {stats_line(t, conversation.mode)}; {t.reused_tokens}/{t.prompt_tokens} "
               f"prompt tokens reused from the cache; turns kept {len(conversation.history) // 2}, dropped "
               f"{totals.dropped_turns}; context {n_ctx} tokens")
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


def _chat_turn(conversation: Chat, text: str, interrupt: "_StopOnInterrupt") -> bool:
    """One line of input: a /command or a message to reply to. False when the chat should end."""
    if not text:
        return True
    if text.startswith("/"):
        return _slash_command(conversation, text)
    steps = conversation.reply(text)
    try:
        stream(steps, end_line=True, stop=lambda: interrupt.stopped)
    finally:
        steps.close()
    s = conversation.last
    if interrupt.stopped:
        notice("stopped")
    elif s.stop_reason == "context":
        notice(f"the reply reached the end of the {conversation.cache.n_ctx}-token context")
    notice(f"{stats_line(s, conversation.mode)}; prompt {s.prompt_tokens - s.reused_tokens} new + "
           f"{s.reused_tokens} cached tokens")
    return True
