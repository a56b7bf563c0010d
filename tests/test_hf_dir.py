"""Hugging Face model directories: checks, the safetensors loader, HfVocab, bitsandbytes
quantization, the GGUF twin, and `specrun add` of a directory."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")

from specrun.engines.torch_engine.hf_vocab import BPE, SPM, HfVocab  # noqa: E402
from specrun.engines.torch_engine.safetensors import (Bnb4bitLinear, Bnb8bitLinear, args_from_config,  # noqa: E402
                                                      check_int8, llama3_rope_factors, load_safetensors,
                                                      planned_bytes)
from specrun.engines.torch_engine.weights import DenseEmbedding, DenseLinear  # noqa: E402
from specrun.errors import EngineError, ModelFileError  # noqa: E402
from specrun.model_dir import chat_template, open_model_dir  # noqa: E402
from tests import processes  # noqa: E402
from tests.tiny_hf import (TinyHfSpec, build_gguf_twin, build_tiny_hf, permute, read_weights,  # noqa: E402
                           reference_logits)

CPU = torch.device("cpu")
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {
        "llama": build_tiny_hf(root / "llama", TinyHfSpec()),  # bf16, one file, SentencePiece-style BPE
        "qwen2": build_tiny_hf(root / "qwen2", TinyHfSpec(model_type="qwen2", dtype="F32", shards=2)),
        "qwen3": build_tiny_hf(root / "qwen3", TinyHfSpec(model_type="qwen3", dtype="F16", head_dim=32, tied=True)),
    }


def config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in e.value.message
    return e.value.message


# --- config.json ----------------------------------------------------------------------

def test_args_from_config(dirs: dict[str, Path]) -> None:
    llama, qwen2, qwen3 = (args_from_config(config(dirs[k])) for k in ("llama", "qwen2", "qwen3"))
    assert (llama.arch, llama.head_dim, llama.n_head_kv, llama.qkv_bias, llama.qk_norm) == ("llama", 16, 2, False, False)
    assert llama.rope_neox and qwen2.rope_neox and qwen3.rope_neox  # every HF checkpoint: rotate-half pairing
    assert (qwen2.arch, qwen2.qkv_bias, qwen2.n_vocab % 64) == ("qwen2", True, 0)
    assert (qwen3.arch, qwen3.head_dim, qwen3.qk_norm, qwen3.tied_embeddings) == ("qwen3", 32, True, True)
    mistral = args_from_config(config(dirs["llama"]) | {"model_type": "mistral", "head_dim": 8})
    assert (mistral.arch, mistral.head_dim, mistral.rope_dim) == ("llama", 8, 8)
    linear = args_from_config(config(dirs["llama"]) | {"rope_scaling": {"type": "linear", "factor": 4.0}})
    assert linear.rope_scale == 0.25


@pytest.mark.parametrize("change, words", [
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn RoPE scaling"),
    ({"quantization_config": {"quant_method": "gptq"}}, "already quantized (gptq)"),
    ({"hidden_size": None}, "lacks hidden_size"),
])
def test_unsupported_configs_are_one_line_errors(dirs: dict[str, Path], change: dict, words: str) -> None:
    with pytest.raises(ModelFileError) as e:
        args_from_config(config(dirs["llama"]) | change)
    assert words in one_line(e)


def test_llama3_rope_factors_match_a_hand_computation() -> None:
    # head_dim 16, base 10000: wavelengths 2*pi*10000^(i/8); original context 64 makes the
    # bands: short (< 64/4 = 16) for i = 0, long (> 64) for i >= 3, between for i = 1, 2.
    factors = llama3_rope_factors({"rope_theta": 10000.0, "rope_scaling": LLAMA3}, 16)
    expected = []
    for i in range(8):
        wavelen = 2 * math.pi * 10000.0 ** (2 * i / 16)
        if wavelen < 16:
            expected.append(1.0)
        elif wavelen > 64:
            expected.append(8.0)
        else:
            smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
            expected.append(1 / ((1 - smooth) / 8.0 + smooth))
    assert factors is not None and factors.dtype == torch.float32 and factors.shape == (8,)
    assert expected[0] == 1.0 and 1.0 < expected[1] < expected[2] < 8.0 and expected[3:] == [8.0] * 5
    torch.testing.assert_close(factors, torch.tensor(expected, dtype=torch.float32))
    assert llama3_rope_factors({"rope_scaling": None}, 16) is None


# --- the directory and the loader --------------------------------------------------------

def test_loader_shapes_and_values(dirs: dict[str, Path]) -> None:
    d = dirs["qwen2"]  # two shards, biases
    a = args_from_config(config(d))
    w = load_safetensors(d, a, CPU, torch.float32, None)
    source = read_weights(d)
    assert len(w.layers) == a.n_layer and isinstance(w.embed, DenseEmbedding) and not w.shared_output
    layer = w.layers[1]
    assert isinstance(layer.q, DenseLinear) and layer.q.weight.shape == (a.n_head * a.head_dim, a.n_embd)
    assert layer.k.weight.shape == (a.n_head_kv * a.head_dim, a.n_embd) and layer.k.bias is not None
    assert layer.o.weight.shape == (a.n_embd, a.n_head * a.head_dim) and layer.o.bias is None
    assert layer.down.weight.shape == (a.n_embd, a.n_ff) and layer.q_norm is None and w.rope_factors is None
    np.testing.assert_array_equal(layer.v.weight.numpy(), source["model.layers.1.self_attn.v_proj.weight"])
    np.testing.assert_array_equal(layer.q.bias.numpy(), source["model.layers.1.self_attn.q_proj.bias"])
    np.testing.assert_array_equal(layer.ffn_norm.numpy(), source["model.layers.1.post_attention_layernorm.weight"])
    np.testing.assert_array_equal(w.output.weight.numpy(), source["lm_head.weight"])
    assert w.norm.dtype == torch.float32 and w.nbytes == planned_bytes(d, 4, None)


def test_loader_bf16_f16_tied_and_rope_factors(dirs: dict[str, Path], tmp_path: Path) -> None:
    d = dirs["qwen3"]  # f16, head_dim 32 != 64/4, q/k norms, tied embeddings
    a = args_from_config(config(d))
    w = load_safetensors(d, a, CPU, torch.bfloat16, None)
    assert w.layers[0].q.weight.dtype == torch.bfloat16 and w.layers[0].q_norm.shape == (32,)
    assert w.shared_output and w.output.weight is w.embed.table  # one table serves both
    assert w.nbytes == planned_bytes(d, 2, None)
    scaled = build_tiny_hf(tmp_path / "llama3", TinyHfSpec(rope_scaling=LLAMA3))
    w = load_safetensors(scaled, args_from_config(config(scaled)), CPU, torch.float32, None)
    torch.testing.assert_close(w.rope_factors, llama3_rope_factors(config(scaled), 16))


def test_model_dir_facts(dirs: dict[str, Path]) -> None:
    md = open_model_dir(dirs["qwen2"])
    facts = md.facts()
    assert facts["shards"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert list(facts["dtypes"]) == ["F32"] and facts["architecture"] == "qwen2" and facts["layers"] == 2
    assert facts["model_name"] == "qwen2" and facts["chat_template"] is True
    assert "<|im_start|>" in (chat_template(dirs["qwen2"]) or "")


def test_missing_shard_is_named(dirs: dict[str, Path], tmp_path: Path) -> None:
    d = Path(shutil.copytree(dirs["qwen2"], tmp_path / "m"))
    (d / "model-00002-of-00002.safetensors").unlink()
    for call in (lambda: open_model_dir(d), lambda: load_safetensors(d, args_from_config(config(d)), CPU,
                                                                      torch.float32, None)):
        with pytest.raises(ModelFileError) as e:
            call()
        assert "shard model-00002-of-00002.safetensors" in one_line(e) and "missing" in e.value.message


def test_truncated_shard_and_missing_tensor(dirs: dict[str, Path], tmp_path: Path) -> None:
    d = Path(shutil.copytree(dirs["llama"], tmp_path / "m"))
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ModelFileError) as e:
        open_model_dir(d)
    assert "truncated" in one_line(e)
    (d / "model.safetensors").write_bytes(data)
    (d / "config.json").write_text(json.dumps(config(d) | {"num_hidden_layers": 3}))
    with pytest.raises(ModelFileError) as e:
        load_safetensors(d, args_from_config(config(d)), CPU, torch.float32, None)
    assert "model.layers.2." in one_line(e) and "missing" in e.value.message


def test_missing_tokenizer_and_config(dirs: dict[str, Path], tmp_path: Path) -> None:
    d = Path(shutil.copytree(dirs["llama"], tmp_path / "m"))
    (d / "tokenizer.json").unlink()
    for call in (lambda: HfVocab(d, 512), lambda: open_model_dir(d)):
        with pytest.raises(ModelFileError) as e:
            call()
        assert "no tokenizer.json" in one_line(e)
    (d / "config.json").unlink()
    with pytest.raises(ModelFileError) as e:
        open_model_dir(d)
    assert "no config.json" in one_line(e)


# --- HfVocab --------------------------------------------------------------------------------

TEXTS = ["hello world", "def fib(n):\n    return fib(n - 1)", "The quick brown fox, 12345!", "ünïcödé 日本", ""]


def test_hf_vocab_round_trips_and_pieces(dirs: dict[str, Path]) -> None:
    spm = HfVocab(dirs["llama"], args_from_config(config(dirs["llama"])).n_vocab)
    assert (spm.vocab_type(), spm.special_tokens(), spm.n_vocab) == (SPM, (1, 2), 448)
    for text in TEXTS:
        ids = spm.tokenize(text)
        assert ids[0] == 1 and spm.tokenize(text, add_special=False) == ids[1:]
        assert b"".join(spm.piece(i) for i in ids) == (b" " + text.encode() if text else b"")  # SentencePiece's prefix
    assert spm.piece(3 + 0x0A) == b"\n" and spm.token_text(3 + 0x0A) == b"<0x0A>"  # a byte-fallback token
    hello = spm.tokenize("hello", add_special=False)
    assert spm.token_text(hello[0]).startswith("\u2581".encode()) and spm.piece(hello[0]).startswith(b" ")
    assert [spm.piece(i) for i in (0, 1, 2)] == [b"", b"", b""] and spm.is_eog(2) and not spm.is_eog(1)
    assert spm.piece(447) == b"" and spm.token_text(447) == b"[PAD447]" and spm.token_text(448) == b""

    bl = HfVocab(dirs["qwen2"], args_from_config(config(dirs["qwen2"])).n_vocab)
    end, start, im_end = (bl.tokenize(t, add_special=False)[0] for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    assert (bl.vocab_type(), bl.special_tokens()) == (BPE, (end, im_end))
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        ids = bl.tokenize(text)
        assert b"".join(bl.piece(i) for i in ids) == text.replace("<|im_start|>", "").replace("<|im_end|>", "").encode()
    world = bl.tokenize(" world", add_special=False)
    assert bl.token_text(world[0]).startswith("Ġ".encode()) and bl.piece(world[0]).startswith(b" ")
    assert bl.piece(start) == b"" and bl.is_eog(im_end) and bl.is_eog(end) and not bl.is_eog(start)
    assert bl.tokenize("\udcff x") == bl.tokenize("? x")  # lone surrogates as the llama.cpp engine reads them


def test_gguf_twin_matches_hf_semantics_and_llama_cpp(dirs: dict[str, Path], tmp_path: Path) -> None:
    """The twin run by llama.cpp gives the logits of a transformers-style forward pass of the
    directory, and its vocabulary answers as HfVocab does (pieces, texts, EOG, specials)."""
    from specrun.engines.llamacpp import LlamaCppConfig, LlamaCppEngine

    scaled = build_tiny_hf(tmp_path / "llama3", TinyHfSpec(rope_scaling=LLAMA3))
    for d in (dirs["llama"], dirs["qwen2"], dirs["qwen3"], scaled):
        twin = build_gguf_twin(d, tmp_path / f"{d.name}.gguf")
        ids = [5, 17, 99, 3, 200, 42, 7, 300, 11, 12] * 3
        engine = LlamaCppEngine(twin, LlamaCppConfig(n_threads=1))
        try:
            cache = engine.new_cache(64)
            got = np.stack([engine.eval(cache, [t]).row(0) for t in ids])
            ref = reference_logits(d, ids)
            assert np.abs(got - ref).max() < 2e-3 * np.abs(ref).max(), d.name  # llama.cpp keeps K/V in f16
            hf, lc = HfVocab(d, args_from_config(config(d)).n_vocab), engine.vocab
            assert (hf.n_vocab, hf.vocab_type(), hf.special_tokens()) == (lc.n_vocab, lc.vocab_type(),
                                                                         lc.special_tokens())
            for i in range(lc.n_vocab):
                assert (hf.piece(i), hf.token_text(i), hf.is_eog(i)) == (lc.piece(i), lc.token_text(i),
                                                                        lc.is_eog(i)), i
            for text in TEXTS:  # SentencePiece scores and BPE merges can disagree on rarer splits
                assert hf.tokenize(text) == lc.tokenize(text), text
        finally:
            engine.close()


def test_the_torch_engine_runs_a_directory_as_transformers_would(dirs: dict[str, Path]) -> None:
    """The loader's weights through the torch engine's forward pass: the reference logits."""
    from specrun.engines.torch_engine import TorchConfig, TorchEngine

    ids = [5, 17, 99, 3, 200, 42, 7, 300, 11, 12]
    for d in dirs.values():
        engine = TorchEngine(d, TorchConfig(device="cpu", dtype="float32", threads=1))
        try:
            cache = engine.new_cache(32)
            got = np.stack([engine.eval(cache, [t]).row(0) for t in ids])
        finally:
            engine.close()
        ref = reference_logits(d, ids)
        assert np.abs(got - ref).max() < 1e-5 * np.abs(ref).max(), d.name


@pytest.mark.parametrize("quant, cosine", [(None, 0.999), ("nf4", 0.95)])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_directory_in_bf16_or_nf4_generates_and_matches_its_gguf_twin(dirs: dict[str, Path], tmp_path: Path,
                                                                       kind: str, quant: str | None,
                                                                       cosine: float) -> None:
    """The directory as a user runs it (bfloat16 compute, or NF4 weights) against its GGUF
    twin on the torch engine in float32 (the same weights, in llama.cpp's layout and RoPE
    pairing): cosine of the logits at every position above 0.999 (bf16 rounding only) or
    0.95 (NF4's 4-bit weights), and greedy generation runs on both."""
    if quant:
        pytest.importorskip("bitsandbytes")
    from specrun.engines.torch_engine import TorchConfig, TorchEngine

    d = dirs[kind]
    twin = build_gguf_twin(d, tmp_path / "twin.gguf")
    ids = [5, 17, 99, 3, 200, 42, 7, 300, 11, 12]
    rows = {}
    for name, path, cfg in (("dir", d, TorchConfig(dtype="bfloat16", quant=quant, threads=1)),
                            ("twin", twin, TorchConfig(dtype="float32", threads=1))):
        with TorchEngine(path, cfg) as engine:
            cache = engine.new_cache(64)
            rows[name] = np.stack([engine.eval(cache, [t]).row(0) for t in ids])
            logits, out = engine.eval(cache, [1]), []
            for _ in range(8):
                out.append(logits.argmax(0))
                logits = engine.eval(cache, [out[-1]])
            assert len(out) == 8 and all(0 <= t < engine.vocab.n_vocab for t in out)
    a, b = rows["dir"], rows["twin"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > cosine, cos.min()


def test_permute_turns_rotate_half_into_adjacent_pairs() -> None:
    """RoPE on HF rows (dim i with i + d/2) equals RoPE on permuted rows (2i with 2i + 1)."""
    n_head, d = 2, 8
    q = np.random.default_rng(0).standard_normal((n_head * d, 3))
    theta = 0.7 * 10000.0 ** (-np.arange(d // 2) * 2 / d)
    c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
    hf = q.reshape(n_head, d, 3)
    a, b = hf[:, :d // 2], hf[:, d // 2:]
    rotated_hf = np.concatenate([a * c - b * s, a * s + b * c], 1)
    gg = permute(q, n_head).reshape(n_head, d, 3)
    x, y = gg[:, 0::2], gg[:, 1::2]
    rotated_gg = np.stack([x * c - y * s, x * s + y * c], 2).reshape(n_head, d, 3)
    np.testing.assert_allclose(permute(rotated_hf.reshape(-1, 3), n_head).reshape(n_head, d, 3), rotated_gg)


# --- bitsandbytes -----------------------------------------------------------------------------

def test_bnb_4bit_and_int8_linears_are_close_to_dense() -> None:
    pytest.importorskip("bitsandbytes")
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 128, generator=gen) / 128 ** 0.5, torch.randn(96, generator=gen)
    x = torch.randn(2, 5, 128, generator=gen)
    ref = torch.nn.functional.linear(x, w, b)

    def rel(y: torch.Tensor) -> float:
        return ((y.float() - ref).norm() / ref.norm()).item()

    # Measured relative errors of these random matrices: nf4 0.06, fp4 0.08, int8 0.006.
    for dtype in (torch.float32, torch.bfloat16):
        for quant, tol in (("nf4", 0.1), ("fp4", 0.12)):
            lin = Bnb4bitLinear.quantize(w.to(dtype), b.to(dtype), quant)
            y = lin(x.to(dtype))
            assert y.shape == ref.shape and y.dtype == dtype and rel(y) < tol, (quant, dtype)
            assert lin.nbytes < w.numel() * 2 // 3
    try:
        check_int8(CPU)
    except EngineError as e:  # a CPU bitsandbytes cannot multiply int8 on: the error must be one line
        assert "\n" not in e.message and "int8" in e.message
        return
    lin8 = Bnb8bitLinear.quantize(w, b)
    assert rel(lin8(x)) < 0.02 and lin8.nbytes < w.numel() * 2
    x[..., 3] = 20.0  # an outlier column stays in float
    ref = torch.nn.functional.linear(x, w, b)
    assert rel(lin8(x)) < 0.02 and (x[..., 3] == 20.0).all()


def test_bnb_4bit_without_the_fused_kernel_keeps_the_asked_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where bitsandbytes has no fused CPU kernel (no AVX-512 BF16, or shapes it does not pack),
    its dequantization may return float32 whatever was asked (0.50.2 on an AVX2 EPYC): a bf16
    Linear with a bias (Qwen2's q/k/v) must still work and return bf16."""
    pytest.importorskip("bitsandbytes")
    import types

    real = torch.ops.bitsandbytes.dequantize_4bit  # what both bitsandbytes' matmul and its dequantize call
    monkeypatch.setattr(torch.ops.bitsandbytes, "dequantize_4bit",
                        types.SimpleNamespace(default=lambda *a: real.default(*a).float()))
    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(40, 128, generator=gen) / 128 ** 0.5, torch.randn(40, generator=gen)  # 40 rows: never packed
    x = torch.randn(3, 128, generator=gen)
    ref = torch.nn.functional.linear(x, w, b)
    lin = Bnb4bitLinear.quantize(w.bfloat16(), b.bfloat16(), "nf4")
    assert not getattr(lin.state, "packing_format_for_cpu", False)
    y = lin(x.bfloat16())
    assert y.dtype == torch.bfloat16 and ((y.float() - ref).norm() / ref.norm()).item() < 0.1


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_load(dirs: dict[str, Path], quant: str) -> None:
    pytest.importorskip("bitsandbytes")
    d = dirs["qwen3"]  # tied: the embedding stays dense, the output gets a quantized copy
    a = args_from_config(config(d))
    kind = Bnb4bitLinear if quant == "nf4" else Bnb8bitLinear
    try:
        w = load_safetensors(d, a, CPU, torch.float32, quant)
    except EngineError as e:  # int8 unsupported here: one line
        assert quant == "int8" and "\n" not in e.message
        return
    assert isinstance(w.layers[0].gate, kind) and isinstance(w.output, kind) and not w.shared_output
    assert isinstance(w.embed, DenseEmbedding) and w.embed.table.dtype == torch.float32
    dense = load_safetensors(d, a, CPU, torch.float32, None)
    h = torch.randn(3, a.n_embd, generator=torch.Generator().manual_seed(0))
    up = dense.layers[0].up
    # The loader quantizes exactly the dense weights: its layer matches one quantized here, bit
    # for bit; how close quantized is to dense is test_bnb_4bit_and_int8_linears_are_close_to_dense's.
    again = (Bnb4bitLinear.quantize(up.weight, up.bias, quant) if quant == "nf4"
             else Bnb8bitLinear.quantize(up.weight, up.bias))
    torch.testing.assert_close(w.layers[0].up(h), again(h), rtol=0, atol=0)
    ref = up(h)  # and a loose bound that catches a wrong matrix (unrelated ones give ~1.4)
    assert ((w.layers[0].up(h) - ref).norm() / ref.norm()).item() < 0.2
    assert w.nbytes < dense.nbytes and abs(w.nbytes - planned_bytes(d, 4, quant)) < 0.05 * w.nbytes


def test_bitsandbytes_imports_quietly_from_the_repo_root() -> None:
    """Our kernels/ folder must not pass for bitsandbytes' optional `kernels` package."""
    pytest.importorskip("bitsandbytes")
    code = ("import sys; from specrun.engines.torch_engine.safetensors import import_bitsandbytes; "
            "import_bitsandbytes(); import specrun.kernels; print('kernels' in sys.modules)")
    root = Path(__file__).resolve().parents[1]
    done = processes.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Failed to load" not in done.stderr and "kernels" not in done.stderr, done.stderr
    assert done.stdout.strip() == "False"


def test_the_int8_forward_hands_bitsandbytes_its_outlier_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where bitsandbytes cannot multiply int8 (this CPU, maybe) the forward never ran in a test,
    and its threshold was a name bnb.py did not define; reach the call with a stand-in."""
    from types import SimpleNamespace

    from specrun.engines.torch_engine import bnb

    seen: list[float] = []

    def quant(a: torch.Tensor, threshold: float) -> None:
        seen.append(threshold)
        raise RuntimeError("stand-in")

    fake = SimpleNamespace(functional=SimpleNamespace(int8_vectorwise_quant=quant))
    monkeypatch.setattr(bnb, "import_bitsandbytes", lambda: fake)
    lin = Bnb8bitLinear(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), None)
    with pytest.raises(RuntimeError, match="stand-in"):
        lin(torch.ones(2, 8))
    assert seen == [bnb.INT8_THRESHOLD]
