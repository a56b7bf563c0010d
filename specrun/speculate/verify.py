"""Exact verification of a draft tree against the target's logits.

The rule (SpecExec's): starting at the root, draw the next token from the
*target's* distribution at the current node, exactly as plain decoding would
(same sampler, same random stream). If a child of the node holds that token,
move to the child and repeat; otherwise stop: the drawn token is the first
token after the accepted path (the "bonus" token).

Why the output distribution is the target's: every emitted token is a draw
from the target's distribution conditioned on exactly the tokens before it, in
the same order plain decoding draws them; the draft only decides how many of
those conditionals were computed in the same forward pass. A wrong draft costs
time, never correctness. With the same seed, speculative and plain decoding
therefore emit the same tokens, up to float differences between a batched and
a single-token forward pass: a token's logits computed inside a batch can differ
slightly from the same token's computed alone (llama.cpp's do), which can flip a
near-tie between the two likeliest tokens. Greedy is the temperature-0 case: the
draw is the argmax.
"""

from __future__ import annotations

from typing import Callable

from specrun.engines.base import Logits
from specrun.speculate.tree import DraftTree

Draw = Callable[[Logits, int], int]  # (logits, row) -> the token drawn from that row


def walk(tree: DraftTree, logits: Logits, draw: Draw) -> tuple[list[int], int]:
    """(accepted path of node indices, root first; the next token) for the tree's logits
    [n, vocab]. Reads only the rows along the path: depth + 1 of them at most."""
    node, path = 0, [0]
    while True:
        token = draw(logits, node)
        child = tree.child(node, token)
        if child is None:
            return path, token
        path.append(child)
        node = child
