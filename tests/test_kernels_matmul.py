"""ggml's CPU quantized matrix product against float64 x @ W^T of the dequantized weight.

ggml quantizes the activations before its dot products (q8_K for the K types, q8_0 for
Q8_0/Q4_0, f16/bf16 for those), as llama.cpp does, so it is not float32-exact: the bounds
below are the measured relative errors with about 1.5x margin (kernels/README.md).
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as gguf_quants

from specrun.kernels import dequant_cpu, ggml_matmul
from specrun.kernels.dequant import UnsupportedType
from specrun.kernels.ggml_matmul import aligned_empty, available, matmul
from specrun.kernels.gguf_reference import dequantize_reference

# Relative Frobenius error bound per type, on gaussian x and weights. Measured worst over
# n in (1, 3, 17, 64) x 5 draws, 256x512 and 512x768: K types 8.0e-3, Q8_0/Q4_0 6.1e-3,
# BF16 1.9e-3, F16 2.3e-4, F32 1.4e-7.
BOUNDS = {T.Q4_K: 1.2e-2, T.Q5_K: 1.2e-2, T.Q6_K: 1.2e-2, T.Q8_0: 1e-2, T.Q4_0: 1e-2,
          T.F16: 4e-4, T.BF16: 3e-3, T.F32: 1e-6}
TYPES = list(BOUNDS)
N_OUT, N_IN = 256, 512
needs_ggml = pytest.mark.skipif(not available(), reason="llama-cpp-python's ggml libraries are missing")


def quantize(w: torch.Tensor, qtype: T) -> torch.Tensor:
    """float32 [rows, cols] -> 64-byte aligned uint8 [rows * row_bytes] of qtype: gguf's
    quantizer where it has one, else llama.cpp's own (gguf has none for the K types)."""
    rows, cols = w.shape
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = aligned_empty(rows * cols // block_size * type_size, 64)
    try:
        data = gguf_quants.quantize(w.numpy(), qtype)
        raw.copy_(torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).reshape(-1)))
    except NotImplementedError:
        if not available():
            pytest.skip(f"gguf cannot quantize {qtype.name} and ggml is missing")
        lib = ctypes.CDLL(str(dequant_cpu.library_paths()[0]))
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        w = w.contiguous()
        assert lib.ggml_quantize_chunk(int(qtype), w.data_ptr(), raw.data_ptr(), 0, rows, cols, None) == raw.numel()
    return raw


def weight(qtype: T, seed: int = 0) -> torch.Tensor:
    w = torch.randn(N_OUT, N_IN, generator=torch.Generator().manual_seed(seed))  # [n_out, n_in]
    return quantize(w, qtype)


def reference(raw: torch.Tensor, qtype: T, x: torch.Tensor) -> torch.Tensor:
    """float64 [n, n_out]: the dequantized weight, multiplied in float64."""
    w = dequantize_reference(raw, int(qtype), (N_OUT, N_IN)).double()  # [n_out, n_in]
    return x.double() @ w.T


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def gaussian(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, N_IN, generator=torch.Generator().manual_seed(seed))  # [n, n_in]


def test_aligned_empty_is_aligned_and_sized() -> None:
    for alignment in (32, 64, 4096):
        for nbytes in (0, 1, 4095, 100_000):
            buf = aligned_empty(nbytes, alignment)
            assert buf.dtype == torch.uint8 and buf.shape == (nbytes,) and buf.data_ptr() % alignment == 0
    with pytest.raises(ValueError):
        aligned_empty(16, 0)


@needs_ggml
def test_ggml_multiplies_every_supported_type() -> None:
    assert all(available(int(t)) for t in TYPES)
    assert not available(int(T.Q5_0))  # a type the fallback could not dequantize


@needs_ggml
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n", [1, 3, 17])
def test_matches_float64_reference_within_activation_rounding(qtype: T, n: int) -> None:
    raw = weight(qtype)
    x = gaussian(n)
    got = matmul(raw, int(qtype), (N_OUT, N_IN), x)
    assert got.dtype == torch.float32 and got.shape == (n, N_OUT)
    assert rel_err(got, reference(raw, qtype, x)) < BOUNDS[qtype]
    # The same bytes as [n_out, row_bytes].
    assert torch.equal(matmul(raw.view(N_OUT, -1), int(qtype), (N_OUT, N_IN), x), got)


@needs_ggml
def test_out_is_written_and_returned() -> None:
    raw, x = weight(T.Q4_K), gaussian(5)
    out = aligned_empty(5 * N_OUT * 4, 64).view(torch.float32).view(5, N_OUT).fill_(float("nan"))
    assert matmul(raw, int(T.Q4_K), (N_OUT, N_IN), x, out=out) is out
    assert torch.equal(out, matmul(raw, int(T.Q4_K), (N_OUT, N_IN), x))


@needs_ggml
def test_unaligned_or_strided_x_is_copied() -> None:
    raw, x = weight(T.Q6_K), gaussian(3)
    want = matmul(raw, int(T.Q6_K), (N_OUT, N_IN), x)
    shifted = torch.empty(3 * N_IN + 1)[1:].view(3, N_IN).copy_(x)  # 4 bytes past torch's alignment
    assert shifted.data_ptr() % 32 and torch.equal(matmul(raw, int(T.Q6_K), (N_OUT, N_IN), shifted), want)
    strided = x.t().contiguous().t()  # [3, n_in], column-major
    assert not strided.is_contiguous() and torch.equal(matmul(raw, int(T.Q6_K), (N_OUT, N_IN), strided), want)


@needs_ggml
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_thread_count_does_not_change_results(qtype: T) -> None:
    """Each output is one thread's dot product, so ggml's results are bit-identical for any
    thread count (measured for 1-7 threads and n up to 200)."""
    raw, x = weight(qtype), gaussian(17)
    one = matmul(raw, int(qtype), (N_OUT, N_IN), x, threads=1)
    assert torch.equal(matmul(raw, int(qtype), (N_OUT, N_IN), x, threads=2), one)


def test_unaligned_raw_is_refused_not_aborted() -> None:
    """ggml would abort the process on an unaligned buffer; matmul raises first."""
    raw = weight(T.Q8_0)
    shifted = aligned_empty(raw.numel() + 1, 64)[1:]  # 1 byte past an aligned address
    shifted.copy_(raw)
    with pytest.raises(ValueError, match="aligned"):
        matmul(shifted, int(T.Q8_0), (N_OUT, N_IN), gaussian(1))


def test_wrong_shapes_and_arguments_are_refused() -> None:
    raw, x = weight(T.Q4_0), gaussian(2)
    q, shape = int(T.Q4_0), (N_OUT, N_IN)
    bad_calls = [
        lambda: matmul(raw, q, (N_OUT, N_IN + 32), x),  # byte count
        lambda: matmul(raw, q, (N_OUT * 32, 16), gaussian(2)[:, :16]),  # rows of 16: Q4_0 blocks hold 32
        lambda: matmul(raw, q, (N_OUT, N_IN, 1), x),  # not a matrix
        lambda: matmul(raw.view(N_OUT * 2, -1), q, shape, x),  # rows of raw
        lambda: matmul(raw, q, shape, x[:, :256]),  # x's width
        lambda: matmul(raw, q, shape, x.double()),  # x's dtype
        lambda: matmul(raw, q, shape, x[0]),  # x 1-D
        lambda: matmul(raw, q, shape, x, out=torch.empty(2, N_OUT + 1)),
        lambda: matmul(raw, q, shape, x, out=torch.empty(2 * N_OUT + 1)[1:].view(2, N_OUT)),  # unaligned out
        lambda: matmul(raw, q, shape, x, threads=0),
        lambda: matmul(raw.view(N_OUT, -1)[:, : 14 * 18], q, (N_OUT, 14 * 32), x[:, : 14 * 32]),  # raw strided
    ]
    for call in bad_calls:
        with pytest.raises(ValueError):
            call()
    with pytest.raises(UnsupportedType):
        matmul(raw, int(T.Q5_0), shape, x)


def test_empty_batch_gives_empty_result() -> None:
    got = matmul(weight(T.Q4_K), int(T.Q4_K), (N_OUT, N_IN), torch.empty(0, N_IN))
    assert got.shape == (0, N_OUT)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.F16], ids=lambda t: t.name)
def test_without_ggml_falls_back_to_float32(monkeypatch: pytest.MonkeyPatch, qtype: T) -> None:
    raw, x = weight(qtype), gaussian(3)
    monkeypatch.setattr(ggml_matmul, "_ggml", lambda: None)
    assert not available() and not available(int(qtype))
    w = dequantize_reference(raw, int(qtype), (N_OUT, N_IN))  # [n_out, n_in] float32
    got = matmul(raw, int(qtype), (N_OUT, N_IN), x)
    torch.testing.assert_close(got, x @ w.T, rtol=1e-5, atol=1e-5)
    assert rel_err(got, reference(raw, qtype, x)) < 1e-6
    out = torch.empty(3, N_OUT)
    assert matmul(raw, int(qtype), (N_OUT, N_IN), x, out=out) is out and torch.equal(out, got)
