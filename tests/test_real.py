"""The real-model tier: the default Qwen2.5-Coder pair, as pulled by `specrun pull`.

Skipped when the pair is not pulled; CI (scripts/test.sh) pulls it and sets
SPECRUN_REQUIRE_REAL=1, so every landing runs these.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from specrun.gguf_file import read_gguf
from tests import processes
from tests.conftest import DEFAULT_DRAFT, DEFAULT_TARGET, REAL_STORE

SPECRUN = [sys.executable, "-m", "specrun"]


def _env() -> dict[str, str]:
    return {**os.environ, "SPECRUN_HOME": str(REAL_STORE.root), "NO_COLOR": "1"}


def _run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return processes.run([*SPECRUN, *args], input=stdin, capture_output=True, text=True, env=_env())


def test_pair_headers_match_the_catalog(real_pair: dict[str, Path]) -> None:
    target, draft = read_gguf(real_pair[DEFAULT_TARGET]), read_gguf(real_pair[DEFAULT_DRAFT])
    assert target.arch == draft.arch == "qwen2"
    assert target.vocab_size == draft.vocab_size == 151936
    assert target.has_chat_template and target.n_layers == 28 and draft.n_layers == 24


def test_fib_prompt_prints_only_python(real_pair: dict[str, Path]) -> None:
    """The foundation issue's acceptance command."""
    proc = _run(["run", DEFAULT_TARGET, "--temperature", "0", "--max-tokens", "48"], stdin="def fib(n):\n")
    assert proc.returncode == 0, proc.stderr
    assert "llama_" not in proc.stderr and "ggml" not in proc.stderr  # no engine logging anywhere
    code = "def fib(n):\n" + proc.stdout
    complete = code[: code.rfind("\n")]  # 48 tokens may end mid-line
    ast.parse(complete)
    assert "return" in proc.stdout


def test_json_reports_counts_and_greedy_is_deterministic(real_pair: dict[str, Path]) -> None:
    args = ["run", DEFAULT_TARGET, "def add(a, b):", "-t", "0", "-n", "16", "--json"]
    first, second = json.loads(_run(args).stdout), json.loads(_run(args).stdout)
    assert first["text"] == second["text"] and first["generated_tokens"] == 16
    assert 3 <= first["prompt_tokens"] <= 8 and first["timings"]["tokens_per_s"] > 0  # timed; how fast is bench's


def test_draft_model_runs(real_pair: dict[str, Path]) -> None:
    proc = _run(["run", DEFAULT_DRAFT, "import numpy as", "-t", "0", "-n", "4"])
    assert proc.returncode == 0 and proc.stdout.strip().startswith("np"), proc.stdout


def test_ctrl_c_during_generation(real_pair: dict[str, Path]) -> None:
    """A runner ignoring SIGINT (a background job) used to pass that on: the test waited 30 s
    and left the 2000-token generation running."""
    with processes.ignoring_sigint(), \
            processes.spawned([*SPECRUN, "run", DEFAULT_TARGET, "Write a long story about a dragon.", "-n", "2000"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=_env()) as proc:
        assert proc.stdout is not None
        processes.read_some(proc.stdout, timeout=processes.HANG)  # generation has started (loading may calibrate)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)  # only so that a hang ends: it stops after the current step
    assert proc.returncode == 130, stderr
    assert b"Traceback" not in stderr and b"interrupted" in stderr


def test_speculative_modes_on_the_real_pair(real_pair: dict[str, Path]) -> None:
    """Draft and target tokenizers pass the compatibility check, and on this prompt every
    mode gives plain greedy's text (elsewhere a near-tie may flip a token: llama.cpp's logits for a
    token evaluated inside a batch differ slightly from the same token's evaluated alone)."""
    base = ["run", DEFAULT_TARGET, "def is_prime(n):\n", "-t", "0", "-n", "32", "--json"]
    plain = json.loads(_run([*base, "--spec", "none"]).stdout)
    for mode in ("auto", "ngram", "chain", "tree"):
        # a fixed budget for the draft model: planned, it rarely pays on a CPU and may draft nothing
        proc = _run([*base, "--spec", mode, *(["--budget", "4"] if mode in ("chain", "tree") else [])])
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        assert data["text"] == plain["text"], mode
        assert data["speculation"]["mode"] == mode
        if mode in ("chain", "tree"):
            assert data["speculation"]["accepted"] > 0


def decode_alongside_llama_cpp(path: Path, ours, tokens: int) -> None:
    """Greedy decoding of `path` by `ours` beside the llama.cpp engine, `tokens` steps: the same
    tokens up to a near-tie. llama.cpp's 8-bit activations move its top-2 margins by up to
    about 0.25 logits (measured against the torch engine in float32), so a parting where
    llama.cpp's margin exceeds 0.5 is a bug. Closes both engines."""
    import numpy as np

    from specrun.engines.llamacpp import LlamaCppConfig, LlamaCppEngine

    ref = LlamaCppEngine(path, LlamaCppConfig(n_gpu_layers=0))
    try:
        ref_cache, our_cache = ref.new_cache(256), ours.new_cache(256)
        prompt = ref.vocab.tokenize("def fibonacci(n):\n", add_special=False)
        assert ours.vocab.tokenize("def fibonacci(n):\n", add_special=False) == prompt
        a, b = ref.eval(ref_cache, prompt), ours.eval(our_cache, prompt)
        for _ in range(tokens):
            row_a, row_b = a.row(0), b.row(0)
            x, y = int(np.argmax(row_a)), int(np.argmax(row_b))
            if x != y:
                top = np.sort(row_a)[-2:]
                assert top[1] - top[0] < 0.5, (x, y, top)
                return
            a, b = ref.eval(ref_cache, [x]), ours.eval(our_cache, [x])
    finally:
        ref.close()


def test_the_torch_engine_decodes_the_default_target_as_llama_cpp_does(real_pair: dict[str, Path]) -> None:
    """Greedy, 24 tokens, weights resident in float32."""
    from specrun.engines.torch_engine import TorchConfig, TorchEngine

    path = real_pair[DEFAULT_TARGET]
    with TorchEngine(path, TorchConfig(dtype="float32")) as ours:
        decode_alongside_llama_cpp(path, ours, 24)


def test_the_default_target_streamed_from_disk_decodes_as_llama_cpp_and_reads_the_file(real_pair: dict[str, Path]) -> None:
    """The default target read from its file on every pass (16 tokens): streamed layers go
    through llama.cpp's own quantized kernels, so greedy decoding follows llama.cpp's, up to a
    near-tie; every pass reads the layers and the output matrix, about 980 MB."""
    from specrun.engines.torch_engine import OffloadConfig, TorchConfig, TorchEngine

    path = real_pair[DEFAULT_TARGET]
    with TorchEngine(path, TorchConfig(offload=OffloadConfig(mode="disk"))) as ours:
        decode_alongside_llama_cpp(path, ours, 16)
        done = ours.transfer()
        assert done is not None and done.passes >= 2
        assert done.bytes == done.passes * done.bytes_per_pass and done.bytes_per_pass > 0.8 * path.stat().st_size
