"""What the wheel ships: every package of the tree, kernels/ as specrun.kernels, and nothing
named `kernels` at the top level (bitsandbytes imports a package of that name)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_listed_and_kernels_ship_inside_specrun() -> None:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    folders = {p.parent for p in (ROOT / "specrun").rglob("*.py")}  # a folder of modules is a package ...
    assert all((f / "__init__.py").is_file() for f in folders)  # ... with an __init__ (a wheel skips it otherwise)
    on_disk = {".".join(f.relative_to(ROOT).parts) for f in folders}
    assert listed == on_disk | {"specrun.kernels"}
    assert tool["package-dir"] == {"specrun.kernels": "kernels"}
    assert (ROOT / "kernels" / "__init__.py").is_file() and "kernels" not in listed


def test_specrun_kernels_imports_from_the_kernels_folder() -> None:
    import specrun.kernels

    assert Path(specrun.kernels.__file__).resolve().parent == ROOT / "kernels"


def test_modules_stay_short() -> None:
    """One concept a module: none much past 400 lines."""
    long = {str(p.relative_to(ROOT)): n for p in [*(ROOT / "specrun").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]
            if (n := len(p.read_text().splitlines())) > 420}
    assert not long
