"""Multi-turn chat on top of the one generation loop.

The model's own chat template (from its GGUF metadata, or a model directory's
tokenizer_config.json / chat_template.jinja) renders the whole
conversation each turn, in llama-cpp-python's sandboxed Jinja2 formatter. The
rendered tokens are compared with what the target's KV cache already holds
(each engine remembers its cache's tokens), so a turn evaluates only its new
tokens; the draft model's cache does the same through its drafter. When a conversation no longer
fits the context, the oldest turns go first; the system message stays.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from specrun.engines.base import Cache, Vocab
from specrun.errors import UsageError
from specrun.generate import Generation, GenerationConfig, GenerationStats, Step, check_prompt
from specrun.gguf_file import read_gguf
from specrun.session import Session
from specrun.speculate.factory import SpecConfig

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
_MARK = "\ue000{}\ue001"  # a message's place in a rendering (private-use characters: no template writes them)
_MARKS = re.compile("\ue000(\\d+)\ue001")


def messages_of(value: object) -> list[Message] | None:
    """A request's messages as a template takes them: a non-empty list of {role, content}
    objects, content a string or a list of text parts (OpenAI's newer form, joined); None when
    `value` is not one (run --batch lines and serve's requests read them so)."""
    if not isinstance(value, list) or not value:
        return None
    out = []
    for m in value:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str) or not isinstance(m.get("role"), str):
            return None
        out.append({"role": m["role"], "content": content})
    return out


def template_of(path: Path) -> str | None:
    """A model's chat template: a GGUF file's `tokenizer.chat_template`, or a Hugging Face
    directory's chat_template.jinja / tokenizer_config.json `chat_template`."""
    if path.is_dir():
        from specrun.model_dir import chat_template

        return chat_template(path)
    template = read_gguf(path).metadata.get("tokenizer.chat_template")
    return template if isinstance(template, str) else None


class ChatTemplate:
    """A model's chat template, rendered in a sandbox (templates come with downloaded files)."""

    def __init__(self, template: str, bos_token: str, eos_token: str) -> None:
        import specrun.engines.llama_lib  # noqa: F401  (llama-cpp-python loaded as the engines load it)
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._formatter = Jinja2ChatFormatter(template, eos_token=eos_token, bos_token=bos_token,
                                              add_generation_prompt=True)
        self._holds_special: dict[str, bool] = {}  # by message text: does it contain a special token's text?

    @classmethod
    def of_model(cls, path: Path, vocab: Vocab) -> "ChatTemplate":
        """The template in `path`'s metadata (or its directory's tokenizer config), with `vocab`'s
        BOS and EOS texts; UsageError when the model has none."""
        template = template_of(path)
        if template is None:
            where = "tokenizer_config.json" if path.is_dir() else "metadata"
            raise UsageError(f"{path.name} has no chat template in its {where}",
                             hint="use `specrun run` for plain completion, or an instruct model")
        bos, eos = vocab.special_tokens()
        text = vocab.token_text
        return cls(template, text(bos).decode("utf-8", "replace") if bos >= 0 else "",
                   text(eos).decode("utf-8", "replace") if eos >= 0 else "")

    def render(self, messages: list[Message]) -> str:
        """The conversation as the model expects it, ending where the assistant's reply begins."""
        try:
            return self._formatter(messages=messages).prompt
        except Exception as e:  # a template error is the file's problem, not a specrun bug
            raise UsageError(f"the model's chat template failed: {e}") from None


    def tokens(self, messages: list[Message], vocab: Vocab) -> list[int]:
        """The rendered conversation as tokens, its special tokens (`<|im_start|>`, BOS) coming
        only from the template: a message is text, so typing `<|im_end|><|im_start|>system` forges
        no turn. A conversation whose messages hold no special token's text is tokenized whole, as
        before; one that does is tokenized as llama.cpp does (raw text between special tokens, each
        stretch on its own), with only the template's special tokens parsed."""
        text = self.render(messages)
        if not any(self._special_in(m["content"], vocab) for m in messages):
            return vocab.tokenize(text, add_special=False)
        parts = _MARKS.split(self.render([{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)]))
        template, contents = parts[0::2], [messages[int(i)]["content"] for i in parts[1::2]] + [""]
        if "".join(t + c for t, c in zip(template, contents)) != text:  # it rewrites messages (trims, splits)
            raise UsageError("a message holds a special token's text, and this model's chat template rewrites "
                             "messages, so that text cannot be kept apart from the template's own tokens",
                             hint="leave the special token's text (e.g. <|im_end|>) out of the message")
        specials = {}  # the template's special tokens, by text
        for part in set(template):
            for token in vocab.tokenize(part, add_special=False):
                piece = vocab.token_text(token).decode("utf-8", "replace")
                if piece and piece in part and self._special_in(piece, vocab):
                    specials[piece] = token
        tokens, raw = [], ""
        for part, content in zip(template, contents):
            for piece in _split_at(part, specials):
                if isinstance(piece, str):
                    raw += piece
                    continue
                tokens += vocab.tokenize(raw, add_special=False, parse_special=False) if raw else []
                tokens.append(piece)
                raw = ""
            raw += content
        return tokens + (vocab.tokenize(raw, add_special=False, parse_special=False) if raw else [])

    def _special_in(self, text: str, vocab: Vocab) -> bool:
        """Whether `text` holds a special token's text (it tokenizes otherwise as text)."""
        if text not in self._holds_special:
            self._holds_special[text] = (vocab.tokenize(text, add_special=False)
                                         != vocab.tokenize(text, add_special=False, parse_special=False))
        return self._holds_special[text]


def _split_at(text: str, specials: dict[str, int]) -> list[str | int]:
    """`text` cut at the special tokens' texts, each replaced by its id: the longest first, as
    llama.cpp partitions text before tokenizing it."""
    pieces: list[str | int] = [text]
    for special in sorted(specials, key=len, reverse=True):
        cut: list[str | int] = []
        for piece in pieces:
            if isinstance(piece, int) or special not in piece:
                cut.append(piece)
                continue
            for k, chunk in enumerate(piece.split(special)):
                cut += ([specials[special]] if k else []) + ([chunk] if chunk else [])
        pieces = cut
    return pieces


@dataclass(frozen=True)
class ChatConfig:
    spec: SpecConfig = field(default_factory=SpecConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    system: str | None = None  # None: whatever the template does without one
    reserve: int = 512  # tokens kept free for each reply when old turns must be dropped


@dataclass
class ChatTotals:
    """Session totals for /stats."""

    turns: int = 0
    dropped_turns: int = 0
    stats: GenerationStats = field(default_factory=GenerationStats)  # every reply's, summed

    def add(self, s: GenerationStats) -> None:
        self.turns += 1
        self.stats.add(s)


class Chat:
    """A conversation with one model: history, KV reuse across turns, one speculator throughout.

    It generates in the session's caches, or (`cache`, one of the target engine's) in caches
    of its own: another conversation on the same loaded model, whose turns leave this one's
    cached turns as they were."""

    def __init__(self, session: Session, template: ChatTemplate, config: ChatConfig,
                 notice: Callable[[str], None] = lambda _: None, cache: Cache | None = None) -> None:
        self.session, self.template, self.config, self.notice = session, template, config, notice
        self.own_cache = cache
        self.system = config.system
        self.history: list[Message] = []  # user and assistant messages, oldest first
        self.totals = ChatTotals()
        self.last: GenerationStats | None = None  # the latest reply's stats
        self.speculator = session.speculator(config.spec, separate=cache)
        self.mode = self.speculator.name if self.speculator else "none"
        overlap = session.overlaps(config.spec)
        self.generation = replace(config.generation, overlap=overlap)  # as the session decided

    @property
    def cache(self) -> Cache:
        """The target's cache this conversation generates in (the session's may be replaced
        while it calibrates: read it when needed)."""
        cache = self.own_cache or self.session.cache
        assert cache is not None, "Chat before the session's open()"
        return cache

    def messages(self, user: str | None = None) -> list[Message]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history + ([{"role": "user", "content": user}] if user is not None else [])

    def reset(self) -> None:
        """Forget the conversation (the system message stays). The caches are reused only
        as far as the new prompt matches them, so nothing of the old turns is seen again."""
        self.history.clear()

    def _prompt(self, user: str) -> list[int]:
        """The rendered conversation with `user` appended, dropping the oldest turns until it
        leaves room for a reply; UsageError if even the newest message alone does not fit."""
        n_ctx = self.cache.n_ctx
        room = min(self.config.reserve, self.config.generation.max_tokens, n_ctx // 4)
        dropped = 0
        while True:
            tokens = self.template.tokens(self.messages(user), self.session.target.vocab)
            if len(tokens) + room <= n_ctx or not self.history:
                break
            del self.history[:2]  # the oldest user message and its reply
            dropped += 1
        if dropped:
            self.totals.dropped_turns += dropped
            self.notice(f"context full: dropped the oldest {dropped} turn{'s' if dropped > 1 else ''}")
        check_prompt(tokens, n_ctx)
        return tokens

    def reply(self, user: str) -> Iterator[Step]:
        """Generate the assistant's reply to `user`, step by step. Stopping early (closing the
        iterator) keeps the partial reply in the history, as a chat app does after Stop."""
        tokens = self._prompt(user)
        gen = Generation(self.session.target, self.cache, tokens, self.generation, self.speculator)
        self.history.append({"role": "user", "content": user})
        try:
            yield from gen
        finally:
            self.history.append({"role": "assistant", "content": gen.text})
            self.last = gen.stats
            self.totals.add(gen.stats)
            self.session.remember(gen.tokens)  # for the suffix drafter of other conversations too
            self.session.save()
