"""ggml's device registry (its C API through ctypes): which devices this llama.cpp build
computes on.

llama.cpp's own `llama_supports_gpu_offload()` answers yes whenever the build has the RPC
backend, GPU or not (RPC workers count as places to offload to), so a CPU machine with an
RPC-enabled build would be taken for a GPU one. The registry tells the kinds apart: a
device's type, and the backend that registered it.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from functools import cache

DEVICE_CPU, DEVICE_GPU, DEVICE_IGPU = 0, 1, 2  # enum ggml_backend_dev_type (ggml-backend.h)


@dataclass(frozen=True)
class Device:
    name: str  # "CPU", "CUDA0", "RPC0[127.0.0.1:50052]"...
    description: str
    type: int  # DEVICE_CPU, DEVICE_GPU, ...
    backend: str  # the registering backend: "CPU", "CUDA", "RPC"...
    handle: int = field(default=0, compare=False)  # its ggml_backend_dev_t

    @property
    def remote(self) -> bool:
        """An RPC worker's device (`specrun worker`), on another machine or process."""
        return self.backend.startswith("RPC")

    @property
    def is_gpu(self) -> bool:
        """A GPU of this machine (an RPC worker's device is remote, whatever it reports)."""
        return self.type in (DEVICE_GPU, DEVICE_IGPU) and not self.remote


@cache
def _lib() -> ctypes.CDLL:
    """libggml as llama-cpp-python loaded it, with the registry's signatures declared."""
    from specrun.engines.llama_lib import llama_cpp  # noqa: F401  (loads libllama, which registers the backends)
    from llama_cpp._ggml import libggml

    void_p, char_p = ctypes.c_void_p, ctypes.c_char_p
    for name, args, result in [("ggml_backend_dev_count", [], ctypes.c_size_t),
                               ("ggml_backend_dev_get", [ctypes.c_size_t], void_p),
                               ("ggml_backend_dev_name", [void_p], char_p),
                               ("ggml_backend_dev_description", [void_p], char_p),
                               ("ggml_backend_dev_type", [void_p], ctypes.c_int),
                               ("ggml_backend_dev_backend_reg", [void_p], void_p),
                               ("ggml_backend_reg_name", [void_p], char_p)]:
        function = getattr(libggml, name)
        function.argtypes, function.restype = args, result
    return libggml


def devices() -> list[Device]:
    """Every device registered now (RPC workers appear once added)."""
    lib = _lib()
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        reg = lib.ggml_backend_dev_backend_reg(dev)
        out.append(Device(name=(lib.ggml_backend_dev_name(dev) or b"").decode(),
                          description=(lib.ggml_backend_dev_description(dev) or b"").decode(),
                          type=lib.ggml_backend_dev_type(dev),
                          backend=(lib.ggml_backend_reg_name(reg) or b"").decode() if reg else "", handle=dev))
    return out


def has_gpu() -> bool:
    """Whether this llama.cpp build sees a GPU of this machine (CUDA, Metal, Vulkan...)."""
    return any(d.is_gpu for d in devices())
