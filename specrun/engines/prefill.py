"""How several prompts' prefills share passes (`Engine.sync_many`): the tokens each cache still
needs, packed into passes of at most a backend's chunk, every prompt's last token in the
final pass, where its logits are read."""

from __future__ import annotations

from typing import Sequence

Span = tuple[int, int, int]  # (request, start, stop): tokens [start, stop) of that request's remaining ones


def prefill_passes(lengths: Sequence[int], per_pass: int) -> list[list[Span]]:
    """Passes, each a list of spans, that evaluate `lengths[i]` tokens of request i (each >= 1)
    in order: one pass when all fit, else every token but each request's last packed into full
    passes, then a pass of the last tokens (read: their logits)."""
    if any(n < 1 for n in lengths):
        raise ValueError("a prefill of no tokens")
    if len(lengths) > per_pass:
        raise ValueError(f"{len(lengths)} prompts cannot end in one pass of {per_pass} tokens")
    if sum(lengths) <= per_pass:
        return [[(i, 0, n) for i, n in enumerate(lengths)]]
    passes: list[list[Span]] = []
    current: list[Span] = []
    room = per_pass
    for i, n in enumerate(lengths):
        start = 0
        while start < n - 1:
            stop = min(n - 1, start + room)
            current.append((i, start, stop))
            room -= stop - start
            start = stop
            if room == 0:
                passes.append(current)
                current, room = [], per_pass
    if current:
        passes.append(current)
    return passes + [[(i, n - 1, n) for i, n in enumerate(lengths)]]
