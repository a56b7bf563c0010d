"""llama-cpp-python, loaded so that OpenMP's idle threads keep spinning between passes.

llama.cpp's CPU backend runs each pass on an OpenMP team of the thread that calls it.
Drafting during the target's pass calls it from a second thread, so the process then
holds two teams, and libgomp, counting their threads against the cores, stops spinning
between parallel regions once they outnumber them (its "throttled" spin count), for good:
every pass after then waits for its workers to wake. On 2 cores, after one prompt that
drafted during the target's passes, plain decoding ran at 12.2 tok/s for the rest of
the process where it had run at 16.4 (and `specrun chat` stayed that slow). With
OMP_WAIT_POLICY=ACTIVE and GOMP_SPINCOUNT at libgomp's own default, a worker spins that
long, then sleeps, whatever the count: 15.0-15.5 tok/s there.

libgomp reads them once, when it is loaded (with llama-cpp-python, here), so they are set
around the import only: child processes and a torch that loads its own libgomp later
keep their defaults; and only where the build uses libgomp (LLVM's OpenMP reads ACTIVE as
spinning for good). A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT is left as it is.
Every module that uses llama-cpp-python imports it from here.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

SPIN = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}  # 300000: libgomp's default (about 3 ms)


def uses_libgomp() -> bool:
    """Whether the installed llama-cpp-python's CPU backend links GNU libgomp (read from the
    library's dynamic section, without loading it)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return False
    libs = Path(next(iter(spec.submodule_search_locations))) / "lib"
    try:
        return any(b"libgomp.so" in f.read_bytes() for f in sorted(libs.glob("libggml-cpu*.so*"))[:1])
    except OSError:
        return False


def _import() -> ModuleType:
    if "llama_cpp" in sys.modules or any(k in os.environ for k in SPIN) or not uses_libgomp():
        import llama_cpp
        return llama_cpp
    os.environ.update(SPIN)
    try:
        import llama_cpp
    finally:
        for k in SPIN:
            os.environ.pop(k, None)
    return llama_cpp


llama_cpp = _import()
