"""A random-weight GGUF with the exact shape of a real model, for timing what a big model costs.

    .venv/bin/python scripts/random_model.py qwen2.5-7b OUT.gguf
    .venv/bin/python scripts/random_model.py --list

What a pass costs does not depend on the weights' values, so a file of the
right shapes and tensor types tells what streaming a 7B-70B model costs on a
machine that has never downloaded one (and on one that cannot: the GPU machine
reaches no network). Tensors get llama.cpp's Q4_K_M mix (Q4_K; Q6_K for the
output matrix and for attn_v/ffn_down in the layers llama.cpp gives more bits);
norms are f32 ones. Quantized blocks are written directly, never quantized
from floats: a pool of valid random blocks (random codes and scales, small
finite f16 block scales) tiled to each tensor's size, so a 32B-shaped file
(about 20 GB) takes as long as the disk takes to write it. The vocabulary is a
synthetic SentencePiece-style one of the real size (byte tokens, then filler
pieces): the tokenizer loads, text is not meant to make sense.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, TokenType

BLOCK = {Q.Q4_K: (256, 144, 0), Q.Q6_K: (256, 210, 208)}  # weights, bytes, offset of the f16 scale `d`


@dataclass(frozen=True)
class Shape:
    arch: str  # the GGUF architecture: "qwen2" (q/k/v biases) or "llama"
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    tied: bool = False  # the token embeddings serve as the output matrix
    rope_base: float = 1e6
    n_ctx: int = 32768


SHAPES = {
    "qwen2.5-1.5b": Shape("qwen2", 28, 1536, 8960, 12, 2, 151936, tied=True),
    "qwen2.5-7b": Shape("qwen2", 28, 3584, 18944, 28, 4, 152064),
    "qwen2.5-14b": Shape("qwen2", 48, 5120, 13824, 40, 8, 152064),
    "qwen2.5-32b": Shape("qwen2", 64, 5120, 27648, 40, 8, 152064),
    "llama-3.1-8b": Shape("llama", 32, 4096, 14336, 32, 8, 128256, rope_base=500000.0, n_ctx=131072),
    "llama-3.3-70b": Shape("llama", 80, 8192, 28672, 64, 8, 128256, rope_base=500000.0, n_ctx=131072),
}


def more_bits(i: int, n: int) -> bool:
    """llama.cpp's Q4_K_M gives attn_v and ffn_down Q6_K in these layers (`use_more_bits`)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensors(s: Shape) -> list[tuple[str, tuple[int, ...], Q]]:
    """(name, shape rows first, type) in the order llama.cpp's converter writes them."""
    head_dim = s.n_embd // s.n_head
    kv = s.n_head_kv * head_dim
    embd = Q.Q6_K if s.tied else Q.Q4_K  # tied: it is the output matrix too, which Q4_K_M keeps in Q6_K
    out = [("token_embd.weight", (s.n_vocab, s.n_embd), embd), ("output_norm.weight", (s.n_embd,), Q.F32)]
    if not s.tied:
        out.append(("output.weight", (s.n_vocab, s.n_embd), Q.Q6_K))
    for i in range(s.n_layer):
        extra = Q.Q6_K if more_bits(i, s.n_layer) else Q.Q4_K
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (s.n_embd,), Q.F32), (b + "attn_q.weight", (s.n_embd, s.n_embd), Q.Q4_K),
                (b + "attn_k.weight", (kv, s.n_embd), Q.Q4_K), (b + "attn_v.weight", (kv, s.n_embd), extra)]
        if s.arch == "qwen2":
            out += [(b + "attn_q.bias", (s.n_embd,), Q.F32), (b + "attn_k.bias", (kv,), Q.F32),
                    (b + "attn_v.bias", (kv,), Q.F32)]
        out += [(b + "attn_output.weight", (s.n_embd, s.n_embd), Q.Q4_K), (b + "ffn_norm.weight", (s.n_embd,), Q.F32),
                (b + "ffn_gate.weight", (s.n_ff, s.n_embd), Q.Q4_K), (b + "ffn_up.weight", (s.n_ff, s.n_embd), Q.Q4_K),
                (b + "ffn_down.weight", (s.n_embd, s.n_ff), extra)]
    return out


def nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    if qtype == Q.F32:
        return 4 * int(np.prod(shape))
    weights, size, _ = BLOCK[qtype]
    return int(np.prod(shape)) // weights * size


def block_pool(qtype: Q, rng: np.random.Generator, n_blocks: int = 8192) -> np.ndarray:
    """Valid random blocks of `qtype` (uint8 [n_blocks, block bytes]): random codes and scales,
    block scales small finite f16 (2^-12 to 2^-8), so activations stay finite."""
    _, size, d_at = BLOCK[qtype]
    pool = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    scales = rng.uniform(2.0 ** -12, 2.0 ** -8, size=(n_blocks, 2)).astype(np.float16)
    if qtype == Q.Q4_K:  # d and dmin lead the block
        pool[:, 0:4] = scales.view(np.uint8).reshape(n_blocks, 4)
    else:  # Q6_K: d ends it
        pool[:, d_at:d_at + 2] = scales[:, :1].view(np.uint8).reshape(n_blocks, 2)
    return pool


def write(shape: Shape, name: str, path: Path, seed: int = 0, progress: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), shape.arch)
    w.add_name(f"random {name}")
    w.add_context_length(shape.n_ctx)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_rope_freq_base(shape.rope_base)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(shape.n_embd // shape.n_head)
    w.add_file_type(15)  # MOSTLY_Q4_K_M
    pieces = shape.n_vocab - 259
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [f"▁w{i}" for i in range(pieces)])
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(pieces)])
    w.add_token_types([TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
                      + [TokenType.NORMAL] * pieces)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    plan = tensors(shape)
    for tname, tshape, qtype in plan:
        n = nbytes(tshape, qtype)
        if qtype == Q.F32:
            w.add_tensor_info(tname, tshape, np.dtype(np.float32), n)
        else:
            w.add_tensor_info(tname, (*tshape[:-1], tshape[-1] // BLOCK[qtype][0] * BLOCK[qtype][1]),
                              np.dtype(np.uint8), n, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    pools = {q: block_pool(q, rng) for q in BLOCK}
    total, done, t0 = sum(nbytes(s, q) for _, s, q in plan), 0, time.perf_counter()
    for tname, tshape, qtype in plan:
        if qtype == Q.F32:
            data = np.zeros(tshape, np.float32) if tname.endswith(".bias") else np.ones(tshape, np.float32)
        else:
            blocks = nbytes(tshape, qtype) // BLOCK[qtype][1]
            start = int(rng.integers(0, len(pools[qtype])))
            data = np.resize(np.roll(pools[qtype], -start, axis=0), (blocks, BLOCK[qtype][1]))
        w.write_tensor_data(data)
        done += data.nbytes
        if progress and sys.stderr.isatty():
            print(f"\r{done / 1e9:6.2f} / {total / 1e9:.2f} GB", end="", file=sys.stderr)
    w.close()
    if progress:
        print(f"\rwrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", nargs="?", choices=sorted(SHAPES))
    parser.add_argument("out", nargs="?", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="list the shapes and their sizes")
    args = parser.parse_args()
    if args.list or args.shape is None:
        for name, s in SHAPES.items():
            size = sum(nbytes(sh, q) for _, sh, q in tensors(s))
            print(f"{name:15} {s.arch:6} {s.n_layer:3} layers  embd {s.n_embd:5}  ff {s.n_ff:5}  {size / 1e9:5.1f} GB")
        return
    if args.out is None:
        parser.error("give the output path")
    write(SHAPES[args.shape], args.shape, args.out, args.seed)


if __name__ == "__main__":
    main()
