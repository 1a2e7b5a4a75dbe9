"""The FIPO model card rendered from model_cards/fipo_model_card.md."""

import ast
import pickle
import re
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from peft import LoraConfig

from fipo_trl import FIPOConfig, FIPOTrainer
from fipo_trl.tools import model_card
from fipo_trl.tools.tiny import digit_reward, tiny_prompt_dataset


def make_trainer(model_path, tmp_path, peft_config=None, **overrides):
    args = FIPOConfig(output_dir=str(tmp_path / "run"), bf16=False, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=8, report_to="none", gradient_checkpointing=False,
                      gradient_accumulation_steps=2, fipo_clip_high_only=False, fipo_safety_threshold=3.0, **overrides)
    return FIPOTrainer(model=model_path, reward_funcs=digit_reward, args=args, train_dataset=tiny_prompt_dataset(16),
                       peft_config=peft_config)


def front_matter(text):
    return yaml.safe_load(text.split("---")[1])


def test_card_carries_fipo_hyperparameters_curves_and_eval(tiny_model_path, tmp_path):
    trainer = make_trainer(tiny_model_path, tmp_path)
    trainer.state.log_history = [
        {"step": s, "reward": 0.1 * s if s % 8 == 1 else None, "completions/mean_length": 10.0 + s,
         "fipo/influence_weights_mean": 1.0 + s / 100, "fipo/influence_weights_max": 1.2,
         "fipo/IW_upper_clip_ratio": 0.25, "fipo/active": float(s % 8 != 1)} for s in range(1, 31)]
    for entry in trainer.state.log_history:  # rewards are only logged on generating steps
        if entry["reward"] is None:
            del entry["reward"]
    trainer.create_model_card(dataset_name="org/math", eval_results={"AIME-2024": {"avg@32": 0.41, "pass@32": 0.8}})
    text = (tmp_path / "run" / "README.md").read_text()
    meta = front_matter(text)
    assert meta["tags"] == ["fipo", "grpo", "trl"] and meta["datasets"] == ["org/math"]
    assert meta["library_name"] == "transformers" and "base_model" not in meta  # a local path is not a Hub id
    assert "None" not in text
    assert "| influence-weight clip | [0.8, 1.2] |" in text and "| safety threshold" in text and "| 3.0 |" in text
    assert "| optimizer updates per generation batch | 8 |" in text and "| dual clip c (`delta`) | 10.0 |" in text
    assert "| completions per prompt / per optimizer step | 4 / 8 |" in text
    curve_rows = [line for line in text.splitlines() if line.startswith("| ") and line.count("|") == 8][1:]
    assert len(curve_rows) == 12 and curve_rows[0].startswith("| 1 | 0.1 |") and curve_rows[-1].startswith("| 30 |")
    card = ModelCard(text)  # the model-index parses back into evaluation results
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {("AIME-2024", "avg@32"): 0.41, ("AIME-2024", "pass@32"): 0.8}
    assert "@article{fipo2026" in text and "trl:" in text and "transformers:" in text


def test_adapter_card_explains_how_to_load_the_adapter(tiny_model_path, tmp_path):
    trainer = make_trainer(tiny_model_path, tmp_path, peft_config=LoraConfig(r=4, target_modules=["q_proj"],
                                                                             task_type="CAUSAL_LM"))
    trainer.create_model_card()
    text = (tmp_path / "run" / "README.md").read_text()
    assert front_matter(text)["library_name"] == "peft"
    assert "AutoPeftModelForCausalLM.from_pretrained" in text and "LoRA adapter" in text
    assert "No training steps were logged." in text


def test_hub_base_model_is_linked(tiny_model_path, tmp_path):
    trainer = make_trainer(tiny_model_path, tmp_path)
    trainer.model.config._name_or_path = "org/base-model"
    trainer.create_model_card()
    text = (tmp_path / "run" / "README.md").read_text()
    assert front_matter(text)["base_model"] == "org/base-model"
    assert "[org/base-model](https://huggingface.co/org/base-model)" in text


@pytest.mark.parametrize("protocol", [pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_hub_token_is_never_pickled(tmp_path, protocol):
    args = FIPOConfig(output_dir=str(tmp_path), bf16=False, hub_token="hf_secret_value_123")
    blob = pickle.dumps(args, protocol=protocol)
    assert b"hf_secret_value_123" not in blob
    assert pickle.loads(blob).hub_token is None and args.hub_token == "hf_secret_value_123"


HOSTILE = "evil\n---\nlicense: mit\n<script>alert(1)</script> | a | [x](http://e) `c` # *em* - 1. _u_ &lt;"


def card_body(text):
    """The Markdown after the front matter, split the way the Hub splits it."""
    return text.split("\n---\n", 1)[1]


def python_snippet(text):
    code = text.split("```python\n", 1)[1].split("\n```", 1)[0]
    return ast.parse(code)  # a SyntaxError fails the test


def string_constants(tree):
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def test_hostile_names_are_inert_in_the_front_matter_body_and_table(tiny_model_path, tmp_path):
    trainer = make_trainer(tiny_model_path, tmp_path)
    trainer.model.config._name_or_path = HOSTILE
    trainer.create_model_card(model_name=HOSTILE, dataset_name=HOSTILE, tags=[HOSTILE],
                              eval_results={HOSTILE: {"avg@4 | pass": 0.5}})
    text = (tmp_path / "run" / "README.md").read_text()
    meta = ModelCard(text).data.to_dict()  # YAML written by huggingface_hub, parsed back: every field intact
    assert "license" not in meta and "datasets" not in meta and "base_model" not in meta  # not Hub ids
    assert HOSTILE in meta["tags"] and meta["model-index"][0]["name"] == HOSTILE
    assert meta["model-index"][0]["results"][0]["dataset"]["name"] == HOSTILE
    body = card_body(text)
    assert "<script>" not in body and "&lt;script&gt;" in body and "&amp;lt;" in body
    lines = body.splitlines()
    assert "---" not in lines and not any(line.startswith(("license", "- 1.", "<")) for line in lines)
    assert lines[1] == "# " + model_card.markdown_text(HOSTILE)  # the title stays one heading line
    header = lines.index("| dataset | metric | value |")
    row = lines[header + 2]
    cells = re.split(r"(?<!\\)\|", row)[1:-1]  # cell boundaries are the unescaped pipes
    assert len(cells) == 3 and cells[2].strip() == "0.5"


@pytest.mark.parametrize("where", ["hub_model_id", "output_dir"])
def test_a_quote_in_the_repository_name_cannot_run_code_from_the_quick_start(tiny_model_path, tmp_path, where):
    """A `"` in output_dir or hub_model_id was pasted into the Quick-start Python: a copied snippet could run it."""
    hostile = 'run"); __import__("os").system("echo pwned"); ("``` `'
    trainer = make_trainer(tiny_model_path, tmp_path)
    if where == "hub_model_id":
        trainer.hub_model_id = f"org/{hostile}"
    else:
        trainer.args.output_dir = str(tmp_path / hostile)
        (tmp_path / hostile).mkdir()
    trainer.create_model_card()
    text = (Path(trainer.args.output_dir) / "README.md").read_text()
    tree = python_snippet(text)
    expected = f"org/{hostile}" if where == "hub_model_id" else hostile
    assert expected in string_constants(tree)
    assert "__import__" not in {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    called = {node.func.id for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert called == {"pipeline", "print", "generator"}  # the snippet's own calls, nothing injected


@pytest.mark.parametrize(("text", "expected"), [
    ("a | b", r"a \| b"), ("<b>&", "&lt;b&gt;&amp;"), ("line\n\n--- x", "line --- x"), ("- item", r"\- item"),
    ("12. point", r"12\. point"), ("[x](y)", r"\[x\](y)"), ("`c` *e* _u_ ~s~ # h", r"\`c\` \*e\* \_u\_ \~s\~ \# h"),
    ("org/Qwen2.5-0.5B", "org/Qwen2.5-0.5B"), ("back\\slash", "back\\\\slash"),
])
def test_markdown_text(text, expected):
    assert model_card.markdown_text(text) == expected


def test_weight_bounds_come_from_the_kernels_contract(tiny_model_path, tmp_path):
    trainer = make_trainer(tiny_model_path, tmp_path, fipo_clip_ratio=0.0)
    trainer.create_model_card()
    assert "| influence-weight clip | min(exp F, 10) |" in (tmp_path / "run" / "README.md").read_text()
    trainer.args.fipo_clip_high_only, trainer.args.fipo_clip_ratio = True, 0.3
    trainer.create_model_card()
    assert "| influence-weight clip | [1, 1.3] |" in (tmp_path / "run" / "README.md").read_text()
