"""Speculative decoding logic: draft trees, drafters, verification. Pure logic, no I/O."""
