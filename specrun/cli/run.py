"""`specrun run`: one completion, streamed to stdout (or one JSON object)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from specrun.cli import options as O
from specrun.cli.app import app
from specrun.cli.console import (clean_text, echo, err, friendly, notice, overlap_json, overlap_line, spec_json,
                                 sources_line, stats_line, stream, stream_json, stream_line, timings_json,
                                 warn)
from specrun.cli.models import resolve, use_corpus
from specrun.cli.run_batch import BatchItem, BatchRun, check_batch_spec, read_batch, run_batch
from specrun.engines.memory_plan import describe_plan_json
from specrun.errors import UsageError
from specrun.generate import Generation, GenerationConfig, check_prompt
from specrun.sampling import SamplingConfig


def read_prompt(prompt: str | None) -> str:
    """stdin first (when piped), then the argument, as ollama and llm do. Bytes that are not
    UTF-8 become U+FFFD rather than an error."""
    parts = []
    if not sys.stdin.isatty():
        piped = sys.stdin.buffer.read().decode("utf-8", "replace")
        if piped:
            parts.append(piped if prompt is None else piped.rstrip("\n"))
    if prompt is not None:
        parts.append(clean_text(prompt))
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
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="0 = greedy."),
    top_p: float = O.TOP_P,
    seed: Optional[int] = O.SEED,
    threads: Optional[int] = O.THREADS,
    ctx: Optional[int] = typer.Option(None, "--ctx", min=16, help="Context size in tokens (default: fits the request)."),
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
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming text."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print a stats line to stderr."),
    batch: Optional[str] = typer.Option(None, "--batch", help="A file of prompts (- for stdin), one per line: "
                                        'text, or JSON with "prompt" or "messages"; JSON lines out, in order.'),
    samples: Optional[int] = typer.Option(None, "--samples", min=1, help="K completions of PROMPT sharing every "
                                          "pass (JSON lines out; with --seed, sample k draws with seed + k)."),
    parallel: int = typer.Option(8, "--parallel", min=1, help="With --batch: sequences decoding at once."),
) -> None:
    """Generate a completion of PROMPT and stream it to stdout."""
    spec_cfg = O.spec_config(spec, budget, depth, draft, no_draft, overlap)
    O.check_sampling(top_p, temperature)
    places = O.placements(threads, gpu_layers, draft_threads, draft_gpu_layers, engine, device, quant,
                          offload=offload, ram=ram, gpu_memory=gpu_memory, rpc=rpc, exact=exact)
    if batch is not None or samples is not None:
        items = batch_items(batch, samples, prompt)
        check_batch_spec(spec_cfg)
        models = resolve(model, draft, spec, no_draft)
        run_batch(models, BatchRun(tuple(items), spec_cfg, *places, max_tokens,
                                   SamplingConfig(temperature=temperature, top_p=top_p, seed=seed),
                                   parallel if samples is None else samples, ctx, corpus))
        return
    models = resolve(model, draft, spec, no_draft)
    text = read_prompt(prompt)
    t0 = time.perf_counter()
    # Tokens are fewer than the prompt's UTF-8 bytes (plus a BOS): an upper bound, before any tokenizer loads.
    needed = len(text.encode("utf-8", "replace")) + 2 + max_tokens
    with models.session([spec_cfg], *places, ctx=ctx, needed_ctx=needed) as session:
        tokens = session.target.vocab.tokenize(text, parse_special=False)  # the user's text is text, as in chat
        check_prompt(tokens, session.open(session.n_ctx).n_ctx)  # before any calibration work
        use_corpus(session, corpus, models.store)
        speculator = session.speculator(spec_cfg)
        sampling = SamplingConfig(temperature=temperature, top_p=top_p, seed=seed)
        config = GenerationConfig(max_tokens, sampling, overlap=session.overlaps(spec_cfg))
        load_s = time.perf_counter() - t0
        gen = Generation(session.target, session.cache, tokens, config, speculator)
        try:
            if as_json:
                for _ in gen:
                    pass
            else:
                stream(gen, end_line=sys.stdout.isatty())
        finally:
            session.save()
        n_ctx, plan = gen.cache.n_ctx, session.plan
        replaced = session.calibration.cost.replaced if session.calibration is not None else []
    stats = gen.stats
    mode = speculator.name if speculator else "none"
    if stats.stop_reason == "context":
        warn(f"stopped at the end of the {n_ctx}-token context")
    if as_json:
        echo(json.dumps({
            "model": models.label, "path": str(models.target), "text": gen.text,
            "prompt_tokens": stats.prompt_tokens, "generated_tokens": stats.generated_tokens,
            "stop_reason": stats.stop_reason,
            "speculation": spec_json(mode, stats),
            "streaming": stream_json(stats),
            "overlap": overlap_json(stats) if config.overlap else None,
            "timings": {"load_s": round(load_s, 4), **timings_json(stats)},
            "memory": describe_plan_json(plan),
        }))
    if verbose:
        err.print(f"[dim]{stats.prompt_tokens} prompt tokens, {stats_line(stats, mode)}; {stats.target_calls} "
                  f"target calls; stopped by {stats.stop_reason}; load {load_s:.2f} s, prefill {stats.prefill_s:.2f} "
                  f"s, drafting {stats.draft_s:.2f} s, verifying {stats.verify_s:.2f} s[/]")
        notice("memory: " + "; ".join(plan.describe()))
        for line in replaced:
            notice(line)
        if (line := sources_line(stats)) is not None:
            notice(line)
        if (line := stream_line(stats)) is not None:
            notice(line)
        if (line := overlap_line(stats)) is not None:
            notice(line)


def batch_items(batch: str | None, samples: int | None, prompt: str | None) -> list[BatchItem]:
    """The requests of `--batch FILE` (- reads stdin), or `--samples K` copies of the prompt."""
    if batch is not None and samples is not None:
        raise UsageError("--batch and --samples contradict each other",
                         hint="--samples takes one prompt; repeat a line of the batch file instead")
    if samples is not None:
        return [BatchItem(prompt=read_prompt(prompt))] * samples
    if prompt is not None:
        raise UsageError("--batch reads its prompts from the file, not from an argument",
                         hint=f'put "{prompt[:20]}" on a line of the batch file')
    assert batch is not None
    if batch == "-":
        return read_batch(sys.stdin.buffer.read().decode("utf-8", "replace"))
    try:
        return read_batch(Path(batch).read_bytes().decode("utf-8", "replace"))
    except OSError as e:
        raise UsageError(f"cannot read the batch file {batch}: {e.strerror}") from None
