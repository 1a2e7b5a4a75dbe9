"""The `fipo-trl` command: train from a recipe file and from flags, dataset mixtures, rewards by name, --help."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fipo_trl.tools import cli

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "fipo_trl.tools.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow  # a subprocess
def test_help_lists_fipo_and_toolkit_fields(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for flag in ("--fipo_decay_rate", "--fipo_clip_high_only", "--fipo_safety_threshold", "--delta",
                 "--dynamic_sampling", "--dynamic_sampling_max_retries", "--reward_funcs", "--overlong_buffer_length",
                 "--use_peft", "--config", "--datasets"):
        assert flag in result.stdout, flag
    assert "Future-KL decay rate" in result.stdout  # the help text, not just the flag


@pytest.mark.slow  # a subprocess
def test_trains_the_tiny_model_from_the_recipe_file(tmp_path):
    result = run_cli("train", "--config", str(REPO / "examples" / "recipes" / "tiny-cpu.yaml"), "--max_steps", "4",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "[fipo] step" in line]
    assert len(lines) == 4 and "active=1" in lines[1]
    out = tmp_path / "outputs" / "fipo-tiny-recipe"
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()
    # the locally built base model sits beside the run but is never uploaded with it (transformers skips "_*")
    from huggingface_hub.utils import filter_repo_objects
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    files = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()]
    assert any(f.startswith("_base-model/") for f in files)
    uploaded = list(filter_repo_objects(files, ignore_patterns=["_*", f"{PREFIX_CHECKPOINT_DIR}-*"]))
    assert "model.safetensors" in uploaded and not any("base-model" in f for f in uploaded)


def test_trains_from_flags_with_a_dataset_mixture_and_shipped_rewards(tiny_model_path, tmp_path):
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is {w} plus one ?", "answer": str(n + 1), "extra": 0}) + "\n"
                            for n, w in enumerate(["one", "two", "three", "four"] * 4, start=1)))
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(f"datasets:\n  - path: json\n    data_files: {data}\n    split: train\n"
                      "    columns: [prompt, answer]\n")
    trainer = cli.train([
        "--config", str(recipe), "--model_name_or_path", tiny_model_path, "--output_dir", str(tmp_path / "o"),
        "--reward_funcs", "math_verify_reward", "overlong_penalty", "fipo_trl.tools.tiny.digit_reward",
        "--overlong_buffer_length", "4", "--max_completion_length", "8", "--per_device_train_batch_size", "4",
        "--num_generations", "4", "--max_steps", "2", "--bf16", "false", "--gradient_checkpointing", "false",
        "--report_to", "none", "--save_strategy", "no", "--dtype", "float32", "--learning_rate", "1e-3",
        "--logging_steps", "1",
    ])
    assert trainer.reward_func_names == ["math_verify_reward", "overlong_penalty", "digit_reward"]
    assert trainer.args.steps_per_generation == 8  # FIPOConfig default: 8 updates per generation batch
    assert set(trainer.train_dataset.column_names) == {"prompt", "answer"}  # the mixture's `columns`
    assert len([h for h in trainer.state.log_history if "loss" in h]) == 2
    assert (tmp_path / "o" / "model.safetensors").exists()
    assert "on json: problems.jsonl" in (tmp_path / "o" / "README.md").read_text()  # the card names the mixture's data


def test_unknown_reward_name_is_rejected():
    with pytest.raises(ValueError, match="dotted import path"):
        cli.load_reward_funcs(["accuracy"], None, None)


CONSOLE_SCRIPT = Path(sys.executable).with_name("fipo-trl")


def run_console_script(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([str(CONSOLE_SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow  # a subprocess
def test_installed_console_script_exits_0_on_success_and_prints_no_repr(tmp_path):
    assert CONSOLE_SCRIPT.exists(), "pip install -e . installs the fipo-trl console script"
    result = run_console_script("train", "--max_steps", "2", "--output_dir", str(tmp_path / "o"),
                                "--save_strategy", "no", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FIPOTrainer object" not in result.stderr + result.stdout
    assert (tmp_path / "o" / "model.safetensors").exists()


@pytest.mark.slow  # two subprocesses
def test_the_quick_start_runs_again_and_keeps_the_last_runs_checkpoints(tmp_path):
    """The README's main job, twice into its default folder: the embedded run moves the last run's checkpoints
    aside (previous-run-1/) instead of refusing to start or mixing them."""
    for _ in range(2):
        result = run_console_script("train", "--max_steps", "2", "--save_steps", "1", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "outputs" / "fipo-tiny"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert sorted(p.name for p in (out / "previous-run-1").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


@pytest.mark.slow  # a subprocess per case
@pytest.mark.parametrize("reward, match", [
    ("no_such_module.reward", "cannot import module 'no_such_module'"),
    ("json.no_such_function", "module 'json' has no attribute 'no_such_function'"),
    ("json.__doc__", "is a str, not a function"),
])
def test_bad_reward_funcs_fail_first_with_one_line_naming_the_flag(tmp_path, reward, match):
    result = run_console_script("train", "--reward_funcs", reward, "--output_dir", str(tmp_path / "o"), cwd=tmp_path)
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"fipo-trl: error: --reward_funcs {reward!r}") and match in last_line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()  # failed before building the model


def test_reward_import_puts_the_working_directory_on_sys_path_only_for_the_import(tmp_path, monkeypatch):
    source = "def length(completions, **kwargs):\n    return [0.0] * len(completions)\n"
    (tmp_path / "my_rewards.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)  # another test's module of the same name
    before = list(sys.path)
    (function,) = cli.load_reward_funcs(["my_rewards.length"], None, None)
    assert function.__name__ == "length" and sys.path == before


def write_problems(path, n, column="prompt"):
    words = ["one", "two", "three", "four"]
    path.write_text("".join(json.dumps({column: f"what is {words[i % 4]} plus one ?", "answer": str(i % 4 + 2)})
                            + "\n" for i in range(n)))
    return path


def test_trains_a_local_model_on_local_json_without_bf16_flags(tiny_model_path, tmp_path):
    """A user's own folder and JSONL on CPU: bf16 follows the hardware, the card names the data files and shows the
    curves plot (matplotlib is installed in the test environment)."""
    data = write_problems(tmp_path / "problems.jsonl", 8)
    out = tmp_path / "o"
    trainer = cli.train([
        "--model_name_or_path", tiny_model_path, "--dataset_name", "json", "--data_files", str(data),
        "--output_dir", str(out), "--reward_funcs", "fipo_trl.tools.tiny.digit_reward", "--max_steps", "2",
        "--max_completion_length", "6", "--per_device_train_batch_size", "4", "--num_generations", "4",
        "--fipo_updates_per_generation", "2", "--report_to", "none", "--save_strategy", "no",
        "--gradient_checkpointing", "false", "--logging_steps", "1",
    ])
    assert trainer.args.bf16 is False and trainer.state.global_step == 2
    card = (out / "README.md").read_text()
    assert "on json: problems.jsonl" in card and "datasets:" not in card.split("---")[1]  # not a Hub id
    assert (out / "training_curves.png").exists() and "![Training curves](training_curves.png)" in card


@pytest.mark.parametrize("args, match", [
    (["--dataset_name", "{tmp}/notes.txt"], r"--dataset_name '.*notes.txt': a .txt file cannot be read"),
    (["--dataset_name", "{tmp}/missing.jsonl"], r"--dataset_name '.*missing.jsonl': no such file"),
    (["--dataset_name", "{tmp}/small.jsonl"], r"train_dataset has 3 prompts, but one generation batch takes 8"),
    (["--dataset_name", "{tmp}/question.jsonl"], r"train_dataset has no 'prompt' column \(its columns: "
                                                 r"\['question', 'answer'\]\)"),
    (["--dataset_name", "{tmp}/small.jsonl", "--dataset_train_split", "test"], r"--dataset_train_split 'test'"),
])
def test_bad_training_data_is_one_error_line_before_the_model_loads(tmp_path, monkeypatch, capsys, args, match):
    (tmp_path / "notes.txt").write_text("what is one plus one ?\n")
    write_problems(tmp_path / "small.jsonl", 3)
    write_problems(tmp_path / "question.jsonl", 16, column="question")
    import transformers

    def no_model_load(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model_load)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--model_name_or_path", str(tmp_path / "some-model"), "--output_dir", str(tmp_path / "o"),
                  "--per_device_train_batch_size", "4", "--num_generations", "4",
                  "--fipo_updates_per_generation", "8", *[a.format(tmp=tmp_path) for a in args]])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("fipo-trl: error: ") and __import__("re").search(match, error), error


def test_a_resume_flag_with_nothing_to_resume_fails_first(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--output_dir", str(tmp_path / "o"), "--resume_from_checkpoint", str(tmp_path / "nope")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("fipo-trl: error: ") and "resume_from_checkpoint" in error
    assert not (tmp_path / "o" / "_base-model").exists()  # failed before building the model
