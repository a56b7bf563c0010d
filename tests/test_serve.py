"""`specrun serve` driven as people drive it: the official openai client, and raw HTTP for what
a client should not be able to do. The server is the real command in a child process on the
tiny model; greedy replies must equal `specrun run` alone, also when 8 requests share passes."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tests import processes
from tests.test_cli_run import invoke

KEY = "test-key"
PROMPTS = ["def fib(n):", "hello world hello", "the a the a", "import os\n", "x = [1, 2", "class A:", "# sum", "if x"]


@contextmanager
def server(model: Path, home: Path, *args: str) -> Iterator[tuple[subprocess.Popen, int]]:
    """The command on a free port; (process, port) once it listens."""
    argv = [sys.executable, "-m", "specrun", "serve", str(model), "--port", "0", "--api-key", KEY, *args]
    env = {**os.environ, "SPECRUN_HOME": str(home), "NO_COLOR": "1"}
    with processes.spawned(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env) as proc:
        seen = b""
        while b"/v1 (" not in seen:
            seen += processes.read_some(proc.stderr, timeout=120)  # type: ignore[arg-type]
        port = int(re.search(rb"http://127\.0\.0\.1:(\d+)/v1", seen).group(1))  # type: ignore[union-attr]
        yield proc, port


@pytest.fixture(scope="module")
def served(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with server(tiny_model, tmp_path_factory.mktemp("home"), "--parallel", "4", "--max-requests", "8",
                "-n", "64") as (_, port):
        yield port


def client(port: int):
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)


def alone(model: Path, prompt: str, n: int = 24) -> str:
    result = invoke("run", str(model), prompt, "-n", str(n), "-t", "0", "--spec", "none", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["text"]


def post(port: int, path: str, body: bytes, key: str | None = KEY) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    conn.request("POST", path, body=body, headers=headers)
    response = conn.getresponse()
    data = json.loads(response.read() or b"{}")
    conn.close()
    return response.status, data


def metrics(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    data = json.loads(conn.getresponse().read())
    conn.close()
    return data


def test_a_completion_whole_and_streamed_equals_a_run_alone(served: int, tiny_model: Path) -> None:
    c = client(served)
    whole = c.completions.create(model=tiny_model.name, prompt=PROMPTS[0], max_tokens=24, temperature=0)
    assert whole.choices[0].text == alone(tiny_model, PROMPTS[0])
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 24
    pieces = list(c.completions.create(model=tiny_model.name, prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                       stream=True))
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "length"
    assert [m.id for m in c.models.list().data] == [tiny_model.name]


def test_eight_concurrent_requests_equal_their_runs_alone(served: int, tiny_model: Path) -> None:
    c = client(served)

    def ask(prompt: str) -> str:
        return c.completions.create(model=tiny_model.name, prompt=prompt, max_tokens=24, temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(ask, PROMPTS))
    assert texts == [alone(tiny_model, p) for p in PROMPTS]
    m = metrics(served)
    assert m["passes"] > 0 and m["nodes_per_pass"] > 1  # passes were shared
    assert m["in_flight"] == 0 and m["active"] == 0


def test_requests_sharing_passes_with_a_draft_model_equal_their_runs_alone(tiny_model: Path, tmp_path: Path) -> None:
    """With --draft, auto's draft model drafts for every request of a pass at once, in caches of
    its own that requests hand on as they come and go (more requests than --parallel)."""
    with server(tiny_model, tmp_path / "home", "--parallel", "3", "--draft", str(tiny_model)) as (_, port):
        c = client(port)

        def ask(prompt: str) -> str:
            return c.completions.create(model=tiny_model.name, prompt=prompt, max_tokens=24,
                                        temperature=0).choices[0].text

        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(ask, PROMPTS))
    assert texts == [alone(tiny_model, p) for p in PROMPTS]


def test_chat_whole_and_streamed_agree_and_stop_strings_cut(served: int, tiny_model: Path) -> None:
    c = client(served)
    messages = [{"role": "user", "content": "hi"}]
    whole = c.chat.completions.create(model=tiny_model.name, messages=messages, max_tokens=20, temperature=0)
    text = whole.choices[0].message.content
    assert text and whole.choices[0].message.role == "assistant"
    streamed = c.chat.completions.create(model=tiny_model.name, messages=messages, max_tokens=20, temperature=0,
                                         stream=True)
    assert "".join(p.choices[0].delta.content or "" for p in streamed) == text
    stop = text[3:5]
    cut = c.chat.completions.create(model=tiny_model.name, messages=messages, max_tokens=20, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    parts = c.chat.completions.create(model=tiny_model.name, max_tokens=20, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}])
    assert parts.choices[0].message.content == text  # text parts read as the text they join to
    seeded = [c.completions.create(model=tiny_model.name, prompt="hi", max_tokens=16, seed=7).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]


@pytest.mark.parametrize("body, key, status, needle", [
    (b'{"prompt": ', KEY, 400, "not valid JSON"),
    (b'{"model": "other", "prompt": "x"}', KEY, 404, "does not exist"),
    (b'{"prompt": "x", "n": 2}', KEY, 400, "n must be 1"),
    (b'{"prompt": "x", "max_tokens": 100000}', KEY, 400, "max_tokens must be between"),
    (b'{"prompt": "x", "temperature": "hot"}', KEY, 400, "temperature must be a number"),
    (b'{"prompt": "x", "max_tokens": 2.5}', KEY, 400, "max_tokens must be an integer"),
    (b'{"messages": [{"role": "user", "content": 3}]}', KEY, 400, "messages must be"),
    (b'{"prompt": ""}', KEY, 400, "prompt must be"),
    (b'{"prompt": "x"}', None, 401, "API key"),
    (b'{"prompt": "x"}', "wrong", 401, "API key"),
    (b'{"prompt": "' + b"a" * (2 << 20) + b'"}', KEY, 413, "over"),
])
def test_bad_requests_get_an_openai_error_and_a_4xx(served: int, body: bytes, key: str | None, status: int,
                                                    needle: str) -> None:
    got, data = post(served, "/v1/chat/completions" if b'"messages"' in body else "/v1/completions", body, key)
    assert got == status and needle in data["error"]["message"], data
    assert set(data["error"]) == {"message", "type", "param", "code"}


def test_a_client_that_disconnects_frees_its_sequence(served: int) -> None:
    before = metrics(served)["requests_done"]
    conn = http.client.HTTPConnection("127.0.0.1", served, timeout=60)
    body = json.dumps({"prompt": "def", "max_tokens": 64, "stream": True, "temperature": 0})
    conn.request("POST", "/v1/completions", body=body, headers={"Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    conn.close()  # gone mid-stream
    deadline = time.monotonic() + 20
    while (m := metrics(served))["in_flight"] or m["active"] or m["requests_done"] == before:
        assert time.monotonic() < deadline, m
        time.sleep(0.05)


def test_the_limit_on_requests_and_sigterm_drains_what_is_in_flight(tiny_model: Path, tmp_path: Path) -> None:
    with server(tiny_model, tmp_path, "--max-requests", "1", "-n", "1500", "--ctx", "2000", "--spec", "none") as (
            proc, port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        body = json.dumps({"prompt": "def", "max_tokens": 1500, "stream": True, "temperature": 0})
        conn.request("POST", "/v1/completions", body=body, headers={"Authorization": f"Bearer {KEY}"})
        response = conn.getresponse()
        assert response.readline().startswith(b"data: ")
        status, data = post(port, "/v1/completions", b'{"prompt": "x", "max_tokens": 4}')
        assert status == 429 and data["error"]["type"] == "rate_limit_error"
        proc.send_signal(signal.SIGTERM)  # the stream in flight still ends whole
        rest = response.read()
        assert rest.rstrip().endswith(b"data: [DONE]") and b'"finish_reason": "length"' in rest
        assert proc.wait(timeout=60) == 0  # drained, what was learnt saved, and a clean exit


def test_serving_beyond_loopback_needs_an_api_key(tiny_model: Path) -> None:
    result = invoke("serve", str(tiny_model), "--host", "0.0.0.0")
    assert result.exit_code == 2 and "--api-key" in result.stderr
