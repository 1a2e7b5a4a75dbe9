#!/usr/bin/env bash
# The GPU table in one call of the device tool (one GPU, no network, the repo's working tree copied, files under
# $OUT sent back). Prepare here, with network:
#
#   bash scripts/prepare_device_wheels.sh      # the wheels the device image lacks (trl, datasets, ...) into .whl/
#
# then the device tool's run with carry: [".whl"], timeout_s: 560, command: bash scripts/gpu_report_on_device.sh
#
# On the device: installs .whl/*.whl and this project (--no-deps, offline) into $FIPO_DEVICE_SITE (/tmp/site) and
# puts it on PYTHONPATH, runs benchmarks/gpu_report.py --out $OUT --budget_s 420, then, while time is left, the
# compiled-kernel and bf16 checks of examples/gpu_smoke_test.py. Writes to $OUT: setup.log (install and versions),
# gpu_report.log, gpu_<device>.md and .json (the report), smoke_test.log, summary.txt.
# Exit status: gpu_report.py's when it fails (2: no CUDA device), else 4 when a section of the report recorded an
# error, else 3 when a smoke check failed, else 0.
# Before it installs anything it refuses, with one line, when OUT is unset or .whl/ lacks the wheels.
#
# Overrides (for a local dry run): PYTHON (python3), FIPO_DEVICE_SITE (/tmp/site), FIPO_DEVICE_BUDGET_S (540: the
# whole script, within the tool's timeout_s of 560), FIPO_REPORT_BUDGET_S (420), FIPO_SMOKE_CHECKS ("kernel bf16").
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
PYTHON="${PYTHON:-python3}"
SITE="${FIPO_DEVICE_SITE:-/tmp/site}"
BUDGET_S="${FIPO_DEVICE_BUDGET_S:-540}"
REPORT_BUDGET_S="${FIPO_REPORT_BUDGET_S:-420}"
SMOKE_CHECKS="${FIPO_SMOKE_CHECKS:-kernel bf16}"
SMOKE_MIN_S=75  # a smoke check starts only with this much of BUDGET_S left (a check takes ~30-60 s)

refuse() {
    echo "gpu_report_on_device: refusing: $*" >&2
    exit 1
}

# --- checks first: nothing is installed or run before these pass -----------------------------------------------------
[ -n "${OUT:-}" ] || refuse "OUT is not set. The device tool sets \$OUT (the folder whose files come back); for a" \
    "local dry run: OUT=/tmp/gpu-out bash scripts/gpu_report_on_device.sh"
[ -d .whl ] || refuse "no .whl/ folder in $(pwd). Run 'bash scripts/prepare_device_wheels.sh' where there is" \
    "network, then pass carry: [\".whl\"] to the device tool (.whl/ is git-ignored: it travels only when carried)."
for package in trl datasets; do
    compgen -G ".whl/$package-*.whl" > /dev/null || refuse "no $package wheel in .whl/: run" \
        "'bash scripts/prepare_device_wheels.sh' again and carry .whl"
done
command -v "$PYTHON" > /dev/null || refuse "no $PYTHON on PATH"
mkdir -p "$OUT"

export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # no network: never wait on the Hub

# --- install: the carried wheels and this project, no dependency resolution, no index --------------------------------
set +e
{
    echo "installing $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')and fipo_trl into $SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation --upgrade \
        --target "$SITE" .whl/*.whl .
} 2>&1 | tee "$OUT/setup.log"
install_status=${PIPESTATUS[0]}
set -e
if [ "$install_status" -ne 0 ]; then
    echo "gpu_report_on_device: installing .whl/*.whl and the project into $SITE failed (exit $install_status);" \
        "see $OUT/setup.log" | tee -a "$OUT/setup.log" >&2
    exit "$install_status"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# Versions, and whether the trainer stack imports (a failure here costs only the report's trainer section: it is
# recorded, not fatal). Run from / so that the repo's fipo_trl/ folder (without kernels/) does not shadow the
# installed package.
version_check() {
    cd / && "$PYTHON" - <<'EOF'
import importlib
import importlib.metadata as metadata
import sys

print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "triton", "transformers", "trl", "datasets", "accelerate", "peft", "huggingface-hub",
             "tokenizers", "safetensors", "pyarrow", "dill", "multiprocess", "numpy", "liger-kernel", "vllm",
             "deepspeed", "fipo_trl"):
    try:
        print(f"  {name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"  {name} (not installed)")
for module in ("fipo_trl.kernels.fipo_triton", "trl", "datasets", "fipo_trl.trainer"):
    try:
        importlib.import_module(module)
    except Exception as error:  # recorded, not fatal
        print(f"WARNING: import {module} failed: {type(error).__name__}: {error}")
    else:
        print(f"import {module}: ok")
EOF
}
(version_check) 2>&1 | tee -a "$OUT/setup.log" || echo "WARNING: the version check crashed" | tee -a "$OUT/setup.log"

left() { echo $((BUDGET_S - (SECONDS - started))); }
at_least() { echo $(($1 > $2 ? $1 : $2)); }  # timeout 0 would mean no limit

# --- the report ------------------------------------------------------------------------------------------------------
# A hard stop a little before the script's budget, should a section overrun its own: what the report wrote stays.
set +e
timeout --kill-after=10 "$(at_least $(($(left) - 15)) 30)" "$PYTHON" benchmarks/gpu_report.py --out "$OUT" \
    --budget_s "$REPORT_BUDGET_S" 2>&1 | tee "$OUT/gpu_report.log"
report_status=${PIPESTATUS[0]}
set -e
case "$report_status" in
    0) report_line="benchmarks/gpu_report.py: ok, wrote $(cd "$OUT" && echo gpu_*.md)"
       # a section's error is written into the report and the run goes on: count them
       failed_parts=$(cat "$OUT"/gpu_*.md 2>/dev/null | grep -cE '\*\*failed\*\*|\| (failed \(exit|timed out)' || true)
       [ "$failed_parts" -eq 0 ] || report_line+="; $failed_parts section(s) or trainer row(s) FAILED inside it" ;;
    2) report_line="benchmarks/gpu_report.py FAILED (exit 2): no CUDA device on this machine (see gpu_report.log)" ;;
    124 | 137) report_line="benchmarks/gpu_report.py FAILED: stopped at the time limit (exit $report_status)" ;;
    *) report_line="benchmarks/gpu_report.py FAILED (exit $report_status); see gpu_report.log" ;;
esac

# --- the smoke checks, while time is left ----------------------------------------------------------------------------
smoke_lines=()
smoke_failed=0
for check in $SMOKE_CHECKS; do
    if [ "$report_status" -eq 2 ]; then
        smoke_lines+=("gpu_smoke_test --only $check: skipped (no CUDA device)")
        continue
    fi
    if [ "$(left)" -lt "$SMOKE_MIN_S" ]; then
        smoke_lines+=("gpu_smoke_test --only $check: skipped ($(left) s of the budget left)")
        continue
    fi
    set +e
    {
        echo "=== examples/gpu_smoke_test.py --only $check"
        timeout --kill-after=10 "$(($(left) - 10))" "$PYTHON" examples/gpu_smoke_test.py --only "$check"
    } 2>&1 | tee -a "$OUT/smoke_test.log"
    status=${PIPESTATUS[0]}
    set -e
    case "$status" in
        0) smoke_lines+=("gpu_smoke_test --only $check: ok") ;;
        124 | 137) smoke_lines+=("gpu_smoke_test --only $check: stopped at the time limit (not counted as failed)") ;;
        *) smoke_lines+=("gpu_smoke_test --only $check: FAILED (exit $status); see smoke_test.log")
           smoke_failed=1 ;;
    esac
done

{
    echo "$report_line"
    printf '%s\n' "${smoke_lines[@]}"
    echo "total $((SECONDS - started)) s"
} | tee "$OUT/summary.txt"
if [ "$report_status" -ne 0 ]; then
    echo "gpu_report_on_device: FAILED: $report_line" >&2
    exit "$report_status"
fi
if [ "${failed_parts:-0}" -ne 0 ]; then
    echo "gpu_report_on_device: the report is written, but $failed_parts part(s) of it FAILED (see the report)" >&2
    exit 4
fi
if [ "$smoke_failed" -ne 0 ]; then
    echo "gpu_report_on_device: a smoke check FAILED (see smoke_test.log); the report itself is complete" >&2
    exit 3
fi
