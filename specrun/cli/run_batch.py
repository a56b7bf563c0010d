"""`specrun run --batch FILE` and `run --samples K`: many sequences sharing the target's passes.

Prompts come one per line (text, or a JSON object with "prompt" or "messages");
results go to stdout as JSON lines in input order, each as soon as the ones
before it are done; progress and the summary go to stderr. Up to `--parallel`
sequences decode at once, each in a cache of its own; one that ends makes room
for the next prompt between passes (continuous batching).
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

from specrun.batched import BatchGeneration
from specrun.chat import ChatTemplate, Message, messages_of
from specrun.cli.console import echo, notice, sources_line
from specrun.cli.models import Resolved, use_corpus
from specrun.engines import Placement
from specrun.engines.base import Vocab
from specrun.errors import UsageError
from specrun.generate import Generation, GenerationConfig, GenerationStats, check_prompt
from specrun.sampling import SamplingConfig
from specrun.speculate.factory import MODEL_MODES, SpecConfig

FORMAT_HINT = 'each line is a prompt, or a JSON object with "prompt" (text) or "messages" (a chat)'


@dataclass(frozen=True)
class BatchItem:
    """One request of a batch: a completion of `prompt`, or a chat reply to `messages`."""

    prompt: str | None = None
    messages: tuple[Message, ...] | None = None


def read_batch(text: str) -> list[BatchItem]:
    """The requests in a batch file, in order (blank lines skipped); UsageError naming the line
    of the first bad one."""
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            items.append(BatchItem(prompt=line))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"line {number} of the batch is not valid JSON ({e.msg})", hint=FORMAT_HINT) from None
        items.append(_item(obj, number))
    if not items:
        raise UsageError("the batch has no prompts", hint=FORMAT_HINT)
    return items


def _item(obj: dict, number: int) -> BatchItem:
    prompt, messages = obj.get("prompt"), messages_of(obj.get("messages"))
    if isinstance(prompt, str) and prompt and obj.get("messages") is None:
        return BatchItem(prompt=prompt)
    if prompt is None and messages is not None:
        return BatchItem(messages=tuple(messages))
    raise UsageError(f'line {number} of the batch has neither a "prompt" string nor a "messages" list of '
                     '{"role", "content"} objects', hint=FORMAT_HINT)


@dataclass(frozen=True)
class BatchRun:
    """What `run --batch` / `--samples` was asked for."""

    items: tuple[BatchItem, ...]
    spec: SpecConfig
    target: Placement
    draft: Placement
    max_tokens: int
    sampling: SamplingConfig  # its seed, when set, is the first sequence's; sequence i draws with seed + i
    parallel: int  # sequences decoding at once
    ctx: int | None  # per sequence (--ctx)
    corpus: Path | None = None  # --corpus: what the suffix drafter reads beside each context


def check_batch_spec(spec: SpecConfig) -> None:
    """A batch plans each pass over its sequences' candidates: the free drafters', and auto's
    draft model's, drafted for all of them at once (chain and tree draft one sequence at a time)."""
    if spec.mode in MODEL_MODES:
        raise UsageError(f"--spec {spec.mode} drafts with the draft model alone, one sequence at a time; a batch "
                         "drafts with auto's sources", hint="use --spec auto or ngram with --batch and --samples")


def run_batch(models: Resolved, job: BatchRun) -> None:
    """Generate every item, `job.parallel` at a time sharing each pass; JSON lines on stdout."""
    longest = max(len((i.prompt or json.dumps(i.messages)).encode("utf-8", "replace")) for i in job.items)
    per_sequence = longest + 2 + job.max_tokens + 64  # bytes bound tokens; room for a tree at the end
    parallel = min(job.parallel, len(job.items))
    with models.session([job.spec], job.target, job.draft, ctx=None if job.ctx is None else job.ctx * parallel,
                        needed_ctx=per_sequence * parallel, batched=parallel) as session:
        engine = session.target
        n_each = job.ctx or max(session.n_ctx // parallel, 16)
        template = ChatTemplate.of_model(models.target, engine.vocab) if any(i.messages for i in job.items) else None
        prompts = [_tokens(engine.vocab, template, item) for item in job.items]
        for tokens in prompts:
            check_prompt(tokens, n_each)
        session.open(n_each)
        use_corpus(session, job.corpus, models.store)
        speculate = job.spec.mode != "none"
        if speculate:
            session.speculator(job.spec)  # measures the cost curve first, if this machine has none
        cost = session.calibration.cost if session.calibration is not None else None
        batch = BatchGeneration(engine, [], max(session.plan.tree_nodes, 1), cost)
        queue, owner, done = deque(range(len(prompts))), {}, {}
        shown, t0 = 0, time.perf_counter()
        try:
            while queue or batch.active:
                joining = [queue.popleft() for _ in range(min(len(queue), parallel - len(batch.active)))]
                started = time.perf_counter()
                gens = [session.sequence(prompts[k], GenerationConfig(job.max_tokens, _sampling(job.sampling, k)),
                                         job.spec, n_each) for k in joining]
                for k, (index, _) in zip(joining, batch.join_many(gens)):  # their prefills share passes
                    owner[index] = (k, started)
                batch.step()
                for index in [i for i in owner if i not in batch.active]:  # ended in this pass
                    k, started = owner.pop(index)
                    g = batch.generations[index]
                    done[k] = _result(k, g, time.perf_counter() - started)
                    session.sequence_ended(g)
                    notice(f"{len(done) + shown}/{len(prompts)} done")
                while shown in done:  # in input order, each as soon as those before it are out
                    echo(json.dumps(done.pop(shown)))
                    shown += 1
        finally:
            session.save()
        _summary(batch, time.perf_counter() - t0)


def _sampling(sampling: SamplingConfig, k: int) -> SamplingConfig:
    """Item k's: a seed, when given, plus k (samples of one prompt differ; a rerun repeats them)."""
    return sampling if sampling.seed is None else replace(sampling, seed=sampling.seed + k)


def _tokens(vocab: Vocab, template: ChatTemplate | None, item: BatchItem) -> list[int]:
    if item.messages is None:
        assert item.prompt is not None
        return vocab.tokenize(item.prompt, parse_special=False)  # the user's text is text
    assert template is not None
    return template.tokens(list(item.messages), vocab)


def _result(k: int, g: Generation, latency_s: float) -> dict:
    s = g.stats
    return {"index": k, "text": g.text, "prompt_tokens": s.prompt_tokens, "generated_tokens": s.generated_tokens,
            "stop_reason": s.stop_reason, "latency_s": round(latency_s, 4),
            "tokens_per_call": round(s.tokens_per_call, 3)}


def _summary(batch: BatchGeneration, wall_s: float) -> None:
    tokens = sum(g.stats.generated_tokens for g in batch.generations.values())
    st = batch.stats
    notice(f"{st.sequences} sequences, {tokens} tokens in {wall_s:.1f} s ({tokens / max(wall_s, 1e-9):.1f} tok/s "
           f"over all); {st.passes} shared passes, {st.nodes_per_pass:.1f} nodes a pass; prefill {st.prefill_s:.1f} "
           f"s, decoding {st.decode_s:.1f} s")
    total = GenerationStats()
    for g in batch.generations.values():
        total.add(g.stats)
    if (line := sources_line(total)) is not None:
        notice(line)
