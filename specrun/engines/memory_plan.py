"""One memory plan per run, resolved before anything loads: where the target runs and what every part holds.

A run holds the runtime (Python, torch, llama.cpp), the target's weights (or
its read buffers and resident layers when they stream), KV caches for the
context, the buffers a verified tree needs (logits rows), the draft model and
its cache, and headroom. The plan adds them up against the memory this
process may really use (`memory_limit`: a cgroup's limit, not the host's free
memory) and decides, once:

- the target's placement: resident when it fits; else streamed (torch: from
  disk on a CPU, from RAM on a GPU) with as many read-ahead slots and resident
  layers as the rest leaves; else, without the torch engine, llama.cpp paging
  the file from disk;
- the draft model: held in anonymous memory (locked where the system allows)
  while the target streams, so the target's reads never evict it; left out
  with a notice when it does not fit and the mode can go without;
- the context and the largest tree, shrunk from their defaults when only
  smaller ones fit.

When nothing fits, `DoesNotFit` says before anything loads which parts are
biggest and which flags would shrink them (exit 2): no combination of flags
ends in the kernel's OOM killer. Engines read the resolved `Placement`s and
never look at free memory themselves.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from specrun.engines.placement import Placement, engine_for, torch_device, tree_limit
from specrun.files import model_bytes
from specrun.engines.model_shape import ModelShape
from specrun.errors import UsageError
from specrun.memory_limit import MemoryLimit, can_lock, detect, gib, resident_bytes, swap_enabled

MIB = 1 << 20
DEFAULT_CTX = 4096  # a context this big when it fits (a chat's turns, a long prompt)
MIN_CTX = 512
HEADROOM = 64 * MIB  # at least; 5% of the plan above that (allocator slack, page tables, thread stacks)
TREE_STEPS = (1024, 512, 256, 128, 64, 32, 16, 8)  # tree sizes tried when the requested one does not fit


class DoesNotFit(UsageError):
    """Nothing this run could hold fits the memory it may use."""


@dataclass(frozen=True)
class Item:
    """One part of the plan: what it is, its bytes, the flag that shrinks it ('' for none), and
    which of PARTS it belongs to."""

    what: str
    bytes: int
    flag: str = ""
    part: str = "buffers"


PARTS = ("runtime", "weights", "cache", "buffers", "draft", "headroom")


@dataclass(frozen=True)
class PlanRequest:
    """What a run asks of memory. `tree_nodes`: the largest tree its modes would verify in one
    pass (0: plain decoding); `needed_ctx`: an upper bound of the tokens it needs (prompt plus
    tokens to generate); `ctx`: --ctx, when given."""

    target: Path
    draft: Path | None
    target_placement: Placement = Placement()
    draft_placement: Placement = Placement()
    ctx: int | None = None
    needed_ctx: int = 0
    tree_nodes: int = 0
    draft_required: bool = False  # chain and tree cannot go without it; auto can
    fixed_nodes: int = 0  # the largest --budget asked for: trees never shrink below it
    sequences: int = 1  # sequences sharing the target's passes at most (a batch's, in one llama.cpp context)


@dataclass(frozen=True)
class MemoryPlan:
    """The decisions, frozen: every layer reads them and none re-derives them."""

    limit: MemoryLimit
    target: Placement  # engine and offload decided; streamed: `ram` and `slots` set
    draft: Placement | None  # None: no draft model this run
    n_ctx: int
    tree_nodes: int  # the largest tree verified in one pass (0: plain decoding only)
    items: tuple[Item, ...]
    notices: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return sum(i.bytes for i in self.items)

    def describe(self) -> list[str]:
        """The plan as `specrun info` and -v show it: one line per part, then the total."""
        lines = [f"{i.what}: {gib(i.bytes)}" for i in self.items]
        return lines + [f"total {gib(self.total)} of {self.limit.describe()}"]


# --- building the plan ------------------------------------------------------------------------


def plan_memory(request: PlanRequest, limit: MemoryLimit | None = None, runtime: int | None = None) -> MemoryPlan:
    """The plan for `request` under `limit` (None: read it now). `runtime`: bytes the runtime holds
    (None: measured, importing what the chosen engine needs: torch only when it is picked)."""
    limit = limit if limit is not None else detect()
    engine_for(request.target, request.target_placement)  # a placement no engine serves: its error, first
    shape = ModelShape.of(request.target)
    draft_shape = ModelShape.of(request.draft) if request.draft is not None else None
    tried: list[MemoryPlan] = []
    for kind in _kinds(request):
        with_torch = kind not in ("llama.cpp", "paged")
        if with_torch and runtime is None and not _room_for_torch(limit):  # importing it would be killed
            floor = resident_bytes() + TORCH_FLOOR
            tried.append(MemoryPlan(limit, request.target_placement, None, 0, 0, (
                Item("runtime (Python, llama.cpp, torch: too little room to import it)", floor, part="runtime"),
                Item("headroom", HEADROOM, part="headroom"))))
            continue
        if kind == "stream":
            p = request.target_placement
            kind = p.offload if p.offload in ("ram", "disk") else "ram" if _torch_on_gpu(p) else "disk"
        if with_torch:
            torch_device(request.target_placement)  # no torch, no CUDA asked for: one line, before importing it
        rt = runtime if runtime is not None else measure_runtime(with_torch)
        for plan in _variants(request, kind, shape, draft_shape, limit, rt):
            if plan.total <= limit.budget:
                return _finish(request, plan, shape, draft_shape)
            tried.append(plan)
    raise _refusal(request, min(tried, key=lambda pl: pl.total), limit)


def _kinds(request: PlanRequest) -> list[str]:
    """Placements to try, best first: 'llama.cpp' or 'torch' (resident), 'stream' (the torch
    engine streaming from disk, or from RAM to a GPU: decided only when tried, since asking
    imports torch), 'paged' (llama.cpp reading the file through the page cache)."""
    p, target = request.target_placement, request.target
    if p.offload in ("ram", "disk") or (p.offload == "auto" and (p.ram is not None or p.gpu_memory is not None)):
        return ["stream"]  # asked for, or a streaming budget given
    resident = engine_for(target, p)
    if p.offload == "none" or target.is_dir() or p.rpc:
        return [resident]
    kinds = [resident]
    if p.engine != "llama.cpp" and _torch_installed():
        kinds.append("stream")
    if resident == "llama.cpp":
        kinds.append("paged")
    return kinds


def _torch_installed() -> bool:
    """Whether torch can be imported (found without importing it: that takes a second)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except ValueError:  # in sys.modules without a spec: a stand-in put there (tests)
        return "torch" in sys.modules


def _torch_on_gpu(p: Placement) -> bool:
    return torch_device(p).startswith("cuda")


def _variants(request: PlanRequest, kind: str, shape: ModelShape, draft: ModelShape | None, limit: MemoryLimit,
              runtime: int) -> list[MemoryPlan]:
    """The plans of one placement, from the most generous down: the requested tree with the
    default context, then with the smallest the request allows, then smaller trees, and only
    then (where the mode allows) no draft model. Placements are tried in turn, so a target
    that fits resident without the draft runs so rather than streamed with it: in RAM plain
    decoding is bound by memory bandwidth, streamed by the disk's, ten times less here
    (inside 1.2 GiB: resident 15.2 tok/s, streamed with the draft 8.2)."""
    wanted = default_ctx(shape.n_ctx_train, request.needed_ctx) if request.ctx is None else request.ctx
    smallest = min(max(_round_up(request.needed_ctx, 256), MIN_CTX), wanted) if request.ctx is None else request.ctx
    contexts = list(dict.fromkeys([wanted, min(wanted, smallest)]))
    limit_nodes = tree_limit(request.target, replace(request.target_placement, engine=_engine(kind)))
    if limit_nodes is not None and request.fixed_nodes > limit_nodes:
        raise UsageError(f"{_engine(kind)} verifies trees of at most {limit_nodes} nodes, not {request.fixed_nodes}",
                         hint=f"use --budget {limit_nodes} or less")
    asked = min(request.tree_nodes, limit_nodes or request.tree_nodes)
    floor = max(min(asked, 8), request.fixed_nodes)
    trees = [asked] + [n for n in TREE_STEPS if floor <= n < asked]
    drafts = [True, False] if draft is not None and not request.draft_required else [draft is not None]
    placed = _placed(request, kind, shape, draft, limit, runtime)
    return [_plan(request, placed, shape, draft if with_draft else None, limit, n_ctx, nodes)
            for with_draft in drafts for nodes in trees for n_ctx in contexts]


def _local_layers(request: PlanRequest, shape: ModelShape) -> int | None:
    """The target's layers this machine holds (their weights and KV): all but --gpu-layers of them
    with --rpc (none by default); None without --rpc (the placement decides where they compute)."""
    p = request.target_placement
    if not p.rpc:
        return None
    return 0 if p.gpu_layers in (None, -1) else max(shape.n_layer - p.gpu_layers, 0)


def default_ctx(n_ctx_train: int, needed: int) -> int:
    """A KV cache big enough for `needed` tokens: at least DEFAULT_CTX, at most the training context."""
    ctx = max(DEFAULT_CTX, needed)
    return min(ctx, n_ctx_train) if n_ctx_train > 0 else ctx


def _engine(kind: str) -> str:
    return "llama.cpp" if kind in ("llama.cpp", "paged") else "torch"


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


@dataclass(frozen=True)
class _Placed:
    """What one placement holds whatever the context and trees: worked out once per placement,
    not once per variant (the header reads behind them took a second over 32 variants)."""

    kind: str
    target: Placement  # engine, offload and dtype decided
    items: tuple[Item, ...]  # the runtime, and resident weights
    on_gpu: bool
    units: list | None  # type: ignore[type-arg]  # streamed: the file's units
    draft: Placement | None  # the draft's placement, were it to come
    draft_held: bool  # it is held in anonymous memory (the target streams, or a cgroup limits)


def _placed(request: PlanRequest, kind: str, shape: ModelShape, draft: ModelShape | None, limit: MemoryLimit,
            runtime: int) -> _Placed:
    p = request.target_placement
    items = [Item("runtime (Python, llama.cpp" + (", torch" if kind not in ("llama.cpp", "paged") else "")
                  + "; measured)", runtime, part="runtime")]
    target = replace(p, engine=_engine(kind), offload="none" if kind in ("llama.cpp", "torch", "paged") else kind)
    on_gpu, units = False, None
    if kind == "llama.cpp" and not p.rpc:
        items.append(Item("target weights", shape.weight_bytes, "--offload disk", "weights"))
    elif kind == "llama.cpp" and (local := _local_layers(request, shape)) and shape.n_layer:
        # --rpc: the layers beyond --gpu-layers stay here, the rest go to the workers (and GPUs here)
        items.append(Item("target weights kept here (the rest on the RPC workers)",
                          shape.weight_bytes * local // shape.n_layer, "--gpu-layers", "weights"))
    elif kind == "paged":
        target = replace(target, load="mmap", repack=False)
    else:
        on_gpu = kind == "ram" or (kind == "torch" and _torch_on_gpu(p))
        weights, dtype = _torch_weights(request, on_gpu, limit.budget) if kind == "torch" else (None, p.dtype)
        items += [weights] if weights is not None else []
        target = replace(target, dtype=dtype)
        if kind in ("disk", "ram"):
            from specrun.engines.torch_engine.streamed import file_units

            units = file_units(request.target)
    held = kind in ("disk", "ram", "paged") or limit.cgroup
    draft_placement = None
    if draft is not None:
        load = ("locked" if can_lock(draft.weight_bytes) else "resident") if held else "mmap"
        draft_placement = replace(request.draft_placement, load=load)
    return _Placed(kind, target, tuple(items), on_gpu, units, draft_placement, held)


def _plan(request: PlanRequest, placed: _Placed, shape: ModelShape, draft: ModelShape | None, limit: MemoryLimit,
          n_ctx: int, nodes: int) -> MemoryPlan:
    cells = max(n_ctx, 64 + nodes + 1)  # calibration measures a tree of `nodes` after a 64-token prefix
    items = list(placed.items)
    if placed.kind in ("llama.cpp", "paged"):
        from specrun.engines.llamacpp import slot_ids

        outputs = request.sequences * slot_ids(nodes, request.sequences)  # a row per sequence id
        items.append(Item(f"target KV cache and buffers ({cells} tokens, trees of {nodes})",
                          shape.llama_context_bytes(cells, outputs, _local_layers(request, shape)), "--ctx", "cache"))
    elif not placed.on_gpu:
        items.append(Item(f"target KV cache ({cells} tokens)", shape.kv_bytes(cells, 4), "--ctx", "cache"))
        items.append(Item(f"target pass buffers (trees of {nodes})", shape.torch_pass_bytes(cells, nodes),
                          "--budget"))
    draft_placement = None
    if draft is not None:
        assert request.draft is not None
        draft_nodes = min(nodes, tree_limit(request.draft, request.draft_placement) or nodes)
        draft_placement = placed.draft
        items.append(Item(f"draft model{' (held in RAM)' if placed.draft_held else ''}", draft.weight_bytes,
                          "--no-draft", "draft"))
        from specrun.engines.llamacpp import slot_ids  # a batch's draft caches share one context

        seqs = request.sequences
        items.append(Item("draft KV cache and buffers",
                          draft.llama_context_bytes(n_ctx, seqs * slot_ids(draft_nodes, seqs)), "--ctx", "draft"))
    base = sum(i.bytes for i in items)
    items.append(Item("headroom", max(HEADROOM, base // 20), part="headroom"))
    plan = MemoryPlan(limit, placed.target, draft_placement, n_ctx, nodes, tuple(items))
    return _streamed_budget(plan, request, placed.units) if placed.units is not None else plan


def _torch_weights(request: PlanRequest, on_gpu: bool, budget: int) -> tuple[Item, str | None]:
    """The resident torch engine's weights and compute dtype: as loaded, float32 on a CPU while
    that takes at most half the budget (on a GPU they take GPU memory, not this)."""
    from specrun.engines import torch_config
    from specrun.engines.torch_engine import cpu_dtype_for, planned_weight_bytes

    resident = replace(request.target_placement, offload="none")
    dtype, weights = resident.dtype, 0
    if not on_gpu and dtype is None:
        float32 = planned_weight_bytes(request.target, torch_config(request.target, replace(resident, dtype="float32")))
        dtype = cpu_dtype_for(float32, budget)
        weights = float32 if dtype == "float32" else 0
    if not on_gpu and not weights:
        weights = planned_weight_bytes(request.target, torch_config(request.target, replace(resident, dtype=dtype)))
    return Item("target weights" + (f" ({dtype})" if dtype else ""), weights, "--offload disk", "weights"), dtype


def _streamed_budget(plan: MemoryPlan, request: PlanRequest, units: list) -> MemoryPlan:  # type: ignore[type-arg]
    """The read buffers (and, with room, resident layers) of a streamed target: --ram when given,
    else what the rest of the plan leaves (all of a cgroup's; half the host's free memory, to
    stay a good neighbour), capped at the read-ahead that keeps the disk busy when
    --offload disk asked to stream every layer."""
    from specrun.engines.torch_engine import OffloadConfig
    from specrun.engines.torch_engine.streamed import MIN_SLOTS, disk_plan

    p = request.target_placement
    left = plan.limit.budget - plan.total
    biggest = max(u.n_bytes for u in units)
    if plan.target.offload == "ram":  # pinned host copies of the streamed layers (the GPU's slots are its own)
        host = sum(u.n_bytes for u in units)
        item = Item("target layers in pinned RAM", host, "--gpu-memory", "weights")
        return replace(plan, target=replace(plan.target, ram=p.ram if p.ram is not None else host),
                       items=plan.items + (item,))
    if p.offload == "disk" and p.ram is None:  # asked for disk: every layer streams, through what fits of the read-ahead
        resident, slots = disk_plan(units, OffloadConfig(mode="disk"))
        slots = max(MIN_SLOTS, min(slots, left // biggest))
        ram = None
    else:
        ram = p.ram if p.ram is not None else max(left if plan.limit.cgroup else left // 2, MIN_SLOTS * biggest)
        resident, slots = disk_plan(units, OffloadConfig(mode="disk", ram=ram))  # too little --ram: its error
    buffers = slots * biggest + sum(u.n_bytes for u in units if u.index in resident)
    what = f"target read buffers ({slots} slots of {gib(biggest)}" + (
        f", {len(resident)} of {len(units)} units resident)" if resident else ")")
    target = replace(plan.target, ram=None if ram is None else buffers, slots=slots)
    return replace(plan, target=target, items=plan.items + (Item(what, buffers, "--ram", "weights"),))


def _finish(request: PlanRequest, plan: MemoryPlan, shape: ModelShape, draft: ModelShape | None) -> MemoryPlan:
    """The notices a chosen plan owes the user: what it gave up, and why."""
    notices = []
    name = request.target.name
    if plan.target.offload in ("disk", "ram") and request.target_placement.offload == "auto":
        notices.append(f"{name} ({gib(model_bytes(request.target))}) does not fit the memory specrun may use "
                       f"({plan.limit.describe()}): streaming it from {plan.target.offload} each pass")
    if plan.target.load == "mmap" and plan.target.repack is False:
        notices.append(f"{name} does not fit the memory specrun may use ({plan.limit.describe()}): llama.cpp will "
                       "read it from disk through the page cache, slowly; the torch engine streams it faster "
                       "(bash scripts/install.sh --torch)")
    if draft is not None and plan.draft is None and request.draft is not None:
        notices.append(f"the draft model {request.draft.name} ({gib(draft.weight_bytes)}) does not fit beside the "
                       "target: speculating with prompt lookup only")
    if plan.draft is not None and plan.draft.load == "resident" and swap_enabled():
        notices.append("the draft model cannot be locked in RAM here (RLIMIT_MEMLOCK): with swap on, the system "
                       "may page it out while the target streams")
    wanted = default_ctx(shape.n_ctx_train, request.needed_ctx)
    if request.ctx is None and plan.n_ctx < wanted:
        notices.append(f"a {plan.n_ctx}-token context fits the memory limit, not {wanted}")
    if plan.tree_nodes < min(request.tree_nodes, tree_limit(request.target, plan.target) or request.tree_nodes):
        notices.append(f"trees of at most {plan.tree_nodes} nodes fit the memory limit, not {request.tree_nodes}")
    return replace(plan, notices=tuple(notices))


def _refusal(request: PlanRequest, smallest: MemoryPlan, limit: MemoryLimit) -> DoesNotFit:
    """One line: what the smallest plan needs against what there is and its biggest parts; the
    hint names only flags that would still shrink something (a context already the least,
    trees already the least, are not worth suggesting)."""
    parts = sorted((i for i in smallest.items if i.bytes), key=lambda i: -i.bytes)
    biggest = ", ".join(f"{i.what.split(' (')[0]} {gib(i.bytes)}" for i in parts[:3])
    p = request.target_placement
    can = {"--no-draft": smallest.draft is not None, "--ctx": smallest.n_ctx > MIN_CTX,
           "--budget": smallest.tree_nodes > max(8, request.fixed_nodes) or request.fixed_nodes > 8,
           "--ram": p.ram is not None, "--gpu-memory": p.gpu_memory is not None,
           "--offload disk": p.offload == "none"}
    flags = [f for f in dict.fromkeys(i.flag for i in parts if i.flag) if can.get(f, False)]
    flags = ["--no-draft (or a smaller --draft)" if f == "--no-draft" else f"a smaller {f}" if f in ("--ctx", "--ram",
             "--gpu-memory", "--budget") else f for f in flags]
    hint = f"try {', '.join(flags)}, or run where more memory is allowed" if flags else \
        f"run where at least {gib(smallest.total)} is allowed"
    return DoesNotFit(f"{request.target.name} cannot run in the memory specrun may use: it needs at least "
                      f"{gib(smallest.total)} and has {limit.describe()}; the most: {biggest}", hint=hint)


# --- the runtime ------------------------------------------------------------------------------


TORCH_FLOOR = 200 * MIB  # importing torch 2.13 (CPU) and a first matmul took 230-250 MiB on this project's machines


def _room_for_torch(limit: MemoryLimit) -> bool:
    """Whether importing torch could not get this process killed: it is imported already, or the
    limit leaves TORCH_FLOOR for it (where it does not, the floor stands in for the measurement,
    and no streamed plan fits)."""
    return "torch" in sys.modules or limit.budget - resident_bytes() >= TORCH_FLOOR


def measure_runtime(with_torch: bool) -> int:
    """What this process holds once its runtime is up (measured: resident memory after importing
    and starting llama.cpp and, when the torch engine is picked, torch and its thread pool)."""
    from specrun.engines.llamacpp_backend import init_backend

    init_backend()
    if with_torch:
        import torch

        if hasattr(torch, "ones"):  # (a stand-in in tests has none)
            (torch.ones(64, 64) @ torch.ones(64, 64)).sum()  # its thread pool and allocator, as a pass starts them
    return resident_bytes()


def describe_plan_json(plan: MemoryPlan) -> dict[str, object]:
    """The plan for --json and `specrun info --json`."""
    return {"limit": {"budget": plan.limit.budget, "available": plan.limit.available, "held": plan.limit.held,
                      "source": plan.limit.source, "limit": plan.limit.limit},
            "engine": plan.target.engine, "offload": plan.target.offload, "n_ctx": plan.n_ctx,
            "tree_nodes": plan.tree_nodes, "draft": plan.draft.load if plan.draft else None,
            "items": [{"what": i.what, "bytes": i.bytes} for i in plan.items], "total": plan.total,
            "notices": list(plan.notices)}

