"""llama.cpp's RPC backend: a target's layers held and computed by workers on other machines.

A worker (`specrun worker`) is llama.cpp's own RPC server running in a specrun process; a
run given `--rpc HOST:PORT,...` adds each worker as a ggml device and the llama.cpp engine
spreads the target's layers over them (the draft stays local). Reached through ggml's C
API with ctypes, as the rest of the llama.cpp engine is.

The protocol has no authentication and no encryption: anyone who reaches a worker's port
can make it allocate memory and run computations, and can read what it holds. Workers
listen on loopback unless told otherwise, and belong on a trusted network only.

llama.cpp aborts the process when a worker goes away mid-pass; `on_lost_worker` turns
that into one line naming the worker and a clean exit.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Sequence

from specrun.errors import UsageError

DEFAULT_PORT = 50052  # llama.cpp's rpc-server's
CONNECT_TIMEOUT_S = 3.0
INSECURE = ("the RPC protocol has no authentication or encryption: anyone who can reach this port can use "
            "this machine's memory and CPU and read what it holds; run workers on a trusted network only")


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_endpoint(text: str, flag: str) -> Endpoint:
    """'HOST:PORT' (IPv6 as '[::1]:PORT') -> Endpoint; UsageError otherwise."""
    host, sep, port = text.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in host):
        raise UsageError(f"{flag} takes HOST:PORT, not '{text.strip()}'",
                         hint=f"e.g. {flag} 192.168.1.20:{DEFAULT_PORT}")
    return Endpoint(host, int(port))


def parse_endpoints(text: str | None) -> tuple[Endpoint, ...]:
    """--rpc's value, 'HOST:PORT,HOST:PORT...' -> endpoints (none for None); UsageError for a
    malformed or repeated one."""
    if text is None:
        return ()
    found = tuple(parse_endpoint(part, "--rpc") for part in text.split(","))
    if len(set(found)) != len(found):
        raise UsageError(f"--rpc names a worker twice: '{text}'", hint="give each HOST:PORT once")
    return found


def check_listening(endpoints: Sequence[Endpoint], timeout: float = CONNECT_TIMEOUT_S) -> None:
    """UsageError naming the first worker that does not accept a connection (llama.cpp would
    abort the process instead)."""
    for e in endpoints:
        try:
            socket.create_connection((e.host, e.port), timeout=timeout).close()
        except OSError as err:
            reason = err.strerror or str(err) or type(err).__name__
            raise UsageError(f"no RPC worker at {e}: {reason}",
                             hint=f"start one there: specrun worker --host HOST --port {e.port}") from None


@cache
def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """(libggml, libggml-rpc) as llama-cpp-python loaded them, with signatures declared."""
    from specrun.engines.llama_lib import llama_cpp
    from llama_cpp._ggml import libggml  # (after: llama_lib loads llama-cpp-python first)

    path = Path(llama_cpp.__file__).parent / "lib" / "libggml-rpc.so"
    if not path.exists() or not llama_cpp.llama_supports_rpc():
        raise UsageError("this llama.cpp build has no RPC backend",
                         hint="rebuild it with bash scripts/install.sh (it builds with -DGGML_RPC=ON)")
    rpc = ctypes.CDLL(str(path))
    void_p, size = ctypes.c_void_p, ctypes.c_size_t
    for lib, name, args, result in [
            (rpc, "ggml_backend_rpc_add_server", [ctypes.c_char_p], void_p),
            (rpc, "ggml_backend_rpc_get_device_memory", [ctypes.c_char_p, ctypes.c_uint32, ctypes.POINTER(size),
                                                          ctypes.POINTER(size)], None),
            (rpc, "ggml_backend_rpc_start_server", [ctypes.c_char_p, ctypes.c_char_p, size, size,
                                                     ctypes.POINTER(void_p)], None),
            (libggml, "ggml_backend_register", [void_p], None),
            (libggml, "ggml_backend_reg_dev_count", [void_p], size),
            (libggml, "ggml_backend_reg_dev_get", [void_p, size], void_p),
            (libggml, "ggml_backend_dev_by_type", [ctypes.c_int], void_p),
            (libggml, "ggml_set_abort_callback", [void_p], void_p)]:
        function = getattr(lib, name)
        function.argtypes, function.restype = args, result
    return libggml, rpc


def rpc_built() -> bool:
    """Whether this llama.cpp build has the RPC backend (`specrun info` says)."""
    try:
        _libs()
    except UsageError:
        return False
    return True


_added: dict[Endpoint, list[int]] = {}  # the devices of each worker added in this process


def worker_devices(endpoints: Sequence[Endpoint]) -> list[int]:
    """The ggml devices of these workers, each added (and registered with ggml) once per process."""
    libggml, rpc = _libs()
    check_listening([e for e in endpoints if e not in _added])
    out: list[int] = []
    for e in endpoints:
        if e not in _added:
            reg = rpc.ggml_backend_rpc_add_server(str(e).encode())
            if not reg:
                raise UsageError(f"the RPC worker at {e} did not answer as one", hint="is it specrun worker?")
            libggml.ggml_backend_register(reg)
            _added[e] = [libggml.ggml_backend_reg_dev_get(reg, i) for i in range(libggml.ggml_backend_reg_dev_count(reg))]
        out += _added[e]
    return out


def round_trip_s(endpoint: Endpoint, n: int = 21) -> float:
    """A request and its answer to the worker (its memory asked for, on the connection a client
    keeps to it), the median of `n`, in seconds."""
    _, rpc = _libs()
    check_listening([endpoint])
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        rpc.ggml_backend_rpc_get_device_memory(str(endpoint).encode(), 0, ctypes.byref(free), ctypes.byref(total))
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2]


_ABORT = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
_on_abort: list[object] = []  # the installed callback, kept alive


def on_lost_worker(endpoints: Sequence[Endpoint]) -> None:
    """From now on a ggml abort (llama.cpp's answer to a worker gone mid-pass) prints one line
    naming the workers that no longer answer and exits with status 1, instead of a core dump."""
    libggml, _ = _libs()

    def abort(message: bytes | None) -> None:
        gone = []
        for e in endpoints:
            try:
                check_listening([e], timeout=0.5)
            except UsageError:
                gone.append(str(e))
        text = (message or b"").decode(errors="replace").strip()
        where, _, said = text.partition(": ")  # "/path/to/ggml-rpc.cpp:354: Remote RPC server crashed..."
        if gone:
            what = f"lost the RPC worker{'s' if len(gone) > 1 else ''} at {', '.join(gone)}"
        elif "ggml-rpc" in where:
            names = ", ".join(map(str, endpoints))
            what = f"the RPC worker{'s' if len(endpoints) > 1 else ''} at {names}: {said}"
        else:
            what = f"llama.cpp stopped: {said or text}"
        os.write(2, f"error: {what}\nhint: check the worker{'s' if len(endpoints) > 1 else ''} "
                    f"({', '.join(map(str, endpoints))}) and run again\n".encode())
        os._exit(1)

    callback = _ABORT(abort)
    _on_abort[:] = [callback]
    libggml.ggml_set_abort_callback(ctypes.cast(callback, ctypes.c_void_p))


def check_bindable(endpoint: Endpoint) -> None:
    """UsageError saying why a worker cannot listen on `endpoint` (llama.cpp's server says only
    "Failed to create server socket")."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((endpoint.host, endpoint.port))
    except OSError as err:
        raise UsageError(f"cannot listen on {endpoint}: {err.strerror or err}",
                         hint="pick another --port, or stop what uses this one") from None


def serve(endpoint: Endpoint, threads: int, cache_dir: Path | None) -> None:
    """Run llama.cpp's RPC server on `endpoint` until the process ends, computing on this
    machine's GPUs, or its CPU where it has none. UsageError when it cannot start (the server
    returns then)."""
    from specrun.engines.ggml_devices import DEVICE_CPU, devices

    libggml, rpc = _libs()
    chosen = [d.handle for d in devices() if d.is_gpu] or [libggml.ggml_backend_dev_by_type(DEVICE_CPU)]
    array = (ctypes.c_void_p * len(chosen))(*chosen)
    directory = None if cache_dir is None else str(cache_dir).encode()
    rpc.ggml_backend_rpc_start_server(str(endpoint).encode(), directory, threads, len(chosen), array)
    raise UsageError(f"the RPC server on {endpoint} could not start", hint="see the lines above")
