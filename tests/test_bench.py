"""`specrun bench`, `calibrate` and `info` on tiny models: workloads, the JSON report, the
output check against plain greedy, and the real pair in the real tier."""

from __future__ import annotations

import importlib.util
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specrun.bench import DEFAULT_MODES, MODES, parse_modes
from specrun.workloads import load_workload
from specrun.errors import UsageError
from tests import processes
from tests.conftest import REAL_STORE

SPECRUN = [sys.executable, "-m", "specrun"]
MODE_FIGURES = {"mode", "label", "runs", "tokens_per_s", "tokens_per_s_min", "tokens_per_s_max", "speedup",
                "speedup_min", "speedup_max", "tokens_per_call", "draft_share", "mean_tree", "max_tree",
                "mean_depth", "pass_s", "bytes_per_pass", "read_s_per_pass", "identical", "differences",
                "accepted_histogram", "parallel_s_per_pass", "prepared_share", "failed", "peak_bytes", "sources"}


def specrun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return processes.run(SPECRUN + list(args), capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NO_COLOR": "1", **(env or {})})


def test_builtin_workloads() -> None:
    humaneval = load_workload("humaneval")
    assert len(humaneval) == 164 and humaneval[0].id == "HumanEval/0" and "def " in (humaneval[0].text or "")
    chat = load_workload("chat")
    assert len(chat) >= 30 and all(p.messages and p.messages[-1]["role"] == "user" for p in chat)
    assert len({p.id for p in chat}) == len(chat)
    kinds = {p.id.split("-")[0] for p in chat}
    assert {"explain", "summarize", "translate", "arithmetic", "review", "document"} <= kinds
    assert len(load_workload("chat", 3)) == 3


def test_jsonl_workload(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text('{"id": "a", "prompt": "def add(a, b):"}\n\n'
                    '{"messages": [{"role": "user", "content": "hi"}]}\n')
    prompts = load_workload(str(path))
    assert [p.id for p in prompts] == ["a", "line-3"]
    assert prompts[0].text == "def add(a, b):" and prompts[1].messages == [{"role": "user", "content": "hi"}]
    path.write_text('{"prompt": "ok"}\n{"text": "no"}\n')
    with pytest.raises(UsageError, match="line 2"):
        load_workload(str(path))
    with pytest.raises(UsageError, match="unknown workload"):
        load_workload("nonesuch")


def test_modes() -> None:
    notes: list[str] = []
    assert [m.key for m in parse_modes("", True, notes.append)] == list(DEFAULT_MODES)
    assert [m.key for m in parse_modes("ngram,auto", True, notes.append)] == ["plain", "ngram", "auto"]
    assert [m.key for m in parse_modes("", False, notes.append)] == ["plain", "auto", "ngram", "lcp-lookup"]
    assert notes == ["no draft model: skipping chain, tree"]
    with pytest.raises(UsageError, match="needs a draft"):
        parse_modes("tree", False, notes.append)
    with pytest.raises(UsageError, match="unknown mode 'fast'"):
        parse_modes("fast", True, notes.append)


def test_bench_reports_every_mode_and_figure(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = specrun("bench", str(tiny_model), "--draft", str(tiny_model), "--n-prompts", "2", "-n", "16",
                   "--modes", ",".join(MODES), "--overlap", "on", "--json", str(out))
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert [m["mode"] for m in data["modes"]] == list(MODES)
    for m in data["modes"]:
        assert set(m) == MODE_FIGURES and m["runs"] == 2 and m["tokens_per_s"] > 0
        if m["mode"] in ("auto", "ngram", "chain", "tree", "auto-seq", "tree-seq", "free"):
            assert m["tokens_per_call"] >= 1 and 0 <= m["draft_share"] <= 1 and m["mean_tree"] >= 1
            assert m["identical"] == 2  # tiny f32 models: speculation never changes greedy output
            assert m["sources"] and all(0 <= a <= v for _, v, a in m["sources"].values())
        if m["mode"] == "auto":  # every drafter, per source: proposed, verified, accepted
            assert {"ngram", "suffix", "recycle"} <= set(m["sources"]) <= {"ngram", "suffix", "recycle", "model"}
        if m["mode"] == "free":  # the same without the draft model
            assert set(m["sources"]) == {"ngram", "suffix", "recycle"}
        # --overlap on: every speculative row overlapped but the -seq ones
        assert (m["parallel_s_per_pass"] is not None) == (m["mode"] in ("auto", "ngram", "chain", "tree", "free")), m
    assert len(data["runs"]) == 2 * len(MODES)
    assert {r["prompt_id"] for r in data["runs"]} == {"HumanEval/0", "HumanEval/1"}
    assert data["planner"] and data["max_tokens"] == 16
    lines = done.stdout.splitlines()
    for m in MODES.values():
        assert any(line.startswith(m.label) for line in lines), done.stdout
    assert any(line.startswith("planner: a target pass over n tokens costs") for line in lines)
    assert "\x1b[" not in done.stdout + done.stderr  # no colours or bars in pipes


def test_a_mode_whose_output_differs_is_reported(tiny_model: Path, tmp_path: Path) -> None:
    """Sampling: llama-cpp-python's sampler draws differently from specrun's with the same seed,
    so its output is not plain's, and the report must say so; specrun's modes still match."""
    out = tmp_path / "bench.json"
    done = specrun("bench", str(tiny_model), "--n-prompts", "2", "-n", "24", "-t", "1.0", "--seed", "5",
                   "--modes", "plain,ngram,lcp-plain", "--json", str(out))
    assert done.returncode == 0, done.stderr
    modes = {m["mode"]: m for m in json.loads(out.read_text())["modes"]}
    assert modes["ngram"]["identical"] == 2
    peer = modes["lcp-plain"]
    assert peer["identical"] < 2 and peer["differences"]
    assert all(d["token"] >= 0 and d["top2_margin"] >= 0 for d in peer["differences"])
    row = next(line for line in done.stdout.splitlines() if line.startswith("llama-cpp-python plain"))
    assert "differs in" in row and "top-2 margins" in row


def test_chat_workload_uses_the_template(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = specrun("bench", str(tiny_model), "-w", "chat", "--n-prompts", "2", "-n", "8", "--modes", "plain,ngram",
                   "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert {r["prompt_id"] for r in json.loads(out.read_text())["runs"]} == {"explain-1", "explain-2"}


def test_bench_refuses_bad_outputs_before_working(tiny_model: Path, tmp_path: Path) -> None:
    done = specrun("bench", str(tiny_model), "--json", str(tmp_path / "missing" / "x.json"))
    assert done.returncode == 2 and done.stderr.startswith("error: cannot write") and done.stdout == ""
    done = specrun("bench", str(tiny_model), "-w", "nonesuch")
    assert done.returncode == 2 and "unknown workload" in done.stderr and "Traceback" not in done.stderr


def test_plot(tiny_model: Path, tmp_path: Path) -> None:
    png = tmp_path / "bench.png"
    done = specrun("bench", str(tiny_model), "--n-prompts", "1", "-n", "8", "--modes", "plain,ngram",
                   "--plot", str(png))
    if importlib.util.find_spec("matplotlib") is None:
        assert done.returncode == 2 and "--plot needs matplotlib" in done.stderr and not png.exists()
    else:
        assert done.returncode == 0 and png.read_bytes()[:4] == b"\x89PNG"


def test_calibrate_then_info(tiny_model: Path) -> None:
    before = specrun("info", str(tiny_model), "--json")
    assert before.returncode == 0, before.stderr
    data = json.loads(before.stdout)
    assert data["architecture"] == "llama" and data["layers"] == 2 and data["vocabulary"] == 272
    assert data["chat_template"] is True and data["calibrations"] == []
    cal = specrun("calibrate", str(tiny_model), "--threads", "2", "--json")
    assert cal.returncode == 0, cal.stderr
    costs = json.loads(cal.stdout)["costs"]
    # Up to 32 always; beyond, while a pass costs at most 8 tokens' worth (the tiny model is near that)
    assert costs[0]["tokens"] == 1 and costs[-1]["tokens"] >= 32
    assert [c["ms"] for c in costs] == sorted(c["ms"] for c in costs)  # never cheaper for more tokens
    after = json.loads(specrun("info", str(tiny_model), "--json", "--verify").stdout)
    assert after["checksum"] == "computed" and len(after["sha256"]) == 64
    assert len(after["calibrations"]) == 1 and "threads 2" in after["calibrations"][0]["settings"]
    table = specrun("info", str(tiny_model))
    assert re.search(r"^chat template +yes$", table.stdout, re.M) and "threads 2" in table.stdout


def test_real_bench_and_info(real_pair: dict[str, Path], tmp_path: Path) -> None:
    env = {"SPECRUN_HOME": str(REAL_STORE.root)}
    out = tmp_path / "bench.json"
    done = specrun("bench", "--n-prompts", "1", "-n", "24", "--modes", "plain,auto,tree,lcp-lookup",
                   "--json", str(out), env=env)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert data["model"] == "qwen2.5-coder-1.5b-instruct" and data["draft"]
    assert [m["mode"] for m in data["modes"]] == ["plain", "auto", "tree", "lcp-lookup"]
    assert all(m["tokens_per_s"] > 0 for m in data["modes"])
    # Planned on a 2-core CPU the draft model rarely pays, and the planner may verify none of
    # its nodes (test_real.py checks them accepted with a fixed budget); but it did draft.
    tree = data["modes"][2]
    assert tree["draft_share"] > 0 and tree["mean_tree"] is not None and tree["tokens_per_call"] >= 1
    info = json.loads(specrun("info", "qwen2.5-coder-1.5b-instruct", "--json", env=env).stdout)
    assert info["architecture"] == "qwen2" and info["checksum"] == "verified when pulled"
    assert info["chat_template"] is True and info["calibrations"]


def test_a_short_answer_drafted_in_one_step_is_timed_over_all_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every mode is timed from the prefill's token to the last. A speculative first step comes
    out with the prefill's token: timing from the first piece timed a 13-token answer drafted
    whole in one step over its last token alone (0.96x plain where it was 3x faster)."""
    import specrun.bench as B
    from specrun.generate import GenerationStats, Step

    class OneStepAnswer:  # the prefill's token and 11 accepted in one 0.3 s step, then 1 more
        def __init__(self, *args: object) -> None:
            self.stats, self.text, self.tokens = GenerationStats(), "", list(range(13))

        def __iter__(self):
            yield Step(self.tokens[:12], "", 1, 18, 11, 0.1, 0.2, 0.3, depth=11)
            yield Step(self.tokens[12:], "", 1, 16, 0, 0.1, 0.2, 0.3, depth=9)
            self.stats = GenerationStats(generated_tokens=13, target_calls=3, decode_s=0.6, generations=1)

    class FakeSession:
        target = cache = None

        def forget(self) -> None: ...
        def speculator(self, spec: object) -> None: ...
        def overlaps(self, spec: object) -> bool: return False
        def save(self) -> None: ...

    monkeypatch.setattr(B, "Generation", OneStepAnswer)
    runner = B.SessionRunner(FakeSession(), MODES["auto"], B.BenchConfig(max_tokens=64))  # type: ignore[arg-type]
    result = runner.run([1, 2, 3], "p", 0)
    assert result.tokens_per_s == pytest.approx(12 / 0.6)
    assert result.tree_sizes == [19, 17] and result.accepted_lengths == [11, 0]


def test_rewrite_workload() -> None:
    """The rewrite set: code the model is asked to give back rewritten, so its output repeats its input."""
    rewrite = load_workload("rewrite")
    assert len(rewrite) == 12 and len({p.id for p in rewrite}) == 12
    for prompt in rewrite:
        assert prompt.id.startswith("rewrite/") and prompt.text is None and prompt.messages
        assert len(prompt.messages) == 1 and prompt.messages[0]["role"] == "user"
        assert "```python\n" in prompt.messages[0]["content"]


def test_bench_batch_rows_share_passes_and_keep_the_output(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = specrun("bench", str(tiny_model), "--no-draft", "--n-prompts", "3", "-n", "16", "--modes",
                   "plain,free", "--batch", "2", "--json", str(out))
    assert done.returncode == 0, done.stderr
    rows = {r["mode"]: r for r in json.loads(out.read_text())["batch"]}
    assert set(rows) == {"plain", "free"}
    for r in rows.values():
        assert r["batch"] == 2 and len(r["outputs"]) == 3 and len(r["latency_s"]) == 3
        assert r["passes"] > 0 and r["tokens_per_s"] > 0 and r["cost_ratio"] > 0
    assert rows["plain"]["nodes_per_pass"] > 1  # two sequences in most passes
    lines = [line for line in done.stdout.splitlines() if line.startswith("planner: batch of 2")]
    assert len(lines) == 2 and all("outputs identical to single plain runs: 3/3" in line for line in lines)
    assert "x single-sequence plain" in lines[0] and "x free alone" in lines[1]
    refused = specrun("bench", str(tiny_model), "--batch", "2", "--memory-limit", "1G")
    assert refused.returncode == 2 and "--batch" in refused.stderr


def test_plain_batch_bench_measures_the_curve_its_bound_needs(tiny_model: Path, tmp_path: Path) -> None:
    """`--modes plain --batch 4` plans no trees, but its bound prices a pass over about 4 tokens: the
    curve must be measured that far, not extrapolated from one token's pass."""
    out = tmp_path / "bench.json"
    done = specrun("bench", str(tiny_model), "--no-draft", "--n-prompts", "4", "-n", "8", "--modes", "plain",
                   "--batch", "4", "--json", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    curve = next(line for line in report["planner"] if line.startswith("a target pass over n tokens costs"))
    assert "2: " in curve and "4: " in curve, curve
