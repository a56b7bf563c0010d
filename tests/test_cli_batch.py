"""`specrun run --batch FILE` and `--samples K`: JSON lines in input order, each equal to its own run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specrun.cli.run_batch import BatchItem, read_batch
from specrun.errors import UsageError
from tests.test_cli_run import assert_one_line_error, invoke

LINES = ["def fib(n):", '{"prompt": "hello world hello"}', "", "the a the a", "x = 1\\n", '{"prompt": "import"}']


def _alone(model: Path, prompt: str, *args: str) -> str:
    result = invoke("run", str(model), prompt, "-n", "20", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["text"]


@pytest.mark.parametrize("spec", ["none", "ngram", "auto", "auto --draft"])
def test_a_batch_prints_each_result_in_order_as_its_own_run_would(tiny_model: Path, tmp_path: Path, spec: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # The tiny draft is the target itself, which could never pay on a CPU (auto.could_pay): here
    # it stands for a draft that might, so that auto drafts with it for the whole batch.
    monkeypatch.setattr("specrun.session.could_pay", lambda cost, draft_pass_s: True)
    batch = tmp_path / "prompts.jsonl"
    batch.write_text("\n".join(LINES) + "\n")
    draft = ["--draft", str(tiny_model)] if "--draft" in spec else []  # auto's draft model drafts for them all
    result = invoke("run", str(tiny_model), "--batch", str(batch), "-n", "20", "-t", "0", "--spec", spec.split()[0],
                    "--parallel", "3", *draft)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    prompts = [item.prompt for item in read_batch("\n".join(LINES))]
    assert [r["index"] for r in rows] == list(range(len(prompts)))
    for row, prompt in zip(rows, prompts):
        assert row["text"] == _alone(tiny_model, prompt, "-t", "0", "--spec", "none"), prompt
        assert row["generated_tokens"] <= 20 and row["latency_s"] > 0
    assert "5 sequences" in result.stderr and "shared passes" in result.stderr
    if draft:
        assert "drafters: model " in result.stderr  # what each drafter proposed, verified and accepted


def test_samples_share_passes_and_each_equals_its_seeded_run(tiny_model: Path) -> None:
    result = invoke("run", str(tiny_model), "hello world", "--samples", "3", "--seed", "5", "-n", "20")
    assert result.exit_code == 0, result.output
    texts = [json.loads(line)["text"] for line in result.stdout.splitlines()]
    assert texts == [_alone(tiny_model, "hello world", "--seed", str(5 + k)) for k in range(3)]
    assert len(set(texts)) > 1


def test_a_batch_on_stdin_with_a_chat(tiny_model: Path) -> None:
    chat = '{"messages": [{"role": "user", "content": "hi"}]}'
    result = invoke("run", str(tiny_model), "--batch", "-", "-n", "4", "-t", "0", input=f"a\n{chat}\n")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2 and rows[1]["prompt_tokens"] > 5  # the template's turns around "hi"


def test_batch_files_are_read_line_by_line() -> None:
    items = read_batch('plain text\n\n{"messages": [{"role": "user", "content": "hi"}]}\n  {"prompt": "p"}\n')
    assert items == [BatchItem(prompt="plain text"), BatchItem(messages=({"role": "user", "content": "hi"},)),
                     BatchItem(prompt="p")]
    for bad, needle in (('{"prompt": 1}', "line 1"), ('a\n{"prompt": "x"', "line 2 of the batch is not valid JSON"),
                        ('{"messages": [{"role": "user"}]}', "line 1"), ("\n\n", "no prompts")):
        with pytest.raises(UsageError, match=needle):
            read_batch(bad)


def test_bad_batch_requests_are_one_line_errors(tiny_model: Path, tmp_path: Path) -> None:
    batch = tmp_path / "b.txt"
    batch.write_text('{"prompt": \n')
    assert_one_line_error(invoke("run", str(tiny_model), "--batch", str(batch)), 2, "line 1 of the batch")
    assert_one_line_error(invoke("run", str(tiny_model), "--batch", str(tmp_path / "none.txt")), 2,
                          "cannot read the batch file")
    assert_one_line_error(invoke("run", str(tiny_model), "p", "--batch", str(batch)), 2, "not from an argument")
    assert_one_line_error(invoke("run", str(tiny_model), "p", "--batch", str(batch), "--samples", "2"), 2,
                          "contradict")
    assert_one_line_error(invoke("run", str(tiny_model), "p", "--samples", "2", "--spec", "tree"), 2,
                          "a batch drafts with auto's sources")
