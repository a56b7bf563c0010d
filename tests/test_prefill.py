"""Several prompts' prefills packed into shared passes (engines/prefill.py)."""

from __future__ import annotations

import random

import pytest

from specrun.engines.prefill import prefill_passes


@pytest.mark.parametrize("seed", range(30))
def test_every_token_once_in_order_and_every_last_token_in_the_final_pass(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 6))]
    per_pass = rng.randint(len(lengths), 64)
    passes = prefill_passes(lengths, per_pass)
    assert all(sum(stop - start for _, start, stop in p) <= per_pass for p in passes)
    seen: dict[int, int] = {i: 0 for i in range(len(lengths))}
    for p in passes:
        for i, start, stop in p:
            assert start == seen[i] and stop > start  # each request's tokens in order, none twice
            seen[i] = stop
    assert seen == dict(enumerate(lengths))
    assert {(i, stop) for i, _, stop in passes[-1]} == {(i, n) for i, n in enumerate(lengths)}
    if sum(lengths) <= per_pass:
        assert len(passes) == 1


def test_impossible_requests_are_refused() -> None:
    with pytest.raises(ValueError):
        prefill_passes([3, 0], 8)
    with pytest.raises(ValueError):
        prefill_passes([2] * 5, 4)
