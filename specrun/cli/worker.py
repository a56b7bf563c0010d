"""`specrun worker`: llama.cpp's RPC server in this process, holding a share of a model's layers
for a specrun elsewhere (`--rpc HOST:PORT` there)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Optional

import typer

from specrun.cli import options as O
from specrun.cli.app import app
from specrun.cli.console import friendly, notice, warn
from specrun.errors import UsageError


@app.command()
@friendly
def worker(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback unless told otherwise; "
                             "the protocol has no authentication or encryption)."),
    port: int = typer.Option(50052, "--port", min=1, max=65535, help="Port to listen on."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads (default: all cores)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where tensors sent once are kept, so a "
                                             "client's next load sends only their hashes (default: the store's "
                                             "rpc folder)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Keep no tensors between loads."),
) -> None:
    """Hold and compute a share of a model's layers for `specrun ... --rpc` on another machine."""
    from specrun.engines.ggml_devices import devices
    from specrun.engines.rpc import INSECURE, Endpoint, check_bindable, is_loopback, serve
    from specrun.store import Store

    O.check_threads("--threads", threads)
    if no_cache and cache_dir is not None:
        raise UsageError("--cache-dir and --no-cache contradict each other")
    endpoint = Endpoint(host, port)
    check_bindable(endpoint)
    if not is_loopback(host):
        warn(INSECURE)
    directory = None if no_cache else (cache_dir or Store().root / "rpc")
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    n_threads = threads or os.cpu_count() or 1
    gpus = [d.description or d.name for d in devices() if d.is_gpu]
    notice(f"worker on {endpoint}, computing on {', '.join(gpus) or f'the CPU ({n_threads} threads)'}; "
           f"tensor cache {directory or 'off'}; "
           f"clients use --rpc {endpoint}; Ctrl-C or SIGTERM stops it")
    os.dup2(2, 1)  # llama.cpp's server prints its banner and connections on stdout: they are log lines
    failed: list[BaseException] = []

    def run() -> None:
        try:
            serve(endpoint, n_threads, directory)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            failed.append(e)

    server = threading.Thread(target=run, name="specrun-rpc-server", daemon=True)
    server.start()
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while server.is_alive():
            server.join(0.5)
    except KeyboardInterrupt:
        notice(f"worker on {endpoint} stopped")
        os._exit(0)  # the server thread blocks in llama.cpp's accept loop: nothing to wait for
    if failed:
        raise failed[0]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
