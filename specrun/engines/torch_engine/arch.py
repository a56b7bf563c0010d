"""What a model is, as the forward pass needs it: sizes, attention layout, RoPE flavour.

One dataclass for every supported architecture, filled from a GGUF header or a
Hugging Face config.json, so `model.py` branches on flags (`qkv_bias`,
`qk_norm`, `rope_neox`) and never on architecture names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from specrun.errors import ModelFileError

ARCHITECTURES = ("llama", "qwen2", "qwen3")  # GGUF names; Mistral GGUFs are written as "llama"


class TensorTable(Protocol):
    """A model file's tensors as their names and shapes (weights.GgufTensors)."""

    def __contains__(self, name: object) -> bool: ...
    def names(self) -> set[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class ModelArgs:
    arch: str  # one of ARCHITECTURES
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    norm_eps: float
    rope_base: float
    rope_dim: int  # leading dims of each head that rotate (usually head_dim)
    # Pairing of the rotated dims. llama.cpp's `llama` GGUFs hold Q/K rows permuted by the
    # converter, so adjacent dims (2i, 2i+1) rotate together; Qwen GGUFs and every Hugging Face
    # checkpoint keep the original order, where dim i pairs with i + rope_dim/2 (NEOX style).
    rope_neox: bool
    rope_scale: float = 1.0  # linear position scaling (positions are multiplied by this)
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3: RMSNorm on each head's q and k before RoPE
    tied_embeddings: bool = False  # no output matrix: the token embeddings serve as one

    @staticmethod
    def of_gguf_file(name: str, fields: dict[str, Any], tensors: "TensorTable") -> "ModelArgs":
        """A GGUF file's (`name`, for errors): its key/values, its tensors' names, and its
        vocabulary's size from the token embeddings' shape."""
        if "token_embd.weight" not in tensors:
            raise ModelFileError(f"{name} has no token_embd.weight tensor")
        return ModelArgs.from_gguf(fields, tensors.names(), tensors.shape("token_embd.weight")[0])

    @staticmethod
    def from_gguf(fields: dict[str, Any], tensor_names: set[str], n_vocab: int) -> "ModelArgs":
        """From a GGUF file's key/values (`fields`: name -> plain value) and its tensor names."""
        arch = fields.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise ModelFileError(f"the torch engine does not run architecture '{arch}'",
                                 hint=f"supported: {', '.join(ARCHITECTURES)}; use --engine llama.cpp")

        def get(key: str, default: Any = None) -> Any:
            value = fields.get(f"{arch}.{key}", default)
            if value is None:
                raise ModelFileError(f"the GGUF header lacks {arch}.{key}")
            return value

        n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
        head_dim = int(get("attention.key_length", n_embd // n_head))
        scaling = fields.get(f"{arch}.rope.scaling.type", "none")
        if scaling not in ("none", "linear"):
            raise ModelFileError(f"the torch engine does not implement {scaling} RoPE scaling",
                                 hint="use --engine llama.cpp")
        factor = float(fields.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0)
        return ModelArgs(
            arch=arch,
            n_layer=int(get("block_count")),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=int(get("attention.head_count_kv", n_head)),
            head_dim=head_dim,
            n_ff=int(get("feed_forward_length")),
            n_vocab=n_vocab,
            n_ctx_train=int(get("context_length", 0)),
            norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_base=float(get("rope.freq_base", 10000.0)),
            rope_dim=int(get("rope.dimension_count", head_dim)),
            rope_neox=arch != "llama",
            rope_scale=1.0 / factor if scaling == "linear" else 1.0,
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            tied_embeddings="output.weight" not in tensor_names,
        )
