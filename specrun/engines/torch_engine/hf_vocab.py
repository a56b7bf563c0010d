"""The `Vocab` of a Hugging Face model directory, on the `tokenizers` package.

It answers as llama.cpp answers for the GGUF that llama.cpp's converter would
make of the same directory, so the torch engine's output, the drafters and the
tokenizer-compatibility check see the same tokens whichever file a model came
from: special ids from tokenizer_config.json, then config.json; BOS added when
tokenizer_config.json says so, else when the post-processor's template starts
with it; pieces as llama.cpp's `token_to_piece` gives them (control tokens
empty, byte tokens one byte, `▁` a space for SentencePiece-style vocabularies,
GPT-2's byte-to-unicode map undone for byte-level BPE).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

from specrun.errors import EngineError, ModelFileError
from specrun.model_dir import CONFIG, GENERATION_CONFIG, TOKENIZER, TOKENIZER_CONFIG, read_json

SPM, BPE = 1, 2  # llama.cpp's llama_vocab_type values
# Tokens llama.cpp counts as end of generation by their text alone (llama-vocab.cpp).
EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>",
             "_<EOT>", "<|end_of_text|>", "<end_of_utterance>")
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def unicode_to_bytes() -> dict[str, int]:
    """GPT-2's bytes-to-unicode map, inverted: the printable character standing for each byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_OF = unicode_to_bytes()


class HfVocab:
    """tokenizer.json (+ tokenizer_config.json, config.json, generation_config.json) as a Vocab.
    `n_vocab` is the model's logit count, which may exceed the tokenizer's size (padded
    embedding rows: empty pieces, named "[PADn]" as llama.cpp's converter names them)."""

    def __init__(self, directory: Path, n_vocab: int) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            from specrun.engines.placement import INSTALL_TORCH

            raise EngineError(f"safetensors directories need the tokenizers package ({e})",
                              hint=INSTALL_TORCH) from None
        path = directory / TOKENIZER
        if not path.is_file():
            raise ModelFileError(f"{directory}: no {TOKENIZER}", hint="specrun tokenizes with the fast tokenizer's "
                                 "tokenizer.json; download it with the model")
        spec = read_json(directory, TOKENIZER)
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # a Rust-side parse error: the file's problem
            raise ModelFileError(f"{path}: the tokenizers package cannot load it "
                                 f"({(str(e).splitlines() or [''])[0]})") from None
        self.n_vocab = n_vocab
        self._size = self._tok.get_vocab_size(with_added_tokens=True)
        model = spec.get("model") or {}
        self._type = _vocab_type(spec, path)
        self._byte_fallback = bool(model.get("byte_fallback"))
        added = [t for t in spec.get("added_tokens") or [] if isinstance(t, dict) and "id" in t]
        self._control = {int(t["id"]) for t in added if t.get("special")}
        self._user = {int(t["id"]): str(t.get("content", "")) for t in added if not t.get("special")}
        unk = model.get("unk_token")
        if isinstance(unk, str) and self._tok.token_to_id(unk) is not None:
            self._control.add(self._tok.token_to_id(unk))  # llama.cpp: UNKNOWN, no piece

        tc, config = read_json(directory, TOKENIZER_CONFIG), read_json(directory, CONFIG)
        generation = read_json(directory, GENERATION_CONFIG)
        first, last = _template_specials(spec.get("post_processor"))
        self._bos = self._id(tc.get("bos_token"), config.get("bos_token_id"),
                             first if not tc else None)
        self._eos = self._id(tc.get("eos_token"), config.get("eos_token_id"), last if not tc else None)
        add_bos, add_eos = tc.get("add_bos_token"), tc.get("add_eos_token")
        self._add_bos = add_bos if isinstance(add_bos, bool) else first is not None and first == self._bos
        self._add_eos = add_eos if isinstance(add_eos, bool) else last is not None and last == self._eos
        eog = {self._eos, *_ids(generation.get("eos_token_id")), *_ids(config.get("eos_token_id"))}
        eog |= {i for text in EOG_TEXTS if (i := self._tok.token_to_id(text)) is not None}
        self._eog = frozenset(i for i in eog if 0 <= i < n_vocab)
        self._pieces: dict[int, bytes] = {}

    def _id(self, token: Any, config_id: Any, template_id: int | None) -> int:
        """A special token's id: by its text (tokenizer_config.json), else config.json's id,
        else the post-processor's (only without a tokenizer_config.json); -1 for none."""
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and (found := self._tok.token_to_id(token)) is not None:
            return int(found)
        ids = _ids(config_id)
        if ids:
            return ids[0]
        return template_id if template_id is not None else -1

    # --- Vocab --------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Special tokens written in the text are parsed as such unless `parse_special` is False,
        as the llama.cpp engine does."""
        text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates become '?'
        self._tok.encode_special_tokens = not parse_special  # True: special tokens' text is text
        try:
            ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        finally:
            self._tok.encode_special_tokens = False
        if add_special and self._add_bos and self._bos >= 0:
            ids.insert(0, self._bos)
        if add_special and self._add_eos and self._eos >= 0:
            ids.append(self._eos)
        return ids

    def piece(self, token: int) -> bytes:
        cached = self._pieces.get(token)
        if cached is None:
            cached = self._pieces[token] = self._piece(token)
        return cached

    def _piece(self, token: int) -> bytes:
        if not 0 <= token < self._size or token in self._control:
            return b""
        if token in self._user:
            return self._user[token].encode("utf-8")
        text = self._tok.id_to_token(token) or ""
        if self._type == BPE:
            return b"".join(bytes([_BYTE_OF[c]]) if c in _BYTE_OF else c.encode("utf-8") for c in text)
        byte = _BYTE_TOKEN.match(text) if self._byte_fallback else None
        if byte:
            return bytes([int(byte.group(1), 16)])
        return text.replace("\u2581", " ").encode("utf-8")

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    def vocab_type(self) -> int:
        return self._type

    def special_tokens(self) -> tuple[int, int]:
        return self._bos, self._eos

    def token_text(self, token: int) -> bytes:
        if 0 <= token < self._size:
            return (self._tok.id_to_token(token) or "").encode("utf-8")
        return f"[PAD{token}]".encode() if 0 <= token < self.n_vocab else b""


def _ids(value: Any) -> list[int]:
    """An id or a list of ids from a config file, as a list of ints."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _template_specials(post: Any) -> tuple[int | None, int | None]:
    """Ids of the special tokens a TemplateProcessing post-processor puts before and after a
    single sequence (how llama.cpp's converter decides whether BOS/EOS are added)."""
    if not isinstance(post, dict):
        return None, None
    first = last = None
    for proc in post.get("processors") or [post]:
        if not isinstance(proc, dict) or proc.get("type") != "TemplateProcessing":
            continue
        single, specials = proc.get("single") or [], proc.get("special_tokens") or {}

        def id_of(item: Any) -> int | None:
            name = item.get("SpecialToken", {}).get("id") if isinstance(item, dict) else None
            ids = (specials.get(name) or {}).get("ids") if name is not None else None
            return int(ids[0]) if ids else None

        if len(single) > 1:
            first, last = id_of(single[0]), id_of(single[-1])
    return first, last


def _types(node: Any) -> Iterator[str]:
    """Every component type in a pre-tokenizer or decoder, nested sequences included."""
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            yield node["type"]
        for key in ("pretokenizers", "decoders", "normalizers"):
            for child in node.get(key) or []:
                yield from _types(child)


def _vocab_type(spec: dict[str, Any], path: Path) -> int:
    """BPE for byte-level BPE (GPT-2 style), SPM for SentencePiece-style BPE (`▁` and byte fallback)."""
    model = spec.get("model") or {}
    parts = {*_types(spec.get("pre_tokenizer")), *_types(spec.get("decoder"))}
    if model.get("type") == "BPE" and "ByteLevel" in parts:
        return BPE
    spm_like = model.get("byte_fallback") or "Metaspace" in parts or "\u2581" in str(spec.get("normalizer"))
    if model.get("type") == "BPE" and spm_like:
        return SPM
    raise ModelFileError(f"{path}: unsupported tokenizer (a {model.get('type')} model that is neither byte-level "
                         "nor SentencePiece-style BPE)")
