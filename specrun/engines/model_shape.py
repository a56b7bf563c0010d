"""What a model's caches and buffers take, from its header alone (the memory plan's arithmetic)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from specrun.files import model_bytes
from specrun.gguf_file import read_gguf

MIB = 1 << 20
PREFILL_CHUNK = 512  # prompt tokens per pass: the torch engine's chunk (a long prompt's activations), llama.cpp's n_batch


@dataclass(frozen=True)
class ModelShape:
    """What the memory of a model's caches and buffers depends on, from its header alone."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    kv_width: int  # n_head_kv x head_dim: one token's keys (or values) in one layer
    n_vocab: int
    weight_bytes: int  # the file's tensor data (a directory: its files)
    n_ctx_train: int = 0  # the context it was trained for (0: unknown)

    @classmethod
    def of(cls, path: Path) -> "ModelShape":
        if path.is_dir():
            from specrun.model_dir import open_model_dir

            c = open_model_dir(path, need_tokenizer=False).text_config()
            n_head = int(c.get("num_attention_heads", 1))
            head_dim = int(c.get("head_dim") or int(c.get("hidden_size", 0)) // max(n_head, 1))
            return cls(int(c.get("num_hidden_layers", 0)), int(c.get("hidden_size", 0)),
                       int(c.get("intermediate_size", 0)), n_head,
                       int(c.get("num_key_value_heads", n_head)) * head_dim, int(c.get("vocab_size", 0)),
                       model_bytes(path), int(c.get("max_position_embeddings", 0)))
        info = read_gguf(path)

        def value(key: str, default: int = 0) -> int:
            v = info.arch_value(key)
            return int(v) if isinstance(v, (int, float)) else default

        n_embd, n_head = value("embedding_length"), value("attention.head_count", 1)
        head_dim = value("attention.key_length", n_embd // max(n_head, 1))
        embd = next((t for t in info.tensors if t.name == "token_embd.weight"), None)
        n_vocab = embd.shape[0] if embd is not None else info.vocab_size or 0
        return cls(value("block_count"), n_embd, value("feed_forward_length"), n_head,
                   value("attention.head_count_kv", n_head) * head_dim, n_vocab,
                   sum(t.n_bytes for t in info.tensors), value("context_length"))

    def kv_bytes(self, n_ctx: int, element: int) -> int:
        """Keys and values for n_ctx tokens in every layer, `element` bytes each."""
        return 2 * self.n_layer * n_ctx * self.kv_width * element

    def llama_context_bytes(self, n_ctx: int, outputs: int, local_layers: int | None = None) -> int:
        """A llama.cpp context: f16 KV, a logits buffer for `outputs` rows and a compute buffer
        about as big (measured on the default pair: 0.5B draft, 64 rows, 512 tokens: 83 MB
        against this 84 MB; 1.5B target, 256 rows, 4096 tokens: 421 MB against 426 MB).
        `local_layers`: the layers whose KV this machine holds (None: all; RPC workers hold the rest's)."""
        kv = self.kv_bytes(n_ctx, 2)
        if local_layers is not None and self.n_layer:
            kv = kv * max(min(local_layers, self.n_layer), 0) // self.n_layer
        return kv + 2 * outputs * self.n_vocab * 4 + min(n_ctx, PREFILL_CHUNK) * self.n_embd * 16 + 4 * MIB

    def torch_pass_bytes(self, n_ctx: int, nodes: int) -> int:
        """The torch engine's buffers for its largest pass: logits for `nodes` rows (two sets: the
        last pass's are read while the next is computed), and one chunk's activations and
        attention scores."""
        chunk = max(nodes, min(n_ctx, PREFILL_CHUNK))
        activations = chunk * (3 * self.n_ff + 8 * self.n_embd) * 4
        scores = self.n_head * chunk * n_ctx * 4
        return 2 * nodes * self.n_vocab * 4 + activations + scores
