"""The memory plan: its arithmetic, what it decides under a limit, and refusing before anything loads."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import llama_cpp
import pytest

import specrun.engines as engines
from specrun.engines import memory_plan as mp
from specrun.engines.model_shape import ModelShape
from specrun.memory_limit import MemoryLimit
from tests.test_cli_run import assert_one_line_error, invoke
from tests.tiny_model import TinySpec, build_tiny_model, quantize_model

MIB, GIB = 1 << 20, 1 << 30
HOST = MemoryLimit(available=64 * GIB, held=0, source="MemAvailable (a test's)", limit=None)
RUNTIME = 100 * MIB


def cgroup(budget: int) -> MemoryLimit:
    return MemoryLimit(available=budget, held=0, source="cgroup v1 memory.limit_in_bytes of /test", limit=budget)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan")
    spec = TinySpec(n_embd=256, n_ff=512, n_layers=4, n_head=4, n_head_kv=2, arch="qwen2", scale=2.0)
    f32 = build_tiny_model(root / "f32.gguf", spec)
    return {"target": quantize_model(f32, root / "target.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M),
            "draft": build_tiny_model(root / "draft.gguf", replace(spec, n_layers=2))}


@pytest.fixture
def weigh(monkeypatch: pytest.MonkeyPatch):
    """weigh(path, bytes): the plan sees that model's weights as `bytes` (tiny files standing in
    for big ones; what streams stays what the file holds)."""
    real = ModelShape.of
    sizes: dict[Path, int] = {}

    monkeypatch.setattr(ModelShape, "of", classmethod(
        lambda cls, p: replace(real(p), weight_bytes=sizes[p]) if p in sizes else real(p)))
    monkeypatch.setattr(engines.placement, "llama_gpu", lambda: False)
    monkeypatch.setattr(engines, "llama_gpu", lambda: False)
    return sizes.__setitem__


def plan(files: dict[str, Path], limit: MemoryLimit, draft: bool = True, **kw) -> mp.MemoryPlan:
    request = mp.PlanRequest(files["target"], files["draft"] if draft else None, **kw)
    return mp.plan_memory(request, limit, runtime=RUNTIME)


def test_the_arithmetic(files: dict[str, Path]) -> None:
    """KV caches by hand; a llama.cpp context is its f16 KV, two logits-sized buffers and a
    small compute buffer; the total is the items' sum with at least 64 MiB of headroom."""
    shape = ModelShape.of(files["target"])
    assert (shape.n_layer, shape.kv_width, shape.n_vocab) == (4, 2 * 64, 272)
    assert shape.kv_bytes(1000, 4) == 2 * 4 * 1000 * 128 * 4
    assert shape.llama_context_bytes(1000, 10) == (shape.kv_bytes(1000, 2) + 2 * 10 * 272 * 4 + 512 * 256 * 16
                                                   + 4 * MIB)
    p = plan(files, HOST, needed_ctx=100, tree_nodes=64)
    assert p.total == sum(i.bytes for i in p.items)
    headroom = next(i for i in p.items if i.part == "headroom")
    assert headroom.bytes >= mp.HEADROOM and headroom.bytes >= (p.total - headroom.bytes) // 20
    assert next(i for i in p.items if i.part == "runtime").bytes == RUNTIME
    assert {i.part for i in p.items} <= set(mp.PARTS)


def test_with_room_the_target_loads_and_the_draft_is_mapped(files: dict[str, Path]) -> None:
    p = plan(files, HOST, needed_ctx=100, tree_nodes=64)
    trained = ModelShape.of(files["target"]).n_ctx_train  # the default context: 4096, or less if trained for less
    assert (p.target.engine, p.target.offload, p.n_ctx, p.tree_nodes) == ("llama.cpp", "none", min(4096, trained), 64)
    assert p.draft is not None and p.draft.load == "mmap" and not p.notices


def test_over_rpc_only_the_layers_kept_here_count(files: dict[str, Path]) -> None:
    """--rpc: the workers hold the target's weights, but for the layers --gpu-layers keeps here."""
    shape = ModelShape.of(files["target"])

    def weights(**placement) -> int:
        p = plan(files, HOST, needed_ctx=100, tree_nodes=8, target_placement=engines.Placement(**placement))
        return sum(i.bytes for i in p.items if i.part == "weights")

    assert weights() == shape.weight_bytes
    assert weights(rpc=("127.0.0.1:5",)) == 0
    assert weights(rpc=("127.0.0.1:5",), gpu_layers=1) == shape.weight_bytes * (shape.n_layer - 1) // shape.n_layer
    # and the KV cache of the layers the workers hold is theirs
    here, there = (plan(files, HOST, needed_ctx=100, tree_nodes=8, target_placement=engines.Placement(rpc=rpc))
                   for rpc in ((), ("127.0.0.1:5",)))
    cache = [next(i.bytes for i in p.items if i.part == "cache") for p in (here, there)]
    assert here.n_ctx == there.n_ctx and cache[0] - cache[1] == shape.kv_bytes(max(here.n_ctx, 64 + 8 + 1), 2)


def test_under_a_cgroup_the_draft_is_held_in_ram(files: dict[str, Path]) -> None:
    p = plan(files, cgroup(8 * GIB), needed_ctx=100, tree_nodes=64)
    assert p.target.engine == "llama.cpp" and p.draft is not None and p.draft.load in ("locked", "resident")


def test_a_model_bigger_than_the_limit_streams_and_keeps_its_draft(files: dict[str, Path], weigh) -> None:
    weigh(files["target"], 8 * GIB)  # a container with 2 GiB and an 8 GiB model streams it, it does not load
    p = plan(files, cgroup(2 * GIB), needed_ctx=100, tree_nodes=64)
    assert (p.target.engine, p.target.offload) == ("torch", "disk")
    assert p.draft is not None and p.draft.load in ("locked", "resident")
    assert p.total <= 2 * GIB and any("streaming it from disk" in n for n in p.notices)
    assert p.target.ram is not None and p.target.slots is not None  # what the engine reads, decided here


def test_the_context_and_the_tree_shrink_before_the_draft_goes(files: dict[str, Path], weigh) -> None:
    weigh(files["target"], 8 * GIB)
    weigh(files["draft"], 300 * MIB)
    from specrun.engines.torch_engine.streamed import MIN_SLOTS, file_units

    roomy = plan(files, cgroup(2 * GIB), needed_ctx=100, tree_nodes=1024)
    assert (roomy.tree_nodes, roomy.draft is not None) == (1024, True)
    # A cgroup's room left over goes to the target's read buffers and resident layers. Room for
    # everything but the fewest buffers with the largest tree and context:
    rest = roomy.total - sum(i.bytes for i in roomy.items if i.part == "weights")
    tight = cgroup(rest + MIN_SLOTS * max(u.n_bytes for u in file_units(files["target"])) - 1)
    p = plan(files, tight, needed_ctx=100, tree_nodes=1024)
    assert p.draft is not None and p.total <= tight.budget and p.target.offload == "disk"
    assert p.n_ctx < roomy.n_ctx or p.tree_nodes < 1024
    assert any("context fits" in n or "trees of at most" in n for n in p.notices)


def test_auto_goes_without_a_draft_that_does_not_fit_and_tree_refuses(files: dict[str, Path], weigh) -> None:
    weigh(files["target"], 8 * GIB)
    weigh(files["draft"], 3 * GIB)
    p = plan(files, cgroup(2 * GIB), needed_ctx=100, tree_nodes=64)
    assert p.draft is None and p.target.offload == "disk"
    assert any("does not fit beside the target" in n for n in p.notices)
    with pytest.raises(mp.DoesNotFit, match="draft model 3.00 GiB") as e:
        plan(files, cgroup(2 * GIB), needed_ctx=100, tree_nodes=64, draft_required=True)
    assert "--no-draft" in (e.value.hint or "") and e.value.exit_code == 2


def test_flags_that_cannot_fit_are_refused_naming_the_flag(files: dict[str, Path]) -> None:
    with pytest.raises(mp.DoesNotFit) as e:  # --ram beyond what the limit leaves (a runtime that leaves 1 MiB)
        mp.plan_memory(mp.PlanRequest(files["target"], None, target_placement=engines.Placement(offload="disk",
                                                                                               ram=GIB)),
                       cgroup(RUNTIME + mp.HEADROOM + 3 * MIB), runtime=RUNTIME)
    assert "--ram" in (e.value.hint or "")
    with pytest.raises(mp.DoesNotFit) as e:  # --ctx too big: never shrunk behind the user's back
        plan(files, cgroup(300 * MIB), draft=False, ctx=1_000_000)
    assert "--ctx" in (e.value.hint or "")
    with pytest.raises(engines.UsageError, match="at most 255 nodes, not 300"):
        plan(files, HOST, draft=False, tree_nodes=300, fixed_nodes=300)


def test_nothing_fits_one_line_before_anything_loads(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    """Under a limit smaller than the runtime alone: a one-line error and exit 2, and no engine
    was ever opened."""
    from specrun.session import Session

    opened: list[Path] = []
    monkeypatch.setattr(mp, "detect", lambda: cgroup(50 * MIB))
    monkeypatch.setattr("specrun.session.open_engine", lambda path, *a: opened.append(path))
    result = invoke("run", str(files["target"]), "hi", "-n", "4")
    assert_one_line_error(result, 2, "cannot run in the memory specrun may use")
    assert "needs at least" in result.stderr and "runtime" in result.stderr and opened == []
    from specrun.session import SessionConfig

    with pytest.raises(mp.DoesNotFit):
        Session(SessionConfig(files["target"], None, tmp_path))
    assert opened == []


def test_info_shows_the_limit_and_the_plan(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    monkeypatch.setattr(mp, "detect", lambda: cgroup(3 * GIB))
    data = json.loads(invoke("info", str(files["target"]), "--json").stdout)
    assert "limit 3.00 GiB, cgroup v1 memory.limit_in_bytes of /test" in data["memory_limit"]
    plan_json = data["memory_plan"]
    assert plan_json["total"] == sum(i["bytes"] for i in plan_json["items"]) <= 3 * GIB
    text = invoke("info", str(files["target"])).stdout
    assert "memory limit" in text and "memory plan" in text and "runtime" in text


def test_a_plan_with_small_trees_still_serves_auto(files: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Trees capped below what a mode asks by default (32): auto plans within the cap (it was a
    ValueError: 'the engines were opened for trees of at most 16 nodes')."""
    from specrun.generate import Generation, GenerationConfig
    from specrun.sampling import SamplingConfig
    from specrun.session import Session, SessionConfig
    from specrun.speculate.factory import SpecConfig

    real = mp._variants
    monkeypatch.setattr(mp, "_variants", lambda *a: [p for p in real(*a) if p.tree_nodes <= 16])
    with Session(SessionConfig(files["target"], None, tmp_path, (SpecConfig("auto"),), needed_ctx=64)) as s:
        assert s.plan.tree_nodes == 16
        s.open(s.n_ctx)
        speculator = s.speculator(SpecConfig("auto"))
        assert s.cache is not None  # read after asking for a speculator: calibrating may replace it
        gen = Generation(s.target, s.cache, [1, 5, 6, 5, 6, 5, 6], GenerationConfig(8, SamplingConfig(temperature=0)),
                         speculator)
        assert len(list(gen)) > 0 and max(s.calibration.cost.sizes) <= 16  # type: ignore[union-attr]
