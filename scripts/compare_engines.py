"""Greedy output of the torch engine against llama.cpp's on the same GGUF file, prompt by prompt.

    .venv/bin/python scripts/compare_engines.py MODEL.gguf [--prompts 10] [--tokens 64] [--dtype bfloat16]

Both engines decode the first N HumanEval prompts (the ones `specrun bench`
uses) greedily. For each prompt: the first position where their tokens
differ, and there the top-2 logit margin of each engine (a near-tie, where
either engine's rounding may pick the other token, has a margin near 0).
Also the plain decoding speed of each engine. Output: a table on stdout.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from specrun.engines.llamacpp import LlamaCppConfig, LlamaCppEngine
from specrun.engines.torch_engine import TorchConfig, TorchEngine
from specrun.workloads import load_workload


def margin(row: np.ndarray) -> float:
    top = np.sort(row)[-2:]
    return float(top[1] - top[0])


def greedy(engine, cache, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray], float]:
    """Tokens, the logits row before each, and decode tokens/s (after the prompt)."""
    engine.rewind(cache, 0)
    logits = engine.eval(cache, prompt)
    tokens, rows = [], []
    start = time.perf_counter()
    for _ in range(n):
        row = logits.row(0)
        tokens.append(int(np.argmax(row)))
        rows.append(row)
        logits = engine.eval(cache, [tokens[-1]])
    return tokens, rows, n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dtype", default=None, help="the torch engine's compute dtype (default: its own choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    ref = LlamaCppEngine(args.model, LlamaCppConfig(n_threads=args.threads, n_gpu_layers=0))
    ours = TorchEngine(args.model, TorchConfig(device=args.device, dtype=args.dtype, threads=args.threads))
    ref_cache, our_cache = ref.new_cache(2048), ours.new_cache(2048)
    print(f"torch engine: {ours.settings_key()}")
    print(f"{'prompt':<14} {'first diff':>10} {'llama.cpp margin':>17} {'torch margin':>13} "
          f"{'llama.cpp tok/s':>16} {'torch tok/s':>12}")
    same = 0
    for p in load_workload("humaneval", args.prompts):
        prompt = ref.vocab.tokenize(p.text or "", add_special=False)
        a, rows_a, speed_a = greedy(ref, ref_cache, prompt, args.tokens)
        b, rows_b, speed_b = greedy(ours, our_cache, prompt, args.tokens)
        diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if diff is None:
            same += 1
            print(f"{p.id:<14} {'-':>10} {'':>17} {'':>13} {speed_a:>16.1f} {speed_b:>12.1f}")
        else:
            print(f"{p.id:<14} {diff:>10} {margin(rows_a[diff]):>17.3f} {margin(rows_b[diff]):>13.3f} "
                  f"{speed_a:>16.1f} {speed_b:>12.1f}")
    print(f"identical for all {args.tokens} tokens: {same} of {args.prompts}")
    ref.close()
    ours.close()


if __name__ == "__main__":
    main()
