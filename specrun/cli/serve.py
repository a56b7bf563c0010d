"""`specrun serve MODEL`: an OpenAI-compatible server, every pass shared by the requests in flight."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Optional

import typer

from specrun.chat import ChatTemplate, template_of
from specrun.cli import options as O
from specrun.cli.app import app
from specrun.cli.console import friendly, notice
from specrun.cli.models import resolve, use_corpus
from specrun.cli.run_batch import check_batch_spec
from specrun.errors import UsageError


@app.command()
@friendly
def serve(
    model: str = typer.Argument(..., help="Catalog name, or a path to a GGUF file."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback unless told otherwise)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port (0: any free one, printed)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="SPECRUN_API_KEY", help="Clients must send "
                                          "'Authorization: Bearer KEY' (required when not on loopback)."),
    parallel: int = typer.Option(8, "--parallel", min=1, help="Requests decoding at once, sharing every pass."),
    max_requests: int = typer.Option(16, "--max-requests", min=1, help="Requests in flight (running or waiting); "
                                     "more are answered 429."),
    max_tokens: int = typer.Option(1024, "--max-tokens", "-n", min=1, help="The most tokens a request may ask for."),
    ctx: Optional[int] = typer.Option(None, "--ctx", min=16, help="Tokens each request's cache holds (default: "
                                      "what the memory plan allows for --parallel of them, at most 4096)."),
    threads: Optional[int] = O.THREADS,
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
) -> None:
    """Serve MODEL over HTTP with OpenAI's API (/v1/completions, /v1/chat/completions, /v1/models)."""
    from specrun.server.app import ServeConfig, bind, build_app, is_loopback, server_for
    from specrun.server.scheduler import Scheduler

    if not is_loopback(host) and not api_key:
        raise UsageError(f"--host {host} serves beyond this machine, and no --api-key is set",
                         hint="pass --api-key KEY (or set SPECRUN_API_KEY), or serve on 127.0.0.1")
    spec_cfg = O.spec_config(spec, "auto", None, draft, no_draft)
    check_batch_spec(spec_cfg)
    places = O.placements(threads, None, None, None, engine, device, quant, offload=offload, ram=ram,
                          gpu_memory=gpu_memory, rpc=rpc, exact=exact)
    models = resolve(model, draft, spec, no_draft)
    try:
        sock = bind(host, port)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}", hint="pick another --port") from None
    per_request = ctx or min(4096, max_tokens + 1024)
    with sock, models.session([spec_cfg], *places, ctx=None if ctx is None else ctx * parallel,
                              needed_ctx=per_request * parallel, batched=parallel) as session:
        n_each = ctx or max(min(session.n_ctx // parallel, 4096), 16)
        session.open(n_each)
        use_corpus(session, corpus, models.store)
        if spec_cfg.mode != "none":
            session.speculator(spec_cfg)  # measures the cost curve before the first request, if needed
        vocab = session.target.vocab
        template = ChatTemplate.of_model(models.target, vocab) if template_of(models.target) else None
        scheduler = Scheduler(session, spec_cfg, n_each, parallel, log=notice)
        config = ServeConfig(models.label, api_key, max_tokens=min(max_tokens, n_each), max_requests=max_requests,
                             n_ctx=n_each)
        bound_host, bound_port = sock.getsockname()[:2]
        notice(f"serving {models.label} on http://{bound_host}:{bound_port}/v1 ({parallel} requests at once, "
               f"{n_each} tokens each; pid {os.getpid()}; Ctrl-C or SIGTERM stops after the requests in flight)")
        # uvicorn drains the requests in flight on SIGTERM, then raises the signal again with the
        # handler found before it: this one, so what was learnt is saved and the exit is 0.
        previous = signal.signal(signal.SIGTERM, _terminated)
        try:
            server_for(build_app(scheduler, vocab, template, config)).run(sockets=[sock])
        except _Terminated:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            scheduler.close()
            session.save()


class _Terminated(Exception):
    """SIGTERM, after the server's graceful shutdown."""


def _terminated(signum: int, frame: object) -> None:
    raise _Terminated
