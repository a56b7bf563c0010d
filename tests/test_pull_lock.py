"""Pulls of one model at the same time, in separate processes, against the stand-in hub.

Each pull runs `PULL` in its own Python process (as two terminals would). Its
progress leaves marker files, so the test can tell when the first pull has begun
(holding the lock, its staging folder made), and the first pull can hold there
until the second one says it is waiting: the two really overlap, with no sleeps to tune.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path

from specrun.catalog import HfSource, ModelEntry
from specrun.pulls import pull
from specrun.store import Store

from tests import processes
from tests.hub_server import HubServer

REPO = "tiny-org/tiny-model-GGUF"
FILE = "tiny-q8_0.gguf"
DATA = b"GGUF" + bytes(range(256)) * 800
ROOT = Path(__file__).resolve().parent.parent

PULL = r"""
import sys, time
from pathlib import Path
from specrun.catalog import HfSource, ModelEntry
from specrun.pulls import pull
from specrun.store import Store

root, name, repo, file, digest, flags, hold = sys.argv[1:]
flags = Path(flags)

class Marks:
    held = False
    def start(self, description, total):  # first called with the lock held and the staging folder made
        if self.held:
            return
        self.held = True
        (flags / "started").touch()
        if hold == "until-waited":  # keep the lock until the other pull waits for it
            deadline = time.monotonic() + 10
            while not (flags / "waiting").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        while hold == "forever":  # until killed
            time.sleep(1)
    def advance(self, n): pass
    def note(self, message):
        print(message, file=sys.stderr, flush=True)
        if message.startswith("waiting"):
            (flags / "waiting").touch()

e = ModelEntry(name=name, arch="llama", tokenizer="llama", file="tiny.gguf", sha256=digest, size=None,
               sources=(HfSource(repo, file),))
print(pull(Store(Path(root)), e, progress=Marks()).sha256)
"""


def entry(digest: str, name: str = "tiny") -> ModelEntry:
    return ModelEntry(name=name, arch="llama", tokenizer="llama", file="tiny.gguf", sha256=digest, size=None,
                      sources=(HfSource(REPO, FILE),))


def start_pull(store: Store, digest: str, flags: Path, hold: str) -> AbstractContextManager[subprocess.Popen[str]]:
    """`specrun pull` of tiny in another process (huggingface-hub finds the hub through the
    environment), killed when the test ends: one holding "forever" must not outlive a failure."""
    args = [str(store.root), "tiny", REPO, FILE, digest, str(flags), hold]
    return processes.spawned([sys.executable, "-c", PULL, *args], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(path: Path, proc: subprocess.Popen[str], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, f"the pull ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {path.name} after {seconds} s"
        time.sleep(0.02)


class Notes:
    def __init__(self) -> None:
        self.notes: list[str] = []

    def start(self, description: str, total: int | None) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def note(self, message: str) -> None:
        self.notes.append(message)


def test_two_pulls_of_one_model_at_once_download_it_once(hub: HubServer, tmp_path: Path) -> None:
    digest = hub.add(REPO, FILE, DATA)
    store, flags = Store(tmp_path / "store"), tmp_path / "flags"
    flags.mkdir()

    with start_pull(store, digest, flags, hold="until-waited") as first:
        wait_for(flags / "started", first)  # the first holds the lock, its staging folder in tmp/
        with start_pull(store, digest, flags, hold="no") as second:
            results = [p.communicate(timeout=60) for p in (first, second)]

    for proc, (out, err) in zip((first, second), results):
        assert proc.returncode == 0, err
        assert out.strip() == digest
    assert results[1][1].count("waiting for another pull of tiny to finish") == 1, results[1][1]
    assert "waiting" not in results[0][1]
    pulled = store.pulled(entry(digest))
    assert pulled is not None and pulled.sha256 == digest
    assert hashlib.sha256(Path(pulled.path).read_bytes()).hexdigest() == digest
    assert len(hub.gets(FILE)) == 1  # the second reused the first's file
    assert list((store.root / "tmp").iterdir()) == []


def test_leftovers_of_a_killed_pull_are_cleared_by_the_next(hub: HubServer, tmp_path: Path) -> None:
    digest = hub.add(REPO, FILE, DATA)
    store, flags = Store(tmp_path / "store"), tmp_path / "flags"
    flags.mkdir()
    with start_pull(store, digest, flags, hold="forever") as killed:
        wait_for(flags / "started", killed)
        killed.kill()  # like kill -9: no cleanup runs, its lock goes with the process
        killed.communicate(timeout=30)
    tmp = store.root / "tmp"
    assert [p.name.startswith("tiny.") for p in tmp.iterdir()] == [True]  # its staging folder, left behind
    other = tmp / "tiny.v2.abcd1234"  # a pull of another model, "tiny.v2", still running
    other.mkdir()
    progress = Notes()

    pulled = pull(store, entry(digest), progress=progress)

    assert pulled.sha256 == digest and Path(pulled.path).read_bytes() == DATA
    assert progress.notes == []  # no live pull held the lock: no waiting
    assert list(tmp.iterdir()) == [other]
