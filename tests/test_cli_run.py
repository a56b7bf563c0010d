"""`specrun run` as users drive it: stdout holds only model text, errors are one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
from typer.testing import CliRunner

from specrun.cli import app
from tests import processes

runner = CliRunner()
SPECRUN = [sys.executable, "-m", "specrun"]


def invoke(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def assert_one_line_error(result, code: int, needle: str) -> None:
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert len(lines) <= 2 and (len(lines) == 1 or lines[1].startswith("hint:"))
    assert "Traceback" not in result.stderr


def test_stdout_holds_exactly_the_generated_text(tiny_model: Path) -> None:
    as_json = invoke("run", str(tiny_model), "def fib(n):", "-t", "0", "-n", "24", "--json")
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert data["generated_tokens"] == 24 and data["stop_reason"] == "length"
    assert data["prompt_tokens"] > 0 and data["timings"]["tokens_per_s"] > 0
    streamed = invoke("run", str(tiny_model), "def fib(n):", "-t", "0", "-n", "24", "--verbose")
    assert streamed.exit_code == 0
    assert streamed.stdout == data["text"]
    assert "24 tokens, " in streamed.stderr and "tok/s" in streamed.stderr and "stopped by length" in streamed.stderr


def test_stdin_comes_before_the_argument(tiny_model: Path) -> None:
    both = invoke("run", str(tiny_model), "world", "-t", "0", "-n", "8", "--json", input="hello\n")
    joined = invoke("run", str(tiny_model), "hello\nworld", "-t", "0", "-n", "8", "--json")
    only_stdin = invoke("run", str(tiny_model), "-t", "0", "-n", "8", "--json", input="hello\nworld")
    texts = {json.loads(r.stdout)["text"] for r in (both, joined, only_stdin)}
    assert len(texts) == 1
    assert json.loads(both.stdout)["prompt_tokens"] == json.loads(joined.stdout)["prompt_tokens"]


def test_seed_makes_sampling_reproducible(tiny_model: Path) -> None:
    a = invoke("run", str(tiny_model), "hello", "-n", "16", "--seed", "3", "--json")
    b = invoke("run", str(tiny_model), "hello", "-n", "16", "--seed", "3", "--json")
    assert json.loads(a.stdout)["text"] == json.loads(b.stdout)["text"]


def test_empty_prompt(tiny_model: Path) -> None:
    assert_one_line_error(invoke("run", str(tiny_model), "  "), 2, "prompt is empty")
    assert_one_line_error(invoke("run", str(tiny_model), input=""), 2, "prompt is empty")


def test_prompt_longer_than_the_context(tiny_model: Path) -> None:
    assert_one_line_error(invoke("run", str(tiny_model), "hello " * 200, "--ctx", "64"), 2, "the context holds")


def test_unknown_model_suggests_names() -> None:
    result = invoke("run", "qwen2.5-coder-1.5b", "hi")
    assert_one_line_error(result, 1, "unknown model")
    assert "qwen2.5-coder-1.5b-instruct" in result.stderr


def test_model_not_pulled_says_the_pull_command() -> None:
    result = invoke("run", "smollm2-135m-instruct", "hi")
    assert_one_line_error(result, 1, "not pulled")
    assert "specrun pull smollm2-135m-instruct" in result.stderr


def test_bad_files(tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "text.gguf").write_text("not a model\n")
    assert_one_line_error(invoke("run", str(tmp_path / "text.gguf"), "hi"), 1, "not a GGUF file")
    (tmp_path / "cut.gguf").write_bytes(tiny_model.read_bytes()[:-1000])
    assert_one_line_error(invoke("run", str(tmp_path / "cut.gguf"), "hi"), 1, "truncated")
    assert_one_line_error(invoke("run", str(tmp_path / "missing.gguf"), "hi"), 1, "no such file")


def test_bad_option_values(tiny_model: Path) -> None:
    result = invoke("run", str(tiny_model), "hi", "--top-p", "0")
    assert_one_line_error(result, 2, "--top-p")
    assert invoke("run", str(tiny_model), "hi", "--max-tokens", "0").exit_code == 2


def test_registered_local_model_runs_by_name(tiny_model: Path) -> None:
    assert invoke("add", "tiny", str(tiny_model)).exit_code == 0
    result = invoke("run", "tiny", "hello", "-n", "4", "-t", "0", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["generated_tokens"] == 4  # greedy: a random draw could end early
    listed = {r["name"]: r for r in json.loads(invoke("list", "--json").stdout)}
    assert listed["tiny"]["pulled"] and listed["tiny"]["path"] == str(tiny_model.resolve())


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.startswith("specrun ")


# --- real processes: pipes and signals ----------------------------------------------

def _env() -> dict[str, str]:
    return {**os.environ, "NO_COLOR": "1"}


def test_pipe_into_head_ends_quietly(tiny_model: Path) -> None:
    """The reader goes away mid-stream: no traceback, generation stops."""
    proc = processes.run(
        f"{' '.join(SPECRUN)} run {tiny_model} 'hello' -n 2000 --ctx 2048 -t 1 | head -c 1",
        shell=True, capture_output=True, env=_env(), executable="/bin/bash", timeout=120,
    )
    assert proc.returncode == 0 and len(proc.stdout) == 1
    assert b"Traceback" not in proc.stderr and b"Broken pipe" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("runner", ["as started", "ignoring SIGINT"])
def test_ctrl_c_ends_cleanly(tiny_model: Path, runner: str) -> None:
    """SIGINT while specrun waits for its prompt on stdin: exit 130, one line, no traceback.
    Also from a runner that ignores SIGINT (a background job of a non-interactive shell):
    its children inherited that, and this waited out its timeout."""
    with processes.ignoring_sigint() if runner == "ignoring SIGINT" else nullcontext():
        with processes.spawned([*SPECRUN, "run", str(tiny_model)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=_env()) as proc:
            processes.wait_until_reading(proc, fd=0)
            proc.send_signal(signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=60)  # only so that a hang ends; it takes well under a second
    assert proc.returncode == 130, stderr
    assert stdout == "" and "Traceback" not in stderr and "interrupted" in stderr


# --- speculation flags --------------------------------------------------------------

def test_every_spec_mode_prints_the_plain_greedy_text(tiny_model: Path) -> None:
    base = ["run", str(tiny_model), "hello world hello", "-t", "0", "-n", "40", "--json"]
    plain = json.loads(invoke(*base, "--spec", "none").stdout)
    assert plain["speculation"]["mode"] == "none" and plain["speculation"]["tokens_per_call"] == 1.0
    for extra in (["--spec", "ngram", "--budget", "6"], ["--spec", "auto"], ["--spec", "ngram"],
                  ["--spec", "chain", "--draft", str(tiny_model)], ["--spec", "tree", "--draft", str(tiny_model)],
                  ["--spec", "auto", "--draft", str(tiny_model)]):
        result = invoke(*base, *extra)
        assert result.exit_code == 0, (extra, result.output)
        data = json.loads(result.stdout)
        assert data["text"] == plain["text"], extra
        assert set(data["speculation"]) == {"mode", "target_calls", "drafted", "accepted", "tokens_per_call",
                                            "nodes_per_pass", "depth_per_pass", "sources"}
        sources = data["speculation"]["sources"]  # per drafter: what it proposed, got verified and accepted
        assert sum(c["verified"] for c in sources.values()) >= data["speculation"]["drafted"]
        assert all(0 <= c["accepted"] <= c["verified"] for c in sources.values()), sources
        if extra[:2] == ["--spec", "auto"]:
            assert {"ngram", "suffix", "recycle"} <= set(sources), sources
        assert data["timings"]["draft_s"] >= 0 and data["timings"]["verify_s"] > 0


def test_draft_equal_to_target_speeds_up_the_count_of_calls(tiny_model: Path) -> None:
    result = invoke("run", str(tiny_model), "hello", "-t", "0", "-n", "40", "--json", "--spec", "chain",
                    "--budget", "5", "--draft", str(tiny_model))
    spec = json.loads(result.stdout)["speculation"]
    assert spec["accepted"] == spec["drafted"] > 0 and spec["tokens_per_call"] > 3
    assert 1 < spec["nodes_per_pass"] <= 5 and 0 < spec["depth_per_pass"] <= 4  # --budget 5: a chain of 4


def test_bad_speculation_flags(tiny_model: Path) -> None:
    run = ("run", str(tiny_model), "hi")
    assert_one_line_error(invoke(*run, "--spec", "fast"), 2, "unknown --spec")
    assert_one_line_error(invoke(*run, "--budget", "many"), 2, "--budget")
    assert_one_line_error(invoke(*run, "--budget", "0"), 2, "--budget")
    assert_one_line_error(invoke(*run, "--spec", "chain"), 2, "no recommended draft")
    assert_one_line_error(invoke(*run, "--spec", "tree", "--no-draft"), 2, "needs a draft")
    assert_one_line_error(invoke(*run, "--draft", str(tiny_model), "--no-draft"), 2, "contradict")
    assert_one_line_error(invoke(*run, "--spec", "chain", "--draft", "nope"), 1, "unknown model")


def test_verbose_reports_speculation(tiny_model: Path) -> None:
    result = invoke("run", str(tiny_model), "hello", "-n", "10", "-v", "--spec", "ngram", "--budget", "4")
    assert result.exit_code == 0
    assert "(ngram)" in result.stderr and " target calls" in result.stderr and "tokens per target call" in result.stderr


def test_a_budget_beyond_what_llama_cpp_verifies_is_the_engine_s_one_line_error(tiny_model: Path) -> None:
    result = invoke("run", str(tiny_model), "hi", "--spec", "ngram", "--budget", "300")
    assert_one_line_error(result, 2, "at most 255 nodes")
    ok = invoke("run", str(tiny_model), "hi hi hi hi", "-n", "8", "--spec", "ngram", "--budget", "255")
    assert ok.exit_code == 0, ok.output


def test_bytes_that_are_not_utf8_on_stdin_are_replaced_not_a_crash(tiny_model: Path) -> None:
    done = processes.run([*SPECRUN, "run", str(tiny_model), "-n", "4", "-t", "0", "--json"],
                         input=b"\xff\xfe def f(", capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    assert b"Traceback" not in done.stderr
    data = json.loads(done.stdout)
    assert data["generated_tokens"] == 4
    # The same as the prompt with U+FFFD for each bad byte, which is what the user sees in an editor.
    same = invoke("run", str(tiny_model), "\ufffd\ufffd def f(", "-n", "4", "-t", "0", "--json")
    assert json.loads(same.stdout)["text"] == data["text"]
    argv = processes.run([*SPECRUN, "run", str(tiny_model), b"\xff def f(", "-n", "2", "--json"],
                         capture_output=True, timeout=120)  # argv bytes arrive as lone surrogates
    assert argv.returncode == 0 and b"Traceback" not in argv.stderr, argv.stderr.decode()


def test_a_tiny_context_is_not_a_crash(tiny_model: Path) -> None:
    """--ctx 16 aborted the process inside llama.cpp (GGML_ASSERT, exit 134)."""
    done = processes.run([*SPECRUN, "run", str(tiny_model), "hello", "--ctx", "16", "-n", "300", "-t", "0"],
                         capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "GGML_ASSERT" not in done.stderr
    assert done.stdout
    too_long = invoke("run", str(tiny_model), "hello world " * 200, "--ctx", "16")
    assert_one_line_error(too_long, 2, "the context holds")
