"""llama.cpp's backend as this process uses it: started once, its log kept for error
messages instead of flooding stderr, and a model's vocabulary (`LlamaCppVocab`), also
readable without the weights (`VocabOnly`, for the torch engine on a GGUF file)."""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

from specrun.engines.llama_lib import llama_cpp as C
from specrun.errors import EngineError

_log_lock = threading.Lock()
_recent_log: list[str] = []


@C.llama_log_callback
def _log_to_buffer(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp writes a lot to stderr; keep the last lines for error messages instead."""
    with _log_lock:
        _recent_log.append(text.decode("utf-8", "replace"))
        del _recent_log[:-50]


_backend_ready = False


def init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        C.llama_log_set(_log_to_buffer, ctypes.c_void_p(0))
        C.llama_backend_init()
        _backend_ready = True


def last_log_error() -> str:
    with _log_lock:
        lines = "".join(_recent_log).strip().splitlines()
    errors = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
    return (errors or lines or [""])[-1].strip()



class LlamaCppVocab:
    """The vocabulary of a loaded llama.cpp model."""

    def __init__(self, vocab: ctypes.c_void_p) -> None:
        self._vocab = vocab
        self.n_vocab: int = C.llama_vocab_n_tokens(vocab)
        self._pieces: dict[int, bytes] = {}

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8", "replace")  # lone surrogates (undecodable input bytes) become '?'
        cap = len(data) + 8
        for _ in range(2):
            buf = (C.llama_token * cap)()
            n = C.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
            if n >= 0:
                return list(buf[:n])
            cap = -n
        raise EngineError("tokenization failed")

    def piece(self, token: int) -> bytes:
        cached = self._pieces.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = C.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = C.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            cached = self._pieces[token] = buf.raw[:n]
        return cached

    def is_eog(self, token: int) -> bool:
        return bool(C.llama_vocab_is_eog(self._vocab, token))

    def vocab_type(self) -> int:
        return int(C.llama_vocab_type(self._vocab))

    def special_tokens(self) -> tuple[int, int]:
        return int(C.llama_vocab_bos(self._vocab)), int(C.llama_vocab_eos(self._vocab))

    def token_text(self, token: int) -> bytes:
        return C.llama_vocab_get_text(self._vocab, token) or b""


class VocabOnly:
    """A GGUF file's vocabulary through llama.cpp without its weights (`vocab_only`): another
    engine running the same file tokenizes exactly as the llama.cpp engine does."""

    def __init__(self, path: Path) -> None:
        init_backend()
        params = C.llama_model_default_params()
        params.vocab_only = True
        params.n_gpu_layers = 0
        self._model = C.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise EngineError(f"llama.cpp could not read the vocabulary of {path}: {last_log_error() or 'unknown error'}")
        self.vocab = LlamaCppVocab(C.llama_model_get_vocab(self._model))

    def close(self) -> None:
        if self._model:
            C.llama_model_free(self._model)
            self._model = None
