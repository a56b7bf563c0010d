#!/usr/bin/env bash
# On a GPU machine without specrun installed (the device tool's machine): carried wheels in
# .whl/, then the torch engine's CUDA tests and timings. Output under $OUT when set.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
[ -e specrun/kernels ] || ln -s ../kernels specrun/kernels  # the wheel's package-dir mapping
nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 tests/tiny_model.py --smoke && echo "llama.cpp smoke ok"
python3 -m pytest -q -p no:cacheprovider tests/test_engine_contract.py tests/test_engine_torch.py 2>&1 | tail -8
python3 -m pytest -q -p no:cacheprovider tests/test_kernels_dequant.py -k cuda 2>&1 | tail -3
python3 - <<'PY'
from pathlib import Path
from tests.tiny_model import TinySpec, build_tiny_model, quantize_model
import llama_cpp
spec = TinySpec(arch="qwen2", n_embd=1536, n_ff=8960, n_layers=28, n_head=12, n_head_kv=2, tied=True, scale=1.0)
f32 = build_tiny_model(Path("/tmp/q15.gguf"), spec)
quantize_model(f32, Path("/tmp/q15-q4km.gguf"), llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)
PY
python3 scripts/cost_curve.py /tmp/q15-q4km.gguf --engine torch --device cuda --max 1024
