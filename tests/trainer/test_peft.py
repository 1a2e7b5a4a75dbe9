"""LoRA adapters trained with FIPOTrainer: save, reload, merge."""

import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig
from transformers import AutoModelForCausalLM

from fipo_trl import FIPOConfig, FIPOTrainer
from fipo_trl.tools.tiny import digit_reward, tiny_prompt_dataset


@pytest.fixture(scope="module")
def lora_run(tiny_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    args = FIPOConfig(output_dir=str(out), bf16=False, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, max_steps=4, learning_rate=5e-2, fipo_updates_per_generation=2,
                      report_to="none", save_strategy="no", gradient_checkpointing=False, disable_tqdm=True)
    trainer = FIPOTrainer(model=tiny_model_path, reward_funcs=digit_reward, args=args,
                          train_dataset=tiny_prompt_dataset(16),
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"))
    trainer.train()
    trainer.save_model(str(out))
    return trainer, out


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapter_saves_and_reloads_to_the_same_outputs(lora_run, tiny_model_path):
    trainer, out = lora_run
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    assert not (out / "model.safetensors").exists()  # the adapter only, not a copy of the base model
    ids = torch.randint(7, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    reloaded = AutoPeftModelForCausalLM.from_pretrained(str(out))
    torch.testing.assert_close(logits(reloaded, ids), logits(trainer.model, ids), rtol=0, atol=1e-6)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert (logits(base, ids) - logits(reloaded, ids)).abs().max() > 1e-4  # the adapter did learn something


def test_merged_adapter_gives_the_same_outputs(lora_run, tmp_path):
    _, out = lora_run
    ids = torch.randint(7, 60, (2, 12), generator=torch.Generator().manual_seed(1))
    adapter_model = AutoPeftModelForCausalLM.from_pretrained(str(out))
    expected = logits(adapter_model, ids)
    merged = adapter_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=0, atol=1e-5)


def test_fipo_trl_train_use_peft_builds_trls_lora_config_or_names_the_peft_to_install():
    """`fipo-trl train --use_peft` builds its LoraConfig with TRL's get_peft_config, which passes target_parameters
    (peft >= 0.17). On an older peft (the oldest stack: 0.13) that was a raw TypeError; it is an error with the fix."""
    import peft
    from packaging.version import Version
    from trl import ModelConfig

    from fipo_trl.tools.cli import lora_config

    model_args = ModelConfig(use_peft=True, lora_r=4)
    if "target_parameters" in peft.LoraConfig.__dataclass_fields__:
        assert lora_config(model_args).r == 4
    else:
        assert Version(peft.__version__) < Version("0.17")
        with pytest.raises(ValueError, match=r"--use_peft: .*peft 0\.\d+.* Fix: pip install -U 'peft>=0.17'"):
            lora_config(model_args)
