"""Training killed with SIGKILL after a checkpoint resumes with resume_from_checkpoint and finishes."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # subprocess runs of whole trainings

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "resume_run.py"


def run(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=600)


def test_resume_after_sigkill_on_a_generation_boundary_equals_an_uninterrupted_run(tiny_model_path, tmp_path):
    # 2 optimizer updates per generation batch: checkpoints every 2 steps fall on generation-batch boundaries
    reference = run(tiny_model_path, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    killed = run(tiny_model_path, tmp_path / "killed", "--kill_after_step", 4)
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "killed" / "checkpoint-4").is_dir() and not (tmp_path / "killed" / "final.pt").exists()

    checkpoint = tmp_path / "killed" / "checkpoint-4"
    resumed = run(tiny_model_path, tmp_path / "killed", "--resume_from_checkpoint", checkpoint)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = torch.load(tmp_path / "reference" / "final.pt")
    actual = torch.load(tmp_path / "killed" / "final.pt")
    assert actual["losses"] == expected["losses"]  # steps 1-4 restored from the checkpoint, 5-6 trained again
    for name, param in expected["params"].items():
        torch.testing.assert_close(actual["params"][name], param, rtol=0, atol=1e-6, msg=name)


def test_resume_inside_a_generation_batch_regenerates(tiny_model_path, tmp_path):
    """TRL does not checkpoint its buffer of generated micro-batches: resuming after step 3 (mid generation batch)
    generates a fresh batch with the resumed policy, so step 4 is on-policy (F = 0) and differs from a straight run."""
    reference = run(tiny_model_path, tmp_path / "reference", "--save_steps", 1)
    killed = run(tiny_model_path, tmp_path / "killed", "--save_steps", 1, "--kill_after_step", 3)
    assert killed.returncode == -signal.SIGKILL
    resumed = run(tiny_model_path, tmp_path / "killed", "--save_steps", 1, "--resume_from_checkpoint",
                  tmp_path / "killed" / "checkpoint-3")
    assert reference.returncode == 0 and resumed.returncode == 0, resumed.stderr[-3000:]
    expected = torch.load(tmp_path / "reference" / "final.pt")
    actual = torch.load(tmp_path / "killed" / "final.pt")
    assert actual["active"][:3] == expected["active"][:3] and expected["active"][3] > 0
    assert actual["active"][3] == 0 and len(actual["losses"]) == 6
    assert actual["losses"][3] != expected["losses"][3]
