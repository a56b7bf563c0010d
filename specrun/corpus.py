"""A corpus of one's own files for the suffix drafter (`--corpus DIR`), indexed once and kept.

Every text file under the folder is tokenized with the target's tokenizer and
the documents' suffix array built (speculate/suffix.py). Both are kept in the
store under a name derived from the folder, with a key of the tokenizer and of
every file's contents: a later run with the same corpus and tokenizer loads the
index in milliseconds; a changed file, another tokenizer, or a damaged index is
rebuilt, with a notice saying why.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from specrun.engines.base import Vocab
from specrun.errors import UsageError
from specrun.files import write_whole
from specrun.speculate.suffix import SuffixIndex

MAX_FILE = 8 << 20  # bytes: larger files are data, not text to continue
FORMAT = 1  # of the kept index


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    sha256: str


def corpus_files(folder: Path) -> list[CorpusFile]:
    """The text files under `folder` (UTF-8, no NUL bytes, at most MAX_FILE), sorted, hidden
    folders and files skipped; a UsageError when it is not a folder or holds none."""
    if not folder.is_dir():
        raise UsageError(f"--corpus {folder}: not a folder", hint="pass a folder of text or code files")
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(root) / name
            if name.startswith(".") or not path.is_file() or path.stat().st_size > MAX_FILE:
                continue
            data = path.read_bytes()
            if b"\0" in data or not _utf8(data):
                continue
            found.append(CorpusFile(path, hashlib.sha256(data).hexdigest()))
    if not found:
        raise UsageError(f"--corpus {folder}: no text files in it", hint="pass a folder of text or code files")
    return found


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def tokenizer_key(vocab: Vocab) -> str:
    """What identifies a tokenizer here: its size and every token's text."""
    h = hashlib.sha256(str(vocab.n_vocab).encode())
    for i in range(vocab.n_vocab):
        h.update(vocab.token_text(i) + b"\0")
    return h.hexdigest()


def corpus_key(files: list[CorpusFile], tokenizer: str) -> str:
    h = hashlib.sha256(f"{FORMAT}\n{tokenizer}\n".encode())
    for f in files:
        h.update(f"{f.path}\0{f.sha256}\n".encode())
    return h.hexdigest()


def load_corpus(folder: Path, vocab: Vocab, root: Path, notice: Callable[[str], None] = lambda _: None,
                progress: Callable[[int, int], None] = lambda done, total: None) -> SuffixIndex:
    """The index of `folder`'s text files for `vocab`'s tokenizer: the one kept under `root`
    when it is still true (same key, arrays intact), else built now (`progress(files done,
    files)` as it tokenizes) and kept. A store that cannot be written costs only the next
    run a rebuild."""
    folder = folder.resolve()
    files = corpus_files(folder)
    key = corpus_key(files, tokenizer_key(vocab))
    kept = root / (hashlib.sha256(str(folder).encode()).hexdigest()[:16] + ".npz")
    index, why = _load(kept, key)
    if index is not None:
        return index
    if why:
        notice(f"the corpus index of {folder} {why}: indexing it again")
    else:
        notice(f"indexing the corpus {folder} ({len(files)} files, once)…")
    docs = []
    for i, f in enumerate(files):
        docs.append(vocab.tokenize(f.path.read_text("utf-8"), add_special=False, parse_special=False))
        progress(i + 1, len(files))
    index = SuffixIndex(docs)
    try:
        _keep(kept, key, index)
    except OSError as e:
        notice(f"warning: cannot keep the corpus index in {root} ({e.strerror or e}); the next run builds it again")
    return index


def _checksum(stream: np.ndarray, order: np.ndarray) -> str:
    return hashlib.sha256(stream.tobytes() + order.tobytes()).hexdigest()


def _load(path: Path, key: str) -> tuple[SuffixIndex | None, str]:
    """(the kept index, '') when it is there and true; (None, why not) when it is there but
    stale or damaged; (None, '') when there is none."""
    if not path.exists():
        return None, ""
    try:
        with np.load(path, allow_pickle=False) as kept:
            meta = json.loads(str(kept["meta"]))
            stream, order = kept["stream"], kept["order"]
            if meta.get("key") != key:
                return None, "is stale (the files or the tokenizer changed)"
            if meta.get("checksum") != _checksum(stream, order):
                return None, "is damaged"
            return SuffixIndex(stream=stream, order=order), ""
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
        return None, f"is damaged ({type(e).__name__})"


def _keep(path: Path, key: str, index: SuffixIndex) -> None:
    """Whole or nothing (files.write_whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"key": key, "checksum": _checksum(index.stream, index.order), "tokens": len(index)})
    write_whole(path, lambda tmp: np.savez(tmp, stream=index.stream, order=index.order, meta=np.array(meta)))
