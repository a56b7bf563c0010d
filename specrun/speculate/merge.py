"""One tree from every drafter: the union of their tries, each node priced at its best.

Drafters find candidates in different ways (prompt lookup, a suffix index, the
target's recycled top-k, a draft model) and each is right at its own rate,
learnt per key. A pass verifies one tree, so their trees are merged: a
node is a path of tokens from the root, whoever proposed it, and it keeps every
proposer's key, so each drafter learns from the nodes it proposed, apart for
each company it proposed them in (`mark_company`). Its chance of acceptance
given its parent's is the best of its proposers' rates. The planner then keeps
the likeliest nodes the cost curve pays for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from specrun.speculate.base import Draft, Proposers
from specrun.speculate.acceptance import AcceptanceStats
from specrun.speculate.tree import DraftTree


@dataclass(frozen=True)
class Merged:
    tree: DraftTree
    proposers: list[Proposers]  # per node: (source, key) of every drafter that proposed it; () for the root
    prepared: list[bool]  # per node: some proposer found it during the previous pass


def merge(drafts: Sequence[tuple[str, Draft]]) -> Merged:
    """The union of the drafts' trees (all rooted at the same token), in the order the drafts
    come: a node first proposed by a later draft is appended after the earlier drafts' nodes."""
    if not drafts:
        raise ValueError("nothing to merge")
    root = drafts[0][1].tree.tokens[0]
    tree, proposers, prepared = DraftTree.rooted(root), [()], [False]
    for source, draft in drafts:
        if draft.tree.tokens[0] != root:
            raise ValueError(f"{source} drafted below {draft.tree.tokens[0]}, not the root {root}")
        where = [0] * len(draft.tree)  # its node -> the merged node
        for i in range(1, len(draft.tree)):
            parent = where[draft.tree.parents[i]]
            node = tree.child(parent, draft.tree.tokens[i])
            if node is None:
                if draft.keys[i] is None:
                    raise ValueError(f"{source} carried a node no draft proposed")
                node = tree.add(draft.tree.tokens[i], parent)
                proposers.append(())
                prepared.append(False)
            where[i] = node
            if draft.keys[i] is not None:  # None: a node another draft proposed, carried to hang nodes below
                proposers[node] = proposers[node] + ((source, draft.keys[i]),)
            prepared[node] = prepared[node] or (i < len(draft.prepared) and bool(draft.prepared[i]))
    return Merged(tree, proposers, prepared)


PASSED_OVER = "passed over"


def mark_passed_over(merged: Merged, source: str) -> Merged:
    """The merged tree with every node that `source` passed over marked in its proposers' keys:
    a node `source` did not propose below a node it grew children under (it looked there and
    chose other tokens). A draft model's top guesses hold most of what cheap drafters get
    right, so what they propose beside them is right less often than their own rate says: on
    a disk-streamed target, adding them to the model's trees grew them from 13 to 20 nodes a
    pass for no more tokens. The keys get PASSED_OVER appended, so those nodes learn their
    own rate and fall back to the plain key's while few were tested."""
    parents, proposers = merged.tree.parents, list(merged.proposers)
    its = [any(s == source for s, _ in p) for p in proposers]  # node i: `source` proposed it
    grew = {parents[i] for i in range(1, len(proposers)) if its[i]}
    for i in range(1, len(proposers)):
        if parents[i] in grew and not its[i]:
            proposers[i] = tuple((s, (*k, PASSED_OVER) if isinstance(k, tuple) else (k, PASSED_OVER))
                                 for s, k in proposers[i])
    return Merged(merged.tree, proposers, merged.prepared)


def company(source: str, sources: Sequence[str]) -> str:
    """The key part that says which other drafters proposed a node beside `source`."""
    others = sorted(set(sources) - {source})
    return "with " + "+".join(others) if others else "alone"


def mark_company(merged: Merged) -> Merged:
    """The merged tree with every proposer's key extended by the drafters that proposed the node
    beside it (`company`). Cheap drafters agree where the text repeats, and their nodes are right
    far more often there than alone: on a disk-streamed target a recycled guess proposed alone
    was right 15% of the time and one that prompt lookup and the suffix index proposed too 42%,
    so a key learnt over both priced the lone ones at 25%; and lookup and the suffix index,
    which see the same text, agreeing is not two signs (such nodes priced at 40% were right
    20% of the time). Each company learns its own rate, falling back to the plain key's while
    few were tested."""
    proposers = list(merged.proposers)
    for i in range(1, len(proposers)):
        names = [s for s, _ in proposers[i]]
        proposers[i] = tuple((s, (*k, company(s, names)) if isinstance(k, tuple) else k)  # (a plain key has no
                             for s, k in proposers[i])  # coarser one to fall back to: kept as it is)
    return Merged(merged.tree, proposers, merged.prepared)


def rate_of(proposers: Proposers, stats: Mapping[str, AcceptanceStats], sure: bool = False) -> float:
    """P(accepted | parent accepted): the best of its proposers' learnt rates (`sure`: of the
    rates their evidence stands behind, AcceptanceStats.rate)."""
    return max(stats[source].rate(key, sure) for source, key in proposers)


def chances(tree: DraftTree, proposers: Sequence[Proposers], stats: Mapping[str, AcceptanceStats],
            sure: bool = False) -> list[float]:
    """P(node accepted) for every node: 1 for the root, its parent's chance times its rate
    (`sure`: the rate the evidence stands behind, AcceptanceStats.rate)."""
    out = [1.0] * len(tree)
    for i in range(1, len(tree)):
        out[i] = out[tree.parents[i]] * rate_of(proposers[i], stats, sure)
    return out


def single(source: str, draft: Draft) -> list[Proposers]:
    """The proposers of a draft standing alone."""
    return [()] + [((source, key),) for key in list(draft.keys)[1:]]


def counts(proposers: Sequence[Proposers], path: Sequence[int]) -> dict[str, tuple[int, int]]:
    """Per source: (nodes it proposed in the verified tree, of them accepted on `path`)."""
    accepted = set(path)
    out: dict[str, list[int]] = {}
    for i in range(1, len(proposers)):
        for source in {s for s, _ in proposers[i]}:
            c = out.setdefault(source, [0, 0])
            c[0] += 1
            c[1] += i in accepted
    return {s: (v, a) for s, (v, a) in out.items()}

