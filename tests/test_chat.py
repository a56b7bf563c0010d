"""`specrun chat`: templates, KV reuse across turns, /reset, context overflow, and the
interactive (pseudo-terminal) and scripted (piped) ways of driving it."""

from __future__ import annotations

import os
import sys
from contextlib import AbstractContextManager
from pathlib import Path

import pexpect
import pytest

from specrun.chat import Chat, ChatConfig, ChatTemplate
from specrun.engines import Cache, Placement
from specrun.generate import GenerationConfig
from specrun.sampling import SamplingConfig
from specrun.session import Session, SessionConfig
from specrun.speculate.factory import SpecConfig
from tests import processes
from tests.conftest import REAL_STORE
from tests.tiny_model import CHAT_TEMPLATE, TinySpec, build_tiny_model

SPECRUN = [sys.executable, "-m", "specrun"]
GREEDY = GenerationConfig(max_tokens=12, sampling=SamplingConfig(temperature=0))


@pytest.fixture
def session(tiny_model: Path, tmp_path: Path):
    """The tiny model as target and as its own draft (every mode available)."""
    specs = (SpecConfig("none"), SpecConfig("ngram"), SpecConfig("tree"))
    with Session(SessionConfig(tiny_model, tiny_model, tmp_path, specs, Placement(threads=2), Placement(threads=2))) as s:
        s.open(512)
        yield s


def make_chat(session: Session, spec: str = "none", cache: Cache | None = None, **kw) -> Chat:
    template = ChatTemplate(CHAT_TEMPLATE, "<s>", "</s>")
    return Chat(session, template, ChatConfig(SpecConfig(spec), kw.pop("generation", GREEDY), **kw), cache=cache)


def reply(chat: Chat, text: str) -> list[int]:
    return [t for step in chat.reply(text) for t in step.tokens]


def test_template_renders_the_conversation() -> None:
    template = ChatTemplate(CHAT_TEMPLATE, "<s>", "</s>")
    text = template.render([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert text == "<s>system: be brief\nuser: hi\nassistant:"


@pytest.mark.parametrize("spec", ["none", "ngram", "tree"])
def test_later_turns_reuse_the_cache_and_answer_as_without_it(session: Session, spec: str) -> None:
    chat = make_chat(session, spec)
    reply(chat, "hello world")
    first_prompt = chat.last.prompt_tokens
    second = reply(chat, "the fib")
    assert chat.last.reused_tokens >= first_prompt  # only the reply and the new message were evaluated
    session.forget()  # empty caches: the same history evaluated from scratch
    uncached = make_chat(session, spec)
    uncached.history = chat.history[:2]
    assert reply(uncached, "the fib") == second
    assert uncached.last.reused_tokens == 0


@pytest.mark.parametrize("spec", ["none", "ngram", "tree"])
def test_a_second_conversation_in_its_own_cache_leaves_the_firsts_turns_cached(session: Session, spec: str) -> None:
    """Two conversations on one loaded model, turns alternating: the second generates in a
    cache of its own (and drafts in a draft cache of its own), so the first one's next turn
    still evaluates only its new tokens, and each replies as a fresh conversation would."""
    chat = make_chat(session, spec)
    other = make_chat(session, spec, cache=session.target.new_cache(512))
    assert other.cache is not chat.cache and other.cache.n_ctx == chat.cache.n_ctx

    def held() -> tuple:  # what the session's caches (the first conversation's) hold
        return session.cache.tokens, session.draft_cache.tokens if session.draft_cache is not None else None

    first = reply(chat, "hello world")
    first_prompt, before = chat.last.prompt_tokens, held()
    other_first = reply(other, "the a def")  # another text: its tokens differ
    assert other.last.reused_tokens == 0  # its own cache: nothing of the first conversation in it
    assert held() == before  # the first conversation's caches as they were
    other_prompt = other.last.prompt_tokens
    second = reply(chat, "the fib")
    assert chat.last.reused_tokens >= first_prompt  # its earlier turn was still cached
    before = held()
    other_second = reply(other, "the fib")
    assert other.last.reused_tokens >= other_prompt and held() == before
    for history, text, expected in (([], "hello world", first), (chat.history[:2], "the fib", second),
                                    ([], "the a def", other_first), (other.history[:2], "the fib", other_second)):
        session.forget()  # empty caches: the same history evaluated from scratch
        fresh = make_chat(session, spec)
        fresh.history = history
        assert reply(fresh, text) == expected, text
        assert fresh.last.reused_tokens == 0


def test_reset_forgets_the_earlier_turns(session: Session) -> None:
    chat = make_chat(session, system="be brief")
    first = reply(chat, "hello world")
    reply(chat, "the fib")
    chat.reset()
    assert chat.history == [] and chat.system == "be brief"
    again = reply(chat, "hello world")
    assert again == first  # what a fresh conversation says: the old turns are not in the cache
    assert chat.last.reused_tokens < chat.last.prompt_tokens


def test_a_full_context_drops_the_oldest_turns_and_goes_on(tiny_model: Path, tmp_path: Path) -> None:
    notices: list[str] = []
    with Session(SessionConfig(tiny_model, None, tmp_path, (SpecConfig("none"),), Placement(threads=2))) as s:
        s.open(160)
        chat = Chat(s, ChatTemplate(CHAT_TEMPLATE, "<s>", "</s>"),
                    ChatConfig(SpecConfig("none"), GenerationConfig(16, SamplingConfig(temperature=0)), "sys"),
                    notice=notices.append)
        for i in range(8):
            assert len(reply(chat, f"message {i} " + "the world " * 8)) > 0
        assert any("dropped the oldest" in n for n in notices)
        assert chat.totals.dropped_turns > 0 and chat.totals.turns == 8
        assert chat.messages()[0] == {"role": "system", "content": "sys"}
        assert chat.history[-2]["content"].startswith("message 7")
        assert "message 0" not in str(chat.history)


def test_a_message_longer_than_the_context_is_refused_and_the_chat_goes_on(tiny_model: Path) -> None:
    lines = "hello\n" + "the world " * 400 + "\nhello\n"
    done = processes.run(SPECRUN + ["chat", str(tiny_model), "-t", "0", "-n", "6", "--ctx", "256"],
                         input=lines, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "error: the prompt is" in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.count("tokens per target call") == 2


def test_piped_chat_prints_only_replies(tiny_model: Path) -> None:
    """Each stdin line is a turn; /reset between two equal messages gives two equal replies."""
    done = processes.run(SPECRUN + ["chat", str(tiny_model), "-t", "0", "-n", "8"],
                         input="hello world\n/reset\nhello world\n", capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    half = len(out) // 2
    assert out and out[:half] == out[half:]  # reply + newline, twice: nothing else on stdout
    assert ">>>" not in out + done.stderr
    assert done.stderr.count("tokens per target call") == 2 and "conversation cleared" in done.stderr


def test_unknown_slash_command_is_reported(tiny_model: Path) -> None:
    done = processes.run(SPECRUN + ["chat", str(tiny_model), "-t", "0", "-n", "4"],
                         input="/frobnicate\n/system be brief\n/system\n/exit\nhello\n", capture_output=True,
                         text=True)
    assert done.returncode == 0
    assert "error: unknown command /frobnicate" in done.stderr
    assert "system message: be brief" in done.stderr
    assert done.stdout == ""  # /exit came before the message


def test_model_without_a_chat_template(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path / "base.gguf", TinySpec(chat_template=None))
    done = processes.run(SPECRUN + ["chat", str(path)], input="hi\n", capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("error: base.gguf has no chat template") and "Traceback" not in done.stderr


def spawn_chat(*args: str, home: Path | None = None) -> AbstractContextManager[pexpect.spawn]:
    """`specrun chat` in a pseudo-terminal, closed (by force if need be) when the test ends."""
    env = dict(os.environ, NO_COLOR="1", TERM="dumb", **({"SPECRUN_HOME": str(home)} if home else {}))
    return processes.in_terminal(SPECRUN + ["chat", *args], env=env, encoding="utf-8", timeout=60,
                                 dimensions=(40, 200))


def test_interactive_chat_in_a_terminal(tiny_model: Path) -> None:
    with spawn_chat(str(tiny_model), "-t", "0", "-n", "8") as child:
        child.expect("chatting with tiny.gguf")
        child.expect_exact(">>> ")
        child.sendline("hello world")
        child.expect(r"8 tokens, .* tok/s")
        child.expect_exact(">>> ")
        child.sendline("/help")
        child.expect("/reset")
        child.expect_exact(">>> ")
        child.sendintr()  # Ctrl-C at the prompt: a fresh prompt, not an exit
        child.expect_exact(">>> ")
        child.sendline("/stats")
        child.expect("1 replies, 8 tokens")
        child.expect_exact(">>> ")
        child.sendeof()  # Ctrl-D leaves
        child.expect(pexpect.EOF)
        child.close()
    assert child.exitstatus == 0


def test_real_chat_remembers_until_reset(real_pair: dict[str, Path]) -> None:
    turns = ("My name is Zorblax. Reply with one short sentence.\nWhat is my name? Answer in three words.\n"
             "/reset\nWhat is my name? Answer in three words.\n")
    done = processes.run(SPECRUN + ["chat", "qwen2.5-coder-1.5b-instruct", "-t", "0", "-n", "40"],
                         input=turns, capture_output=True, text=True, env=dict(os.environ, SPECRUN_HOME=str(REAL_STORE.root)))
    assert done.returncode == 0, done.stderr
    replies = done.stdout.strip().split("\n")
    assert "Zorblax" in replies[1] and "Zorblax" not in replies[-1], done.stdout
    stats = [ln for ln in done.stderr.splitlines() if "tokens per target call" in ln]
    assert len(stats) == 3 and "(auto)" in stats[0]
    assert " + 0 cached" not in stats[1]  # the second turn reused the first one's cache


def test_real_ctrl_c_stops_a_reply_and_keeps_the_session(real_pair: dict[str, Path]) -> None:
    with spawn_chat("qwen2.5-coder-1.5b-instruct", "-t", "0", "-n", "400", home=REAL_STORE.root) as child:
        child.expect_exact(">>> ", timeout=processes.HANG)  # loading may measure the cost curve first
        child.sendline("Write a long essay on the history of computing.")
        child.expect(r"\w+ \w+ \w+")  # the reply is streaming
        child.sendintr()
        child.expect("stopped")
        child.expect_exact(">>> ")
        child.sendline("What is 2+2? Answer with just the number.")
        child.expect("4")
        child.expect(r"tokens per target call")
        child.expect_exact(">>> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
        child.close()
    assert child.exitstatus == 0
