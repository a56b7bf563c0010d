"""Opening a model for the torch engine: a GGUF file or a Hugging Face safetensors directory.

Either way the result is the same: the architecture (`ModelArgs`), the weights
(`ModelWeights`) and a vocabulary. GGUF vocabularies come from llama.cpp
(vocabulary only, no weights), so both engines tokenize a file identically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from specrun.engines.base import Vocab
from specrun.engines.torch_engine.arch import ModelArgs
from specrun.engines.torch_engine.config import OffloadConfig
from specrun.engines.torch_engine.model import LayerSource
from specrun.engines.torch_engine.weights import GgufTensors, ModelWeights, load_gguf
from specrun.errors import ModelFileError, UsageError
from specrun.gguf_file import read_gguf

if TYPE_CHECKING:
    from specrun.engines.torch_engine.streamed import Stream


@dataclass
class LoadedModel:
    args: ModelArgs
    weights: ModelWeights
    vocab: Vocab
    storage: str  # how the weights are kept (part of the calibration key)
    close: Callable[[], None] = lambda: None
    source: LayerSource | None = None  # a streamed placement's layers (None: weights.layers)
    stream: Stream | None = None


def load_model(path: Path, device: torch.device, dtype: torch.dtype, quant: str | None,
               offload: OffloadConfig = OffloadConfig()) -> LoadedModel:
    if path.is_dir():
        if offload.mode != "none":
            raise UsageError(f"--offload {offload.mode} streams GGUF files; {path.name} is a safetensors directory",
                             hint="use --offload none, or a GGUF file of the model")
        return _load_directory(path, device, dtype, quant)
    if quant is not None:
        raise UsageError("--quant applies to safetensors directories; a GGUF file is already quantized")
    if offload.mode != "none":
        return _load_streamed(path, device, dtype, offload)
    return _load_gguf(path, device, dtype)


def _load_streamed(path: Path, device: torch.device, dtype: torch.dtype, offload: OffloadConfig) -> LoadedModel:
    from specrun.engines.llamacpp_backend import VocabOnly
    from specrun.engines.torch_engine.streamed import open_streamed

    info = read_gguf(path)
    tensors = GgufTensors(path, info)
    args = ModelArgs.of_gguf_file(path.name, info.metadata, tensors)
    stream, source, embed = open_streamed(path, info, tensors, args, device, dtype, offload)
    norm = tensors.dense("output_norm.weight", torch.float32).to(device)
    factors = tensors.dense("rope_freqs.weight", torch.float32).to(device) if "rope_freqs.weight" in tensors else None
    weights = ModelWeights(embed=embed, layers=[], norm=norm, output=None, rope_factors=factors)
    vocab_file = VocabOnly(path)

    def close() -> None:
        source.close()
        stream.close()
        embed.close()
        vocab_file.close()

    return LoadedModel(args, weights, vocab_file.vocab, f"gguf blocks, {stream.describe()}", close, source, stream)


def _load_gguf(path: Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from specrun.engines.llamacpp_backend import VocabOnly

    info = read_gguf(path)
    tensors = GgufTensors(path, info)
    args = ModelArgs.of_gguf_file(path.name, info.metadata, tensors)
    # On a CPU, matrices are dequantized once at load: per pass it would cost more than the pass.
    weights = load_gguf(tensors, args, device, dtype, convert=device.type == "cpu")
    vocab_file = VocabOnly(path)
    storage = f"gguf {'dequantized to ' + str(dtype)[6:] if device.type == 'cpu' else 'blocks'}"
    return LoadedModel(args, weights, vocab_file.vocab, storage, vocab_file.close)


def _load_directory(path: Path, device: torch.device, dtype: torch.dtype, quant: str | None) -> LoadedModel:
    from specrun.engines.torch_engine.hf_vocab import HfVocab
    from specrun.engines.torch_engine.safetensors import args_from_config, load_safetensors

    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelFileError(f"{path} has no config.json", hint="a model directory holds config.json, "
                             "*.safetensors and tokenizer.json")
    args = args_from_config(json.loads(config_file.read_text()))
    weights = load_safetensors(path, args, device, dtype, quant)
    vocab = HfVocab(path, args.n_vocab)
    return LoadedModel(args, weights, vocab, f"safetensors {quant or str(dtype)[6:]}")
