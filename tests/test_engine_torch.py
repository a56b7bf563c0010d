"""The torch engine against llama.cpp on the same GGUF files, and speculation with a torch target.

Tiny models of each supported architecture (llama with adjacent RoPE pairs,
Qwen2 and Qwen3 with NEOX pairs), written at test time in f32 and
requantized by llama.cpp itself to Q8_0 and Q4_K_M. f32: the two engines
agree to cosine > 0.999 and on every argmax. Quantized: llama.cpp rounds the
activations to 8 bits inside its quantized dot products and the torch engine
does not, so the torch engine on a quantized file is held to llama.cpp on the
file's dequantized f32 twin (the same weights, exactly), and to llama.cpp on
the quantized file only loosely.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from specrun.engines.llamacpp import LlamaCppConfig, LlamaCppEngine
from specrun.engines.torch_engine import TorchConfig, TorchEngine
from specrun.engines.torch_engine.model import Rope
from specrun.errors import ModelFileError
from specrun.generate import Generation, GenerationConfig
from specrun.sampling import SamplingConfig
from specrun.speculate.draft_model import DraftModel, ModelDraftConfig, ModelDrafter
from specrun.speculate.planned import PlannedSpeculator, Source
from specrun.speculate.acceptance import AcceptanceStats
from tests.conftest import torch_devices
from tests.tiny_model import TinySpec, build_tiny_model, dequantized_twin, quantize_model

TEXT = "def fib(n): return the world hello print a"
SHAPES = {  # name -> spec (dimensions multiples of 256 so llama.cpp can K-quantize them)
    "llama": TinySpec(arch="llama", n_embd=256, n_ff=512, scale=2.0),
    "llama-gqa-tied": TinySpec(arch="llama", n_embd=256, n_ff=512, scale=2.0, n_head_kv=2, tied=True),
    "qwen2-gqa-tied": TinySpec(arch="qwen2", n_embd=256, n_ff=512, scale=2.0, n_head_kv=2, tied=True),
    "qwen3-gqa": TinySpec(arch="qwen3", n_embd=256, n_ff=512, scale=2.0, n_head_kv=2),
}
FTYPES = {"f32": None, "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("arch")
    out = {}
    for name, spec in SHAPES.items():
        f32 = build_tiny_model(root / f"{name}.gguf", spec)
        for ftype, code in FTYPES.items():
            out[name, ftype] = f32 if code is None else quantize_model(f32, root / f"{name}-{ftype}.gguf", code)
    return out


DEVICES = torch_devices()


def both_engines(path: Path, device: str = "cpu") -> tuple[np.ndarray, np.ndarray, TorchEngine]:
    """Logits at every position of TEXT from each engine: ([n, vocab], [n, vocab], the torch engine)."""
    ref = LlamaCppEngine(path, LlamaCppConfig(n_threads=1))
    ours = TorchEngine(path, TorchConfig(device=device, dtype="float32", threads=1))
    try:
        ref_cache, our_cache = ref.new_cache(128), ours.new_cache(128)
        tokens = ref.vocab.tokenize(TEXT)
        assert ours.vocab.tokenize(TEXT) == tokens
        a = np.stack([ref.sync(ref_cache, tokens[:i]).row(0) for i in range(1, len(tokens) + 1)])
        b = np.stack([ours.sync(our_cache, tokens[:i]).row(0) for i in range(1, len(tokens) + 1)])
    finally:
        ref.close()
    return a, b, ours


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_f32_logits_match_llama_cpp_at_every_position(models, name: str, device: str) -> None:
    a, b, ours = both_engines(models[name, "f32"], device)
    ours.close()
    assert cosines(a, b).min() > 0.999
    np.testing.assert_array_equal(a.argmax(1), b.argmax(1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ftype", ["q8_0", "q4_k_m"])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_quantized_logits_match_llama_cpp(models, name: str, ftype: str, device: str, tmp_path: Path) -> None:
    """Against llama.cpp on the dequantized twin: cosine > 0.999 and every argmax (the
    dequantization and the forward pass are exact). Against llama.cpp on the quantized file:
    cosine > 0.98 at every position (its 8-bit activations move logits by a few percent)."""
    quantized = models[name, ftype]
    twin = dequantized_twin(quantized, tmp_path / "twin.gguf")
    reference, _, ours = both_engines(twin)
    ours.close()
    direct, b, ours = both_engines(quantized, device)
    ours.close()
    assert cosines(reference, b).min() > 0.999
    np.testing.assert_array_equal(reference.argmax(1), b.argmax(1))
    assert cosines(direct, b).min() > 0.98


@pytest.mark.parametrize("name", ["llama", "qwen2-gqa-tied"])
def test_the_other_rope_pairing_would_be_caught(models, name: str) -> None:
    """The comparison above can fail: the same weights with the RoPE pairs of the other
    convention drift far from llama.cpp."""
    a, _, ours = both_engines(models[name, "f32"])
    model = ours.model
    flipped = dataclasses.replace(model.args, rope_neox=not model.args.rope_neox)
    model.rope = Rope(flipped, model.weights.rope_factors, ours.device_obj)
    cache = ours.new_cache(128)
    tokens = ours.vocab.tokenize(TEXT)
    b = np.stack([ours.sync(cache, tokens[:i]).row(0) for i in range(1, len(tokens) + 1)])
    ours.close()
    assert cosines(a[2:], b[2:]).min() < 0.99  # positions 0 and 1 rotate (almost) alike either way


def test_a_tensor_type_it_cannot_read_is_named(models, tmp_path: Path) -> None:
    q2 = quantize_model(models["llama", "f32"], tmp_path / "q2.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K)
    with pytest.raises(ModelFileError, match=r"tensor [\w.]+ has type Q2_K, which the torch engine does not read") as e:
        TorchEngine(q2, TorchConfig(dtype="float32"))
    assert "Q4_K" in (e.value.hint or "")


def test_an_architecture_it_cannot_run_is_refused(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path / "phi.gguf", TinySpec(arch="phi3"))
    with pytest.raises(ModelFileError, match="does not run architecture 'phi3'"):
        TorchEngine(path, TorchConfig(dtype="float32"))


# --- speculation with a torch target and a llama.cpp draft -----------------------

GREEDY = SamplingConfig(temperature=0)


@pytest.fixture(scope="module")
def torch_pair(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """Target: the tiny model on torch; drafts on llama.cpp: the same model, and other weights (often
    wrong, sometimes right). Each an engine with a 1024-token cache (as conftest's `pair`)."""
    other = build_tiny_model(tmp_path_factory.mktemp("draft") / "other.gguf", TinySpec(seed=9))
    with TorchEngine(tiny_model, TorchConfig(dtype="float32", threads=1, max_tree_nodes=63)) as target, \
            LlamaCppEngine(tiny_model, LlamaCppConfig(n_threads=1, max_tree_nodes=63)) as same, \
            LlamaCppEngine(other, LlamaCppConfig(n_threads=1, max_tree_nodes=63)) as different:
        yield tuple(DraftModel(e, e.new_cache(1024)) for e in (target, same, different))


def generate(target: DraftModel, prompt: str, sampling: SamplingConfig, speculator=None,
             max_tokens: int = 48) -> Generation:
    engine, cache = target.engine, target.cache
    engine.rewind(cache, 0)
    gen = Generation(engine, cache, engine.vocab.tokenize(prompt), GenerationConfig(max_tokens, sampling), speculator)
    for _ in gen:
        pass
    return gen


def tree(draft, nodes: int = 24) -> PlannedSpeculator:
    # min_prob 0: the tiny models' likeliest token is about 2% likely, below the default threshold
    return PlannedSpeculator("model", [Source("model", ModelDrafter(draft, ModelDraftConfig(min_prob=0.0)), AcceptanceStats())], None,
                             nodes, 6)


@pytest.mark.parametrize("which", [1, 2])
def test_greedy_trees_on_a_torch_target_equal_plain_decoding(torch_pair, which: int) -> None:
    target, draft = torch_pair[0], torch_pair[which]
    plain = generate(target, "def fib(n):", GREEDY)
    spec = generate(target, "def fib(n):", GREEDY, tree(draft))
    assert spec.tokens == plain.tokens
    assert spec.stats.drafted_tokens > 0
    if which == 1:  # the draft is the target's twin: its greedy path is accepted
        assert spec.stats.accepted_tokens > len(plain.tokens) // 2


@pytest.mark.parametrize("seed", [1, 2])
def test_seeded_sampling_with_trees_equals_plain_sampling(torch_pair, seed: int) -> None:
    target, _, draft = torch_pair
    cfg = SamplingConfig(temperature=0.8, top_p=0.95, seed=seed)
    plain = generate(target, "hello world", cfg)
    spec = generate(target, "hello world", cfg, tree(draft))
    assert spec.tokens == plain.tokens and spec.stats.drafted_tokens > 0
    other = generate(target, "hello world", dataclasses.replace(cfg, seed=seed + 100))
    assert other.tokens != plain.tokens  # the seed matters: the comparison can fail

