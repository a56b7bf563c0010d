"""Compute kernels of specrun's own engines, shipped as `specrun.kernels` (see README.md here).

Each kernel comes with a slow, obviously right reference and a test comparing the two."""
