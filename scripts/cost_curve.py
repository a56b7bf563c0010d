"""One engine's cost curve and plain decoding speed on this machine, for comparing engines.

    .venv/bin/python scripts/cost_curve.py MODEL.gguf --engine torch [--device cuda] [--max 256]
    .venv/bin/python scripts/cost_curve.py BIG.gguf --offload disk --max 128 --plain 0

Times one pass over n tokens (a chain of n tree nodes after a 64-token prefix,
as `specrun calibrate` does) for n = 1, 2, 4, ... up to --max, the fastest of
--reps, then greedy plain decoding of --plain tokens. llama.cpp verifies at
most 255 nodes a pass, so its largest size is 255. With --offload disk the
torch engine streams the file (all of it each pass unless --ram keeps layers);
the table then gives a pass against reading its bytes alone. Output: a table
on stdout, then the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from specrun.calibrate import context_needed, measure_cost_curve
from specrun.cli.options import parse_size
from specrun.engines import Placement, open_engine
from specrun.speculate.planner import CostCurve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--engine", default="torch", choices=("torch", "llama.cpp"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--offload", default="none", choices=("none", "disk", "ram"))
    parser.add_argument("--ram", default=None, help="RAM for streamed layers' buffers and resident layers (e.g. 2G)")
    parser.add_argument("--plain", type=int, default=64, help="tokens of plain decoding to time (0: none)")
    parser.add_argument("--forecast", type=Path, default=None,
                        help="a `specrun bench --json` report with tree:BxD rows (the real pair's): forecast tok/s")
    args = parser.parse_args()
    limit = min(args.max, 255) if args.engine == "llama.cpp" else args.max
    sizes = sorted({min(2 ** i, limit) for i in range(12) if 2 ** i <= 2 * limit})
    ram = parse_size(args.ram, "--ram")
    engine = open_engine(args.model, Placement(threads=args.threads, engine=args.engine, device=args.device,
                                               offload=args.offload, ram=ram), max_tree_nodes=limit)
    cache = engine.new_cache(context_needed(tuple(sizes)))
    print(engine.settings_key())
    curve = measure_cost_curve(engine, cache, tuple(sizes), reps=args.reps)
    one = curve.seconds[0]
    transfer = engine.transfer()
    link = engine.measure_link() if transfer is not None else None
    read = transfer.bytes_per_pass / link if transfer is not None and link else None
    print(f"{'tokens':>6} {'ms':>9} {'x one':>7}" + ("  x reading alone" if read else ""))
    for n, s in zip(curve.sizes, curve.seconds):
        print(f"{n:>6} {s * 1000:>9.1f} {s / one:>7.2f}" + (f"  {s / read:>16.2f}" if read else ""))
    if transfer is not None and link:
        print(f"streamed {transfer.bytes_per_pass / 1e9:.2f} GB a pass; reading it alone takes {read:.2f} s "
              f"({link / 1e9:.2f} GB/s)")
    if args.plain:
        engine.rewind(cache, 0)
        logits = engine.eval(cache, engine.vocab.tokenize("def fibonacci(n):"))
        start = time.perf_counter()
        for _ in range(args.plain):
            logits = engine.eval(cache, [logits.argmax(0)])
        print(f"plain decoding: {args.plain / (time.perf_counter() - start):.2f} tokens/s")
    engine.close()
    if args.forecast is not None:
        forecast(curve, json.loads(args.forecast.read_text()))
    print(f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB")


def forecast(curve: CostCurve, report: dict) -> None:
    """Tokens per second this model would give with the trees a bench measured on another (the
    real pair): for each fixed tree of B nodes, the tokens its passes produced over a pass of
    this curve plus the drafting those steps waited for there (the same draft model drafts,
    whatever the target's size). Acceptance does not depend on the target's size only if the
    draft is as good a guess for it: a forecast, not a measurement."""
    rows = []
    for mode in report["modes"]:
        if not mode["mode"].startswith("tree:") or not mode["tokens_per_call"]:
            continue
        runs = [r for r in report["runs"] if r["mode"] == mode["mode"] and r["target_calls"]]
        passes = sum(len(r["tree_sizes"]) for r in runs)
        drafting = sum(r["draft_s"] for r in runs) / passes if passes else 0.0  # waited for, per step
        per_pass = sum(sum(r["accepted_lengths"]) + len(r["accepted_lengths"]) for r in runs) / passes
        nodes = round(mode["mean_tree"])
        rows.append((mode["mode"], nodes, per_pass, curve.cost(nodes), drafting))
    print(f"{'trees':>11} {'nodes':>5} {'tokens/pass':>11} {'pass s':>7} {'drafting s':>10} {'tok/s':>6}")
    for name, nodes, per_pass, pass_s, drafting in rows:
        print(f"{name:>11} {nodes:>5} {per_pass:>11.2f} {pass_s:>7.2f} {drafting:>10.3f} "
              f"{per_pass / (pass_s + drafting):>6.2f}")
    best = max(rows, key=lambda r: r[2] / (r[3] + r[4]), default=None)
    if best is not None:
        print(f"forecast: {best[2] / (best[3] + best[4]):.2f} tok/s with {best[0]} trees, against plain "
              f"{1 / curve.cost(1):.2f} tok/s ({best[2] / (best[3] + best[4]) * curve.cost(1):.1f}x)")


if __name__ == "__main__":
    main()
