"""Where and how a model runs (`Placement`), and which engine serves a placement.

The flags' vocabularies (engines, offload modes, devices, quantizations), the
checks that tell a user which combination cannot work before any model is read,
and the backend's limits the memory plan needs. Leaf of the engines package:
the backends and the memory plan import it, it imports neither (llama.cpp and
torch only lazily, where a question needs them).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from specrun.errors import UsageError

ENGINES = ("auto", "llama.cpp", "torch")
OFFLOADS = ("auto", "none", "ram", "disk")
DEVICES = ("cpu", "cuda")
QUANTS = ("nf4", "fp4", "int8")
TORCH_EXTRA = ("torch", "bitsandbytes", "tokenizers")  # what `pip install 'specrun[torch]'` brings
INSTALL_TORCH = "install the torch engine: pip install 'specrun[torch]' (or bash scripts/install.sh --torch)"


@dataclass(frozen=True)
class Placement:
    """Where and how a model runs. `None` and "auto" mean: decide from the model and the machine."""

    threads: int | None = None  # CPU threads; None: every core
    gpu_layers: int | None = None  # llama.cpp: layers on the GPU; None: all when the build has a GPU; -1: all
    engine: str = "auto"  # "auto" | "llama.cpp" | "torch"
    device: str | None = None  # "cpu" | "cuda"; None: the GPU when the engine has one
    quant: str | None = None  # torch on safetensors only: "nf4" | "fp4" | "int8"
    offload: str = "auto"  # "auto" | "none" | "ram" (pinned RAM -> GPU each pass) | "disk" (read each pass)
    ram: int | None = None  # bytes of RAM for streamed weights' buffers and resident layers
    gpu_memory: int | None = None  # bytes of GPU memory for weights (offload ram)
    # Decided by the memory plan (engines.memory_plan), not by flags:
    slots: int | None = None  # streamed: read (or copy) slots; None: the stream's default
    load: str = "mmap"  # llama.cpp: "mmap" (the page cache holds the file), "resident" (read into
    # anonymous memory, which a streaming target's reads cannot evict), "locked" (and mlock'd)
    repack: bool = True  # llama.cpp: let it repack weights for its CPU kernels (anonymous copies)
    dtype: str | None = None  # torch: the compute dtype; None: chosen for the device
    rpc: tuple[str, ...] = ()  # llama.cpp: RPC workers ("HOST:PORT") that hold the layers (engines.rpc)
    exact: bool = False  # torch on the CPU: every token's logits as a pass of it alone would give them


def engine_for(model: Path, placement: Placement = Placement()) -> str:
    """The engine that runs `model` resident: "llama.cpp" or "torch". Auto picks torch only where
    llama.cpp cannot serve the placement (a safetensors directory, --quant, --offload ram/disk,
    --exact, or --device cuda on a llama.cpp build without GPU offload); whether the model fits
    is the memory plan's to weigh. UsageError for a placement none can serve; whether torch and a
    CUDA device are there is `torch_device`'s to say (it imports torch)."""
    p = placement
    if p.engine not in ENGINES:
        raise UsageError(f"unknown engine '{p.engine}'", hint=f"use one of: {', '.join(ENGINES)}")
    if p.device is not None and p.device not in DEVICES:
        raise UsageError(f"unknown device '{p.device}'", hint=f"use one of: {', '.join(DEVICES)}")
    if p.quant is not None and p.quant not in QUANTS:
        raise UsageError(f"unknown quantization '{p.quant}'", hint=f"use one of: {', '.join(QUANTS)}")
    if p.offload not in OFFLOADS:
        raise UsageError(f"unknown offload '{p.offload}'", hint=f"use one of: {', '.join(OFFLOADS)}")
    streamed = p.offload in ("ram", "disk")
    if streamed and p.engine == "llama.cpp":
        raise UsageError(f"--offload {p.offload} streams weights in the torch engine, not llama.cpp",
                         hint="use --engine torch (or leave --engine out)")
    if p.offload == "ram" and p.device == "cpu":
        raise UsageError("--offload ram streams weights from RAM to a GPU; with --device cpu they are in RAM already",
                         hint="use --offload disk to read them from the file each pass, or --device cuda")
    directory = model.is_dir()
    if p.engine == "llama.cpp" and directory:
        raise UsageError(f"llama.cpp runs GGUF files, and {model.name} is a safetensors directory",
                         hint="use --engine torch (or leave --engine out)")
    if p.quant is not None and not directory:
        where = "the llama.cpp engine" if p.engine == "llama.cpp" else f"{model.name}, a GGUF file"
        raise UsageError(f"--quant quantizes safetensors weights as they load, not {where} (already quantized)",
                         hint="leave out --quant, or give a safetensors directory (torch engine)")
    if directory and streamed:
        raise UsageError(f"--offload {p.offload} streams GGUF files; {model.name} is a safetensors directory",
                         hint="use --offload none, or a GGUF file of the model")
    if p.rpc and (p.engine == "torch" or streamed or directory or p.quant is not None):
        raise UsageError("--rpc spreads a GGUF model's layers over llama.cpp RPC workers; it does not combine "
                         "with the torch engine, --offload ram/disk, --quant or safetensors",
                         hint="leave those out with --rpc")
    if p.rpc and (p.device == "cpu" or p.gpu_layers == 0):
        flag = "--device cpu" if p.device == "cpu" else "--gpu-layers 0"
        raise UsageError(f"{flag} keeps every layer on this machine, and --rpc sends them to the workers",
                         hint="with --rpc, --gpu-layers N sends N layers to the workers (and GPUs here) and keeps "
                              "the rest on this CPU")
    if p.exact and (p.engine == "llama.cpp" or p.rpc or p.device == "cuda" or p.offload == "ram" or directory):
        raise UsageError("--exact computes a GGUF model's tokens as if alone in the torch engine on the CPU",
                         hint="leave out --exact, or --engine llama.cpp, --rpc, --device cuda and --offload ram")
    if (p.ram is not None or p.gpu_memory is not None) and p.offload == "none":
        raise UsageError("--ram and --gpu-memory are budgets for streamed weights (--offload ram or disk)",
                         hint="add --offload disk (or ram, on a GPU)")
    if p.engine != "auto":
        engine = p.engine
    elif directory or p.quant is not None or streamed or p.exact or (p.device == "cuda" and not llama_gpu()):
        engine = "torch"
    else:
        engine = "llama.cpp"
    if engine == "llama.cpp":
        llama_gpu_layers(p)  # its contradictions, before any model is read
    elif p.gpu_layers is not None:
        raise UsageError("--gpu-layers is for the llama.cpp engine; the torch engine puts the whole model "
                         "on --device")
    return engine


def tree_limit(model: Path, placement: Placement = Placement()) -> int | None:
    """The most tree nodes the engine for `model` verifies in one pass, where its backend bounds
    them: llama.cpp gives each node a sequence id of its own and has 256 (the cache takes one).
    None: bounded by cache room only (the torch engine)."""
    if engine_for(model, placement) == "llama.cpp":
        from specrun.engines.llamacpp import MAX_SEQ

        return MAX_SEQ - 1
    return None


def llama_gpu_layers(placement: Placement) -> int | None:
    """llama.cpp's GPU layers for a placement: --device cpu means none, --device cuda needs a
    build with GPU offload; otherwise --gpu-layers (None: all on a GPU build)."""
    layers, device = placement.gpu_layers, placement.device
    if device == "cpu":
        if layers not in (None, 0):
            raise UsageError(f"--device cpu and --gpu-layers {layers} contradict each other")
        return 0
    if device == "cuda":
        if layers == 0:
            raise UsageError("--device cuda and --gpu-layers 0 contradict each other")
        if not llama_gpu():
            raise UsageError("no CUDA device: this llama.cpp build has no GPU offload",
                             hint='use --engine torch, or rebuild: CMAKE_ARGS="-DGGML_CUDA=on" bash scripts/install.sh')
    return layers


def torch_device(placement: Placement) -> str:
    """The torch engine's device: --device, else cuda when torch sees a GPU, else cpu. Imports
    torch, so a missing torch is one line with the install command before any model is read."""
    try:
        import torch
    except ModuleNotFoundError as e:
        if placement.device == "cuda" or placement.gpu_memory is not None:
            raise UsageError("no CUDA device: torch is not installed", hint=INSTALL_TORCH) from None
        raise install_error(e) or e from None
    if placement.device == "cpu":
        if placement.gpu_memory is not None:
            raise UsageError("--gpu-memory budgets GPU memory, and --device cpu uses none",
                             hint="leave out --gpu-memory (--ram budgets the RAM for streamed weights)")
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    build = " (a CPU-only build)" if torch.version.cuda is None else ""
    if placement.device == "cuda":
        raise UsageError(f"no CUDA device: torch {torch.__version__}{build} sees no GPU",
                         hint="leave out --device cuda to run on the CPU; on an NVIDIA machine, "
                              "bash scripts/install.sh --torch installs torch's CUDA build")
    if placement.gpu_memory is not None:  # it would be ignored: say so, as for --device cuda
        raise UsageError(f"no CUDA device for --gpu-memory: torch {torch.__version__}{build} sees no GPU",
                         hint="leave out --gpu-memory (--ram budgets the RAM for streamed weights)")
    return "cpu"


def llama_gpu() -> bool:
    """Whether this llama.cpp build sees a GPU of this machine to offload layers to (CUDA, Metal...)."""
    from specrun.engines.ggml_devices import has_gpu

    return has_gpu()


def install_error(e: ModuleNotFoundError) -> UsageError | None:
    """The install command for a missing package of the torch extra; None for anything else (a bug)."""
    top = (e.name or "").split(".")[0]
    if top in TORCH_EXTRA:
        return UsageError(f"the torch engine needs {top}, which is not installed", hint=INSTALL_TORCH)
    return None


@contextmanager
def torch_needed() -> Iterator[None]:
    """Imports inside the torch engine that find no torch (or bitsandbytes, tokenizers) say how to
    install them instead of raising a traceback."""
    try:
        yield
    except ModuleNotFoundError as e:
        if (error := install_error(e)) is None:
            raise
        raise error from None
