"""Compute kernels of specrun's own engines, shipped as `specrun.kernels` (see README.md here).

Now: GGUF dequantization (`specrun.kernels.dequant`), with ggml's C routines on the CPU
and Triton on CUDA; and the CPU product of activations with GGUF-quantized matrices
through llama.cpp's own kernels (`specrun.kernels.ggml_matmul`), which streamed layers use. Each kernel comes with a slow, obviously right reference and a test
comparing the two."""
