"""The FIPO model card rendered from model_cards/fipo_model_card.md."""

import pickle

import pytest
import yaml
from huggingface_hub import ModelCard
from peft import LoraConfig

from fipo_trl import FIPOConfig, FIPOTrainer
from fipo_trl._tiny import digit_reward, tiny_prompt_dataset


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
