"""scripts/prepare_device_wheels.sh and scripts/gpu_report_on_device.sh (the GPU table in one device-tool call):
the device script's refusals, which come before it installs or runs anything, its summary and exit status, and the
prepare script's refusal of an unknown option. No network, no GPU: each script runs from a copy in a scratch repo, so
the real .whl/ is never touched."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocess runs (a few ms each)

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ("prepare_device_wheels.sh", "gpu_report_on_device.sh")


@pytest.fixture
def scratch_repo(tmp_path):
    """A repo root holding only the scripts, and a PYTHON that leaves a mark when anything runs it."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in (*SCRIPTS, "constraints.txt"):
        shutil.copy(REPO / "scripts" / name, root / "scripts" / name)
    mark = tmp_path / "python-ran"
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
    python.chmod(0o755)
    return root, python, mark


def run_device_script(root, python, **env_overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "PYTHON", "FIPO_DEVICE_SITE")}
    env.update(PYTHON=str(python), FIPO_DEVICE_SITE=str(root.parent / "site"), **env_overrides)
    return subprocess.run(["bash", str(root / "scripts" / "gpu_report_on_device.sh")], env=env, capture_output=True,
                          text=True, timeout=60)


def assert_refused_before_anything(run, root, mark, *phrases):
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_report_on_device: refusing:"), run.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert run.stdout == ""
    assert not mark.exists() and not (root.parent / "site").exists()  # nothing ran, nothing was installed


def test_device_script_refuses_without_out(scratch_repo):
    root, python, mark = scratch_repo
    (root / ".whl").mkdir()
    run = run_device_script(root, python)
    assert_refused_before_anything(run, root, mark, "OUT is not set")


def test_device_script_refuses_without_wheels(scratch_repo, tmp_path):
    root, python, mark = scratch_repo
    out = tmp_path / "out"
    run = run_device_script(root, python, OUT=str(out))
    assert_refused_before_anything(run, root, mark, "no .whl/ folder", "prepare_device_wheels.sh", "carry")
    assert not out.exists()


def test_device_script_refuses_without_the_trl_wheel(scratch_repo, tmp_path):
    root, python, mark = scratch_repo
    (root / ".whl").mkdir()
    (root / ".whl" / "datasets-5.2.0-py3-none-any.whl").write_bytes(b"")
    run = run_device_script(root, python, OUT=str(tmp_path / "out"))
    assert_refused_before_anything(run, root, mark, "no trl wheel")


def test_prepare_script_rejects_unknown_options_before_touching_wheels(scratch_repo):
    root, _, _ = scratch_repo
    (root / ".whl").mkdir()
    (root / ".whl" / "keep.whl").write_bytes(b"")
    run = subprocess.run(["bash", str(root / "scripts" / "prepare_device_wheels.sh"), "--bogus"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 64 and "usage:" in run.stderr
    assert (root / ".whl" / "keep.whl").exists()


# A stand-in for the device's python3: "installs" nothing, and plays gpu_report.py and gpu_smoke_test.py with the
# outcome the test asks for, so that the script's bookkeeping (summary, exit status) runs without a GPU.
FAKE_PYTHON = """#!/bin/sh
case "$1" in
    -m|-) cat > /dev/null 2>&1; exit 0 ;;
    benchmarks/gpu_report.py)
        printf '# GPU report\\n%s\\n' "$FAKE_REPORT_BODY" > "$OUT/gpu_fake_device.md"
        exit "$FAKE_REPORT_STATUS" ;;
    examples/gpu_smoke_test.py) echo "smoke $3"; exit "$FAKE_SMOKE_STATUS" ;;
esac
exit 99
"""


@pytest.mark.parametrize(("report_status", "report_body", "smoke_status", "expected", "summary_phrase"), [
    (0, "| 8 | 64 | 1.0 |", 0, 0, "gpu_report.py: ok, wrote gpu_fake_device.md"),
    (0, "**failed** after 3 s: `RuntimeError: x`", 0, 4, "1 section(s) or trainer row(s) FAILED"),
    (0, "| False | failed (exit 1): `x` | | |", 0, 4, "1 section(s) or trainer row(s) FAILED"),
    (0, "| 8 | 64 | 1.0 |", 1, 3, "gpu_smoke_test --only kernel: FAILED (exit 1)"),
    (1, "", 0, 1, "gpu_report.py FAILED (exit 1)"),
    (2, "", 0, 2, "smoke_test --only kernel: skipped (no CUDA device)"),
])
def test_device_script_summary_and_exit_status(scratch_repo, tmp_path, report_status, report_body, smoke_status,
                                               expected, summary_phrase):
    root, _, _ = scratch_repo
    (root / ".whl").mkdir()
    for name in ("trl-1.16.0-py3-none-any.whl", "datasets-5.2.0-py3-none-any.whl"):
        (root / ".whl" / name).write_bytes(b"")
    python = tmp_path / "fake-python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    out = tmp_path / "out"
    run = run_device_script(root, python, OUT=str(out), FAKE_REPORT_STATUS=str(report_status),
                            FAKE_REPORT_BODY=report_body, FAKE_SMOKE_STATUS=str(smoke_status))
    assert run.returncode == expected, run.stdout + run.stderr
    summary = (out / "summary.txt").read_text()
    assert summary_phrase in summary, summary
    assert {"setup.log", "gpu_report.log", "summary.txt"} <= {p.name for p in out.iterdir()}
    if expected:
        assert run.stderr.strip().splitlines()[-1].startswith("gpu_report_on_device: "), run.stderr
    if report_status != 2:  # the smoke checks run after a report that failed for another reason too
        assert "smoke kernel" in (out / "smoke_test.log").read_text()
