from __future__ import annotations

import struct
from pathlib import Path

import pytest
from gguf import GGUFReader

from specrun.errors import ModelFileError
from specrun.gguf_file import ArrayInfo, read_gguf


def test_header_matches_the_gguf_package_reader(tiny_model: Path) -> None:
    """Our fast header pass against gguf's own (slow, complete) reader."""
    info = read_gguf(tiny_model)
    ref = GGUFReader(tiny_model)
    assert info.n_tensors == len(ref.tensors)
    ref_end = max(t.data_offset + t.n_bytes for t in ref.tensors)
    assert info.data_end == ref_end == tiny_model.stat().st_size
    for name, fld in ref.fields.items():
        if name.startswith("GGUF."):
            continue
        ours = info.metadata[name]
        if isinstance(ours, ArrayInfo):
            assert ours.length == len(fld.data)
        else:
            assert ours == pytest.approx(fld.contents())
    assert info.arch == "llama" and info.n_layers == 2 and info.vocab_size == 272
    assert info.context_length == 2048 and info.has_chat_template


def _variant(src: Path, dst: Path, data: bytes) -> Path:
    dst.write_bytes(data)
    return dst


@pytest.mark.parametrize("cut", [10, 200, 3000, -1])
def test_truncated_files_are_rejected(tiny_model: Path, tmp_path: Path, cut: int) -> None:
    data = tiny_model.read_bytes()
    path = _variant(tiny_model, tmp_path / "t.gguf", data[:cut])
    with pytest.raises(ModelFileError, match="truncated|not a GGUF"):
        read_gguf(path)


def test_wrong_magic_and_version(tiny_model: Path, tmp_path: Path) -> None:
    data = tiny_model.read_bytes()
    with pytest.raises(ModelFileError, match="bad magic"):
        read_gguf(_variant(tiny_model, tmp_path / "a.gguf", b"GGML" + data[4:]))
    with pytest.raises(ModelFileError, match="version 9"):
        read_gguf(_variant(tiny_model, tmp_path / "b.gguf", data[:4] + struct.pack("<I", 9) + data[8:]))
    with pytest.raises(ModelFileError, match="not a GGUF"):
        read_gguf(_variant(tiny_model, tmp_path / "c.gguf", b"hello\n"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="cannot read"):
        read_gguf(tmp_path / "nope.gguf")
