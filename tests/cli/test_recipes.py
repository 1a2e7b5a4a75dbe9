"""Every recipe in examples/recipes/ goes through the real `fipo-trl` parser and keeps the FIPO invariants."""

from pathlib import Path

import pytest

from fipo_trl.tools.cli import make_parser

RECIPES = Path(__file__).resolve().parents[2] / "examples" / "recipes"
# Processes each recipe's batch sizes are written for (its header says so).
PROCESSES = {"qwen2.5-32b-dapo-math.yaml": 16, "qwen2.5-math-7b.yaml": 16, "qwen2.5-1.5b-single-gpu.yaml": 1,
             "tiny-cpu.yaml": 1}
OFFICIAL = dict(epsilon=0.2, epsilon_high=0.28, delta=10.0, beta=0.0, loss_type="bnpo", fipo_decay_rate=32.0,
                fipo_clip_ratio=0.2, num_iterations=1, vllm_importance_sampling_correction=False,
                mask_truncated_completions=False, temperature=1.0, weight_decay=0.1, max_grad_norm=1.0,
                importance_sampling_level="token")


def parse(name):
    # CPU here: bf16 and vLLM are GPU settings, overridden explicitly so that FIPOConfig validates the rest.
    return make_parser().parse_args_and_config(["--config", str(RECIPES / name), "--bf16", "false",
                                                "--use_vllm", "false"])


def test_every_recipe_is_covered():
    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == sorted(PROCESSES)


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_recipe_parses_and_keeps_the_fipo_invariants(name):
    script, args, model, data = parse(name)
    for field, value in OFFICIAL.items():
        assert getattr(args, field) == value, field
    assert not args.fipo_is_degenerate
    assert args.steps_per_generation == 8 * args.gradient_accumulation_steps or name == "tiny-cpu.yaml"
    assert args.steps_per_generation // args.gradient_accumulation_steps > 1
    assert args.delta > 1 + args.epsilon_high  # the dual clip sits above the PPO clip


def test_official_32b_recipe():
    script, args, model, data = parse("qwen2.5-32b-dapo-math.yaml")
    processes = PROCESSES["qwen2.5-32b-dapo-math.yaml"]
    assert args.num_generations == 16 and args.max_completion_length == 20480
    assert args.per_device_train_batch_size * processes * args.gradient_accumulation_steps == 1024  # 64 prompts x 16
    assert args.per_device_train_batch_size * processes * args.steps_per_generation == 512 * 16
    assert args.steps_per_generation // args.gradient_accumulation_steps == 8
    assert args.fipo_clip_high_only is True and args.fipo_safety_threshold == 10.0
    assert args.learning_rate == 1e-6 and args.lr_scheduler_type == "constant_with_warmup" and args.warmup_steps == 80
    assert args.top_p == 1.0 and args.scale_rewards == "group"
    assert script.reward_funcs == ["math_verify_reward", "overlong_penalty"] and script.overlong_buffer_length == 4096
    assert model.model_name_or_path == "Qwen/Qwen2.5-32B"
    assert data.datasets[0].path == "BytedTsinghua-SIA/DAPO-Math-17k"


def test_paper_7b_recipe():
    script, args, model, data = parse("qwen2.5-math-7b.yaml")
    processes = PROCESSES["qwen2.5-math-7b.yaml"]
    assert args.num_generations == 32 and args.max_completion_length == 10240
    assert args.per_device_train_batch_size * processes * args.gradient_accumulation_steps == 64 * 32
    assert args.per_device_train_batch_size * processes * args.steps_per_generation == 512 * 32
    assert args.fipo_clip_high_only is False and args.fipo_safety_threshold == 3.0
    assert script.overlong_buffer_length == 2048 and args.warmup_steps == 80
    assert args.model_init_kwargs["max_position_embeddings"] == 32768


def test_single_gpu_recipe_uses_dynamic_sampling_on_the_correctness_reward():
    script, args, model, data = parse("qwen2.5-1.5b-single-gpu.yaml")
    assert args.dynamic_sampling and args.dynamic_sampling_metric == "math_verify_reward"
    assert "math_verify_reward" in script.reward_funcs
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 64


def test_tiny_recipe_has_no_model_so_the_cli_builds_one():
    script, args, model, data = parse("tiny-cpu.yaml")
    assert model.model_name_or_path is None and not data.datasets and script.dataset_name is None


@pytest.mark.parametrize("name", ["qwen2.5-32b-dapo-math.yaml", "qwen2.5-math-7b.yaml"])
def test_paper_recipes_use_dynamic_sampling_as_the_official_runs(name):
    """filter_groups on the correctness metric with the official budget: 10 generation batches of 4x the train batch
    = the first train batch plus 39 refills of one train batch."""
    script, args, model, data = parse(name)
    assert args.dynamic_sampling and args.dynamic_sampling_metric == "math_verify_reward"
    assert "math_verify_reward" in script.reward_funcs
    assert args.dynamic_sampling_max_retries + 1 == 10 * 4
