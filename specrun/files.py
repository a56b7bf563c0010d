"""Small filesystem helpers every layer may use: whole-or-nothing writes, sizes, checksums.

At the bottom of specrun's layers (beside the file formats): nothing here knows
about models, catalogs or engines.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Callable

CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def write_atomic(path: Path, text: str) -> None:
    """Write a whole file or nothing: a temporary file beside it, renamed into place."""
    write_whole(path, lambda tmp: tmp.write_text(text))


def write_whole(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temporary file beside `path` (of the same suffix: numpy's savez
    adds ".npz" to a name without it), then renamed into place; on any failure, nothing."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def directory_size(path: Path) -> int:
    """The bytes of every file below `path`."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def model_bytes(model: Path) -> int:
    """A model's size on disk: a GGUF file's, or the sum of a directory's files."""
    return sum(f.stat().st_size for f in model.iterdir() if f.is_file()) if model.is_dir() else model.stat().st_size


def sha256_file(path: Path, advance: Callable[[int], None] = lambda n: None) -> str:
    """The file's sha256 (hex); `advance` hears each chunk's bytes as they are read (progress)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK * 8):
            h.update(chunk)
            advance(len(chunk))
    return h.hexdigest()


def is_sha256(value: object) -> bool:
    """64 lowercase hex digits: how catalogs and the hub's LFS records write a sha256."""
    return isinstance(value, str) and bool(_SHA256.match(value))
