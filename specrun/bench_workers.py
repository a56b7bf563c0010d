"""Bench modes in worker processes, each inside a memory limit of its own (`bench --memory-limit`).

A user with a model bigger than their RAM wants to see, on their own machine,
what each way of running it does inside the memory they have: specrun's modes
and llama.cpp's own mmap, as ollama and LM Studio run it. Each mode gets a
process in a child memory cgroup (`memory_cgroup.ChildCgroup`) limited to the
same size, loads its models there (a specrun mode plans its memory under that
limit, as `run` would), and answers requests on stdin with JSON lines on
stdout: `run` a prompt's tokens, the target's `margin` after a context (plain
decoding's worker), `explain` what the planner learnt, `quit`. The parent keeps
the rotation and the comparisons (`bench.Bench`), reads each cgroup's peak
memory, and reports a worker the kernel killed as that mode failing, not the
benchmark. Workers start one at a time, so no two calibrate at once.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, TextIO

from specrun.bench import BenchConfig, PeerRunner, RunResult, SessionRunner, mode_of
from specrun.engines import Placement
from specrun.errors import SpecrunError
from specrun.memory_cgroup import ChildCgroup, Usage
from specrun.sampling import SamplingConfig


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, as JSON: the mode, the files, the placements, the run."""

    mode: str  # a --modes key
    target: str
    draft: str | None
    home: str  # where calibrations are kept
    max_tokens: int
    sampling: dict[str, Any]  # SamplingConfig's fields
    needed_ctx: int
    target_placement: dict[str, Any] = field(default_factory=dict)  # Placement's fields
    draft_placement: dict[str, Any] = field(default_factory=dict)
    corpus: str | None = None  # --corpus: its index is kept in the store, so the parent built it once

    def config(self) -> BenchConfig:
        return BenchConfig(self.max_tokens, 1, SamplingConfig(**self.sampling))


def placement_fields(p: Placement) -> dict[str, Any]:
    return {f.name: getattr(p, f.name) for f in fields(p)}


# --- the worker side ---------------------------------------------------------------------


def serve(spec: WorkerSpec, inp: TextIO, out: TextIO) -> int:
    """Load the mode, say ready, answer requests until `quit` or end of input; the exit code."""
    def say(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    session, closers = None, []
    try:
        mode = mode_of(spec.mode)
        assert mode is not None, spec.mode
        if mode.spec is None:
            from specrun.engines.llamacpp_backend import VocabOnly

            vocab = VocabOnly(Path(spec.target))
            closers.append(vocab.close)
            runner = PeerRunner.open(Path(spec.target), mode, spec.config(), spec.needed_ctx,
                                     Placement(**spec.target_placement), vocab.vocab)
            closers.append(runner.close)
        else:
            from specrun.session import Session, SessionConfig

            uses_draft = mode.needs_draft or mode.spec.mode == "auto"
            config = SessionConfig(Path(spec.target), Path(spec.draft) if spec.draft and uses_draft else None,
                                   Path(spec.home), (mode.spec,), Placement(**spec.target_placement),
                                   Placement(**spec.draft_placement), needed_ctx=spec.needed_ctx,
                                   keep_recycled=False)
            session = Session(config, lambda line: say({"notice": line}))
            closers.append(session.close)
            session.open(session.n_ctx)
            if spec.corpus is not None:
                from specrun.corpus import load_corpus

                session.corpus = load_corpus(Path(spec.corpus), session.target.vocab, Path(spec.home) / "corpus",
                                             lambda line: say({"notice": line}))
            if mode.spec.needs_costs:
                session.calibrated()
            runner = SessionRunner(session, mode, spec.config())  # type: ignore[assignment]
        say({"ready": True})
        for line in inp:
            request = json.loads(line)
            if request["op"] == "run":
                result = runner.run(request["tokens"], request["prompt_id"], request["round"])
                say({"result": asdict(result)})
            elif request["op"] == "margin":
                say({"margin": runner.margin(request["context"])})
            elif request["op"] == "explain":
                from specrun.bench_report import calibration_lines

                lines = calibration_lines(session) if session is not None and mode.spec.needs_costs else []
                link = session.target.measure_link() if session is not None else None
                say({"lines": lines, "link": link})
            else:
                break
        return 0
    except SpecrunError as e:
        say({"error": e.message, "hint": e.hint})
        return e.exit_code
    finally:
        for close in reversed(closers):
            close()


# --- the parent side ---------------------------------------------------------------------


class WorkerRunner:
    """One mode in a worker process inside a fresh cgroup limited to `limit` bytes; a `Runner`."""

    def __init__(self, spec: WorkerSpec, limit: int, notice: Callable[[str], None]) -> None:
        self.spec, self.mode, self.notice = spec, spec.mode, notice
        self.failed: str | None = None
        self.usage: Usage | None = None
        self.cgroup = ChildCgroup(limit)
        self._log = tempfile.TemporaryFile("w+")  # the worker's stderr: a traceback, if it has one
        self.proc = self.cgroup.popen([sys.executable, "-m", "specrun.bench_workers", json.dumps(asdict(spec))],
                                      stdin=-1, stdout=-1, stderr=self._log, text=True)
        self.refusal: tuple[str, str | None] | None = None  # (message, hint): its memory plan said no
        reply = self._read()
        if reply is not None and "error" in reply:
            self.refusal = (reply["error"], reply.get("hint"))
            self.failed = f"cannot run: {reply['error']}"

    def _read(self) -> dict[str, Any] | None:
        """The next reply, forwarding notices; None when the worker died (failed says how)."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            reply = json.loads(line)
            if "notice" in reply:
                self.notice(f"{self.mode}: {reply['notice']}")
                continue
            return reply
        code = self.proc.wait()
        usage = self.cgroup.usage()
        killed = code == -9 or bool(usage.oom_kills)
        self._log.seek(0)
        last = (self._log.read().strip().splitlines() or ["no message"])[-1]
        self.failed = "killed by the kernel: out of memory" if killed else f"exited with {code}: {last}"
        return None

    def _ask(self, request: dict[str, Any]) -> dict[str, Any] | None:
        if self.failed is not None:
            return None
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        return self._read()

    def run(self, tokens: list[int], prompt_id: str, rnd: int) -> RunResult:
        reply = self._ask({"op": "run", "tokens": tokens, "prompt_id": prompt_id, "round": rnd})
        if reply is None or "result" not in reply:
            return RunResult(prompt_id, rnd, self.mode, 0.0, 0, "", failed=self.failed or str(reply))
        return RunResult(**reply["result"])

    def margin(self, context: list[int]) -> float:
        reply = self._ask({"op": "margin", "context": context})
        return float(reply["margin"]) if reply and "margin" in reply else float("nan")

    def explain(self) -> tuple[list[str], float | None]:
        reply = self._ask({"op": "explain"})
        return (list(reply["lines"]), reply["link"]) if reply and "lines" in reply else ([], None)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=60)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        self.usage = self.cgroup.usage()
        self.cgroup.close()
        self._log.close()


def main() -> int:
    return serve(WorkerSpec(**json.loads(sys.argv[1])), sys.stdin, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
