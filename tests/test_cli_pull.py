"""`specrun pull / list / rm` end to end, against the stand-in hub (tests/hub_server.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from specrun.cli import app
from tests.hub_server import HubServer, write_hub_catalog

REPO = "tiny-org/tiny-model-GGUF"
FILE = "tiny-q8_0.gguf"
DATA = b"GGUF" + bytes(range(256)) * 400


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("SPECRUN_HOME", str(home))
    return home


def write_catalog(home: Path, sha256: str, name: str = "tiny-hub") -> None:
    write_hub_catalog(home / "models.toml", name, REPO, FILE, sha256, len(DATA))


def listed(runner: CliRunner, name: str) -> dict:
    result = runner.invoke(app, ["list", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    return next(r for r in rows if r["name"] == name)


def test_pull_list_rm(hub: HubServer, home: Path) -> None:
    digest = hub.add(REPO, FILE, DATA)
    write_catalog(home, digest)
    runner = CliRunner()

    assert listed(runner, "tiny-hub")["pulled"] is False

    result = runner.invoke(app, ["pull", "tiny-hub"])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # messages go to stderr
    assert "pulled tiny-hub" in result.stderr and "sha256 ok" in result.stderr

    row = listed(runner, "tiny-hub")
    assert row["pulled"] is True and row["size"] == len(DATA)
    path = Path(row["path"])
    assert path.is_relative_to(home) and hashlib.sha256(path.read_bytes()).hexdigest() == digest

    hub.clear_requests()
    again = runner.invoke(app, ["pull", "tiny-hub"])
    assert again.exit_code == 0 and again.stdout == ""
    assert "already pulled" in again.stderr
    assert hub.requests == []

    removed = runner.invoke(app, ["rm", "tiny-hub"])
    assert removed.exit_code == 0, removed.output
    assert removed.stdout == "" and "removed tiny-hub" in removed.stderr
    assert listed(runner, "tiny-hub")["pulled"] is False
    assert not path.exists()

    twice = runner.invoke(app, ["rm", "tiny-hub"])
    assert twice.exit_code == 1
    assert twice.stderr.startswith("error: model 'tiny-hub' is not in the store")


def test_checksum_mismatch_is_one_error_line(hub: HubServer, home: Path) -> None:
    hub.add(REPO, FILE, DATA)
    write_catalog(home, hashlib.sha256(b"something else").hexdigest())
    runner = CliRunner()

    result = runner.invoke(app, ["pull", "tiny-hub"])

    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and "checksum mismatch" in errors[0]
    assert all(ln.startswith(("error:", "hint:")) for ln in lines), lines
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)
    assert listed(runner, "tiny-hub")["pulled"] is False
    assert not (home / "models" / "tiny-hub" / "manifest.json").exists()


def test_pull_unknown_name(hub: HubServer, home: Path) -> None:
    result = CliRunner().invoke(app, ["pull", "no-such-model"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: unknown model 'no-such-model'")
    assert hub.requests == []
