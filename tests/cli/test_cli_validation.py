"""`fipo-trl train` and `fipo-trl eval` check every flag, path and recipe file before anything loads: a bad one is a
single `fipo-trl: error:` line naming the flag and the fix, exit status 2. An error raised later, while training,
keeps its traceback. The rows of docs/reliability.md, "Round 2: config, flags and paths"."""

import os
import re
import sys
import traceback

import pytest

import fipo_trl.safety.machine
import fipo_trl.tools.tiny
from fipo_trl.tools import cli, evaluation


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if a model (or the embedded tiny one) is built or loaded, or a tokenizer read."""
    import transformers

    def loaded(*args, **kwargs):
        raise AssertionError("something was loaded before the inputs were checked")

    monkeypatch.setattr(fipo_trl.tools.tiny, "build_tiny_model", loaded)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loaded)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", loaded)
    monkeypatch.setattr(evaluation, "transformers_generator", loaded)


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("fipo-trl: error: "), lines
    assert not any("Traceback" in line for line in lines)
    return lines[-1]


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder this process cannot write. Root writes through file modes, so as root a sysfs folder stands in."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    folder = "/sys/kernel"
    if not os.path.isdir(folder) or os.access(folder, os.W_OK) and _writable(folder):
        pytest.skip("running as root with no folder root cannot write")
    yield folder


def _writable(folder) -> bool:
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def output_dir_cases(tmp_path, read_only_dir):
    (tmp_path / "a-file").write_text("not a folder")
    return {
        "empty": ("", "--output_dir '' is empty"),
        "a file": (str(tmp_path / "a-file"), "is a file, not a folder"),
        "under a file": (str(tmp_path / "a-file" / "run"), f"lies under '{tmp_path / 'a-file'}', which is a file"),
        "read-only": (str(read_only_dir), "is not writable"),
        "under a read-only folder": (f"{read_only_dir}/run/deeper", "is not writable"),
    }


OUTPUT_DIR_CASES = ["empty", "a file", "under a file", "read-only", "under a read-only folder"]


@pytest.mark.parametrize("case", OUTPUT_DIR_CASES)
def test_train_output_dir_is_checked_before_anything_loads(tmp_path, read_only_dir, nothing_loads, capsys, case):
    output_dir, expected = output_dir_cases(tmp_path, read_only_dir)[case]
    error = one_line_error(capsys, ["train", "--output_dir", output_dir])
    assert "--output_dir" in error and expected in error and "Fix:" in error, error
    assert not os.path.exists("/_base-model")  # `--output_dir ""` once built the tiny model at the root


@pytest.mark.parametrize("case", OUTPUT_DIR_CASES)
def test_eval_output_dir_is_checked_before_anything_loads(tmp_path, read_only_dir, nothing_loads, capsys, case):
    output_dir, expected = output_dir_cases(tmp_path, read_only_dir)[case]
    error = one_line_error(capsys, ["eval", "--output_dir", output_dir, "--k", "2"])
    assert "--output_dir" in error and expected in error and "Fix:" in error, error


def test_a_writable_output_dir_is_not_created_by_the_check(tmp_path):
    from fipo_trl.safety.inputs import check_output_dir

    check_output_dir(str(tmp_path / "new" / "run"))
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind


BAD_TRAIN_FLAGS = [  # (flags, texts the error must contain)
    (["--num_generations", "0"], ["`num_generations` = 0", ">= 2"]),
    (["--max_completion_length", "0"], ["`max_completion_length` = 0", ">= 1"]),
    (["--temperature", "0"], ["`temperature` = 0.0", "> 0"]),
    (["--temperature", "-1"], ["`temperature` = -1.0", "> 0"]),
    (["--learning_rate", "nan"], ["`learning_rate` = nan", "finite", "Fix"]),
    (["--max_grad_norm", "inf"], ["`max_grad_norm` = inf", "finite"]),
    (["--per_device_train_batch_size", "0"], ["`per_device_train_batch_size` = 0", ">= 1"]),
    (["--per_device_eval_batch_size", "0"], ["`per_device_eval_batch_size` = 0", ">= 1"]),
    (["--max_steps", "0"], ["`max_steps` = 0", "-1 to train for num_train_epochs"]),
    (["--beta", "-1"], ["`beta` = -1.0", ">= 0"]),
    (["--hub_model_id", 'me/x"; import os'], ["`hub_model_id` = 'me/x\"; import os'", "not a valid Hub repository id",
                                             "Fix"]),
    (["--push_to_hub", "true"], ["push_to_hub", "output_dir", "hub_model_id"]),  # output_dir "bad name!" below
    (["--use_liger_kernel", "true"], ["use_liger_kernel", "needs a GPU", "Fix: set use_liger_kernel=False"]),
    (["--use_vllm", "true"], ["use_vllm", "Fix:", "use_vllm=False"]),  # no vLLM here (or server mode, no GPU)
    (["--reward_funcs", "overlong_penalty", "--overlong_buffer_length", "0"],
     ["--overlong_buffer_length 0", "[1, --max_completion_length 12]", "Fix"]),
    (["--reward_funcs", "overlong_penalty", "--overlong_buffer_length", "13"], ["--overlong_buffer_length 13"]),
    (["--reward_funcs", "overlong_penalty", "--overlong_penalty_factor", "nan"],
     ["--overlong_penalty_factor nan", "finite number > 0"]),
    (["--reward_funcs", "overlong_penalty", "--overlong_penalty_factor", "-1"],
     ["--overlong_penalty_factor -1.0", "would reward overlong completions"]),
    (["--overlong_buffer_length", "4"], ["--overlong_buffer_length would be ignored", "overlong_penalty"]),
    (["--overlong_penalty_factor", "2"], ["--overlong_penalty_factor would be ignored"]),
    (["--reward_timeout_seconds", "nan"], ["--reward_timeout_seconds nan", "(0, 86400]"]),
    (["--reward_timeout_seconds", "1e12"], ["--reward_timeout_seconds 1000000000000.0", "(0, 86400]"]),
    (["--reward_timeout_seconds", "0"], ["--reward_timeout_seconds 0.0"]),
    (["--merge_adapter", "true"], ["--merge_adapter", "Fix: add --use_peft true, or drop --merge_adapter"]),
    (["--use_peft", "true", "--lora_r", "0"], ["--lora_r 0", "integer >= 1"]),
    (["--use_peft", "true", "--lora_alpha", "0"], ["--lora_alpha 0", "finite number > 0"]),
    (["--use_peft", "true", "--lora_dropout", "1"], ["--lora_dropout 1.0", "[0, 1)"]),
    (["--eval_strategy", "steps"], ["--eval_strategy steps", "no 'test' split", "['train']",
                                    "--dataset_test_split", "--eval_strategy no"]),
]


@pytest.mark.parametrize("flags, expected", BAD_TRAIN_FLAGS, ids=[" ".join(f) for f, _ in BAD_TRAIN_FLAGS])
def test_a_bad_training_flag_is_one_line_before_anything_loads(tmp_path, nothing_loads, monkeypatch, capsys, flags,
                                                               expected):
    monkeypatch.setattr(fipo_trl.safety.machine, "gpu_available", lambda args: False)  # CPU-only, on any machine
    output_dir = tmp_path / ("bad name!" if "--push_to_hub" in flags else "run")
    error = one_line_error(capsys, ["train", "--output_dir", str(output_dir), *flags])
    for text in expected:
        assert text in error, (text, error)
    assert not output_dir.exists()


def test_the_overlong_buffer_flag_is_used_as_given(tmp_path):
    """`--overlong_buffer_length` was read with `or`: 0 became the default. Now 0 is refused and 1 is 1."""
    args, training_args, _, _ = cli.parse_train_args(["--output_dir", str(tmp_path), "--overlong_buffer_length", "1"])
    (penalty,) = cli.load_reward_funcs(["overlong_penalty"], training_args, args)
    assert (penalty.buffer_length, penalty.max_completion_length) == (1, 12)
    assert penalty.penalty(11) == 0.0 and penalty.penalty(12) == -1.0


RECIPES = {  # file text, texts the error must contain
    "duplicate key": ("learning_rate: 1.0e-3\nmax_steps: 2\nlearning_rate: 5.0e-3\n",
                      ["the key 'learning_rate' appears twice (lines 1 and 3)", "Fix: keep one of them"]),
    "nested duplicate": ("datasets:\n  - path: json\n    path: csv\n",
                         ["the key 'path' appears twice (lines 2 and 3)"]),
    "duplicate in one line": ("reward_funcs: overlong_penalty\nlora_target_modules: {q: 1, q: 2}\n",
                              ["the key 'q' appears twice (line 2)"]),
    "syntax error": ("max_steps: 2\nreward_funcs: [a, b\nlearning_rate: 1\n",
                     ["is not valid YAML at line 3", "(while parsing a flow sequence at line 2)",
                      "Fix: correct that line"]),
    "not a mapping": ("- max_steps\n- 2\n", ["must hold `flag: value` lines", "not a list"]),
}


@pytest.mark.parametrize("subcommand", ["train", "eval"])
@pytest.mark.parametrize("case", [*RECIPES, "missing"])
def test_a_bad_recipe_file_is_one_line_naming_the_file(tmp_path, nothing_loads, capsys, subcommand, case):
    recipe = tmp_path / "recipe.yaml"
    if case == "missing":
        expected = ["no such file"]
    else:
        text, expected = RECIPES[case]
        recipe.write_text(text)
    error = one_line_error(capsys, [subcommand, "--config", str(recipe), "--output_dir", str(tmp_path / "o")])
    assert f"--config '{recipe}'" in error, error
    for text in expected:
        assert text in error, (text, error)


def test_an_error_raised_while_training_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """A ValueError from inside a reward function is a bug to debug, not a bad flag: the console script lets it
    through with its traceback (exit status 1) instead of printing one `fipo-trl: error:` line."""
    module = "fipo_validation_broken_rewards"  # a name no other test imports
    (tmp_path / f"{module}.py").write_text(
        "def broken_reward(completions, **kwargs):\n"
        "    raise ValueError('broken_reward cannot score this')\n")
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(ValueError) as error_info:  # not SystemExit(2)
            cli.main(["train", "--output_dir", str(tmp_path / "o"), "--reward_funcs", f"{module}.broken_reward",
                      "--max_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true"])
    finally:
        sys.modules.pop(module, None)  # no later import may find this test's module
    frames, error = [], error_info.value
    while error is not None:  # the reward's own frame, wherever a wrapper re-raised it
        frames += [frame.name for frame in traceback.extract_tb(error.__traceback__)]
        error = error.__cause__ or error.__context__
    assert "broken_reward" in frames
    assert "fipo-trl: error:" not in capsys.readouterr().err


def test_an_input_error_still_shows_its_traceback_on_request(tmp_path, nothing_loads, monkeypatch):
    monkeypatch.setenv("FIPO_TRL_TRACEBACK", "1")
    with pytest.raises(ValueError, match=re.escape("`max_steps` = 0")):
        cli.main(["train", "--output_dir", str(tmp_path / "o"), "--max_steps", "0"])


def test_every_help_text_formats():
    """argparse reads a bare % in a help text as a format code: one such text breaks `fipo-trl --help` whole."""
    assert "--fipo_inert_threshold" in cli.make_parser().format_help()
    from trl import TrlParser

    assert "--output_dir" in TrlParser((evaluation.EvalArguments,)).format_help()
