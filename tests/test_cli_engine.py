"""Choosing the engine: `--engine`, `--device` and `--quant`, what `open_engine` picks for a model
and a placement, the one-line errors for what no engine can serve, and what `info` reports.

The torch engine itself is not needed here: where a test must reach it, a fake module stands in
for `specrun.engines.torch_engine` (and for torch), so these tests say the same on any machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import specrun.engines as engines
from specrun.bench import parse_modes
from specrun.cli import bench as bench_cli
from specrun.cli import inspect as inspect_cli
from specrun.cli import options as O
from specrun.engines import Placement, engine_for, open_engine
from specrun.errors import UsageError
from specrun.gguf_file import read_gguf
from tests import processes
from tests.tiny_hf import build_tiny_hf
from tests.test_cli_run import assert_one_line_error, invoke

ROOT = Path(__file__).resolve().parent.parent
# The CLI in a fresh interpreter where `import torch` fails, as on an install without the extra.
NO_TORCH = ("import sys; sys.modules['torch'] = None; from specrun.cli import main; "
            "sys.argv = ['specrun', *sys.argv[1:]]; main()")


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    """A tiny safetensors directory: what `info` reads, and what makes auto pick torch."""
    return build_tiny_hf(tmp_path / "tiny-hf")


@dataclass(frozen=True)
class FakeOffloadConfig:
    mode: str = "none"
    ram: int | None = None
    gpu_memory: int | None = None
    slots: int | None = None


@dataclass(frozen=True)
class FakeTorchConfig:
    device: str = "cpu"
    dtype: str | None = None
    threads: int | None = None
    quant: str | None = None
    max_tree_nodes: int = 0
    offload: FakeOffloadConfig = FakeOffloadConfig()
    exact: bool = False


@pytest.fixture
def fake_torch(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """torch (no CUDA) and the torch engine as fakes; `seen` records what the engine was given."""
    seen: dict[str, Any] = {"cuda": False}
    torch = types.ModuleType("torch")
    torch.__version__ = "0.0+fake"  # type: ignore[attr-defined]
    torch.cuda = types.SimpleNamespace(is_available=lambda: seen["cuda"],  # type: ignore[attr-defined]
                                       mem_get_info=lambda device: (80 << 30, 80 << 30))
    torch.device = str  # type: ignore[attr-defined]
    torch.version = types.SimpleNamespace(cuda=None)  # type: ignore[attr-defined]

    class FakeTorchEngine:
        def __init__(self, path: Path, config: FakeTorchConfig) -> None:
            seen["engine"] = (path, config)
            self.device = config.device

    def planned_weight_bytes(path: Path, config: FakeTorchConfig) -> int:
        seen["planned"] = (path, config)
        return 123_456

    module = types.ModuleType("specrun.engines.torch_engine")
    module.TorchConfig, module.TorchEngine = FakeTorchConfig, FakeTorchEngine  # type: ignore[attr-defined]
    module.OffloadConfig = FakeOffloadConfig  # type: ignore[attr-defined]
    module.planned_weight_bytes = planned_weight_bytes  # type: ignore[attr-defined]
    module.cpu_dtype_for = lambda float32_bytes, budget: "float32"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "specrun.engines.torch_engine", module)
    return seen


def cli(*args: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    """specrun in a subprocess (a fresh interpreter: what is imported there is the CLI's doing)."""
    argv = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "specrun", *args]
    return processes.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "NO_COLOR": "1"})


# --- which engine ------------------------------------------------------------------------------

def test_auto_keeps_gguf_files_on_llama_cpp_and_sends_directories_to_torch(tiny_model: Path, hf_dir: Path) -> None:
    assert engine_for(tiny_model) == "llama.cpp"
    assert engine_for(tiny_model, Placement(device="cpu")) == "llama.cpp"
    assert engine_for(tiny_model, Placement(engine="torch")) == "torch"
    assert engine_for(hf_dir) == "torch"
    assert engine_for(hf_dir, Placement(quant="nf4")) == "torch"
    assert engine_for(hf_dir, Placement(engine="torch", quant="int8", device="cuda")) == "torch"


def test_auto_picks_torch_for_cuda_only_when_llama_cpp_has_no_gpu(tiny_model: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engines.placement, "llama_gpu", lambda: True)
    monkeypatch.setattr(engines, "llama_gpu", lambda: True)
    assert engine_for(tiny_model, Placement(device="cuda")) == "llama.cpp"
    monkeypatch.setattr(engines.placement, "llama_gpu", lambda: False)
    monkeypatch.setattr(engines, "llama_gpu", lambda: False)
    assert engine_for(tiny_model, Placement(device="cuda")) == "torch"
    with pytest.raises(UsageError, match="no CUDA device: this llama.cpp build has no GPU offload"):
        engine_for(tiny_model, Placement(device="cuda", engine="llama.cpp"))


@pytest.mark.parametrize("placement, needle", [
    (Placement(engine="llama.cpp"), "llama.cpp runs GGUF files"),
    (Placement(engine="llama.cpp", quant="nf4"), "llama.cpp runs GGUF files"),
    (Placement(engine="onnx"), "unknown engine 'onnx'"),
    (Placement(device="tpu"), "unknown device 'tpu'"),
    (Placement(quant="q4"), "unknown quantization 'q4'"),
])
def test_placements_no_engine_serves_a_directory(hf_dir: Path, placement: Placement, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        engine_for(hf_dir, placement)


@pytest.mark.parametrize("engine", ["auto", "llama.cpp", "torch"])
def test_quant_is_for_safetensors_only(tiny_model: Path, engine: str) -> None:
    with pytest.raises(UsageError, match="--quant quantizes safetensors weights"):
        engine_for(tiny_model, Placement(engine=engine, quant="nf4"))


def test_open_engine_hands_the_torch_engine_its_config(hf_dir: Path, fake_torch: dict[str, Any]) -> None:
    engine = open_engine(hf_dir, Placement(threads=3, quant="nf4"), max_tree_nodes=64)
    path, config = fake_torch["engine"]
    assert path == hf_dir and engine.device == "cpu"  # no CUDA (the fake's): the CPU
    assert config == FakeTorchConfig(device="cpu", threads=3, quant="nf4", max_tree_nodes=64)
    fake_torch["cuda"] = True
    open_engine(hf_dir)
    assert fake_torch["engine"][1].device == "cuda"  # device None: the GPU when torch sees one
    open_engine(hf_dir, Placement(device="cpu"))
    assert fake_torch["engine"][1].device == "cpu"


def test_torch_engine_errors_before_loading(hf_dir: Path, fake_torch: dict[str, Any]) -> None:
    with pytest.raises(UsageError, match=r"no CUDA device: torch 0.0\+fake \(a CPU-only build\) sees no GPU"):
        open_engine(hf_dir, Placement(device="cuda"))
    with pytest.raises(UsageError, match="--gpu-layers is for the llama.cpp engine"):
        open_engine(hf_dir, Placement(gpu_layers=4))
    assert "engine" not in fake_torch


def test_device_cpu_means_no_gpu_layers_on_llama_cpp(tiny_model: Path) -> None:
    engine = open_engine(tiny_model, Placement(device="cpu"))
    try:
        assert engine.config.n_gpu_layers == 0  # type: ignore[attr-defined]
    finally:
        engine.close()
    with pytest.raises(UsageError, match="--device cpu and --gpu-layers 5 contradict"):
        open_engine(tiny_model, Placement(device="cpu", gpu_layers=5))


def test_the_draft_stays_on_llama_cpp_unless_told() -> None:
    target, draft = O.placements(4, None, None, 2, engine="torch", device="cuda", quant="nf4")
    assert (target.engine, target.device, target.quant, target.threads) == ("torch", "cuda", "nf4", 4)
    assert draft == Placement(threads=4, gpu_layers=2)
    _, draft = O.placements(None, None, engine="torch", draft_engine="llama.cpp", draft_device="cpu")
    assert (draft.engine, draft.device) == ("llama.cpp", "cpu")


# --- through the command line -----------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["--engine", "onnx"], "unknown --engine 'onnx'"),
    (["--device", "tpu"], "unknown --device 'tpu'"),
    (["--quant", "q4"], "unknown --quant 'q4'"),
    (["--quant", "nf4"], "--quant quantizes safetensors weights"),
    (["--engine", "llama.cpp", "--quant", "int8"], "not the llama.cpp engine"),
    (["--device", "cpu", "--gpu-layers", "3"], "--device cpu and --gpu-layers 3 contradict"),
])
def test_bad_engine_flags_are_one_line_errors(tiny_model: Path, args: list[str], needle: str) -> None:
    for command in (["run", str(tiny_model), "hi", "-n", "2"], ["calibrate", str(tiny_model)],
                    ["info", str(tiny_model)], ["bench", str(tiny_model), "--n-prompts", "1"]):
        assert_one_line_error(invoke(*command, *args), 2, needle)


def test_chat_takes_the_engine_flags(tiny_model: Path) -> None:
    assert_one_line_error(invoke("chat", str(tiny_model), "--quant", "fp4", input="hi\n"), 2, "--quant quantizes")


def test_device_cuda_without_cuda_is_one_line(tiny_model: Path, fake_torch: dict[str, Any],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engines.placement, "llama_gpu", lambda: False)
    monkeypatch.setattr(engines, "llama_gpu", lambda: False)
    for args in (["--device", "cuda"], ["--engine", "torch", "--device", "cuda"]):
        assert_one_line_error(invoke("run", str(tiny_model), "hi", *args), 2, "no CUDA device: torch 0.0+fake")
    assert_one_line_error(invoke("run", str(tiny_model), "hi", "--engine", "llama.cpp", "--device", "cuda"), 2,
                          "no CUDA device: this llama.cpp build has no GPU offload")


def test_device_cuda_on_this_machine(tiny_model: Path) -> None:
    """The real path, torch and llama.cpp as installed: no CUDA here means one line, exit 2."""
    done = cli("run", str(tiny_model), "hi", "-n", "2", "--device", "cuda")
    if done.returncode == 0:
        pytest.skip("this machine has a CUDA device")
    assert done.returncode == 2 and done.stdout == "", done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("error: no CUDA device") and len(lines) == 2 and lines[1].startswith("hint:")


@pytest.mark.parametrize("args, needle", [
    (["--engine", "torch"], "error: the torch engine needs torch, which is not installed"),
    (["--engine", "torch", "--device", "cpu"], "error: the torch engine needs torch, which is not installed"),
    (["--device", "cuda", "--engine", "torch"], "error: no CUDA device: torch is not installed"),
])
def test_torch_missing_says_how_to_install_it(tiny_model: Path, args: list[str], needle: str) -> None:
    done = cli("run", str(tiny_model), "hi", "-n", "2", *args, code=NO_TORCH)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.strip().splitlines() == [
        needle, "hint: install the torch engine: pip install 'specrun[torch]' (or bash scripts/install.sh --torch)"]


def test_the_llama_cpp_path_never_imports_torch(tiny_model: Path) -> None:
    code = ("import sys; from typer.testing import CliRunner; from specrun.cli import app; "
            "r = CliRunner().invoke(app, sys.argv[1:]); assert r.exit_code == 0, r.output; "
            "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    for args in (["run", str(tiny_model), "hi", "-n", "4", "-t", "0"], ["info", str(tiny_model), "--json"]):
        done = processes.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                             cwd=ROOT)
        assert done.returncode == 0 and done.stdout.strip().endswith("no torch"), done.stdout + done.stderr


# --- info ---------------------------------------------------------------------------------------

def test_info_says_engine_device_and_weight_memory(tiny_model: Path) -> None:
    done = invoke("info", str(tiny_model), "--json")
    assert done.exit_code == 0, done.output
    data = json.loads(done.stdout)
    assert data["engine"] == "llama.cpp" and data["device"] in ("cpu", "gpu")
    assert data["weight_bytes"] == sum(t.n_bytes for t in read_gguf(tiny_model).tensors) < data["size"]
    assert json.loads(invoke("info", str(tiny_model), "--json", "--device", "cpu").stdout)["device"] == "cpu"
    table = invoke("info", str(tiny_model), "--device", "cpu").stdout
    assert "engine            llama.cpp" in table and "device            cpu" in table and "\nweights " in table


def test_info_with_the_torch_engine(tiny_model: Path, fake_torch: dict[str, Any]) -> None:
    data = json.loads(invoke("info", str(tiny_model), "--json", "--engine", "torch").stdout)
    assert (data["engine"], data["device"], data["weight_bytes"]) == ("torch", "cpu", 123_456)
    assert fake_torch["planned"] == (tiny_model, FakeTorchConfig(device="cpu", dtype="float32"))


def test_info_on_a_safetensors_directory(hf_dir: Path, fake_torch: dict[str, Any],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inspect_cli, "locate", lambda name, get, store: (Path(name).name, Path(name)))
    data = json.loads(invoke("info", str(hf_dir), "--json", "--quant", "nf4").stdout)
    assert (data["engine"], data["device"], data["weight_bytes"]) == ("torch", "cpu", 123_456)
    assert fake_torch["planned"][1].quant == "nf4"
    config = json.loads((hf_dir / "config.json").read_text())
    assert (data["architecture"], data["layers"], data["vocabulary"]) == ("llama", 2, config["vocab_size"])
    assert data["size"] == sum(f.stat().st_size for f in hf_dir.iterdir())
    assert_one_line_error(invoke("info", str(hf_dir), "--engine", "llama.cpp"), 2, "llama.cpp runs GGUF files")
    assert_one_line_error(invoke("info", str(hf_dir), "--verify"), 2, "--verify checks a GGUF file's sha256")


def test_bench_skips_llama_cpp_python_rows_for_a_directory_or_over_rpc(hf_dir: Path, tiny_model: Path) -> None:
    notes: list[str] = []
    chosen = parse_modes("", False, notes.append)
    for target, rpc in ((hf_dir, False), (tiny_model, True)):
        kept = bench_cli._peers_runnable(chosen, target, asked=False, rpc=rpc)
        assert [m.key for m in kept] == [m.key for m in chosen if m.spec is not None] and "lcp-lookup" not in str(kept)
    assert bench_cli._peers_runnable(chosen, tiny_model, asked=False, rpc=False) == chosen
    with pytest.raises(UsageError, match="mode lcp-plain runs llama-cpp-python, which needs a GGUF file"):
        bench_cli._peers_runnable(parse_modes("plain,lcp-plain", False, notes.append), hf_dir, asked=True, rpc=False)
    with pytest.raises(UsageError, match="runs on this machine, not over --rpc workers"):
        bench_cli._peers_runnable(parse_modes("plain,lcp-plain", False, notes.append), tiny_model, asked=True, rpc=True)
