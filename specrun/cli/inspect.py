"""`specrun calibrate` and `specrun info`: what this machine measured, and what a model is and what runs it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from specrun import calibrate, planner_memory
from specrun.catalog import load_catalog
from specrun.cli import options as O
from specrun.cli.app import app
from specrun.cli.console import echo, err, friendly, human, print_stdout
from specrun.cli.models import resolve
from specrun.engines import device_of
from specrun.engines.memory_plan import PlanRequest, describe_plan_json, plan_memory
from specrun.errors import ModelFileError, UsageError
from specrun.gguf_file import read_gguf
from specrun.speculate.factory import SpecConfig
from specrun.files import sha256_file
from specrun.store import Store, locate, looks_like_path

@app.command("calibrate")
@friendly
def calibrate_cmd(
    model: str = typer.Argument(..., help="Catalog name or GGUF path."),
    threads: Optional[int] = O.THREADS,
    gpu_layers: Optional[int] = O.GPU_LAYERS,
    engine: str = O.ENGINE,
    device: Optional[str] = O.DEVICE,
    quant: Optional[str] = O.QUANT,
    exact: bool = O.EXACT,
    offload: str = O.OFFLOAD,
    ram: Optional[str] = O.RAM,
    gpu_memory: Optional[str] = O.GPU_MEMORY,
    rpc: Optional[str] = O.RPC,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Measure what a target pass over n tokens costs here, for the speculation planner."""
    placement = O.placements(threads, gpu_layers, engine=engine, device=device, quant=quant, offload=offload,
                              ram=ram, gpu_memory=gpu_memory, rpc=rpc, exact=exact)[0]
    models = resolve(model)
    label = models.label
    with models.session([SpecConfig()], placement) as session:
        session.open(session.n_ctx)
        cal = session.calibrated(force=True)
    cost = cal.cost
    rows = [{"tokens": n, "ms": round(t * 1000, 2), "per_token_ms": round(t * 1000 / n, 2),
             "vs_one": round(t / cost.seconds[0], 3)} for n, t in zip(cost.sizes, cost.seconds)]
    if as_json:
        echo(json.dumps({"model": label, "settings": cal.settings, "file": str(cal.path), "costs": rows}, indent=1))
        return
    echo(f"{label}: one target pass over n tokens ({cal.settings})")
    table = Table(box=None, pad_edge=False)
    for col in ("tokens", "ms", "ms/token", "x one token"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["tokens"]), f"{r['ms']:.1f}", f"{r['per_token_ms']:.1f}", f"{r['vs_one']:.2f}")
    print_stdout(table)
    if not session.unsaved:  # else the session warned that it could not
        err.print(f"[dim]saved to {escape(str(cal.path))}[/]")


@app.command()
@friendly
def info(
    model: str = typer.Argument(..., help="Catalog name, GGUF path or safetensors directory."),
    verify: bool = typer.Option(False, "--verify", help="Recompute the file's sha256 now."),
    gpu_layers: Optional[int] = O.GPU_LAYERS,
    engine: str = O.ENGINE,
    device: Optional[str] = O.DEVICE,
    quant: Optional[str] = O.QUANT,
    exact: bool = O.EXACT,
    offload: str = O.OFFLOAD,
    ram: Optional[str] = O.RAM,
    gpu_memory: Optional[str] = O.GPU_MEMORY,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """What a model is, what would run it and where: architecture, sizes, engine, device, the
    memory its weights take, template, checksum, stored calibrations."""
    placement = O.placements(None, gpu_layers, engine=engine, device=device, quant=quant, offload=offload,
                              ram=ram, gpu_memory=gpu_memory, exact=exact)[0]
    store, catalog = Store(), load_catalog()
    label, path = locate(model, catalog.get, store)
    if verify and path.is_dir():
        raise UsageError("--verify checks a GGUF file's sha256; a safetensors directory has none to check")
    entry = None if looks_like_path(model) else catalog.entries.get(model)  # None: a path (or bare directory)
    pulled = store.pulled(entry) if entry else None
    expected = (pulled.sha256 if pulled else None) or (entry.sha256 if entry else None)
    data: dict[str, Any] = {"name": label, "path": str(path)}
    data |= _directory_facts(path) if path.is_dir() else _gguf_facts(path)
    draft_path = _pulled_draft(entry, catalog, store)
    plan = plan_memory(PlanRequest(path, draft_path, placement, tree_nodes=max(calibrate.SIZES)))
    data |= {
        "engine": plan.target.engine, "device": device_of(path, plan.target), "offload": plan.target.offload,
        "weight_bytes": sum(i.bytes for i in plan.items if i.part == "weights"),
        "memory_limit": plan.limit.describe(), "memory_plan": describe_plan_json(plan),
        "draft": entry.draft if entry else None, "rpc": _rpc_line(),
        "sha256": expected, "checksum": "verified when pulled" if pulled and pulled.source != "local" else "unknown",
    }
    if verify:
        actual = sha256_file(path)
        data["checksum"] = "ok" if actual == expected else ("computed" if expected is None else "MISMATCH")
        data["sha256"] = actual
    data["calibrations"] = [
        {"settings": c.settings or "(not recorded)", "one_token_ms": round(c.cost.seconds[0] * 1000, 2),
         "costs_vs_one": {str(n): round(t / c.cost.seconds[0], 2) for n, t in zip(c.cost.sizes, c.cost.seconds)},
         "accepted": {k: [sum(v[0] for v in s.counts.values()), sum(v[1] for v in s.counts.values())]
                      for k, s in c.stats.items()}}
        for c in planner_memory.stored_for(store.root, path)]
    if as_json:
        echo(json.dumps(data, indent=1))
    else:
        table = Table(box=None, show_header=False, pad_edge=False)
        table.add_column(style="bold")
        table.add_column()
        for key in ("name", "path", "size", "architecture", "model_name", "quantization", "engine", "device",
                    "offload", "weight_bytes", "memory_limit", "layers", "embedding_length", "vocabulary",
                    "context_length", "chat_template", "draft", "rpc", "sha256", "checksum"):
            value = data[key]
            text = human(value) if key in ("size", "weight_bytes") else (
                "yes" if value is True else "no" if value is False else "" if value is None else str(value))
            table.add_row("weights" if key == "weight_bytes" else key.replace("_", " "), escape(text))
        table.add_row("memory plan", escape("; ".join(plan.describe()[:-1])))
        for line in plan.notices:
            table.add_row("note", escape(line))
        if "shards" in data:  # a model directory
            table.add_row("dtypes", escape(", ".join(f"{k} {human(v)}" for k, v in data["dtypes"].items())))
            table.add_row("shards", escape(f"{len(data['shards'])}: {', '.join(data['shards'])}"))
        for c in data["calibrations"]:
            costs = ", ".join(f"{n}: {x:.2f}x" for n, x in c["costs_vs_one"].items() if n in ("2", "4", "8", "16"))
            accepted = "; ".join(f"{k} {a}/{t} accepted" for k, (a, t) in c["accepted"].items())
            table.add_row("calibration", escape(f"{c['settings']}: 1 token {c['one_token_ms']:.1f} ms, {costs}"
                                                + (f"; {accepted}" if accepted else "")))
        if not data["calibrations"]:
            table.add_row("calibration", f"none yet (specrun calibrate {escape(model)})")
        print_stdout(table)
    if data["checksum"] == "MISMATCH":
        raise ModelFileError(f"{path.name} does not match its sha256", hint=f"pull it again: specrun rm {model} "
                             f"&& specrun pull {model}")


def _rpc_line() -> str:
    """Whether this llama.cpp build can spread a target over RPC workers (specrun worker, --rpc)."""
    from specrun.engines.rpc import rpc_built

    if rpc_built():
        return "built in: specrun worker on other machines, --rpc HOST:PORT,... here"
    return "not in this llama.cpp build (bash scripts/install.sh builds it with -DGGML_RPC=ON)"


def _pulled_draft(entry: Any, catalog: Any, store: Store) -> Path | None:
    """The catalog entry's recommended draft when it is pulled (the plan makes room for it)."""
    if entry is None or entry.draft is None:
        return None
    pulled = store.pulled(catalog.get(entry.draft))
    return Path(pulled.path) if pulled is not None else None


def _gguf_facts(path: Path) -> dict[str, Any]:
    """What a GGUF file's header says about the model (the header is checked on the way)."""
    from gguf import LlamaFileType

    meta = read_gguf(path)
    file_type = meta.metadata.get("general.file_type")
    try:
        quant = LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        quant = str(file_type)
    return {"size": path.stat().st_size, "architecture": meta.arch, "model_name": meta.metadata.get("general.name"),
            "quantization": quant, "layers": meta.n_layers, "embedding_length": meta.arch_value("embedding_length"),
            "vocabulary": meta.vocab_size, "context_length": meta.context_length,
            "chat_template": meta.has_chat_template}


def _directory_facts(path: Path) -> dict[str, Any]:
    """The same facts for a Hugging Face model directory, plus its stored dtypes and shards;
    the directory is checked on the way (config, tokenizer, every shard), with one-line errors."""
    from specrun.model_dir import open_model_dir

    return open_model_dir(path).facts()
