"""Reading a GGUF file's header without loading the model.

llama.cpp can crash on a malformed or truncated file, so every file is checked
here before an engine sees it: magic, version, that the metadata and tensor
table parse, and that the file is long enough to hold every tensor. The same
pass returns the metadata (architecture, layers, vocabulary size, context
length, chat template) for display and for draft/target compatibility checks.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from specrun.errors import ModelFileError

GGUF_MAGIC = b"GGUF"
_SCALARS: dict[int, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class ArrayInfo:
    """An array value: only its element type and length are kept (vocabularies are large)."""

    type: int
    length: int


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor's bytes are: what an engine reading the file itself (or streaming it) needs."""

    name: str
    type: int  # GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: rows first, the contiguous dimension last
    offset: int  # from the start of the file
    n_bytes: int


@dataclass(frozen=True)
class GGUFInfo:
    version: int
    metadata: dict[str, Any]  # scalars and strings as values, arrays as ArrayInfo
    n_tensors: int
    data_end: int  # bytes the file needs to hold every tensor
    file_size: int
    tensors: tuple[TensorInfo, ...] = ()

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def arch_value(self, key: str) -> Any:
        return self.metadata.get(f"{self.arch}.{key}")

    @property
    def n_layers(self) -> int | None:
        return self.arch_value("block_count")

    @property
    def context_length(self) -> int | None:
        return self.arch_value("context_length")

    @property
    def vocab_size(self) -> int | None:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        return tokens.length if isinstance(tokens, ArrayInfo) else None

    @property
    def has_chat_template(self) -> bool:
        return isinstance(self.metadata.get("tokenizer.chat_template"), str)


def read_gguf(path: Path) -> GGUFInfo:
    """Parse and check `path`'s header; ModelFileError if it is not a complete GGUF file."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise ModelFileError(f"{path}: not a GGUF file ({size} bytes)", hint=_HINT)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _parse(memoryview(mm), size, path)
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e.strerror or e}") from None


_HINT = "check the path, or pull the model again"


def _parse(buf: memoryview, size: int, path: Path) -> GGUFInfo:
    if bytes(buf[:4]) != GGUF_MAGIC:
        buf.release()
        raise ModelFileError(f"{path}: not a GGUF file (bad magic)", hint=_HINT)
    reader = _Reader(buf)
    try:
        version = reader.scalar("<I")
        if version not in (2, 3):
            raise ModelFileError(f"{path}: unsupported GGUF version {version}", hint="update specrun")
        n_tensors, n_kv = reader.scalar("<Q"), reader.scalar("<Q")
        if n_tensors > 1 << 24 or n_kv > 1 << 20:
            raise ModelFileError(f"{path}: corrupt GGUF header", hint=_HINT)
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = reader.string()
            metadata[key] = reader.value(reader.scalar("<I"))
        alignment = int(metadata.get("general.alignment", 32))
        data_extent = 0
        table = []
        for _ in range(n_tensors):
            name = reader.string()
            n_dims = reader.scalar("<I")
            if n_dims > 8:
                raise ModelFileError(f"{path}: corrupt tensor table", hint=_HINT)
            dims = [reader.scalar("<Q") for _ in range(n_dims)]
            n_elems = 1
            for d in dims:
                n_elems *= d
            ggml_type, offset = reader.scalar("<I"), reader.scalar("<Q")
            n_bytes = _tensor_bytes(ggml_type, n_elems, path)
            data_extent = max(data_extent, offset + n_bytes)
            table.append((name, ggml_type, tuple(reversed(dims)), offset, n_bytes))
        data_start = -(-reader.pos // alignment) * alignment
    except (struct.error, ValueError, UnicodeDecodeError):
        raise ModelFileError(f"{path}: truncated or corrupt GGUF header", hint=_HINT) from None
    finally:
        buf.release()
    data_end = data_start + data_extent
    if data_end > size:
        raise ModelFileError(
            f"{path}: truncated GGUF file ({size} bytes, its tensors need {data_end})", hint=_HINT
        )
    tensors = tuple(TensorInfo(name, t, shape, data_start + off, nb) for name, t, shape, off, nb in table)
    return GGUFInfo(version=version, metadata=metadata, n_tensors=n_tensors, data_end=data_end, file_size=size,
                    tensors=tensors)


def _tensor_bytes(ggml_type: int, n_elems: int, path: Path) -> int:
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ModelFileError(f"{path}: unknown tensor type {ggml_type}", hint="update specrun") from None
    return n_elems // block * type_size


class _Reader:
    """Sequential little-endian reads from a buffer; struct.error when it runs out."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 4

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.pos + n > len(self.buf):
            raise struct.error("string past end")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
        self.pos += n
        return s

    def skip_strings(self, count: int) -> None:
        buf, pos, end = self.buf, self.pos, len(self.buf)
        for _ in range(count):
            (n,) = struct.unpack_from("<Q", buf, pos)
            pos += 8 + n
            if pos > end:
                raise struct.error("string past end")
        self.pos = pos

    def value(self, vtype: int) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            etype, length = self.scalar("<I"), self.scalar("<Q")
            if etype == GGUFValueType.STRING:
                self.skip_strings(length)
            elif etype in _SCALARS:
                self.pos += struct.calcsize(_SCALARS[etype]) * length
                if self.pos > len(self.buf):
                    raise struct.error("array past end")
            else:
                raise ValueError(f"unsupported array element type {etype}")
            return ArrayInfo(type=etype, length=length)
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        raise ValueError(f"unknown value type {vtype}")
