#!/usr/bin/env bash
# Download into .whl/ the wheels the GPU device machine lacks for benchmarks/gpu_report.py and
# examples/gpu_smoke_test.py; scripts/gpu_report_on_device.sh installs them there (the device has no network).
#
#   bash scripts/prepare_device_wheels.sh               # here, with network; then the device tool's run with
#       carry: [".whl"], timeout_s: 560, command: bash scripts/gpu_report_on_device.sh
#   bash scripts/prepare_device_wheels.sh --with-liger  # also liger-kernel, for the report's use_liger_kernel=True
#                                                       # row (it takes half of the trainer section's budget)
#
# The device image (Python 3.12, /opt/torch/.venv) has torch 2.11.0, triton 3.6.0, transformers 5.17.0, accelerate
# 1.15.0, tokenizers 0.23.2, huggingface-hub 1.33.0, peft, numpy, pandas, pyarrow, xxhash, safetensors, ...
# (DEVICE_IMAGE below) but not trl, datasets, dill, multiprocess. Its transformers 5.17 is inside trl 1.16's range
# (>= 4.56.2) and ours (>= 5.4), so transformers does not travel. The script checks every downloaded wheel's
# requirements against the image's known versions and the other wheels, and keeps .whl/ out of git
# (.git/info/exclude): the device tool copies it only when carried.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS=.whl
LIMIT_BYTES=$((64 * 1024 * 1024))  # the device tool copies at most 64 MiB: working tree + carried paths

pin() {  # NAME -> NAME==VERSION from scripts/constraints.txt
    local line
    line=$(grep -iE "^$1==" scripts/constraints.txt | head -1)
    [ -n "$line" ] || { echo "prepare_device_wheels: $1 is not pinned in scripts/constraints.txt" >&2; exit 1; }
    echo "$line"
}
# datasets 5.2.0 wants dill < 0.4.2 and multiprocess < 0.70.20 (its own pins, not in constraints.txt); these are
# the newest in those ranges, as the CPU venv has them. multiprocess ships one wheel per Python (py312 here).
PACKAGES=("$(pin trl)" "$(pin datasets)" "dill==0.4.1" "multiprocess==0.70.19")
# DeepSpeed, for the report's ZeRO-3 run (its sharded section), and what it needs beyond the image: DeepSpeed has
# only an sdist, built below into a pure-Python wheel without compiled ops (DS_BUILD_OPS=0; ZeRO-3 with the
# trainer's torch optimizer needs none). These versions are the ones scripts/setup.sh resolves here.
DEEPSPEED="$(pin deepspeed)"
PACKAGES+=("einops==0.8.2" "hjson==3.1.0" "msgpack==1.2.4" "ninja==1.13.2" "py-cpuinfo==9.0.0" "pydantic==2.14.4"
           "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5")
for arg in "$@"; do
    case "$arg" in
        --with-liger) PACKAGES+=("$(pin liger-kernel)") ;;
        *) echo "usage: bash scripts/prepare_device_wheels.sh [--with-liger]" >&2; exit 64 ;;
    esac
done

rm -rf "$WHEELS"  # exactly these wheels: nothing stale travels
mkdir -p "$WHEELS"
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" "${PACKAGES[@]}" 2>&1 | { grep -v "is ignored" || true; }
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps --no-cache-dir -w "$WHEELS" \
    "$DEEPSPEED" 2>&1 | { grep -v "is ignored" || true; }
compgen -G "$WHEELS/deepspeed-*-py3-none-any.whl" > /dev/null \
    || { echo "prepare_device_wheels: building a pure-Python $DEEPSPEED wheel failed" >&2; exit 1; }

# Every requirement of the wheels must be met on the device: by the image (with its version, where known) or by
# another wheel here.
"$PYTHON" - "$WHEELS" <<'EOF'
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

# The device image's packages: version where known, None where only its presence is known (dependencies of what
# the image lists: torch's, transformers 5.17's).
DEVICE_IMAGE = {
    "torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0", "accelerate": "1.15.0", "tokenizers": "0.23.2",
    "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0", **dict.fromkeys([
        "peft", "scipy", "matplotlib", "pytest", "pyarrow", "pandas", "xxhash", "requests",
        "tqdm", "pyyaml", "jinja2", "psutil", "setuptools", "wheel", "filelock", "fsspec", "packaging", "regex",
        "typer", "typing-extensions", "sympy", "networkx", "httpx"]),
}
wheels = {}
for path in sorted(Path(sys.argv[1]).glob("*.whl")):
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(name).decode())
    wheels[canonicalize_name(metadata["Name"])] = (path.name, Version(metadata["Version"]),
                                                   metadata.get_all("Requires-Dist") or [])
problems = []
for package, (file_name, _, requirements) in wheels.items():
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker and not requirement.marker.evaluate({"extra": "", "python_version": "3.12",
                                                                   "sys_platform": "linux",
                                                                   "platform_system": "Linux"}):
            continue
        needed = canonicalize_name(requirement.name)
        if needed in wheels:
            version, source = wheels[needed][1], "wheel"
        elif needed in DEVICE_IMAGE:
            if DEVICE_IMAGE[needed] is None:
                continue
            version, source = Version(DEVICE_IMAGE[needed]), "device image"
        else:
            problems.append(f"{file_name}: needs {text}, which neither the device image nor .whl/ provides")
            continue
        if not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{file_name}: needs {text}, the {source} has {version}")
for problem in problems:
    print(f"prepare_device_wheels: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF "/$WHEELS/" "$exclude" 2>/dev/null || echo "/$WHEELS/" >> "$exclude"
git check-ignore -q "$WHEELS/x.whl" || { echo "prepare_device_wheels: $WHEELS/ is not ignored by git" >&2; exit 1; }

tree_bytes=$(git ls-files -co --exclude-standard -z | { xargs -0 du -cb 2>/dev/null || true; } \
    | awk '$2 == "total" {s += $1} END {print s + 0}')
wheel_bytes=$(du -cb "$WHEELS"/*.whl | awk '$2 == "total" {print $1}')
echo "device wheels in $WHEELS/:"
du -b "$WHEELS"/*.whl | awk '{printf "  %10d  %s\n", $1, $2}'
awk -v tree="$tree_bytes" -v wheels="$wheel_bytes" 'BEGIN {
    printf "working tree %.2f MiB + wheels %.2f MiB = %.2f MiB (the device tool copies at most 64 MiB)\n",
        tree / 2^20, wheels / 2^20, (tree + wheels) / 2^20 }'
if [ $((tree_bytes + wheel_bytes)) -gt "$LIMIT_BYTES" ]; then
    echo "prepare_device_wheels: over the 64 MiB the device tool copies" >&2
    exit 1
fi
