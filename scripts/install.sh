#!/usr/bin/env bash
# Set up specrun in ./.venv (Python 3.11+), building llama-cpp-python with flags that work on this CPU.
#
#   bash scripts/install.sh                 # specrun and its runtime dependencies
#   bash scripts/install.sh --test          # plus the test dependencies
#   bash scripts/install.sh --torch         # plus the torch engine (flags combine: --test --torch)
#
# llama-cpp-python compiles llama.cpp from source (minutes). Build flags come from
# CMAKE_ARGS when you set it (for example CMAKE_ARGS="-DGGML_CUDA=on" for an NVIDIA
# GPU); otherwise a native CPU build, except on CPUs that advertise AMX, where
# llama.cpp's AMX path has crashed (a decode aborted in its AMX kernels) and the build targets
# the CPU's AVX/AVX-512 features without AMX. Either way a quick decode of a tiny
# quantized model proves the build before specrun is used; a build that fails it
# is rebuilt once with the portable flags. Every build includes llama.cpp's RPC backend
# (-DGGML_RPC=ON, a small socket client and server) so `specrun worker` and `--rpc` work.
#
# torch (--torch): PyPI's Linux wheel is the CUDA build, several GB with its NVIDIA
# libraries, worth fetching only where there is an NVIDIA GPU. So: a torch already
# installed is kept; with an NVIDIA GPU (nvidia-smi lists one), or on macOS, torch comes
# from PyPI; otherwise the CPU build (about 200 MB): the newest X+cpu build that pip's own
# configuration already offers (a local wheel folder, a mirror of PyTorch's CPU index),
# else from PyTorch's CPU index. TORCH_BUILD=cpu|cuda overrides the choice.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""  # comma-separated
for arg in "$@"; do
  case $arg in
    --test) extras="$extras,test" ;;
    --torch) extras="$extras,torch" ;;
    *) echo "install.sh: unknown option '$arg' (use --test, --torch)" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
LLAMA_VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
TORCH_MIN=$(sed -n 's/.*"torch>=\([0-9.]*\)".*/\1/p' pyproject.toml)
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

say() {  # to stderr, bold only on a terminal without NO_COLOR
  if [ -t 2 ] && [ -z "${NO_COLOR:-}" ]; then printf '\033[1m%s\033[0m\n' "$*" >&2; else printf '%s\n' "$*" >&2; fi
}

# Flags for the CPU's own vector extensions, never AMX.
portable_flags() {
  local flags="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DGGML_RPC=ON" cpu
  cpu=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
  for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C avx512f:AVX512 avx512_vnni:AVX512_VNNI \
              avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
    if grep -qw "${pair%%:*}" <<<"$cpu"; then flags+=" -DGGML_${pair##*:}=ON"; fi
  done
  echo "$flags"
}

# The installed torch's version ("" when none), read without importing torch.
torch_version() {
  .venv/bin/python -c 'from importlib.metadata import version; print(version("torch"))' 2>/dev/null || true
}

# Whether version $1 is at least $2 (public parts compared as numbers; "+cpu" and the like ignored).
at_least() {
  .venv/bin/python - "$1" "$2" <<'PY'
import sys
def parts(v): return tuple(int(p) for p in v.split("+")[0].split(".")[:3] if p.isdigit())
sys.exit(0 if parts(sys.argv[1]) >= parts(sys.argv[2]) else 1)
PY
}

# The newest torch CPU build (X+cpu) pip's configuration already offers for this Python, if any:
# `pip index versions` lists what the configured indexes and find-links hold, downloading no wheel.
offered_cpu_torch() {
  { "${PIP[@]}" index versions torch --json 2>/dev/null || true; } | .venv/bin/python -c '
import json, sys
def parts(v): return tuple(int(p) for p in v.split("+")[0].split(".")[:3] if p.isdigit())
try:
    versions = json.load(sys.stdin)["versions"]
except ValueError:
    sys.exit()
cpu = [v for v in versions if v.endswith("+cpu") and parts(v) >= parts(sys.argv[1])]
print(max(cpu, key=parts) if cpu else "")' "$TORCH_MIN"
}

install_torch() {
  local have want=${TORCH_BUILD:-auto} cpu
  have=$(torch_version)
  if [ -n "$have" ] && at_least "$have" "$TORCH_MIN"; then
    say "torch $have is installed; keeping it"
    return
  fi
  if [ "$want" = auto ]; then
    if [ "$(uname -s)" != Linux ]; then want=pypi
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then want=cuda
    else want=cpu; fi
  fi
  case $want in
    cuda|pypi)
      if [ "$want" = cuda ]; then
        say "NVIDIA GPU found: installing torch>=$TORCH_MIN from PyPI, the CUDA build (several GB with its NVIDIA libraries)"
      else
        say "installing torch>=$TORCH_MIN from PyPI (its macOS build, no CUDA libraries)"
      fi
      "${PIP[@]}" install -q "torch>=$TORCH_MIN"
      if [ "$want" = cuda ] && ! .venv/bin/python -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
        say "warning: pip chose torch $(torch_version), a build without CUDA (your pip configuration offers it);" \
            "for the GPU, reinstall torch from the CUDA index https://pytorch.org/get-started/locally/ names"
      fi ;;
    cpu)
      cpu=$(offered_cpu_torch)
      if [ -n "$cpu" ]; then
        say "no NVIDIA GPU: installing torch $cpu, the CPU build (about 200 MB) that pip's configuration offers"
        "${PIP[@]}" install -q "torch==$cpu"
      else
        say "no NVIDIA GPU: installing torch>=$TORCH_MIN, the CPU build (about 200 MB), from $TORCH_CPU_INDEX"
        "${PIP[@]}" install -q --index-url "$TORCH_CPU_INDEX" "torch>=$TORCH_MIN" || {
          say "could not install torch's CPU build from $TORCH_CPU_INDEX; TORCH_BUILD=cuda installs PyPI's CUDA build (several GB) instead"
          exit 1; }
      fi ;;
    *) say "TORCH_BUILD must be cpu or cuda, not '$want'"; exit 2 ;;  # (pypi: what auto picks on macOS)
  esac
}

if [ -n "${CMAKE_ARGS:-}" ]; then
  build_flags=$CMAKE_ARGS
  [[ $build_flags == *GGML_RPC* ]] || build_flags+=" -DGGML_RPC=ON"
elif grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
  build_flags=$(portable_flags)
else
  build_flags="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DGGML_RPC=ON"
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

# The pinned llama-cpp-python, built with the RPC backend (an older install, or a wheel pip
# built before and cached, may lack it).
llama_ready() {
  .venv/bin/python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_VERSION' or not llama_cpp.llama_supports_rpc())" 2>/dev/null
}
if ! llama_ready; then
  say "building llama-cpp-python $LLAMA_VERSION (CMAKE_ARGS=$build_flags); this takes a few minutes"
  CMAKE_ARGS="$build_flags" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc 2>/dev/null || echo 2) \
    "${PIP[@]}" install -q "llama-cpp-python==$LLAMA_VERSION"
  if ! llama_ready; then
    say "that llama-cpp-python has no RPC backend (a wheel pip built before); building it again"
    "${PIP[@]}" cache remove llama_cpp_python >/dev/null 2>&1 || true
    CMAKE_ARGS="$build_flags" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc 2>/dev/null || echo 2) \
      "${PIP[@]}" install -q --force-reinstall --no-deps "llama-cpp-python==$LLAMA_VERSION"
    llama_ready || say "warning: llama-cpp-python was built without its RPC backend (CMAKE_ARGS says so?): specrun worker and --rpc will not work"
  fi
fi
pin=""
if [[ ",$extras," == *,torch,* ]]; then
  install_torch
  pin="torch==$(torch_version)"  # the extra's other packages must not swap this build for another
fi
spec=.
[ -n "$extras" ] && spec=".[${extras#,}]"
"${PIP[@]}" install -q -e "$spec" $pin

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
