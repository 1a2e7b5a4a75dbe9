"""The learning demo and the FIPO-vs-DAPO comparison run offline and leave the promised artifacts."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")
import matplotlib.image  # noqa: E402
from influence_page import read_influence_html  # noqa: E402

pytestmark = pytest.mark.slow  # subprocess runs of whole trainings

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))  # the demo's task module lives beside its scripts


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reward_and_task():
    from arithmetic_demo import arithmetic_problems, correctness_reward, parse_answer

    problems = arithmetic_problems()
    assert len(problems) == 110 and ("what is seven minus three ?", "4") in problems
    assert parse_answer("the answer is 4 .") == "4"
    assert parse_answer("the answer is 4 . 4") is None  # trailing text or a cut completion is wrong
    assert correctness_reward(["the answer is 4 .", "the answer is 5 .", "4"], answer=["4", "4", "4"]) == [1, -1, -1]


def test_demo_writes_curves_influence_page_and_card(tmp_path):
    demo = load_example("demo_learning")
    threads = torch.get_num_threads()
    try:
        # 150 warm-start steps: enough right answers that rewards differ within groups, so the policy moves
        trainer, results = demo.main(["--output_dir", str(tmp_path), "--max_steps", "16", "--logging_steps", "8",
                                      "--influence_every", "8", "--warm_start_steps", "150"])
    finally:
        torch.set_num_threads(threads)

    image = matplotlib.image.imread(tmp_path / "training_curves.png")  # decodes
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0
    card = (tmp_path / "README.md").read_text()
    assert "![Training curves](training_curves.png)" in card
    assert "(fipo_influence/latest.html)" in card  # the card links the influence page too
    assert "[token-influence page](fipo_influence/latest.html)" in card

    # The latest page is step 16, the last update, whose weights the trainer still holds.
    page = (tmp_path / "fipo_influence" / "latest.html").read_text()
    assert page == (tmp_path / "fipo_influence" / "step-16.html").read_text()
    rows = read_influence_html(page)
    batch = trainer.fipo_last_batch
    assert 0 < len(rows) == min(8, batch["completion_ids"].shape[0])
    for row, spans in enumerate(rows):
        mask = batch["mask"][row]
        assert len(spans) == int(mask.sum())  # one shaded span per completion token
        assert [w for w, _, _ in spans] == batch["weights"][row][mask].tolist()  # the trainer's own weights
        assert [f for _, f, _ in spans] == batch["future_kl"][row][mask].tolist()
    assert any(f != 0 for spans in rows for _, f, _ in spans)  # step 16 is off-policy: the Future-KL is live

    assert 0 <= results["greedy_accuracy_before"] <= 1 and 0 <= results["greedy_accuracy_after"] <= 1
    assert (tmp_path / "demo_results.json").exists()


def test_compare_script_quick_mode(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(REPO / "examples" / "compare_fipo_dapo.py"), "--quick",
                             "--output_dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    image = matplotlib.image.imread(tmp_path / "fipo_vs_dapo.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0
    table = (tmp_path / "fipo_vs_dapo.md").read_text()
    assert "| FIPO | " in table and "| DAPO | " in table and "±" in table
    assert (tmp_path / "fipo_vs_dapo.json").exists()


def test_missing_matplotlib_names_the_extra(monkeypatch):
    import builtins

    from fipo_trl.tools import plots

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match=r"fipo_trl\[demo\]"):
        plots.require_matplotlib()
