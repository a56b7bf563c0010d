"""Safetensors directories: snapshot pulls against the stand-in hub (tests/hub_server.py),
their catalog entries, and the CLI on directories (pull, list, info, rm, add)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("tokenizers")

from specrun.catalog import HfSource, ModelEntry, load_catalog  # noqa: E402
from specrun.cli import app  # noqa: E402
from specrun.errors import CatalogError, NotPulledError, PullError  # noqa: E402
from specrun.model_dir import open_model_dir  # noqa: E402
from specrun.pulls import pull  # noqa: E402
from specrun.store import Store  # noqa: E402
from tests.hub_server import HubServer, commit_for, set_hf_offline  # noqa: E402
from tests.tiny_hf import TinyHfSpec, build_tiny_hf  # noqa: E402

REPO = "tiny-org/tiny-llama-hf"
SHARD2 = "model-00002-of-00002.safetensors"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_hf(tmp_path_factory.mktemp("hf") / "tiny-llama", TinyHfSpec(shards=2))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(root=tmp_path / "store")


def upload(hub: HubServer, model: Path, revision: str = "main", skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Serve `model`'s files (weights as LFS files) plus two files no pattern asks for."""
    files = {p.name: p.read_bytes() for p in sorted(model.iterdir()) if p.name not in skip}
    files |= {"pytorch_model.bin": b"pickle" * 100, "README.md": b"# tiny\n"}
    for name, data in files.items():
        hub.add(REPO, name, data, revision=revision, lfs=name.endswith((".safetensors", ".bin")))
    return files


def entry(source: HfSource = HfSource(REPO), name: str = "tiny-hf", size: int | None = None) -> ModelEntry:
    return ModelEntry(name=name, arch="llama", tokenizer="llama", file="tiny-llama", format="safetensors",
                      sources=(source,), size=size)


def assert_not_pulled(store: Store, e: ModelEntry) -> None:
    assert store.pulled(e) is None
    with pytest.raises(NotPulledError):
        store.path_of(e)
    assert not (store.model_dir(e.name) / "manifest.json").exists()
    tmp = store.root / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []


def test_snapshot_pull(hub: HubServer, store: Store, model: Path) -> None:
    upload(hub, model)
    e = entry()
    pulled = pull(store, e)

    path = store.path_of(e)
    assert path == store.model_dir(e.name) / "tiny-llama" and path.is_dir()
    expected = sorted(p.name for p in model.iterdir())  # *.json and *.safetensors: no .bin, no README
    assert sorted(pulled.files or {}) == expected and pulled.commit == commit_for(REPO, "main")
    for name in expected:
        assert (path / name).read_bytes() == (model / name).read_bytes()
    assert pulled.size == sum(os.path.getsize(model / n) for n in expected) and pulled.source == f"hf:{REPO}@main"
    blob = (Path(os.environ["HF_HUB_CACHE"]) / "models--tiny-org--tiny-llama-hf" / "snapshots" / pulled.commit
            / SHARD2).resolve()
    assert (path / SHARD2).stat().st_ino == blob.stat().st_ino  # a hard link into the HF cache, no copy
    assert open_model_dir(path).shards == ("model-00001-of-00002.safetensors", SHARD2)
    assert list((store.root / "tmp").iterdir()) == []

    hub.clear_requests()
    assert pull(store, e) == pulled and hub.requests == []  # pulled: no network at all


def test_allow_patterns_and_pinned_revision(hub: HubServer, store: Store, model: Path, tmp_path: Path) -> None:
    upload(hub, model)
    old = build_tiny_hf(tmp_path / "old", TinyHfSpec(shards=2, seed=7))
    upload(hub, old, revision="v1")
    commit = commit_for(REPO, "v1")
    for revision in ("v1", commit):
        e = entry(HfSource(REPO, revision=revision, allow_patterns=("*.safetensors", "*.json", "README.md")),
                  name=f"pinned-{revision[:4]}")
        pulled = pull(store, e)
        assert pulled.commit == commit and "README.md" in (pulled.files or {})
        assert (store.path_of(e) / SHARD2).read_bytes() == (old / SHARD2).read_bytes()


@pytest.mark.parametrize("bad", [SHARD2, "config.json"])  # an LFS file (sha256), a small one (git sha1)
def test_corrupt_file_is_caught_and_dropped_from_the_hf_cache(hub: HubServer, store: Store, model: Path,
                                                              bad: str) -> None:
    upload(hub, model)
    hub.corrupt(REPO, bad)
    e = entry()
    with pytest.raises(PullError) as exc:
        pull(store, e)
    assert "\n" not in exc.value.message and bad in exc.value.message
    assert ("sha256" if bad == SHARD2 else "git sha1") in exc.value.message
    assert_not_pulled(store, e)
    hub.clear_faults()
    assert pull(store, e).files is not None  # the bad blob was dropped: fetched again, now right


def test_resumes_a_cut_download(hub: HubServer, store: Store, model: Path) -> None:
    upload(hub, model)
    hub.drop_after(20_000, times=1, filename="model-00001-of-00002.safetensors")
    pulled = pull(store, entry())
    assert any(r.range for r in hub.gets("model-00001-of-00002.safetensors"))
    assert pulled.files is not None


def test_unusable_snapshots_fail_whole(hub: HubServer, store: Store, model: Path) -> None:
    upload(hub, model, skip=(SHARD2,))  # the index names a shard the repo lacks
    e = entry()
    with pytest.raises(PullError) as exc:
        pull(store, e)
    assert SHARD2 in exc.value.message and "missing" in exc.value.message and "\n" not in exc.value.message
    assert_not_pulled(store, e)
    with pytest.raises(PullError) as exc:
        pull(store, entry(HfSource(REPO, allow_patterns=("*.gguf",))))
    assert "matches *.gguf" in exc.value.message
    with pytest.raises(PullError) as exc:
        pull(store, entry(HfSource("nobody/nothing")))
    assert "RepositoryNotFound" in exc.value.message and "\n" not in exc.value.message
    upload(hub, model)
    with pytest.raises(PullError) as exc:
        pull(store, entry(size=123))
    assert "size mismatch" in exc.value.message


def test_leftovers_of_a_killed_pull_are_replaced(hub: HubServer, store: Store, model: Path) -> None:
    upload(hub, model)
    e = entry()
    half = store.model_dir(e.name) / "tiny-llama"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{")  # a killed pull's rename never happened: no manifest
    (store.root / "tmp" / f"{e.name}.dead").mkdir(parents=True)
    assert store.pulled(e) is None
    pull(store, e)
    assert json.loads((half / "config.json").read_text())["model_type"] == "llama"
    assert list((store.root / "tmp").iterdir()) == []


def test_a_deleted_file_unpulls_the_model(hub: HubServer, store: Store, model: Path) -> None:
    upload(hub, model)
    e = entry()
    pull(store, e)
    (store.path_of(e) / SHARD2).unlink()
    assert store.pulled(e) is None


def test_offline_pull_from_the_hf_cache(hub: HubServer, store: Store, model: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    upload(hub, model)
    e = entry()
    pull(store, e)
    set_hf_offline(monkeypatch)
    hub.stop()
    other = Store(root=tmp_path / "other")
    assert pull(other, e).commit == commit_for(REPO, "main")
    assert open_model_dir(other.path_of(e)).tensors


# --- the catalog ------------------------------------------------------------------------------

CATALOG = """
[[model]]
name = "tiny-hf"
arch = "llama"
tokenizer = "llama"
format = "safetensors"
{extra}
[[model.sources]]
kind = "hf"
repo = "{repo}"
{source}
"""


def write_catalog(path: Path, extra: str = "", source: str = "") -> Path:
    path.write_text(CATALOG.format(extra=extra, repo=REPO, source=source))
    return path


def test_catalog_safetensors_entries(tmp_path: Path) -> None:
    e = load_catalog(write_catalog(tmp_path / "a.toml", source='revision = "v1"\nallow_patterns = ["*.json"]')
                     ).get("tiny-hf")
    assert e.is_directory and e.file == "tiny-hf" and e.sources[0] == HfSource(REPO, revision="v1",
                                                                               allow_patterns=("*.json",))
    for extra, source, words in (('sha256 = "' + "a" * 64 + '"', "", "no single sha256"),
                                 ("", 'file = "model.safetensors"', "a safetensors source"),
                                 ("", "allow_patterns = []", "a safetensors source"),
                                 ('format = "onnx"', "", "format must be")):
        text = CATALOG.format(extra=extra, repo=REPO, source=source)
        if extra.startswith("format"):
            text = text.replace('format = "safetensors"\n', "")
        (tmp_path / "b.toml").write_text(text)
        with pytest.raises(CatalogError) as exc:
            load_catalog(tmp_path / "b.toml")
        assert words in exc.value.message and "\n" not in exc.value.message


# --- the CLI ----------------------------------------------------------------------------------

def test_cli_pull_list_info_rm(hub: HubServer, model: Path, isolated_home: Path) -> None:
    upload(hub, model)
    isolated_home.mkdir(parents=True, exist_ok=True)
    write_catalog(isolated_home / "models.toml")
    runner = CliRunner()
    done = runner.invoke(app, ["pull", "tiny-hf"])
    assert done.exit_code == 0, done.output
    assert "pulled tiny-hf" in done.stderr and "7 files, hub checksums ok" in done.stderr
    rows = json.loads(runner.invoke(app, ["list", "--json"]).stdout)
    row = next(r for r in rows if r["name"] == "tiny-hf")
    assert row["pulled"] and Path(row["path"]).is_dir()
    info = runner.invoke(app, ["info", "tiny-hf", "--json", "--device", "cpu"])
    assert info.exit_code == 0, info.output
    facts = json.loads(info.stdout)
    assert facts["architecture"] == "llama" and facts["layers"] == 2 and facts["checksum"] == "verified when pulled"
    assert len(facts["shards"]) == 2 and list(facts["dtypes"]) == ["BF16"] and facts["chat_template"] is True
    table = runner.invoke(app, ["info", "tiny-hf", "--device", "cpu"])
    assert table.exit_code == 0 and "shards" in table.stdout and "BF16" in table.stdout
    done = runner.invoke(app, ["rm", "tiny-hf"])
    assert done.exit_code == 0 and not Path(row["path"]).exists()


def test_cli_add_a_directory(model: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    done = runner.invoke(app, ["add", "my-tiny", str(model)])
    assert done.exit_code == 0, done.output
    e = load_catalog().get("my-tiny")
    assert e.is_directory and e.path == model.resolve() and e.arch == "llama" and e.size is not None
    assert Store().path_of(e) == model.resolve()
    rows = json.loads(runner.invoke(app, ["list", "--json"]).stdout)
    assert next(r for r in rows if r["name"] == "my-tiny")["pulled"] is True
    info = runner.invoke(app, ["info", "my-tiny", "--json", "--device", "cpu"])
    assert info.exit_code == 0 and json.loads(info.stdout)["vocabulary"] == 448

    broken = Path(shutil.copytree(model, tmp_path / "broken"))
    (broken / SHARD2).unlink()
    no_tok = Path(shutil.copytree(model, tmp_path / "no-tok"))
    (no_tok / "tokenizer.json").unlink()
    for path, words in ((broken, f"shard {SHARD2}"), (no_tok, "no tokenizer.json"),
                        (tmp_path / "nowhere", "no such file or directory"), (tmp_path, "no config.json")):
        done = runner.invoke(app, ["add", "bad", str(path)])
        assert done.exit_code != 0 and words in done.stderr, done.output
        assert "Traceback" not in done.output and len(done.stderr.strip().splitlines()) <= 2
    assert "bad" not in load_catalog().entries
