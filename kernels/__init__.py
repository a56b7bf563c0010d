"""Compute kernels of specrun's own engines, shipped as `specrun.kernels` (see README.md here).

Now: GGUF dequantization (`specrun.kernels.dequant`), with ggml's C routines on the CPU
and Triton on CUDA. Each kernel comes with a slow, obviously right reference and a test
comparing the two."""
