"""Offloaded placements: weights streamed from disk (or pinned RAM) every pass.

What must hold: streamed logits equal resident ones exactly (the same kernels on
the same bytes, brought in at the right time), the disk is really read every
pass, memory stays within the budget, faults are one-line errors, and
speculation on a streamed target decodes exactly as plain decoding does.
The `ram` placement's slot and event ordering is checked with a recording
fake copy engine (and with CUDA where there is one).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import llama_cpp
import pytest
import torch

import specrun.engines as engines
from specrun.engines.base import Cache
from specrun.engines.llamacpp import LlamaCppConfig, LlamaCppEngine
from specrun.memory_limit import MemoryLimit
from specrun.engines.torch_engine import TorchConfig, TorchEngine
from specrun.engines.torch_engine import disk_stream, layout
from specrun.engines.torch_engine.config import OffloadConfig
from specrun.engines.torch_engine.streamed import plan_residency
from specrun.errors import ModelFileError, UsageError
from specrun.gguf_file import read_gguf
from specrun.generate import Generation, GenerationConfig
from specrun.sampling import SamplingConfig
from specrun.speculate.draft_model import DraftModel, ModelDraftConfig, ModelDrafter
from specrun.speculate.planned import PlannedSpeculator, Source
from specrun.speculate.acceptance import AcceptanceStats
from tests import processes
from tests.tiny_model import TinySpec, build_tiny_model, quantize_model

SPEC = TinySpec(n_embd=256, n_ff=512, n_layers=4, n_head=4, n_head_kv=2, arch="qwen2", scale=2.0)
PROMPT = [1, 80, 81, 82, 200, 201, 90, 91, 92, 93, 17, 18]
TREE = ([5, 40, 41, 42, 43, 44, 45], [-1, 0, 0, 1, 1, 2, 5], [0, 1, 1, 2, 2, 2, 3])


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("offload")
    f32 = build_tiny_model(root / "f32.gguf", SPEC)
    return {"f32": f32, "q4_k_m": quantize_model(f32, root / "q4_k_m.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)}


def engine(path: Path, mode: str = "none", ram: int | None = None, slots: int = 2, **kw) -> TorchEngine:
    e = TorchEngine(path, TorchConfig(dtype="float32", threads=1, max_tree_nodes=16,
                                      offload=OffloadConfig(mode=mode, ram=ram, slots=slots, **kw)))
    return e


def passes(e: TorchEngine, cache: Cache | None = None) -> list[torch.Tensor]:
    """Logits of a prompt, two plain steps and a tree, each as a tensor of all its rows, in
    `cache` (empty, or rewound to empty) or a new 128-token one."""
    c = cache if cache is not None else e.new_cache(128)
    out = [e.eval(c, PROMPT)._rows.clone(), e.eval(c, [7])._rows.clone(), e.eval(c, [8])._rows.clone()]
    out.append(e.eval_tree(c, *TREE)._rows.clone())
    e.commit_path(c, [0, 2, 5])
    out.append(e.eval(c, [9])._rows.clone())
    return out


def unit_bytes(path: Path) -> list[int]:
    from specrun.engines.torch_engine.arch import ModelArgs

    info = read_gguf(path)
    names = {t.name for t in info.tensors}
    n_vocab = next(t.shape[0] for t in info.tensors if t.name == "token_embd.weight")
    size = path.stat().st_size  # the last unit's read stops at the end of the file
    return [min(u.n_bytes, size - u.start)
            for u in layout.plan_units(info, ModelArgs.from_gguf(info.metadata, names, n_vocab))]


def test_units_cover_every_layer_and_output_row_at_aligned_offsets(models: dict[str, Path]) -> None:
    from specrun.engines.torch_engine.arch import ModelArgs

    info = read_gguf(models["q4_k_m"])
    names = {t.name for t in info.tensors}
    args = ModelArgs.from_gguf(info.metadata, names, 272)
    units = layout.plan_units(info, args)
    assert [u.number for u in units if u.kind == "layer"] == list(range(SPEC.n_layers))
    rows = [u.rows for u in units if u.kind == "output"]
    assert rows[0][0] == 0 and rows[-1][1] == 272 and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    by_name = {t.name: t for t in info.tensors}
    for u in units:
        assert u.start % layout.ALIGN == 0 and u.n_bytes % layout.ALIGN == 0
        for s in u.spans:
            assert (u.start + s.offset) % layout.TENSOR_ALIGN == 0 and s.offset + s.n_bytes <= u.n_bytes
            if u.kind == "layer":
                assert u.start + s.offset == by_name[s.name].offset


@pytest.mark.parametrize("ftype", ["f32", "q4_k_m"])
def test_streamed_logits_equal_resident_ones_exactly(models: dict[str, Path], ftype: str) -> None:
    path = models[ftype]
    total = sum(unit_bytes(path))
    with engine(path, "disk", ram=10 * total) as resident, engine(path, "disk") as streamed:
        assert resident.transfer().bytes_per_pass == 0
        assert streamed.transfer().bytes_per_pass == total  # two slots: every unit streams
        for a, b in zip(passes(resident), passes(streamed), strict=True):
            assert torch.equal(a, b)
    if ftype == "f32":  # f32 matrices multiply as the resident engine's own do
        with engine(path) as plain, engine(path, "disk") as streamed:
            for a, b in zip(passes(plain), passes(streamed), strict=True):
                assert torch.equal(a, b)


def test_quantized_streaming_computes_as_llama_cpp_does(models: dict[str, Path]) -> None:
    """Streamed quantized matrices go through llama.cpp's own kernels (activations quantized to
    8 bits), so the logits follow llama.cpp's on the same file more closely than the resident
    CPU engine's (weights dequantized to float32; test_engine_torch holds that one to 0.98)."""
    path = models["q4_k_m"]
    with engine(path, "disk") as streamed, LlamaCppEngine(path, LlamaCppConfig(n_threads=1)) as llama:
        got = streamed.eval(streamed.new_cache(128), PROMPT[:-1] + [PROMPT[-1]])._rows[0]
        want = torch.from_numpy(llama.eval(llama.new_cache(128), PROMPT).row(0))
        assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.995


def test_the_disk_is_read_every_pass_and_memory_stays_within_the_budget(models: dict[str, Path]) -> None:
    path = models["q4_k_m"]
    sizes = unit_bytes(path)
    budget = 3 * max(sizes)
    with engine(path, "disk", ram=budget, slots=3) as e:
        cache = e.new_cache(128)
        assert e.stream.buffer_bytes <= budget
        io_before = _read_bytes()
        before = e.transfer()
        for tok in (5, 6, 7, 8):
            e.eval(cache, [tok])
        done = e.transfer().minus(before)
        assert done.passes == 4
        assert done.bytes == 4 * e.transfer().bytes_per_pass > 0
        io_read = _read_bytes() - io_before if io_before is not None else None
        if io_read is not None and e.stream.direct:  # the kernel agrees: the bytes came off the disk,
            # but for what the read-ahead ring had read before the first of these passes began
            # (at most its slots; the kernel counted those before io_before)
            assert io_read >= done.bytes - e.stream.buffer_bytes


def _read_bytes() -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def test_a_big_model_streams_within_its_budget_whatever_its_size(tmp_path: Path) -> None:
    """Resident memory grows by the buffers, not by the model: 8 layers of 12 MB, 2 slots."""
    path = build_tiny_model(tmp_path / "big.gguf", TinySpec(n_embd=512, n_ff=1536, n_layers=8, n_head=8))
    size = path.stat().st_size
    warm = engine(path, "disk")  # imports and first-use allocations
    warm.close()
    rss = _rss()
    with engine(path, "disk") as e:
        cache = e.new_cache(128)
        for tok in PROMPT:
            e.eval(cache, [tok])
        assert e.stream.buffer_bytes <= 2 * max(unit_bytes(path))
        assert _rss() - rss < size // 2


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_budgets_decide_slots_and_resident_units() -> None:
    units = [layout.Unit(i, "layer", i, i * 8192, 8192, ()) for i in range(6)]
    with pytest.raises(UsageError, match="too small to stream"):
        plan_residency(units, 8192, 3, "--ram")
    assert plan_residency(units, 6 * 8192, 3, "--ram") == ({0, 1, 2, 3, 4, 5}, 0)
    assert plan_residency(units, 5 * 8192, 3, "--ram") == ({0, 1}, 3)
    assert plan_residency(units, 2 * 8192, 3, "--ram") == (set(), 2)


# --- faults ----------------------------------------------------------------------------

def test_a_model_file_that_changes_or_disappears_is_one_error(models: dict[str, Path], tmp_path: Path) -> None:
    path = shutil.copy(models["q4_k_m"], tmp_path / "m.gguf")
    with engine(Path(path), "disk") as e:
        cache = e.new_cache(128)
        e.eval(cache, [5])
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        with pytest.raises(ModelFileError, match="changed on disk"):
            e.eval(cache, [6])
        os.unlink(path)
        with pytest.raises(ModelFileError, match="disappeared"):
            e.eval(cache, [6])


def test_a_read_error_is_one_error_and_the_next_pass_recovers(models: dict[str, Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = models["q4_k_m"]
    with engine(path, "disk", ram=10 * sum(unit_bytes(path))) as resident, engine(path, "disk") as e:
        want = passes(resident)
        real = os.preadv

        def failing(fd: int, buffers: list, offset: int) -> int:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(disk_stream.os, "preadv", failing)
        cache = e.new_cache(128)
        with pytest.raises(ModelFileError, match="Input/output error"):
            e.eval(cache, PROMPT)
        monkeypatch.setattr(disk_stream.os, "preadv", real)
        e.rewind(cache, 0)
        for a, b in zip(want, passes(e, cache), strict=True):
            assert torch.equal(a, b)


def test_a_failed_read_of_a_passs_first_layer_read_ahead_is_one_error_too(models: dict[str, Path],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The ring reads the next pass's first layers during this pass: an error there surfaces at
    the start of the next pass, and the one after starts from a clean ring."""
    path = models["q4_k_m"]
    with engine(path, "disk", ram=10 * sum(unit_bytes(path))) as resident, engine(path, "disk") as e:
        want = passes(resident)
        first = e.stream.streamed[0].start
        real, failed = os.preadv, []

        def fail_once(fd: int, buffers: list, offset: int) -> int:
            if offset == first and not failed:
                failed.append(offset)
                raise OSError(5, "Input/output error")
            return real(fd, buffers, offset)

        monkeypatch.setattr(disk_stream.os, "preadv", fail_once)
        cache = e.new_cache(128)
        e.eval(cache, PROMPT)  # its own first layer was read before the failure was armed
        with pytest.raises(ModelFileError, match="Input/output error"):
            e.eval(cache, [7])
        assert failed
        e.rewind(cache, 0)
        for a, b in zip(want, passes(e, cache), strict=True):
            assert torch.equal(a, b)


def test_read_errors_at_load_and_in_embedding_rows_are_one_error_too(models: dict[str, Path],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The RAM placement reads the whole file as it loads, and every placement reads its tokens'
    embedding rows: a failing disk there is the same one-line error as in a pass."""
    path = models["q4_k_m"]

    def failing(*args: object) -> int:
        raise OSError(5, "Input/output error")

    with engine(path, "disk") as e:
        cache = e.new_cache(128)
        monkeypatch.setattr(os, "pread", failing)
        with pytest.raises(ModelFileError, match="Input/output error"):
            e.eval(cache, PROMPT)
    monkeypatch.setattr(os, "preadv", failing)
    with pytest.raises(ModelFileError, match="Input/output error"):
        ram_engine(path, None, RecordingCopier()).close()


def test_a_file_shorter_than_its_header_is_one_error_wherever_it_is_read(models: dict[str, Path],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass's layer, an embedding row and the RAM placement's load: each short read says the
    file changed on disk, naming it and what was being read."""
    path = models["q4_k_m"]
    real_pread = os.pread
    with engine(path, "disk") as e:
        cache = e.new_cache(128)
        monkeypatch.setattr(os, "pread", lambda fd, n, offset: real_pread(fd, n - 1, offset))
        with pytest.raises(ModelFileError, match=f"{path.name} ended early while reading an embedding row"):
            e.eval(cache, PROMPT)
    monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset: 0)
    with pytest.raises(ModelFileError, match=f"{path.name} ended early while reading a layer"):
        ram_engine(path, None, RecordingCopier()).close()


def test_a_pass_cut_short_leaves_the_stream_in_order(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from specrun.engines.torch_engine import streamed

    path = models["q4_k_m"]
    with engine(path, "disk", ram=10 * sum(unit_bytes(path))) as resident, engine(path, "disk") as e:
        want = passes(resident)
        real, calls = streamed.layer_weights, []

        def interrupted(*args, **kw):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real(*args, **kw)

        monkeypatch.setattr(streamed, "layer_weights", interrupted)
        cache = e.new_cache(128)
        with pytest.raises(KeyboardInterrupt):
            e.eval(cache, PROMPT)
        e.rewind(cache, 0)
        for a, b in zip(want, passes(e, cache), strict=True):
            assert torch.equal(a, b)


def refusing_direct_io(real: Callable[..., int]) -> Callable[..., int]:
    """os.open as on a filesystem that refuses O_DIRECT (tmpfs)."""
    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real(path, flags, *args)
    return no_direct


def test_direct_io_refused_falls_back_to_buffered_reads_with_a_notice(models: dict[str, Path],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    with engine(models["f32"], "disk") as want:
        expected = passes(want)
    monkeypatch.setattr(disk_stream.os, "open", refusing_direct_io(os.open))
    with engine(models["f32"], "disk") as e:
        assert not e.stream.direct
        assert len(e.notices) == 1 and "direct reads refused" in e.notices[0]
        for a, b in zip(expected, passes(e), strict=True):
            assert torch.equal(a, b)


def test_both_engines_notices_reach_the_user(models: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A fallback taken while loading the draft is said as well as the target's (the draft
    loads later, when a speculator first needs it)."""
    from specrun.session import Session, SessionConfig
    from specrun.speculate.factory import SpecConfig

    draft = Path(shutil.copy(models["q4_k_m"], tmp_path / "draft.gguf"))
    monkeypatch.setattr(disk_stream.os, "open", refusing_direct_io(os.open))
    disk = engines.Placement(engine="torch", device="cpu", offload="disk")
    notices: list[str] = []
    chain = SpecConfig("chain", budget=3, overlap="off")
    session = Session(SessionConfig(models["q4_k_m"], draft, tmp_path, (chain,), disk, disk), notices.append)
    try:
        assert len(notices) == 1 and models["q4_k_m"].name in notices[0]
        session.open(128)  # a draft model's speculator drafts in a cache as long as the target's
        session.speculator(chain)
        assert len(notices) == 2 and "draft.gguf" in notices[1] and "direct reads refused" in notices[1]
    finally:
        session.close()


def test_a_budget_below_two_layers_is_refused_before_loading(models: dict[str, Path]) -> None:
    with pytest.raises(UsageError, match="--ram .* too small"):
        engine(models["q4_k_m"], "disk", ram=1000)


# --- speculation on a streamed target --------------------------------------------------

GREEDY = SamplingConfig(temperature=0)


def generate(target: TorchEngine, cache: Cache, prompt: list[int], sampling: SamplingConfig,
             speculator=None) -> Generation:
    target.rewind(cache, 0)
    gen = Generation(target, cache, prompt, GenerationConfig(40, sampling), speculator)
    for _ in gen:
        pass
    return gen


@pytest.mark.parametrize("ftype, sampling", [("q4_k_m", GREEDY), ("f32", GREEDY),
                                             ("f32", SamplingConfig(temperature=0.8, seed=3))])
def test_speculation_on_a_streamed_target_decodes_as_plain_decoding(models: dict[str, Path], ftype: str,
                                                                    sampling: SamplingConfig) -> None:
    """Seeded sampling is compared on f32 weights: llama.cpp's quantized kernels round a token's
    logits a little differently inside a batch than alone (as llama.cpp itself does), which
    moves a sampled token now and then; greedy holds on both."""
    with engine(models[ftype], "disk") as target, \
            LlamaCppEngine(models[ftype], LlamaCppConfig(n_threads=1, max_tree_nodes=16)) as draft:
        cache = target.new_cache(128)
        plain = generate(target, cache, PROMPT, sampling)
        drafter = ModelDrafter(DraftModel(draft, draft.new_cache(128)), ModelDraftConfig())
        tree = PlannedSpeculator("model", [Source("model", drafter, AcceptanceStats())], None, 12, 6)
        before = target.transfer()
        spec = generate(target, cache, PROMPT, sampling, tree)
        assert spec.tokens == plain.tokens
        assert spec.stats.accepted_tokens > 0  # the draft is the target's own file: it is often right
        assert target.transfer().minus(before).passes == spec.stats.target_calls


# --- the ram placement's slots and events, with a recording copy engine ------------------

class RecordingCopier:
    """Copies at once on the CPU; records the order of copies, waits and events."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self._n = 0

    def _event(self, kind: str) -> tuple[str, int]:
        self._n += 1
        return (kind, self._n)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after) -> tuple[str, int]:
        dst.copy_(src)
        done = self._event("copied")
        self.log.append(("copy", src.data_ptr(), dst.data_ptr(), after, done))
        return done

    def wait(self, event) -> None:
        self.log.append(("wait", event))

    def record(self) -> tuple[str, int]:
        used = self._event("used")
        self.log.append(("record", used))
        return used


def ram_engine(path: Path, gpu_memory: int | None, copier: RecordingCopier, slots: int = 2) -> TorchEngine:
    from specrun.engines.torch_engine import streamed

    original = streamed.open_streamed

    def with_copier(*args, **kw):
        return original(*args, **kw, copier=copier)

    streamed.open_streamed = with_copier
    try:
        return engine(path, "ram", slots=slots, gpu_memory=gpu_memory)
    finally:
        streamed.open_streamed = original


def test_ram_placement_orders_copies_with_events_and_wraps_into_the_next_pass(models: dict[str, Path]) -> None:
    path = models["q4_k_m"]
    sizes = unit_bytes(path)
    copier = RecordingCopier()
    with engine(path, "disk", ram=10 * sum(sizes)) as resident, ram_engine(path, None, copier) as e:
        want = passes(resident)
        stream = e.stream
        assert len(stream.slots) == 2 and not stream.resident
        # before any pass: the first two units are already on their way (prefetch)
        assert [entry[0] for entry in copier.log] == ["copy", "copy"]
        got = passes(e)
        for a, b in zip(want, got, strict=True):
            assert torch.equal(a, b)
    copies = [entry for entry in copier.log if entry[0] == "copy"]
    n = len(sizes)
    assert len(copies) == 5 * n + 2  # five passes, plus the next pass's first two units in flight
    # every unit is used only after the compute stream waited for its copy
    done_events = [c[4] for c in copies]
    waits = [entry[1] for entry in copier.log if entry[0] == "wait"]
    assert waits == done_events[:len(waits)] and len(waits) == 5 * n
    # a slot is refilled only after the compute recorded the end of its previous use
    recorded = set()
    for entry in copier.log:
        if entry[0] == "record":
            recorded.add(entry[1])
        elif entry[0] == "copy" and entry[3] is not None:
            assert entry[3] in recorded
    assert [c[3] is None for c in copies] == [True, True] + [False] * (len(copies) - 2)
    # slots alternate; units go in pass order, wrapping around
    slot_ptrs = [c[2] for c in copies]
    assert slot_ptrs[0] != slot_ptrs[1] and slot_ptrs[2:] == [slot_ptrs[i % 2] for i in range(2, len(copies))]


def test_ram_placement_keeps_what_fits_the_gpu_budget_resident(models: dict[str, Path]) -> None:
    path = models["q4_k_m"]
    sizes = unit_bytes(path)
    copier = RecordingCopier()
    budget = 2 * max(sizes) + sizes[0] + sizes[1]
    with ram_engine(path, budget, copier) as e:
        assert set(e.stream.resident) == {0, 1}
        e.eval(e.new_cache(128), PROMPT)
        copied = [c for c in copier.log if c[0] == "copy"]
        assert len(copied) == len(sizes) - 2 + 2  # the streamed units once, then two ahead
        assert e.transfer().bytes_per_pass == sum(sizes[2:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_ram_placement_on_cuda_equals_resident(models: dict[str, Path]) -> None:
    path = models["q4_k_m"]

    def cuda(mode: str, gpu_memory: int | None = None) -> TorchEngine:
        e = TorchEngine(path, TorchConfig(device="cuda", max_tree_nodes=16,
                                          offload=OffloadConfig(mode=mode, slots=2, gpu_memory=gpu_memory)))
        return e

    with cuda("none") as resident, cuda("ram", 2 * max(unit_bytes(path))) as streamed:
        for a, b in zip(passes(resident), passes(streamed), strict=True):
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-3)
        assert streamed.transfer().bytes_per_pass == sum(unit_bytes(path))


# --- the command line --------------------------------------------------------------------

def specrun(*args: str) -> "subprocess.CompletedProcess[str]":
    import subprocess
    import sys

    return processes.run([sys.executable, "-m", "specrun", *args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NO_COLOR": "1"})


def test_run_streams_from_disk_and_reports_what_it_read(models: dict[str, Path]) -> None:
    import json

    path = str(models["q4_k_m"])
    args = ("run", path, "hello", "-n", "8", "--temperature", "0", "--spec", "none")
    resident = specrun(*args, "--engine", "torch", "--json")
    done = specrun(*args, "--offload", "disk", "--ram", "1K", "--json")
    assert done.returncode != 0 and "too small to stream" in done.stderr and "Traceback" not in done.stderr
    done = specrun(*args, "--offload", "disk", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["streaming"]["passes"] >= 8 and out["streaming"]["bytes_per_pass"] == sum(unit_bytes(models["q4_k_m"]))
    assert json.loads(resident.stdout)["streaming"] is None
    verbose = specrun(*args, "--offload", "disk", "-v")
    assert verbose.returncode == 0 and "per pass" in verbose.stderr and verbose.stdout.strip()


@pytest.mark.parametrize("flags, message", [
    (("--offload", "disk", "--engine", "llama.cpp"), "streams weights in the torch engine"),
    (("--offload", "ram", "--device", "cpu"), "from RAM to a GPU"),
    (("--offload", "tape"), "unknown --offload 'tape'"),
    (("--offload", "disk", "--ram", "lots"), "--ram takes a size"),
    (("--offload", "disk", "--ram", "0.5"), "--ram must be a size of at least 1 byte"),  # was 0 bytes
    (("--ram", "1G", "--engine", "torch", "--offload", "none"), "budgets for streamed weights"),
])
def test_offload_flags_that_cannot_work_are_one_line_errors(models: dict[str, Path], flags: tuple[str, ...],
                                                             message: str) -> None:
    done = specrun("run", str(models["f32"]), "hi", "-n", "2", *flags)
    assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr


def heavy(monkeypatch: pytest.MonkeyPatch, path: Path, weight_bytes: int = 2 << 30) -> None:
    """Make the memory plan see `path`'s weights as `weight_bytes` (a tiny model standing in
    for one bigger than the limit; its streamed units stay what they are)."""
    from dataclasses import replace

    from specrun.engines import memory_plan as mp

    real = mp.ModelShape.of
    monkeypatch.setattr(mp.ModelShape, "of", classmethod(
        lambda cls, p: replace(real(p), weight_bytes=weight_bytes) if p == path else real(p)))


def test_placement_facts_agree_with_the_engine_that_opens(models: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`specrun info`'s device and `open_engine` come from one configuration: a disk placement
    computes on the CPU even where torch sees a GPU; the memory plan streams a file that does
    not fit, and never a safetensors directory (loading refuses that) however little there is."""
    from specrun.engines import memory_plan as mp

    monkeypatch.setattr(engines, "torch_device", lambda placement: "cuda")  # a GPU machine
    disk = engines.Placement(offload="disk")
    assert engines.device_of(models["q4_k_m"], disk) == "cpu" == engines.torch_config(models["q4_k_m"], disk).device
    monkeypatch.setattr(engines, "torch_device", lambda placement: "cpu")
    monkeypatch.setattr(mp, "torch_device", lambda placement: "cpu")
    request = mp.PlanRequest(models["q4_k_m"], None, needed_ctx=64)
    resident = mp.plan_memory(request, MemoryLimit(1 << 40, 0, "MemAvailable (a test's)", None), runtime=100 << 20)
    assert (resident.target.engine, resident.target.offload) == ("llama.cpp", "none")
    heavy(monkeypatch, models["q4_k_m"])  # its weights now "take" 2 GiB: resident no longer fits 1 GiB
    small = MemoryLimit(available=1 << 30, held=0, source="cgroup v1 (a test's)", limit=1 << 30)
    plan = mp.plan_memory(request, small, runtime=100 << 20)
    assert (plan.target.engine, plan.target.offload) == ("torch", "disk") and plan.total <= 1 << 30
    assert any("streaming it from disk" in n for n in plan.notices)
    directory = tmp_path / "st"
    directory.mkdir()
    assert mp._kinds(mp.PlanRequest(directory, None)) == ["torch"]


def test_one_plan_per_session_and_no_layer_reads_memory_again(models: dict[str, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A session reads the memory limit once, before anything loads; the engine it opens, the
    trees it sizes and its calibration follow that plan, and nothing reads memory again
    (before, free memory was looked up three times per run and answers could disagree)."""
    from specrun.engines import memory_plan as mp
    from specrun.session import Session, SessionConfig

    reads: list[int] = []

    def tight() -> MemoryLimit:
        reads.append(1)
        return MemoryLimit(available=1 << 30, held=0, source="cgroup v1 (a test's)", limit=1 << 30)

    heavy(monkeypatch, models["f32"])

    monkeypatch.setattr(mp, "detect", tight)
    monkeypatch.setattr(mp, "measure_runtime", lambda with_torch: 50 << 20)  # not this test process's
    monkeypatch.setattr(engines.placement, "llama_gpu", lambda: False)
    monkeypatch.setattr(engines, "llama_gpu", lambda: False)
    with Session(SessionConfig(models["f32"], None, tmp_path, needed_ctx=64)) as session:
        session.open(session.n_ctx)
        assert isinstance(session.target, TorchEngine) and session.target.stream is not None
        assert session.config.target_placement.offload == "disk" == session.plan.target.offload
        assert session.target.max_tree_nodes == session.plan.tree_nodes
        session.calibrated()
    assert reads == [1]
