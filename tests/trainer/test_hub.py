"""Pushing to the Hub through the real huggingface_hub client, against a Hub stand-in on loopback."""

import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hub_stand_in import HubStandIn, hub_env

pytestmark = pytest.mark.slow  # subprocess runs of whole trainings

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "push_run.py"


def push_run(model_path, output_dir, endpoint, token, *flags):
    return subprocess.run([sys.executable, str(SCRIPT), str(model_path), str(output_dir), *flags],
                          env=hub_env(endpoint, token), capture_output=True, text=True, timeout=600)


def assert_token_never_leaks(token, repo, run, output_dir):
    for name, content in repo.files.items():
        assert token.encode() not in content, f"token found in uploaded {name}"
    assert token not in run.stdout and token not in run.stderr
    for path in Path(output_dir).rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), f"token found in local {path}"


@pytest.mark.parametrize("token_in_args", [False, True], ids=["token_from_env", "token_in_config"])
def test_full_model_push_with_fipo_card(token_in_args, tiny_model_path, tmp_path):
    token = f"hf_{secrets.token_hex(16)}"
    with HubStandIn(token) as hub:
        flags = ["--hub_model_id", "tiny-fipo", "--private"] + (["--hub_token", token] if token_in_args else [])
        run = push_run(tiny_model_path, tmp_path / "out", hub.url, token, *flags)
        assert run.returncode == 0, run.stderr[-4000:]
        assert "PUSH SCRIPT DONE" in run.stdout
        repo = hub.repos["fipo-user/tiny-fipo"]
        assert repo.private  # hub_private_repo reached create_repo
        assert len(repo.commits) >= 2  # checkpoint pushes during training (every_save) plus the final push
        for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
            assert name in repo.files, sorted(repo.files)
        card = repo.files["README.md"].decode()
        assert "FIPO hyperparameters" in card and "| Future-KL decay rate" in card and "2603.19835" in card
        assert "fipo-user/tiny-arithmetic" in card and "- fipo" in card
        assert all(r["headers"].get("authorization") == f"Bearer {token}" for r in hub.requests)
        assert_token_never_leaks(token, repo, run, tmp_path / "out")


def test_lora_adapter_push(tiny_model_path, tmp_path):
    token = f"hf_{secrets.token_hex(16)}"
    with HubStandIn(token) as hub:
        run = push_run(tiny_model_path, tmp_path / "out", hub.url, token, "--hub_model_id", "fipo-user/tiny-lora",
                       "--lora")
        assert run.returncode == 0, run.stderr[-4000:]
        repo = hub.repos["fipo-user/tiny-lora"]
        assert not repo.private
        assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(repo.files)
        assert "model.safetensors" not in repo.files
        card = repo.files["README.md"].decode()
        assert "AutoPeftModelForCausalLM" in card and "library_name: peft" in card
        assert_token_never_leaks(token, repo, run, tmp_path / "out")


def test_hub_down_training_continues_and_nothing_is_lost(tiny_model_path, tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead_endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    run = push_run(tiny_model_path, tmp_path / "out", dead_endpoint, f"hf_{secrets.token_hex(16)}",
                   "--hub_model_id", "tiny-fipo")
    assert run.returncode == 0, run.stderr[-4000:]
    assert "PUSH SCRIPT DONE" in run.stdout
    assert "could not create the Hub repository" in run.stderr
    assert "Training continues and nothing is lost" in run.stderr
    assert "could not push the model" in run.stderr
    out = tmp_path / "out"
    for path in ("checkpoint-2/model.safetensors", "checkpoint-4/model.safetensors", "model.safetensors",
                 "README.md"):
        assert (out / path).exists(), path


def test_cli_pushes_the_adapter_and_the_merged_model(tmp_path):
    token = f"hf_{secrets.token_hex(16)}"
    with HubStandIn(token) as hub:
        run = subprocess.run(
            [sys.executable, "-m", "fipo_trl.tools.cli", "train", "--output_dir", str(tmp_path / "out"), "--max_steps",
             "2", "--save_strategy", "no", "--use_peft", "--lora_target_modules", "q_proj", "v_proj",
             "--merge_adapter", "--push_to_hub", "--hub_model_id", "tiny-cli"],
            env=hub_env(hub.url, token), capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-4000:]
        adapter, merged = hub.repos["fipo-user/tiny-cli"], hub.repos["fipo-user/tiny-cli-merged"]
        assert {"adapter_model.safetensors", "README.md"} <= set(adapter.files)
        assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(merged.files)
        assert not any("lora" in name for name in merged.files)
        for repo in (adapter, merged):
            assert_token_never_leaks(token, repo, run, tmp_path / "out")
