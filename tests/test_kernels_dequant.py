"""GGUF dequantization: the torch reference against gguf's numpy code, and every fast
path (ggml's C routines on the CPU, Triton on CUDA) against the reference, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as gguf_quants

from specrun.kernels import dequant_cpu
from specrun.kernels.dequant import SUPPORTED, UnsupportedType, dequantize, dequantize_rows, row_bytes
from specrun.kernels.dequant_cpu import dequantize_cpu
from specrun.kernels.gguf_reference import dequantize_reference

TYPES = [T(t) for t in SUPPORTED]
QUANTIZED = [t for t in TYPES if t not in (T.F16, T.BF16, T.F32)]
# Byte offsets of the f16 scale fields in each block: random bytes there could be NaN or inf.
F16_FIELDS = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.Q8_0: (0,), T.Q4_0: (0,)}


def random_bytes(qtype: T, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """[rows, row_bytes] uint8 of valid, NaN-free blocks: random quant bytes, f16 scales of
    both signs from 1e-7 (subnormal in f16) to 2e4; float types from random normals."""
    rng = np.random.default_rng(seed)
    if qtype in F16_FIELDS:
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        blocks = rng.integers(0, 256, size=(rows, cols // block_size, type_size), dtype=np.uint8)
        for offset in F16_FIELDS[qtype]:
            magnitude = 10.0 ** rng.integers(-7, 5, size=blocks.shape[:2])
            scale = (rng.uniform(-2, 2, size=blocks.shape[:2]) * magnitude).astype(np.float16)
            blocks[:, :, offset : offset + 2] = scale[..., None].view(np.uint8)
        return blocks.reshape(rows, -1)
    x = (rng.standard_normal((rows, cols)) * 10.0 ** rng.integers(-3, 4, size=(rows, 1))).astype(np.float32)
    return np.ascontiguousarray(gguf_quants.quantize(x, qtype)).view(np.uint8).reshape(rows, -1)


def gguf_values(raw: np.ndarray, qtype: T) -> torch.Tensor:
    values = gguf_quants.dequantize(raw, qtype)
    assert not np.isnan(values).any()
    return torch.from_numpy(np.ascontiguousarray(values))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_reference_is_bit_exact_with_gguf(qtype: T) -> None:
    rows, cols = 6, 512
    raw = random_bytes(qtype, rows, cols)
    got = dequantize_reference(torch.from_numpy(raw), int(qtype), (rows, cols))
    assert got.dtype == torch.float32 and got.shape == (rows, cols)
    assert torch.equal(got, gguf_values(raw, qtype))
    # The same bytes as one flat buffer.
    assert torch.equal(dequantize_reference(torch.from_numpy(raw.reshape(-1)), int(qtype), (rows, cols)), got)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0], ids=lambda t: t.name)
def test_reference_on_gguf_quantized_floats(qtype: T) -> None:
    """Blocks as a real quantizer writes them (gguf quantizes these types; not the K types)."""
    x = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    raw = gguf_quants.quantize(x, qtype)
    got = dequantize_reference(torch.from_numpy(raw), int(qtype), x.shape)
    assert torch.equal(got, gguf_values(raw, qtype))
    assert (got - torch.from_numpy(x)).abs().max() < 0.5  # and it is a quantization of x


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_cpu_fast_path_is_bit_exact_with_reference(qtype: T, threads: int) -> None:
    """ggml's routines (torch's cast for F16/F32); CI has llama_cpp, so the fast path must be there."""
    assert dequant_cpu.ggml_available(qtype), "llama_cpp's libggml-base or its routine is missing"
    rows, cols = 64, 4096  # enough values for 3 threads to each get a range
    raw = torch.from_numpy(random_bytes(qtype, rows, cols, seed=2))
    want = dequantize_reference(raw, int(qtype), (rows, cols))
    assert torch.equal(dequantize_cpu(raw, int(qtype), (rows, cols), threads=threads), want)


def test_cpu_path_falls_back_to_reference_without_ggml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dequant_cpu, "_functions", lambda: {})
    raw = torch.from_numpy(random_bytes(T.Q4_K, 4, 256))
    assert torch.equal(dequantize_cpu(raw, int(T.Q4_K), (4, 256)), dequantize_reference(raw, int(T.Q4_K), (4, 256)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qtype", [T.Q6_K, T.BF16], ids=lambda t: t.name)
def test_dispatcher_on_cpu_is_reference_cast(qtype: T, dtype: torch.dtype) -> None:
    raw = torch.from_numpy(random_bytes(qtype, 4, 512, seed=3))
    want = dequantize_reference(raw, int(qtype), (4, 512)).to(dtype)
    got = dequantize(raw, int(qtype), (4, 512), dtype=dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    out = torch.full((4, 512), float("nan"), dtype=dtype)
    assert dequantize(raw, int(qtype), (4, 512), dtype=dtype, out=out) is out and torch.equal(out, want)
    with pytest.raises(ValueError, match="out must be"):
        dequantize(raw, int(qtype), (4, 512), dtype=dtype, out=torch.empty(4, 256, dtype=dtype))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_rows_matches_slicing_the_whole(qtype: T) -> None:
    rows, cols = 10, 512
    raw = torch.from_numpy(random_bytes(qtype, rows, cols, seed=4))
    assert raw.shape == (rows, row_bytes(int(qtype), cols))
    whole = dequantize(raw, int(qtype), (rows, cols))
    ids = torch.tensor([[7, 0, 7], [9, 3, 1]])  # repeated ids, a [batch, seq] shape
    got = dequantize_rows(raw, int(qtype), ids, cols)
    assert got.shape == (2, 3, cols) and torch.equal(got, whole[ids])
    assert torch.equal(dequantize_rows(raw.reshape(-1), int(qtype), [4], cols, torch.bfloat16), whole[[4]].bfloat16())


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_bytes_at_an_odd_offset_in_a_buffer(qtype: T) -> None:
    """A tensor sliced out of a file's buffer need not be aligned for f16/f32 views."""
    raw = random_bytes(qtype, 2, 256, seed=7).reshape(-1)
    buffer = torch.zeros(raw.size + 1, dtype=torch.uint8)
    buffer[1:] = torch.from_numpy(raw)
    want = gguf_values(raw.reshape(2, -1), qtype)
    assert torch.equal(dequantize_reference(buffer[1:], int(qtype), (2, 256)), want)
    assert torch.equal(dequantize(buffer[1:], int(qtype), (2, 256)), want)
    if torch.cuda.is_available():
        assert torch.equal(dequantize(buffer.cuda()[1:], int(qtype), (2, 256)), want.cuda())


@pytest.mark.parametrize("qtype", [int(T.Q2_K), 999])
def test_unsupported_type_names_it_and_the_supported_ones(qtype: int) -> None:
    raw = torch.zeros(84, dtype=torch.uint8)
    for call in (lambda: dequantize(raw, qtype, (256,)), lambda: dequantize_reference(raw, qtype, (256,)),
                 lambda: dequantize_cpu(raw, qtype, (256,)), lambda: row_bytes(qtype, 256)):
        with pytest.raises(UnsupportedType) as err:
            call()
        message = str(err.value)
        assert ("Q2_K" if qtype == int(T.Q2_K) else "999") in message
        assert all(name in message for name in SUPPORTED.values())


def test_wrong_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="multiples of 256"):
        dequantize(torch.zeros(144, dtype=torch.uint8), int(T.Q4_K), (1, 128))
    with pytest.raises(ValueError, match="needs 288 bytes"):
        dequantize(torch.zeros(144, dtype=torch.uint8), int(T.Q4_K), (2, 256))


def test_triton_module_imports_without_triton_or_gpu() -> None:
    from specrun.kernels import dequant_triton

    assert dequant_triton.available() == (dequant_triton.triton is not None and torch.cuda.is_available())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_triton_matches_reference_on_cuda(qtype: T, dtype: torch.dtype) -> None:
    from specrun.kernels.dequant_triton import dequantize_triton

    # 37 rows x 768 values: a block count that is no multiple of any program's block group.
    for rows, cols, seed in ((37, 768, 5), (256, 4096, 6)):
        raw = torch.from_numpy(random_bytes(qtype, rows, cols, seed=seed)).cuda()
        want = dequantize_reference(raw, int(qtype), (rows, cols))  # on the GPU too
        assert torch.equal(want.cpu(), dequantize_reference(raw.cpu(), int(qtype), (rows, cols)))
        got = dequantize_triton(raw, int(qtype), (rows, cols), dtype)
        assert got.dtype == dtype and got.device == raw.device
        assert torch.equal(got, want.to(dtype)), (got.float() - want).abs().max().item()
        assert torch.equal(dequantize(raw, int(qtype), (rows, cols), dtype), got)
        out = torch.full_like(got, float("nan"))
        assert dequantize(raw, int(qtype), (rows, cols), dtype, out=out) is out and torch.equal(out, got)
    ids = torch.tensor([255, 0, 17], device="cuda")
    assert torch.equal(dequantize_rows(raw, int(qtype), ids, cols, dtype), got[ids])
