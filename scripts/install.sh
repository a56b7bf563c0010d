#!/usr/bin/env bash
# Set up specrun in ./.venv (Python 3.11+), building llama-cpp-python with flags that work on this CPU.
#
#   bash scripts/install.sh          # specrun and its runtime dependencies
#   bash scripts/install.sh --test   # plus the test dependencies
#
# llama-cpp-python compiles llama.cpp from source (minutes). Build flags come from
# CMAKE_ARGS when you set it (for example CMAKE_ARGS="-DGGML_CUDA=on" for an NVIDIA
# GPU); otherwise a native CPU build, except on CPUs that advertise AMX, where
# llama.cpp's AMX path has crashed (see shared/PLATFORM.md) and the build targets
# the CPU's AVX/AVX-512 features without AMX. Either way a quick decode of a tiny
# quantized model proves the build before specrun is used; a build that fails it
# is rebuilt once with the portable flags.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
PYTHON=${PYTHON:-python3}
LLAMA_VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)

say() {  # to stderr, bold only on a terminal without NO_COLOR
  if [ -t 2 ] && [ -z "${NO_COLOR:-}" ]; then printf '\033[1m%s\033[0m\n' "$*" >&2; else printf '%s\n' "$*" >&2; fi
}

# Flags for the CPU's own vector extensions, never AMX.
portable_flags() {
  local flags="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" cpu
  cpu=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
  for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C avx512f:AVX512 avx512_vnni:AVX512_VNNI \
              avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
    if grep -qw "${pair%%:*}" <<<"$cpu"; then flags+=" -DGGML_${pair##*:}=ON"; fi
  done
  echo "$flags"
}

if [ -n "${CMAKE_ARGS:-}" ]; then
  build_flags=$CMAKE_ARGS
elif grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
  build_flags=$(portable_flags)
else
  build_flags="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF"
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

if ! .venv/bin/python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_VERSION')" 2>/dev/null; then
  say "building llama-cpp-python $LLAMA_VERSION (CMAKE_ARGS=$build_flags); this takes a few minutes"
  CMAKE_ARGS="$build_flags" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc 2>/dev/null || echo 2) \
    "${PIP[@]}" install -q "llama-cpp-python==$LLAMA_VERSION"
fi
"${PIP[@]}" install -q -e ".$extras"

if ! .venv/bin/python tests/tiny_model.py --smoke; then
  # pip reuses a cached wheel whatever CMAKE_ARGS says, so rebuild without the cache.
  build_flags=$(portable_flags)
  say "this llama-cpp-python build cannot decode here; rebuilding with CMAKE_ARGS=$build_flags"
  "${PIP[@]}" cache remove llama_cpp_python >/dev/null 2>&1 || true
  CMAKE_ARGS="$build_flags" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc 2>/dev/null || echo 2) \
    "${PIP[@]}" install -q --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==$LLAMA_VERSION"
  .venv/bin/python tests/tiny_model.py --smoke || { say "llama-cpp-python still fails its smoke test"; exit 1; }
fi
say "specrun is installed: .venv/bin/specrun"
