"""Options that several commands share (one definition each), and their checks."""

from __future__ import annotations

import math
import os
from typing import Optional

import typer

from specrun.engines import DEVICES, ENGINES, OFFLOADS, QUANTS, Placement
from specrun.engines.rpc import parse_endpoints
from specrun.errors import UsageError
from specrun.speculate.factory import MODEL_MODES, OVERLAPS, SPEC_MODES, SpecConfig

# Float options are checked by check_sampling, not by ranges here: Click's check lets nan
# through to a message about ranges (nan compares false), and inf through altogether.
TOP_P = typer.Option(0.95, "--top-p", help="Nucleus sampling mass (0 to 1).")
SEED = typer.Option(None, "--seed", min=0, help="Sampling seed (default: random).")
THREADS = typer.Option(None, "--threads", min=1, help="CPU threads for the target (default: all cores).")
GPU_LAYERS = typer.Option(None, "--gpu-layers", min=-1, help="Target layers on the GPU (-1 = all).")
DRAFT_THREADS = typer.Option(None, "--draft-threads", min=1, help="CPU threads for the draft model "
                             "(default: as the target).")
DRAFT_GPU_LAYERS = typer.Option(None, "--draft-gpu-layers", min=-1, help="Draft model layers on the GPU "
                                "(default: as the target; 0 keeps it on the CPU).")
ENGINE = typer.Option("auto", "--engine", help="auto, llama.cpp or torch (auto: llama.cpp unless the model "
                      "or --quant/--device needs torch).")
DEVICE = typer.Option(None, "--device", help="cpu or cuda (default: the GPU when the engine has one).")
QUANT = typer.Option(None, "--quant", help="Quantize safetensors weights as they load: nf4, fp4 or int8 "
                     "(torch engine).")
EXACT = typer.Option(False, "--exact", help="Compute every token as a pass of it alone would (torch engine, "
                     "CPU, GGUF): speculative and batched output then equals plain decoding's bit for bit, "
                     "near-ties included. Costs compute: a lone token's products are padded to the few rows "
                     "ggml's blocked kernels take (hidden where a pass waits on a disk read).")
OFFLOAD = typer.Option("auto", "--offload", help="Where the target's weights live between passes: none (on "
                       "the device), ram (pinned RAM, streamed to the GPU each pass), disk (read from the file "
                       "each pass), or auto (none when the model fits, else ram on a GPU, else disk; torch engine).")
RAM = typer.Option(None, "--ram", help="RAM for streamed weights (e.g. 8G): read buffers plus layers kept "
                   "resident (default: --offload disk: just the buffers; auto: half the free RAM).")
GPU_MEMORY = typer.Option(None, "--gpu-memory", help="GPU memory for weights with --offload ram (e.g. 20G): "
                          "slots plus resident layers (default: 80 percent of what is free).")
SPEC = typer.Option("auto", "--spec", help="Speculation: auto, none, ngram (prompt lookup), chain or tree "
                    "(draft model).")
DRAFT = typer.Option(None, "--draft", help="Draft model (default: the catalog's recommended one).")
NO_DRAFT = typer.Option(False, "--no-draft", help="Never use a draft model.")
CORPUS = typer.Option(None, "--corpus", help="A folder of your own text or code: the suffix drafter also "
                      "continues the way it does (indexed once with the target's tokenizer, kept in the store).")
BUDGET = typer.Option("auto", "--budget", help="Draft tree nodes per step (root included), or auto.")
OVERLAP = typer.Option("auto", "--overlap", help="Draft while the target verifies: on, off, or auto (on where "
                       "the target leaves the CPU to the draft, e.g. on a GPU; where both share the CPU, only "
                       "if measured to pay).")
RPC = typer.Option(None, "--rpc", help="Spread the target's layers over llama.cpp RPC workers "
                   "(HOST:PORT,HOST:PORT...: each started with specrun worker); the draft stays here.")
DEPTH = typer.Option(None, "--depth", min=1, max=64, help="Deepest draft node (default 16).")


def spec_config(spec: str, budget: str, depth: int | None, draft: str | None, no_draft: bool,
                overlap: str = "auto") -> SpecConfig:
    """The speculation options of run/chat, checked: a one-line error for each bad combination.
    How big a tree the engine can verify is the engine's to say, not checked here."""
    if spec not in SPEC_MODES:
        raise UsageError(f"unknown --spec '{spec}'", hint=f"use one of: {', '.join(SPEC_MODES)}")
    check_overlap(overlap)
    if budget != "auto" and not (budget.isdigit() and int(budget) >= 1):
        raise UsageError(f"--budget must be auto or a number of nodes (1 or more), not '{budget}'")
    check_draft_flags(draft, no_draft)
    if no_draft and spec in MODEL_MODES:
        raise UsageError(f"--spec {spec} needs a draft model, and --no-draft says not to use one")
    return SpecConfig(mode=spec, budget=None if budget == "auto" else int(budget), depth=depth, overlap=overlap)


def check_overlap(overlap: str) -> None:
    if overlap not in OVERLAPS:
        raise UsageError(f"unknown --overlap '{overlap}'", hint=f"use one of: {', '.join(OVERLAPS)}")


def check_draft_flags(draft: str | None, no_draft: bool) -> None:
    if draft is not None and no_draft:
        raise UsageError("--draft and --no-draft contradict each other")


def check_sampling(top_p: float, temperature: float = 0.0) -> None:
    """--temperature 0 or more and --top-p above 0 up to 1, both finite: nan sampled nothing
    and inf sampled uniformly random tokens."""
    for flag, value, example in (("--temperature", temperature, "0.7 (0 = greedy)"), ("--top-p", top_p, "0.95")):
        if math.isnan(value):
            raise UsageError(f"{flag} takes a number, and nan is not a number", hint=f"e.g. {flag} {example}")
        if math.isinf(value):
            raise UsageError(f"{flag} must be finite, not {value}", hint=f"e.g. {flag} {example}")
    if temperature < 0:
        raise UsageError(f"--temperature must be 0 (greedy) or more, not {temperature}", hint="e.g. --temperature 0.7")
    if not 0 < top_p <= 1:
        raise UsageError(f"--top-p must be greater than 0 and at most 1, not {top_p}",
                         hint="1 keeps every token; 0.9 the likeliest tokens holding 90 percent of the mass")


# Threads beyond the cores only take turns on them (a first calibration with --threads 1000 took
# minutes). A few per core are allowed (os.cpu_count() may not see a quota, and someone may mean
# to measure oversubscription); more than this many per core is a typo.
THREADS_PER_CPU = 4


def check_threads(flag: str, threads: Optional[int]) -> None:
    cpus = os.cpu_count() or 1
    if threads is not None and threads > THREADS_PER_CPU * cpus:
        raise UsageError(f"{flag} {threads} is more than {THREADS_PER_CPU} threads for each of this machine's "
                         f"{cpus} CPUs", hint=f"use {cpus} or fewer (leave {flag} out to use every core)")


def physical_ram() -> Optional[int]:
    """The machine's RAM in bytes; None where the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def parse_size(text: Optional[str], flag: str, at_most: Optional[int] = None) -> Optional[int]:
    """'8G', '512M', '1.5GB', '300000000' -> bytes (binary units: 8G is 8 GiB); UsageError
    above `at_most` (e.g. more RAM than the machine has)."""
    if text is None:
        return None
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise UsageError(f"{flag} takes a size such as 8G or 512M, not '{text}'") from None
    if not math.isfinite(value) or value < 1:
        raise UsageError(f"{flag} must be a size of at least 1 byte, not '{text}'")
    if at_most is not None and value > at_most:
        raise UsageError(f"{flag} {text} is more than this machine's {at_most / (1 << 30):.1f}G of RAM",
                         hint=f"give {flag} a size below that, e.g. {flag} {max(at_most // 2 >> 30, 1)}G")
    return int(value)


def placements(threads: Optional[int], gpu_layers: Optional[int], draft_threads: Optional[int] = None,
               draft_gpu_layers: Optional[int] = None, engine: str = "auto", device: Optional[str] = None,
               quant: Optional[str] = None, draft_engine: str = "auto", draft_device: Optional[str] = None,
               offload: str = "auto", ram: Optional[str] = None,
               gpu_memory: Optional[str] = None, rpc: Optional[str] = None,
               exact: bool = False) -> tuple[Placement, Placement]:
    """(target, draft) placements, checked. The draft follows the target's threads and GPU layers
    where not told otherwise, but not its engine, device, quantization or offloading: a small
    draft stays on llama.cpp in memory unless told."""
    check_engine_flags(engine, device, quant, offload)
    check_engine_flags(draft_engine, draft_device, None)
    check_threads("--threads", threads)
    check_threads("--draft-threads", draft_threads)
    target = Placement(threads=threads, gpu_layers=gpu_layers, engine=engine, device=device, quant=quant,
                       offload=offload, ram=parse_size(ram, "--ram", physical_ram()),
                       gpu_memory=parse_size(gpu_memory, "--gpu-memory"),
                       rpc=tuple(str(e) for e in parse_endpoints(rpc)), exact=exact)
    draft = Placement(threads=draft_threads if draft_threads is not None else threads,
                      gpu_layers=draft_gpu_layers if draft_gpu_layers is not None else gpu_layers,
                      engine=draft_engine, device=draft_device)
    return target, draft


def check_engine_flags(engine: str, device: Optional[str], quant: Optional[str],
                       offload: Optional[str] = None) -> None:
    """One-line errors for values no engine knows (before any model is read)."""
    for flag, value, known in (("--engine", engine, ENGINES), ("--device", device, DEVICES),
                               ("--quant", quant, QUANTS), ("--offload", offload, OFFLOADS)):
        if value is not None and value not in known:
            raise UsageError(f"unknown {flag} '{value}'", hint=f"use one of: {', '.join(known)}")
