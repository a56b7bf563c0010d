"""`--corpus DIR`: indexed once with the target's tokenizer, kept in the store, rebuilt with a
notice when stale or damaged; the suffix drafter reads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from specrun.corpus import corpus_files, load_corpus
from specrun.engines.llamacpp import LlamaCppConfig, LlamaCppEngine
from specrun.errors import UsageError
from specrun.speculate.suffix import SEPARATOR
from tests import processes


@pytest.fixture(scope="module")
def vocab(tiny_model: Path):
    with LlamaCppEngine(tiny_model, LlamaCppConfig(n_threads=1)) as e:
        yield e.vocab


def _corpus(folder: Path) -> Path:
    folder.mkdir()
    (folder / "a.py").write_text("def add(a, b):\n    return a + b\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.txt").write_text("hello world hello world\n")
    (folder / "blob.bin").write_bytes(b"\0\1\2")  # not text: skipped
    (folder / ".hidden").write_text("secret")  # hidden: skipped
    return folder


def test_a_corpus_is_indexed_once_and_loaded_after(vocab, tmp_path: Path) -> None:
    folder, root = _corpus(tmp_path / "corpus"), tmp_path / "store"
    assert [f.path.name for f in corpus_files(folder)] == ["a.py", "b.txt"]
    notices: list[str] = []
    progress: list[tuple[int, int]] = []
    index = load_corpus(folder, vocab, root, notices.append, lambda d, t: progress.append((d, t)))
    assert progress == [(1, 2), (2, 2)] and len(notices) == 1 and "indexing the corpus" in notices[0]
    docs = [vocab.tokenize(t, add_special=False, parse_special=False)
            for t in ("def add(a, b):\n    return a + b\n", "hello world hello world\n")]
    assert list(index.stream) == docs[0] + [SEPARATOR] + docs[1] + [SEPARATOR]
    again: list[str] = []
    kept = load_corpus(folder, vocab, root, again.append)
    assert again == [] and np.array_equal(kept.stream, index.stream) and np.array_equal(kept.order, index.order)
    length, starts = kept.matches(docs[1][:2])
    assert length == 2 and starts  # "hello world" continues in the corpus


def test_a_stale_or_damaged_index_is_rebuilt_with_a_notice(vocab, tmp_path: Path) -> None:
    folder, root = _corpus(tmp_path / "corpus"), tmp_path / "store"
    load_corpus(folder, vocab, root)
    (folder / "a.py").write_text("def sub(a, b):\n    return a - b\n")  # the corpus changed
    notices: list[str] = []
    index = load_corpus(folder, vocab, root, notices.append)
    assert len(notices) == 1 and "is stale" in notices[0]
    assert list(index.stream[:3]) == vocab.tokenize("def sub(a, b):\n", add_special=False)[:3]
    (kept,) = root.glob("*.npz")
    kept.write_bytes(kept.read_bytes()[:100])  # cut short: a crash, a full disk
    notices.clear()
    rebuilt = load_corpus(folder, vocab, root, notices.append)
    assert len(notices) == 1 and "is damaged" in notices[0] and np.array_equal(rebuilt.stream, index.stream)
    with np.load(kept) as z:  # whole again; now tamper with the arrays, keeping the file readable
        stream, order, meta = z["stream"].copy(), z["order"], z["meta"]
    stream[0] += 1
    np.savez(kept, stream=stream, order=order, meta=meta)
    notices.clear()
    load_corpus(folder, vocab, root, notices.append)
    assert notices and "is damaged" in notices[0]


def test_a_folder_without_text_is_a_usage_error(tmp_path: Path, vocab) -> None:
    with pytest.raises(UsageError, match="not a folder"):
        corpus_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no text files"):
        load_corpus(tmp_path / "empty", vocab, tmp_path / "store")


def test_run_with_a_corpus_gives_the_plain_text(tiny_model: Path, tmp_path: Path) -> None:
    folder = _corpus(tmp_path / "corpus")
    cmd = [sys.executable, "-m", "specrun", "run", str(tiny_model), "hello world", "-t", "0", "-n", "24", "--json"]
    env = {**os.environ, "NO_COLOR": "1"}
    plain = processes.run(cmd + ["--spec", "none"], capture_output=True, text=True, env=env, timeout=300)
    spec = processes.run(cmd + ["--corpus", str(folder)], capture_output=True, text=True, env=env, timeout=300)
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert json.loads(spec.stdout)["text"] == json.loads(plain.stdout)["text"]
    assert "indexing the corpus" in spec.stderr
    bad = processes.run(cmd + ["--corpus", str(tmp_path / "nope")], capture_output=True, text=True, env=env,
                        timeout=300)
    assert bad.returncode == 2 and "not a folder" in bad.stderr and "Traceback" not in bad.stderr
    assert isinstance(bad, subprocess.CompletedProcess)
