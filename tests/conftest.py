"""Shared fixtures: tiny models built once per run, an isolated store per test,
and the real default pair for the `real` tier."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from specrun.catalog import load_catalog
from specrun.store import Store, default_root
from tests.hub_server import HubServer, point_hf_at
from tests.tiny_model import TinySpec, build_tiny_model

# Where the real models live, read before any test points SPECRUN_HOME elsewhere.
REAL_STORE = Store(default_root())
DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"


def torch_devices() -> list[str]:
    """Where the torch engine's tests run: the CPU, and CUDA when this machine has it."""
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def sharp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Larger weights: a few likely next tokens instead of a near-uniform spread."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "sharp.gguf", TinySpec(scale=4.0, seed=1))


@pytest.fixture(scope="module")
def pair(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """Target = the tiny model; drafts: the same model (its guesses come true), and other weights.
    Each an engine with a 1024-token cache on it (a `DraftModel`: what a drafter takes; the
    target's generations use its `engine` and `cache`)."""
    from specrun.engines.llamacpp import LlamaCppConfig, LlamaCppEngine
    from specrun.speculate.draft_model import DraftModel

    other = build_tiny_model(tmp_path_factory.mktemp("draft") / "other.gguf", TinySpec(seed=9))
    cfg = LlamaCppConfig(n_threads=1, max_tree_nodes=63)
    with LlamaCppEngine(tiny_model, cfg) as target, LlamaCppEngine(tiny_model, cfg) as same, \
            LlamaCppEngine(other, cfg) as different:
        yield tuple(DraftModel(e, e.new_cache(1024)) for e in (target, same, different))


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A stand-in Hugging Face Hub on loopback, with huggingface-hub pointed at it."""
    with HubServer() as server:
        point_hf_at(monkeypatch, server.url, tmp_path / "hf")
        yield server


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty store and user catalog: never the user's."""
    home = tmp_path / "specrun-home"
    monkeypatch.setenv("SPECRUN_HOME", str(home))
    return home


@pytest.fixture(autouse=True)
def idle_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Calibrations in this process do not read the machine's load: a test's curve is trusted or
    not for its own reasons, not because other tests ran beside it (a calibration test failed in a
    clean-clone run while another suite ran). Tests of the load check give their own."""
    from specrun import calibrate, session

    monkeypatch.setattr(session, "others_load", lambda target: calibrate.OthersLoad(read=lambda: None))


@pytest.fixture(scope="session")
def real_pair() -> dict[str, Path]:
    """Paths of the pulled default pair. Skips when absent, unless SPECRUN_REQUIRE_REAL=1 (CI)."""
    catalog = load_catalog()
    paths = {}
    for name in (DEFAULT_TARGET, DEFAULT_DRAFT):
        pulled = REAL_STORE.pulled(catalog.get(name))
        if pulled is None:
            msg = f"{name} is not pulled (run: specrun pull {DEFAULT_TARGET})"
            if os.environ.get("SPECRUN_REQUIRE_REAL") == "1":
                pytest.fail(msg)
            pytest.skip(msg)
        paths[name] = Path(pulled.path)
    return paths


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "real_pair" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real)
