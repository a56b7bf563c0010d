"""Speculative decoding logic: draft trees, drafters, verification, planning. Pure logic, no I/O.

`base` (the Speculator and Drafter roles), `tree` (flat-array draft trees),
`verify` (the exact acceptance walk); the drafters: `ngram` (prompt lookup),
`suffix` (suffix matches over the text, earlier replies, a corpus), `recycle`
(the target's recycled top-k), `draft_model` (SpecExec-style trees from a
smaller model); `merge` (one tree from every drafter), `planner` (cost curves,
acceptance, what pays to verify), `planned` (the speculator that drafts,
merges and plans), `auto` (the gate on the draft model), `factory` (modes and
SpecConfig).
"""
