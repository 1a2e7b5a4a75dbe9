"""vLLM generation, what can be checked without a GPU: config pass-through and which log-probs are pi_old.
The GPU runs (vLLM colocate, with and without LoRA) are in tests/trainer/test_gpu.py."""

import pytest
import torch
from trainer_utils import config_kwargs, crafted_micro_batch
from transformers import AutoTokenizer
from trl import TrlParser

import fipo_trl.safety.machine
from fipo_trl import FIPOConfig, FIPOTrainer, fipo_loss
from fipo_trl.tools.tiny import digit_reward, tiny_prompt_dataset


@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_vllm_options_pass_through(mode, tmp_path, monkeypatch):
    monkeypatch.setattr(fipo_trl.safety.machine, "gpu_available", lambda args: True)  # FIPOConfig refuses vLLM on CPU
    monkeypatch.setattr(fipo_trl.safety.machine, "vllm_installed", lambda: True)
    parser = TrlParser((FIPOConfig,))
    (args,) = parser.parse_args_and_config([
        "--output_dir", str(tmp_path), "--bf16", "False", "--use_vllm", "True", "--vllm_mode", mode,
        "--vllm_gpu_memory_utilization", "0.25", "--vllm_tensor_parallel_size", "1",
        "--vllm_server_base_url", "http://10.0.0.1:8000", "--vllm_enable_sleep_mode", "True"])
    assert (args.use_vllm, args.vllm_mode, args.vllm_gpu_memory_utilization) == (True, mode, 0.25)
    assert args.vllm_server_base_url == "http://10.0.0.1:8000" and args.vllm_enable_sleep_mode
    assert args.vllm_importance_sampling_correction is False  # the official recipe has no rollout IS correction
    assert not args.fipo_is_degenerate


def test_pi_old_is_the_training_models_recompute_not_the_sampler(tiny_model_path, tmp_path):
    """With vLLM, TRL also carries the sampler's log-probs (sampling_per_token_logps). FIPO's log-ratio must use
    old_per_token_logps, recomputed by the training model before the first update, as the official code does."""
    args = FIPOConfig(**config_kwargs(tmp_path))
    trainer = FIPOTrainer(model=tiny_model_path, reward_funcs=digit_reward, args=args,
                          train_dataset=tiny_prompt_dataset(8))
    batch, logps = crafted_micro_batch(trainer, AutoTokenizer.from_pretrained(tiny_model_path))
    batch["sampling_per_token_logps"] = batch["old_per_token_logps"] - 0.7  # a very different sampler
    trainer.current_gradient_accumulation_steps = 1
    trainer._compute_loss(trainer.model, batch)
    expected = fipo_loss(logps, batch["old_per_token_logps"], batch["advantages"], batch["completion_mask"])
    torch.testing.assert_close(trainer.fipo_last_batch["weights"], expected.weights, rtol=0, atol=1e-6)
