"""`specrun bench`: plain decoding, each speculative mode and llama-cpp-python side by side."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from specrun import bench as B
from specrun import bench_report as R
from specrun.bench_batch import BatchRow, batch_lines, batch_spec, run_batched, single_rate
from specrun.catalog import DEFAULT_TARGET
from specrun.chat import ChatTemplate
from specrun.cli import options as O
from specrun.cli.app import app
from specrun.cli.console import echo, err, friendly, notice, print_stdout, write_report
from specrun.cli.models import resolve, use_corpus
from specrun.engines import engine_for
from specrun.errors import UsageError
from specrun.memory_limit import gib
from specrun.sampling import SamplingConfig
from specrun.workloads import load_workload

@app.command()
@friendly
def bench(
    model: str = typer.Argument(DEFAULT_TARGET, help="Target: catalog name or GGUF path."),
    workload: str = typer.Option("humaneval", "--workload", "-w", help="humaneval, chat, rewrite (code rewrites "
                                 "whose output repeats the input: where prompt lookup and suffix drafting pay), or a "
                                 "JSONL file of prompts ({\"prompt\": ...} or {\"messages\": [...]} per line)."),
    n_prompts: Optional[int] = typer.Option(10, "--n-prompts", min=1, help="Prompts from the workload."),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", min=1, help="Tokens per run."),
    repeats: int = typer.Option(1, "--repeats", min=1, help="Rounds over the prompts."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    top_p: float = O.TOP_P,
    seed: Optional[int] = typer.Option(0, "--seed", min=0, help="Sampling seed."),
    modes: str = typer.Option("", "--modes", help="Comma-separated: plain, auto, ngram, chain, tree, auto-seq, "
                              "tree-seq (the same without overlap), free (auto on the free drafters alone, no draft model), tree:BxD (a fixed tree of B nodes, D deep), "
                              "lcp-lookup, lcp-plain (llama-cpp-python). "
                              "Default: plain, auto, ngram, chain, tree, lcp-lookup."),
    overlap: str = O.OVERLAP,
    draft: Optional[str] = O.DRAFT,
    no_draft: bool = O.NO_DRAFT,
    threads: Optional[int] = O.THREADS,
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
    corpus: Optional[Path] = O.CORPUS,
    memory_limit: Optional[str] = typer.Option(None, "--memory-limit", help="Run every mode, llama.cpp's peer "
                                               "included, in a process of its own inside this much memory (e.g. "
                                               "1.1G; a child memory cgroup) and report each one's peak."),
    batch: int = typer.Option(1, "--batch", min=1, help="Also run the prompts N at a time sharing every target "
                              "pass (plain; auto, its draft model drafting for all N at once; free), beside the "
                              "single-sequence rows."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every figure and run here."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Draw speed-ups and accepted lengths (PNG; "
                                             "needs matplotlib)."),
) -> None:
    """Compare plain decoding, each speculative mode and llama-cpp-python on one workload."""
    O.check_sampling(top_p, temperature)
    O.check_draft_flags(draft, no_draft)
    O.check_overlap(overlap)
    places = O.placements(threads, gpu_layers, draft_threads, draft_gpu_layers, engine, device, quant,
                          offload=offload, ram=ram, gpu_memory=gpu_memory, rpc=rpc, exact=exact)
    limit = O.parse_size(memory_limit, "--memory-limit")
    if batch > 1 and limit is not None:
        raise UsageError("--batch runs in this process, not in memory-limited workers",
                         hint="leave out --memory-limit or --batch")
    if plot_path is not None:
        _need_matplotlib()
    for out in (json_path, plot_path):  # before minutes of work, not after
        if out is not None and not out.parent.is_dir():
            raise UsageError(f"cannot write {out}: {out.parent} is not a directory")
    prompts = load_workload(workload, n_prompts)
    models = resolve(model, draft, "auto", no_draft)
    engine_for(models.target, places[0])  # a placement no engine serves stops here, before any notice
    chosen = _peers_runnable(B.parse_modes(modes, models.draft is not None, notice), models.target, bool(modes),
                             bool(places[0].rpc))
    chosen = [replace(m, spec=replace(m.spec, overlap=overlap)) if m.spec is not None and m.spec.overlap == "auto"
              else m for m in chosen]  # the -seq and fixed-tree rows keep overlap off
    config = B.BenchConfig(max_tokens, repeats, SamplingConfig(temperature, top_p, seed))
    needed = max(p.max_tokens for p in prompts) + max_tokens + 64
    if any(m.key == "lcp-lookup" for m in chosen):
        notice("llama-cpp-python's prompt lookup drafts 2 tokens per step on a CPU (10 with a GPU), as its README "
               "advises")
    batch_rows: list[Any] = []
    if limit is None:
        summaries, results, planner, batch_rows = _in_process(models, chosen, places, config, prompts, needed,
                                                              corpus, batch)
    else:
        summaries, results, planner = _in_limits(models, chosen, places, config, prompts, needed, limit, corpus)
    _print_bench(models.label, workload, len(prompts), config, summaries, planner, limit)
    if json_path is not None:
        data = R.to_json(config, workload, models.label, models.draft.name if models.draft else None, threads,
                         summaries, results, planner, limit)
        data["batch"] = [{**vars(r), "tokens_per_s": r.tokens_per_s, "nodes_per_pass": r.nodes_per_pass}
                         for r in batch_rows]
        write_report(json_path, json.dumps(data, indent=1))
        err.print(f"[dim]wrote {escape(str(json_path))}[/]")
    if plot_path is not None:
        from specrun.plot import plot_bench

        plot_bench(summaries, f"{models.label}, {workload}", plot_path)
        err.print(f"[dim]wrote {escape(str(plot_path))}[/]")


def _progress(total: int, n_modes: int) -> tuple[Progress, Callable[[str, str], None]]:
    """A bar on a terminal; elsewhere a line per prompt."""
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeRemainingColumn())
    bar = Progress(*columns, console=err, transient=True, disable=not err.is_terminal)
    task = bar.add_task("benchmarking", total=total * n_modes)
    runs = [0]

    def advance(pid: str, mode: str) -> None:
        bar.update(task, advance=1, description=f"{pid}: {mode}")
        runs[0] += 1
        if not err.is_terminal and runs[0] % n_modes == 0:  # no bar: a line per prompt
            err.print(f"{pid}: every mode done ({runs[0] // n_modes}/{total})")

    return bar, advance


def _in_process(models: Any, chosen: list[B.Mode], places: Any, config: B.BenchConfig, prompts: list[Any],
                needed: int, corpus: Optional[Path], batch: int = 1) -> Any:
    """Every mode on one session in this process (the peers beside it), then the batched rows."""
    specs = [m.spec for m in chosen if m.spec is not None]
    runners: dict[str, Any] = {}
    with models.session(specs, *places, needed_ctx=needed, keep_recycled=False, batched=batch if batch > 1 else 0) as session:
        vocab = session.target.vocab
        template = ChatTemplate.of_model(models.target, vocab) if any(p.messages for p in prompts) else None
        tokens = [(p.id, _tokens(p, vocab, template)) for p in prompts]
        session.open(session.n_ctx)
        use_corpus(session, corpus, models.store)
        session.calibrated()
        assert session.cache is not None
        n_ctx = session.cache.n_ctx
        try:
            for m in chosen:
                if m.spec is not None:
                    runners[m.key] = B.SessionRunner(session, m, config)
                else:
                    runners[m.key] = B.PeerRunner.open(models.target, m, config, min(needed, n_ctx),
                                                       places[0], vocab)
            runner = B.Bench(runners, chosen, config)
            bar, advance = _progress(len(prompts) * config.repeats, len(chosen))
            with bar:
                runner.run(tokens, advance)
        finally:
            for r in runners.values():
                if isinstance(r, B.PeerRunner):
                    r.close()
        summaries = R.summarize(runner.results, chosen)
        planner = (R.calibration_lines(session) + R.summary_lines(summaries)
                   + R.streaming_lines(session.target.measure_link(), summaries) + _rpc_lines(places[0].rpc))
        rows = _batched(session, chosen, config, [t for _, t in tokens], runner.results, batch) if batch > 1 else []
        planner += batch_lines(rows, _singles(runner.results, len(tokens)))
    return summaries, runner.results, planner, rows


def _batched(session: Any, chosen: list[B.Mode], config: B.BenchConfig, tokens: list[list[int]],
             results: list[Any], batch: int) -> list[BatchRow]:
    """Each of the chosen modes a batch can run (plain; auto, its draft model drafting for every
    sequence at once; free; ngram), once, the prompts `batch` at a time."""
    rows: list[BatchRow] = []
    for m in chosen:
        spec = batch_spec(m.spec) if m.spec is not None else None
        name = m.key
        if spec is None or any(r.mode == name for r in rows):
            continue
        notice(f"batches of {batch}: {name}…")
        rows.append(run_batched(session, name, spec, tokens, batch, config.max_tokens, config.sampling,
                                lambda done: notice(f"  {done}/{len(tokens)} prompts")))
    return rows


def _singles(results: list[Any], n_prompts: int) -> dict[str, tuple[float, list[list[int]]]]:
    """Per mode, single-sequence runs' aggregate rate over every round, and the first round's outputs."""
    out = {}
    for mode in {r.mode for r in results}:
        runs = [r for r in results if r.mode == mode and not r.failed]
        out[mode] = (single_rate([(r.tokens_per_s, r.generated_tokens) for r in runs]),
                     [r.tokens for r in runs if r.round == 0][:n_prompts])
    return out


def _in_limits(models: Any, chosen: list[B.Mode], places: Any, config: B.BenchConfig, prompts: list[Any],
               needed: int, limit: int, corpus: Optional[Path]) -> Any:
    """Every mode in a worker process inside a child memory cgroup of `limit` bytes."""
    from specrun.bench_workers import WorkerRunner, WorkerSpec, placement_fields
    from specrun.engines.llamacpp_backend import VocabOnly
    from specrun.memory_cgroup import ChildCgroup, evict_from_page_cache

    if models.target.is_dir():
        raise UsageError("--memory-limit compares with llama.cpp's mmap, which runs GGUF files, and "
                         f"{models.target.name} is a directory", hint="give a GGUF file, or leave out --memory-limit")
    ChildCgroup(limit).close()  # cannot make one here: one line now, before any work
    vocab_file = VocabOnly(models.target)
    runners: dict[str, WorkerRunner] = {}
    try:
        template = ChatTemplate.of_model(models.target, vocab_file.vocab) if any(p.messages for p in prompts) else None
        tokens = [(p.id, _tokens(p, vocab_file.vocab, template)) for p in prompts]
        piece = vocab_file.vocab.piece
        if corpus is not None:  # indexed (and kept) here once, not by every worker in its limit
            from specrun.corpus import load_corpus

            load_corpus(corpus, vocab_file.vocab, models.store.root / "corpus", notice)
        evict_from_page_cache(*(f for f in (models.target, models.draft) if f is not None))  # each pays its own reads
        for m in chosen:
            notice(f"starting {m.label} in a {gib(limit)} memory cgroup…")
            spec = WorkerSpec(m.key, str(models.target), str(models.draft) if models.draft else None,
                              str(models.store.root), config.max_tokens, config.sampling.__dict__, needed,
                              placement_fields(places[0]), placement_fields(places[1]),
                              str(corpus.resolve()) if corpus is not None else None)
            runners[m.key] = WorkerRunner(spec, limit, notice)
            if runners[m.key].failed:
                notice(f"{m.label}: {runners[m.key].failed}")
        refused = [w.refusal for m, w in zip(chosen, runners.values()) if w.refusal is not None]
        if len(refused) == sum(m.spec is not None for m in chosen):  # no mode of specrun's fits: as `run` says
            raise UsageError(refused[0][0], hint=refused[0][1])
        runner = B.Bench(runners, chosen, config)  # type: ignore[arg-type]
        bar, advance = _progress(len(prompts) * config.repeats, len(chosen))
        with bar:
            runner.run(tokens, advance)
        for r in runner.results:  # the workers sent tokens; their text is the parent's to make
            r.text = b"".join(piece(t) for t in r.tokens).decode("utf-8", "replace")
        explainer = next((runners[m.key] for m in chosen if m.spec is not None and m.spec.needs_costs
                          and not runners[m.key].failed), None)
        lines, _ = explainer.explain() if explainer else ([], None)
        link = runners["plain"].explain()[1]
    finally:
        for w in runners.values():
            w.close()
        vocab_file.close()
    peaks = {k: w.usage.peak if w.usage else None for k, w in runners.items()}
    summaries = R.summarize(runner.results, chosen, peaks)
    failed = [f"{m.key}: {runners[m.key].failed}" for m in chosen if runners[m.key].failed]
    planner = lines + R.summary_lines(summaries) + R.streaming_lines(link, summaries) + failed
    return summaries, runner.results, planner


def _tokens(prompt: Any, vocab: Any, template: Any) -> list[int]:
    if prompt.text is not None:  # a plain completion, as `run` does: its text is text
        return vocab.tokenize(prompt.text, parse_special=False)
    if template is None:
        raise UsageError(f"prompt {prompt.id} is a conversation, and the model has no chat template")
    return template.tokens(prompt.messages, vocab)


def _rpc_lines(workers: tuple[str, ...]) -> list[str]:
    """The network's part of a pass over --rpc workers: a round trip to each, measured now."""
    from specrun.engines.rpc import parse_endpoint, round_trip_s

    return [f"rpc: a round trip to the worker at {w} takes {round_trip_s(parse_endpoint(w, '--rpc')) * 1000:.2f} ms "
            "(a pass makes a few per worker)" for w in workers]


def _peers_runnable(chosen: list[Any], target: Path, asked: bool, rpc: bool) -> list[Any]:
    """llama-cpp-python's rows run the target's GGUF file here: none for a safetensors directory,
    nor beside --rpc (they would not run over the workers); an error when asked for by name,
    skipped with a notice by default."""
    peers = [m.key for m in chosen if m.spec is None]
    if not peers or not (target.is_dir() or rpc):
        return chosen
    why = "needs a GGUF file, not a directory" if target.is_dir() else "runs on this machine, not over --rpc workers"
    if asked:
        raise UsageError(f"mode {peers[0]} runs llama-cpp-python, which {why}", hint="leave the lcp-* modes out of --modes")
    notice(f"llama-cpp-python {why}: skipping {', '.join(peers)}")
    return [m for m in chosen if m.spec is not None]


def _print_bench(label: str, workload: str, n_prompts: int, config: Any, summaries: list[Any],
                 planner: list[str], limit: Optional[int] = None) -> None:
    """The comparison table and the planner's reasons, on stdout (the command's product)."""
    sampling = "greedy" if config.sampling.greedy else (f"temperature {config.sampling.temperature}, top-p "
                                                        f"{config.sampling.top_p}, seed {config.sampling.seed}")
    inside = f" · inside {gib(limit)} each" if limit is not None else ""
    table = Table(title=f"{label} · {workload} · {n_prompts} prompts x {config.repeats} · {config.max_tokens} "
                        f"tokens · {sampling}{inside}", title_justify="left", box=None, pad_edge=False)
    columns = [("mode", "left"), ("tok/s", "right"), ("min-max", "right"), ("speed-up", "right"),
               ("min-max ", "right"), ("tokens/call", "right"), ("drafting", "right"), ("prepared used", "right")]
    columns += [("peak memory", "right")] if limit is not None else []
    for col, justify in columns + [("output vs plain", "left")]:
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for s in summaries:
        if s.failed == s.runs:
            check = "failed: see below"
        elif s.mode == "plain":
            check = "(reference)"
        elif s.identical == s.runs:
            check = "identical"
        else:
            margins = ", ".join(f"{d['top2_margin']:.2f}" for d in s.differences[:4] if d["top2_margin"] is not None)
            check = f"differs in {s.runs - s.identical}/{s.runs} (top-2 margins {margins})"
        if s.failed and s.failed < s.runs:
            check += f"; {s.failed} runs failed"
        row = [s.label, f"{s.tokens_per_s:.1f}", f"{s.tokens_per_s_min:.1f}-{s.tokens_per_s_max:.1f}",
               f"{s.speedup:.2f}x", f"{s.speedup_min:.2f}-{s.speedup_max:.2f}x",
               "" if s.tokens_per_call is None else f"{s.tokens_per_call:.2f}",
               "" if s.draft_share is None else f"{s.draft_share:.0%}",
               "" if s.prepared_share is None else f"{s.prepared_share:.0%}"]
        row += [gib(s.peak_bytes) if s.peak_bytes is not None else "?"] if limit is not None else []
        table.add_row(*row, check)
    print_stdout(table)
    echo("\n".join(f"planner: {line}" for line in planner))


def _need_matplotlib() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib", hint="pip install 'specrun[plot]'")
