"""One engine's cost curve and plain decoding speed on this machine, for comparing engines.

    .venv/bin/python scripts/cost_curve.py MODEL.gguf --engine torch [--device cuda] [--max 256]

Times one pass over n tokens (a chain of n tree nodes after a 64-token prefix,
as `specrun calibrate` does) for n = 1, 2, 4, ... up to --max, median of
--reps, then greedy plain decoding of 64 tokens. llama.cpp verifies at most
255 nodes a pass, so its largest size is 255. Output: a table on stdout.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from specrun.calibrate import context_needed, measure_cost_curve
from specrun.engines import Placement, open_engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--engine", default="torch", choices=("torch", "llama.cpp"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    limit = min(args.max, 255) if args.engine == "llama.cpp" else args.max
    sizes = sorted({min(2 ** i, limit) for i in range(12) if 2 ** i <= 2 * limit})
    engine = open_engine(args.model, Placement(threads=args.threads, engine=args.engine, device=args.device),
                         max_tree_nodes=limit)
    engine.open(context_needed(tuple(sizes)))
    print(engine.settings_key())
    curve = measure_cost_curve(engine, tuple(sizes), reps=args.reps)
    one = curve.seconds[0]
    print(f"{'tokens':>6} {'ms':>9} {'x one':>7}")
    for n, s in zip(curve.sizes, curve.seconds):
        print(f"{n:>6} {s * 1000:>9.1f} {s / one:>7.2f}")
    engine.rewind(0)
    logits = engine.eval(engine.vocab.tokenize("def fibonacci(n):"))
    start = time.perf_counter()
    for _ in range(64):
        logits = engine.eval([logits.argmax(0)])
    print(f"plain decoding: {64 / (time.perf_counter() - start):.1f} tokens/s")
    engine.close()


if __name__ == "__main__":
    main()
