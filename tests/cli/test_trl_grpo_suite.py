"""scripts/trl_grpo_suite.py: TRL's GRPO test file run offline on plain TRL and with FIPOTrainer swapped in.

TRL's real test file is not in the repository (nor in TRL's wheel), so the end-to-end test runs the script on a
stand-in checkout: a zen generator with TRL's signature and a three-test file whose outcomes differ by arm where,
and only where, the swap is visible. The real run's figures are in docs/compatibility.md."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("trl_grpo_suite", REPO / "scripts" / "trl_grpo_suite.py")
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)

TEST_FILE = '''\
import pytest
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl import GRPOConfig, GRPOTrainer


def test_served_offline():
    """The conftest's zen data and tiny model, under their Hub ids."""
    assert len(load_dataset("trl-internal-testing/zen", "standard_prompt_only", split="train")) == 3
    tokenizer = AutoTokenizer.from_pretrained("trl-internal-testing/tiny-Qwen2ForCausalLM-2.5")
    model = AutoModelForCausalLM.from_pretrained("trl-internal-testing/tiny-Qwen2ForCausalLM-2.5")
    assert model.config.vocab_size == len(tokenizer) and tokenizer.chat_template
    assert GRPOConfig(output_dir="unused").bf16 is False  # plain TRL would ask for bf16 on a CPU-only machine


def test_is_trl_own_trainer():
    assert GRPOTrainer.__module__.startswith("trl.")


@pytest.mark.skip(reason="skipped in both arms")
def test_skipped():
    pass
'''

ZEN_GENERATOR = '''\
from datasets import Dataset, DatasetDict


def main(test_size, push_to_hub, repo_id):
    prompts = Dataset.from_dict({"prompt": ["Beautiful is better than", "Explicit is", "Simple is", "Flat is"]})
    prompts = prompts.train_test_split(test_size=test_size, shuffle=False)
    DatasetDict(prompts).push_to_hub(repo_id, config_name="standard_prompt_only")
'''


def stand_in_checkout(root: Path, test_file: str = TEST_FILE) -> Path:
    (root / "tests").mkdir(parents=True)
    (root / "scripts").mkdir()
    (root / "tests" / "test_grpo_trainer.py").write_text(test_file)
    (root / "tests" / "testing_utils.py").write_text("")
    (root / "scripts" / "generate_zen_dataset.py").write_text(ZEN_GENERATOR)
    return root


def test_swap_in_fipo_changes_only_the_trainer_import():
    swapped = suite.swap_in_fipo(TEST_FILE)
    assert "from fipo_trl import FIPOConfig as GRPOConfig, FIPOTrainer as GRPOTrainer\n" in swapped
    assert "from trl import GRPOConfig, GRPOTrainer" not in swapped
    assert swapped.replace(suite.FIPO_IMPORT, suite.TRL_IMPORT) == TEST_FILE


@pytest.mark.parametrize("source", ["from trl import GRPOTrainer, GRPOConfig\n", suite.TRL_IMPORT * 2])
def test_swap_in_fipo_refuses_a_file_it_cannot_swap_exactly(source):
    with pytest.raises(ValueError, match="update TRL_IMPORT"):
        suite.swap_in_fipo(source)


def test_compare_names_what_fipo_loses():
    plain = {"a": "passed", "b": "passed", "c": "failed", "d": "skipped", "e": "failed"}
    fipo = {"a": "passed", "b": "failed", "c": "failed", "d": "skipped", "e": "passed"}
    report = suite.compare(plain, fipo)
    assert report["lost_with_fipo"] == ["b"]
    assert report["passed_only_with_fipo"] == ["e"]
    assert report["failed_on_both"] == ["c"]
    assert report["counts"]["plain"] == {"passed": 2, "failed": 2, "skipped": 1}


def test_a_checkout_without_the_files_is_refused_by_name(tmp_path):
    with pytest.raises(SystemExit, match="tests/test_grpo_trainer.py.*clone of"):
        suite.build_suite(tmp_path, tmp_path / "suite", "fipo")


def without_xdist(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "xdist" else real_find_spec(name, *args))


def test_workers_without_pytest_xdist_are_refused_with_the_fix(tmp_path, monkeypatch, capsys):
    without_xdist(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        suite.main(["--trl_source", str(tmp_path), "--workdir", str(tmp_path / "work"), "--workers", "2"])
    assert exit_info.value.code == 2
    assert "--workers 2 needs pytest-xdist: pip install pytest-xdist, or pass --workers 1" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("xdist", [True, False])
def test_comparing_without_saved_outcomes_is_refused(xdist, tmp_path, monkeypatch, capsys):
    if not xdist:  # comparing runs no test: it needs no pytest-xdist, whatever --workers says
        without_xdist(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        suite.main(["--trl_source", str(tmp_path), "--workdir", str(tmp_path / "work"), "--arms"])
    assert exit_info.value.code == 2 and "nothing to compare" in capsys.readouterr().err


@pytest.mark.slow  # two pytest subprocesses importing trl, about 30 s
def test_both_arms_run_offline_and_the_lost_test_fails_the_run(tmp_path):
    source = stand_in_checkout(tmp_path / "trl")
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "trl_grpo_suite.py"), "--trl_source", str(source),
                          "--workdir", str(tmp_path / "work"), "--workers", "1"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stdout + run.stderr
    logs = {arm: (tmp_path / "work" / arm / "pytest.log").read_text() for arm in suite.ARMS}
    plain = json.loads((tmp_path / "work" / "plain.json").read_text())
    fipo = json.loads((tmp_path / "work" / "fipo.json").read_text())
    test_id = "tests.test_grpo_trainer::{}".format
    assert plain == {test_id("test_served_offline"): "passed", test_id("test_is_trl_own_trainer"): "passed",
                     test_id("test_skipped"): "skipped"}, logs["plain"]
    assert fipo == {**plain, test_id("test_is_trl_own_trainer"): "failed"}, logs["fipo"]
    assert f"lost_with_fipo: 1\n  {test_id('test_is_trl_own_trainer')}" in run.stdout
    comparison = json.loads((tmp_path / "work" / "comparison.json").read_text())
    assert comparison["lost_with_fipo"] == [test_id("test_is_trl_own_trainer")]
    import transformers
    import trl

    assert (comparison["trl"], comparison["transformers"]) == (trl.__version__, transformers.__version__)

    # One arm rerun against the other's saved outcomes: a file where FIPO loses nothing exits 0.
    (source / "tests" / "test_grpo_trainer.py").write_text(TEST_FILE.replace('.startswith("trl.")', " != ''"))
    rerun = subprocess.run([sys.executable, str(REPO / "scripts" / "trl_grpo_suite.py"), "--trl_source",
                            str(source), "--workdir", str(tmp_path / "work"), "--workers", "1", "--arms", "fipo"],
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "lost_with_fipo: 0" in rerun.stdout
