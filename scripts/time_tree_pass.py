"""Time one verification of a large draft tree on a real target: the pass, and the pass plus the
greedy walk over its logits. A tree's logits stay in the engine; the walk reads only the rows on
its path, so the two times should differ by little.

    .venv/bin/python scripts/time_tree_pass.py MODEL.gguf [--nodes 255] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from specrun.engines import Placement, open_engine
from specrun.speculate.tree import DraftTree
from specrun.speculate.verify import walk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--nodes", type=int, default=255)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    engine = open_engine(args.model, Placement(threads=args.threads), max_tree_nodes=args.nodes)
    cache = engine.new_cache(4096)
    prefix = engine.vocab.tokenize('def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n' * 3)
    engine.eval(cache, prefix)
    rng = np.random.default_rng(0)
    tree = DraftTree.rooted(prefix[-1])
    while len(tree) < args.nodes:  # a random tree: the pass costs the same whatever its shape
        tree.add(int(rng.integers(1000, 20000)), int(rng.integers(len(tree))))
    passes, walks = [], []
    for _ in range(args.reps + 1):  # the first is a warm-up
        t = time.perf_counter()
        logits = engine.eval_tree(cache, tree.tokens, tree.parents, tree.depths)
        t_pass = time.perf_counter()
        walk(tree, logits, lambda rows, i: rows.argmax(i))
        t_walk = time.perf_counter()
        engine.commit_path(cache, [])
        passes.append(t_pass - t)
        walks.append(t_walk - t)
    print(f"{args.nodes}-node tree, {len(prefix)} cached tokens, median of {args.reps} after a warm-up: "
          f"eval_tree {statistics.median(passes[1:]) * 1000:.0f} ms, eval_tree + walk "
          f"{statistics.median(walks[1:]) * 1000:.0f} ms")
    engine.close()


if __name__ == "__main__":
    main()
