"""`specrun bench --plot`: speed-up per mode and how many drafted tokens each call accepted.

matplotlib is an optional extra (`pip install 'specrun[plot]'`); only this module imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from specrun.bench_report import ModeSummary


def plot_bench(summaries: Sequence[ModeSummary], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [s.label for s in summaries]
    medians = [s.speedup for s in summaries]
    below = [s.speedup - s.speedup_min for s in summaries]
    above = [s.speedup_max - s.speedup for s in summaries]
    left.barh(labels, medians, xerr=[below, above], color="#4c72b0", capsize=3)
    left.axvline(1.0, color="black", linewidth=0.8)
    left.invert_yaxis()
    left.set_xlabel("speed-up over plain decoding (median, min-max)")

    spec = [s for s in summaries if s.accepted_histogram and s.mode != "plain"]
    longest = max((max(s.accepted_histogram) for s in spec), default=0)
    width = 0.8 / max(len(spec), 1)
    for i, s in enumerate(spec):
        total = sum(s.accepted_histogram.values())
        xs = [k + i * width for k in range(longest + 1)]
        right.bar(xs, [s.accepted_histogram.get(k, 0) / total for k in range(longest + 1)], width, label=s.label)
    right.set_xlabel("drafted tokens accepted per target call")
    right.set_ylabel("share of calls")
    if spec:
        right.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
