"""Speculative decoding logic: draft trees, drafters, verification, planning. Pure logic, no I/O.

`base` (the Speculator and Drafter roles), `tree` (flat-array draft trees),
`verify` (the exact acceptance walk), `ngram` (prompt lookup), `draft_model`
(SpecExec-style trees from a smaller model), `planner` (what pays to verify),
`auto` (choosing a drafter per step), `factory` (modes and SpecConfig).
"""
