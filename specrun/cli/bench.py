"""`specrun bench`: plain decoding, each speculative mode and llama-cpp-python side by side."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from specrun import bench as B
from specrun.catalog import DEFAULT_TARGET
from specrun.chat import ChatTemplate
from specrun.cli import options as O
from specrun.cli.app import app
from specrun.cli.console import err, friendly, notice, print_stdout, write_report
from specrun.cli.models import resolve
from specrun.engines import engine_for
from specrun.errors import UsageError
from specrun.sampling import SamplingConfig
from specrun.workloads import load_workload

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
    top_p: float = O.TOP_P,
    seed: Optional[int] = typer.Option(0, "--seed", help="Sampling seed."),
    modes: str = typer.Option("", "--modes", help="Comma-separated: plain, auto, ngram, chain, tree, auto-seq, "
                              "tree-seq (the same without overlap), lcp-lookup, lcp-plain (llama-cpp-python). "
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
    offload: str = O.OFFLOAD,
    ram: Optional[str] = O.RAM,
    gpu_memory: Optional[str] = O.GPU_MEMORY,
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every figure and run here."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Draw speed-ups and accepted lengths (PNG; "
                                             "needs matplotlib)."),
) -> None:
    """Compare plain decoding, each speculative mode and llama-cpp-python on one workload."""
    O.check_sampling(top_p)
    O.check_draft_flags(draft, no_draft)
    O.check_overlap(overlap)
    places = O.placements(threads, gpu_layers, draft_threads, draft_gpu_layers, engine, device, quant,
                          offload=offload, ram=ram, gpu_memory=gpu_memory)
    if plot_path is not None:
        _need_matplotlib()
    for out in (json_path, plot_path):  # before minutes of work, not after
        if out is not None and not out.parent.is_dir():
            raise UsageError(f"cannot write {out}: {out.parent} is not a directory")
    prompts = load_workload(workload, n_prompts)
    models = resolve(model, draft, "auto", no_draft)
    engine_for(models.target, places[0])  # a placement no engine serves stops here, before any notice
    chosen = _peers_need_gguf(B.parse_modes(modes, models.draft is not None, notice), models.target, bool(modes))
    chosen = [replace(m, spec=replace(m.spec, overlap=overlap)) if m.spec is not None and m.spec.overlap == "auto"
              else m for m in chosen]  # the -seq rows keep overlap off
    specs = [m.spec for m in chosen if m.spec is not None]
    config = B.BenchConfig(max_tokens, repeats, SamplingConfig(temperature, top_p, seed))
    peers: dict[str, Any] = {}
    needed = max(p.max_tokens for p in prompts) + max_tokens + 64
    with models.session(specs, *places, needed_ctx=needed) as session:
        template = ChatTemplate.of_model(models.target, session) if any(p.messages for p in prompts) else None
        runner = B.Bench(session, chosen, config, peers, template)
        session.open(session.n_ctx)
        session.calibrated()
        try:
            for m in chosen:
                if m.spec is None:
                    peers[m.key] = B.LlamaCppPythonPeer(models.target, min(needed, session.target.n_ctx), threads,
                                                        0 if device == "cpu" else gpu_layers,
                                                        lookup=m.key == "lcp-lookup")
                    if m.key == "lcp-lookup":
                        notice(f"llama-cpp-python's prompt lookup drafts {peers[m.key].num_pred_tokens} tokens "
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
    _print_bench(models.label, workload, len(prompts), config, summaries, planner)
    if json_path is not None:
        data = B.to_json(config, workload, models.label, models.draft.name if models.draft else None, threads,
                         summaries, runner.results, planner)
        write_report(json_path, json.dumps(data, indent=1))
        err.print(f"[dim]wrote {escape(str(json_path))}[/]")
    if plot_path is not None:
        from specrun.plot import plot_bench

        plot_bench(summaries, f"{models.label}, {workload}", plot_path)
        err.print(f"[dim]wrote {escape(str(plot_path))}[/]")


def _peers_need_gguf(chosen: list[Any], target: Path, asked: bool) -> list[Any]:
    """llama-cpp-python's rows run the target's GGUF file: none for a safetensors directory
    (an error when asked for by name, skipped with a notice by default)."""
    peers = [m.key for m in chosen if m.spec is None]
    if not peers or not target.is_dir():
        return chosen
    if asked:
        raise UsageError(f"mode {peers[0]} runs llama-cpp-python, which needs a GGUF file, not a directory",
                         hint="leave the lcp-* modes out of --modes")
    notice(f"{target.name} is a safetensors directory: skipping {', '.join(peers)}")
    return [m for m in chosen if m.spec is not None]


def _print_bench(label: str, workload: str, n_prompts: int, config: Any, summaries: list[Any],
                 planner: list[str]) -> None:
    """The comparison table and the planner's reasons, on stdout (the command's product)."""
    sampling = "greedy" if config.sampling.greedy else (f"temperature {config.sampling.temperature}, top-p "
                                                        f"{config.sampling.top_p}, seed {config.sampling.seed}")
    table = Table(title=f"{label} · {workload} · {n_prompts} prompts x {config.repeats} · {config.max_tokens} "
                        f"tokens · {sampling}", title_justify="left", box=None, pad_edge=False)
    for col, justify in (("mode", "left"), ("tok/s", "right"), ("min-max", "right"), ("speed-up", "right"),
                         ("min-max ", "right"), ("tokens/call", "right"), ("drafting", "right"),
                         ("prepared used", "right"), ("output vs plain", "left")):
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
                      "" if s.draft_share is None else f"{s.draft_share:.0%}",
                      "" if s.prepared_share is None else f"{s.prepared_share:.0%}", check)
    print_stdout(table)
    print("\n".join(f"planner: {line}" for line in planner))


def _need_matplotlib() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib", hint="pip install 'specrun[plot]'")
