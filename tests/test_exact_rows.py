"""The torch engine on the CPU gives each token the logits a pass of that token alone would give
it, bit for bit, whatever else its pass carries: tree nodes, a prompt cut into other chunks,
other sequences. That is what makes speculative and batched output equal plain decoding's
(model.Transformer.exact). The reference is the obviously right one: one token a pass."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import pytest
import torch

from specrun.engines.base import TreeRequest
from specrun.engines.torch_engine import TorchConfig, TorchEngine
from specrun.engines.torch_engine.config import OffloadConfig
from specrun.kernels.ggml_matmul import available, blocked_rows, matmul
from tests.test_cli_run import assert_one_line_error, invoke
from tests.test_kernels_matmul import N_IN, N_OUT, weight
from tests.tiny_model import TinySpec, build_tiny_model, quantize_model

SPEC = TinySpec(n_embd=256, n_ff=512, n_layers=3, n_head=4, n_head_kv=2, arch="qwen2", scale=2.0)
PROMPT = [1, 80, 81, 82, 200, 201, 90, 91, 92, 93, 17, 18, 60, 61]
# A root and a tree below it: tokens, parents, depths (flat, parents first).
TREE = ([5, 40, 41, 42, 43, 44, 45, 46, 47], [-1, 0, 0, 1, 1, 2, 5, 6, 3], [0, 1, 1, 2, 2, 2, 3, 4, 3])
needs_ggml = pytest.mark.skipif(not available(), reason="llama-cpp-python's ggml libraries are missing")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("exact")
    return quantize_model(build_tiny_model(root / "f32.gguf", SPEC), root / "q4_k_m.gguf",
                          llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)


def engine(path: Path) -> TorchEngine:
    """Streamed from the file: its quantized matrices multiply in ggml's kernels as they lie."""
    return TorchEngine(path, TorchConfig(dtype="float32", threads=2, max_tree_nodes=16, exact=True,
                                         offload=OffloadConfig(mode="disk", slots=2)))


def alone(e: TorchEngine, tokens: list[int]) -> torch.Tensor:
    """The last token's logits after a prefill of all but it and a pass of it alone."""
    c = e.new_cache(64)
    e.eval(c, tokens[:-1])
    return e.eval(c, tokens[-1:])._rows[-1].clone()


@needs_ggml
@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0"])
def test_rows_padded_to_blocked_rows_do_not_depend_on_the_rows_beside_them(qtype: str) -> None:
    from gguf import GGMLQuantizationType as T

    q, least = T[qtype], blocked_rows()
    raw = weight(q).view(N_OUT, -1)
    x = torch.randn(96, N_IN, generator=torch.Generator().manual_seed(3))
    first = matmul(raw, q, (N_OUT, N_IN), x[:least])
    for n in sorted({least, least + 1, 17, 40, 96}):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
        y = matmul(raw, q, (N_OUT, N_IN), x[:n][order])
        back = torch.empty_like(order)
        back[order] = torch.arange(n)
        assert torch.equal(y[back][:least], first), n
    for row in range(least):  # one row, padded with zeros, as the model pads it
        padded = torch.cat([x[row:row + 1], torch.zeros(least - 1, N_IN)])
        assert torch.equal(matmul(raw, q, (N_OUT, N_IN), padded)[0], first[row])


@needs_ggml
def test_each_tree_node_gets_what_its_path_decoded_token_by_token_gets(quantized: Path) -> None:
    tokens, parents, depths = TREE
    with engine(quantized) as e:
        assert e.model.exact
        c = e.new_cache(64)
        e.eval(c, PROMPT)
        rows = e.eval_tree(c, tokens, parents, depths)._rows
        for node in range(len(tokens)):
            path, at = [], node
            while at >= 0:
                path.insert(0, tokens[at])
                at = parents[at]
            assert torch.equal(rows[node], alone(e, PROMPT + path)), node


@needs_ggml
def test_a_prompt_in_other_chunks_and_beside_other_sequences_gives_the_same_logits(quantized: Path) -> None:
    with engine(quantized) as e:
        whole = alone(e, PROMPT)
        c = e.new_cache(64)
        for start, stop in ((0, 3), (3, 4), (4, len(PROMPT))):  # fewer rows than blocked_rows(), and more
            last = e.eval(c, PROMPT[start:stop])._rows[-1]
        assert torch.equal(last, whole)
        other, c = e.new_cache(64), e.new_cache(64)
        e.eval(other, [7, 8, 9])
        e.eval(c, PROMPT[:-1])
        together = e.eval_trees([TreeRequest(c, PROMPT[-1:], [-1], [0]),  # one pass for both sequences
                                 TreeRequest(other, [10, 11], [-1, 0], [0, 1])])
        assert torch.equal(together[0]._rows[-1], whole)
        assert torch.equal(together[1]._rows[-1], alone(e, [7, 8, 9, 10, 11]))


@needs_ggml
def test_exact_runs_print_what_plain_exact_runs_print(quantized: Path) -> None:
    plain = invoke("run", str(quantized), "def fib(n):", "-n", "24", "-t", "0", "--spec", "none", "--exact",
                   "--offload", "disk")
    assert plain.exit_code == 0, plain.output
    for spec in ("ngram", "tree"):
        sped = invoke("run", str(quantized), "def fib(n):", "-n", "24", "-t", "0", "--spec", spec, "--draft",
                      str(quantized), "--exact", "--offload", "disk")
        assert sped.exit_code == 0, sped.output
        assert sped.stdout == plain.stdout, spec


@pytest.mark.parametrize("flags", [["--engine", "llama.cpp"], ["--device", "cuda"], ["--offload", "ram"]])
def test_exact_with_what_cannot_compute_rows_alone_is_a_one_line_error(tiny_model: Path, flags: list[str]) -> None:
    assert_one_line_error(invoke("run", str(tiny_model), "hi", "--exact", *flags), 2, "--exact")
