"""Hugging Face model directories: config.json, safetensors shards, tokenizer files.

What `gguf_file.py` is for GGUF files, this module is for directories: every
directory is checked here before an engine sees it (config.json parses, the
tokenizer is there, every shard the index names exists and its header parses,
every tensor fits inside its file), and the same pass gives the facts `specrun
info` shows. No torch here: the CLI reads headers without paying for an import
of torch. (Pulling a directory, a hub snapshot, is pulls.py's; it ends with
this module's check.)

The safetensors format is small enough to read by hand: an 8-byte little-endian
header length, a JSON header mapping each tensor name to its dtype, shape and
[begin, end) byte offsets (relative to the end of the header), then raw data.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specrun.errors import ModelFileError



CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.47 saves the template

# Element sizes of safetensors dtypes; a dtype missing here is listed but its size not checked.
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
MAX_HEADER = 100 << 20  # the safetensors library's own limit: a larger header is a broken file
_HINT = "a model directory holds config.json, tokenizer.json and model.safetensors (or shards and their index)"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: where its bytes are."""

    name: str
    dtype: str  # safetensors name: "BF16", "F16", "F32", ...
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, checked to lie inside it; ModelFileError otherwise."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            head = f.read(8)
            if len(head) < 8:
                raise ModelFileError(f"{path}: not a safetensors file ({size} bytes)", hint=_HINT)
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER, size - 8):
                raise ModelFileError(f"{path}: not a safetensors file, or truncated (header of {n} bytes "
                                     f"in a file of {size})", hint="download it again")
            raw = f.read(n)
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise ModelFileError(f"{path}: the safetensors header is not valid JSON", hint="download it again") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: the safetensors header is not a JSON object")
    data_start, data_size = 8 + n, size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = str(spec["dtype"]), tuple(int(d) for d in spec["shape"])
            begin, end = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"{path}: tensor {name} has a malformed header entry") from None
        item = DTYPE_SIZES.get(dtype)
        if not 0 <= begin <= end <= data_size or any(d < 0 for d in shape):
            raise ModelFileError(f"{path}: tensor {name} lies outside the file (truncated?)",
                                 hint="download it again")
        if item is not None and end - begin != math.prod(shape) * item:
            raise ModelFileError(f"{path}: tensor {name} holds {end - begin} bytes, its shape {list(shape)} "
                                 f"of {dtype} needs {math.prod(shape) * item}")
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + begin, end - begin)
    return tensors


def read_json(directory: Path, name: str, required: bool = False) -> dict[str, Any]:
    """`directory/name` as a JSON object; {} when absent and not required; one-line errors."""
    path = directory / name
    if not path.is_file():
        if required:
            raise ModelFileError(f"{directory}: no {name}", hint=_HINT)
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelFileError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise ModelFileError(f"{path}: not a JSON object")
    return value


def shard_files(directory: Path) -> dict[str, list[str]]:
    """Shard file name -> the tensor names the index puts there ([] for the single-file layout,
    whose tensors are whatever its header lists). ModelFileError naming a missing shard."""
    index = directory / INDEX
    if index.is_file():
        weight_map = read_json(directory, INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFileError(f"{index}: no weight_map", hint="download the model again")
        shards: dict[str, list[str]] = {}
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith("."):
                raise ModelFileError(f"{index}: tensor {tensor} maps to an invalid shard name {shard!r}")
            shards.setdefault(shard, []).append(tensor)
        for shard in sorted(shards):
            if not (directory / shard).is_file():
                raise ModelFileError(f"{directory}: shard {shard} named by {INDEX} is missing",
                                     hint="download the model again (every shard)")
        return shards
    if (directory / SINGLE).is_file():
        return {SINGLE: []}
    raise ModelFileError(f"{directory}: no {SINGLE} and no {INDEX}", hint=_HINT)


@dataclass(frozen=True)
class ModelDir:
    """A checked model directory: its config and every tensor of every shard."""

    path: Path
    config: dict[str, Any]
    shards: tuple[str, ...]  # file names, sorted
    tensors: dict[str, TensorInfo]

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "unknown"))

    def text_config(self) -> dict[str, Any]:
        nested = self.config.get("text_config")
        return nested if isinstance(nested, dict) else self.config

    def dtype_bytes(self) -> dict[str, int]:
        """Stored dtype -> bytes of tensors in it (a bf16 checkpoint with f32 norms shows both)."""
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.dtype] = out.get(t.dtype, 0) + t.nbytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def size(self) -> int:
        """Bytes of every file in the directory (what the store holds for it)."""
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def facts(self) -> dict[str, Any]:
        """What `specrun info` shows, with the same keys as for a GGUF file plus dtypes and shards."""
        text = self.text_config()
        dtypes = self.dtype_bytes()
        return {
            "size": self.size(), "architecture": self.model_type,
            "model_name": self.config.get("_name_or_path") or self.path.name,
            "quantization": "/".join(dtypes) or None, "layers": text.get("num_hidden_layers"),
            "embedding_length": text.get("hidden_size"), "vocabulary": text.get("vocab_size"),
            "context_length": text.get("max_position_embeddings"),
            "chat_template": chat_template(self.path) is not None,
            "dtypes": dtypes, "shards": list(self.shards), "tensors": len(self.tensors),
        }


def open_model_dir(path: Path, need_tokenizer: bool = True) -> ModelDir:
    """Check `path` as a Hugging Face model directory (see the module docstring); one-line
    ModelFileError naming the first problem."""
    if not path.is_dir():
        raise ModelFileError(f"{path} is not a directory", hint=_HINT)
    config = read_json(path, CONFIG, required=True)
    if need_tokenizer and not (path / TOKENIZER).is_file():
        raise ModelFileError(f"{path}: no {TOKENIZER}", hint="specrun tokenizes with the fast tokenizer's "
                             "tokenizer.json; download it with the model")
    shards = shard_files(path)
    tensors: dict[str, TensorInfo] = {}
    for shard, names in sorted(shards.items()):
        found = read_safetensors_header(path / shard)
        for name in names:
            if name not in found:
                raise ModelFileError(f"{path}: {INDEX} puts tensor {name} in {shard}, which lacks it",
                                     hint="download the model again")
        tensors.update(found)
    if not tensors:
        raise ModelFileError(f"{path}: the safetensors files hold no tensors")
    return ModelDir(path, config, tuple(sorted(shards)), tensors)


def chat_template(directory: Path) -> str | None:
    """The model's chat template: chat_template.jinja, else tokenizer_config.json's
    `chat_template` (a string, or a list of named templates whose "default" is used)."""
    jinja = directory / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ModelFileError(f"cannot read {jinja}: {e}") from None
    template = read_json(directory, TOKENIZER_CONFIG).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


# --- pulling a directory: a hub snapshot, for the store ---------------------------


