"""The README's main job: `python examples/train_fipo.py` on its embedded default, as a user runs it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocess runs of whole trainings

REPO = Path(__file__).resolve().parents[2]


def run_script(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(REPO / "examples" / "train_fipo.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_embedded_default_trains_prints_fipo_metrics_and_saves(tmp_path):
    result = run_script("--max_steps", "8", "--save_steps", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "[fipo] step" in line]
    assert len(lines) == 8 and "f_mean=" in lines[1] and "active=1" in lines[1]
    out = tmp_path / "outputs" / "fipo-tiny"  # the default output_dir, relative to where the user runs it
    assert (out / "model.safetensors").exists() and (out / "checkpoint-8" / "model.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "FIPO" in card and "2603.19835" in card


def test_help_lists_the_fipo_fields(tmp_path):
    result = run_script("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for flag in ("--fipo_decay_rate", "--fipo_clip_ratio", "--fipo_clip_high_only", "--fipo_safety_threshold",
                 "--fipo_updates_per_generation", "--delta"):
        assert flag in result.stdout


def test_lora_run_saves_the_adapter_and_a_merged_model(tmp_path):
    result = run_script("--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--use_peft",
                        "--lora_target_modules", "q_proj", "v_proj", "--merge_adapter", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()
    assert (tmp_path / "run" / "merged" / "model.safetensors").exists()
    assert (tmp_path / "run" / "merged" / "tokenizer.json").exists()
