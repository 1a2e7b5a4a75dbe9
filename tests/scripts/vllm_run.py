"""Launched by tests/vllm_colocate/test_vllm_colocate.py (plain python, or `accelerate launch` for 2 processes): FIPO
trains the tiny model for 4 optimizer steps with vLLM colocate generating, on the GPU where there is one, else on the
CPU (vLLM's CPU build, with the weight-packing stand-in tests/scripts/cpu_vllm.py, which changes nothing on a GPU),
and each rank writes what it saw to <result_dir>/rank<i>.json:

- ``generations``: each call of TRL's vLLM generate: its completions, and the largest difference between the
  sampler's log-probs and a float64 forward pass of the training model at that moment (pi_old) on the same tokens;
- ``syncs``: each weight sync: vLLM's log-probs of a fixed token sequence before and after it, beside the training
  model's (float64);
- ``micro_batches``: each weighted micro-batch: whether every completion is one vLLM produced, and the largest
  differences of the trainer's log pi, log pi_old, FIPO weights and Future-KL from float64 references recomputed
  independently (log pi_old under the weights vLLM generated with; the weights by kernels/naive.py), and the fipo/*
  metrics of that reference;
- the logged history (losses, fipo/*, kl, the IS ratio, dynamic sampling) and the model card.

    python vllm_run.py MODEL OUTPUT_DIR RESULT_DIR [--is_correction] [--lora_reference] [--dynamic_sampling]
"""

import copy
import json
import os

import cpu_vllm  # noqa: F401 - before the engine is built: vLLM's CPU weight packing (see its docstring)
import torch
from rank_results import run_parser
from trl import GRPOTrainer

from fipo_trl import FIPOConfig, FIPOTrainer
from fipo_trl.kernels.naive import fipo_loss_naive
from fipo_trl.loss import hyperparameters_from_config, metrics_from_stats
from fipo_trl.tools.tiny import completion_text, digit_reward, tiny_prompt_dataset

FIXED_SEQUENCE = list(range(5, 37))  # the sequence whose log-probs the weight-sync check compares


def float64_copy(trainer, model):
    return copy.deepcopy(trainer.accelerator.unwrap_model(model)).double().eval()


def float64_logps(trainer, model64, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Per-token log-probs of the completions under ``model64`` (a float64_copy), by TRL's own routine."""
    with torch.no_grad():
        return GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, model64, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([prompt_mask, completion_mask], 1).long(), completion_ids.size(1))[0]


def vllm_prompt_logps(llm, ids):
    from vllm import SamplingParams

    output = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                          use_tqdm=False)[0]
    return torch.tensor([entry[token].logprob for token, entry in zip(ids[1:], output.prompt_logprobs[1:])],
                        dtype=torch.float64)


def model_logps(trainer, ids):
    return float64_logps(trainer, float64_copy(trainer, trainer.model), torch.tensor([ids[:1]]), torch.ones(1, 1),
                         torch.tensor([ids[1:]]), torch.ones(1, len(ids) - 1))[0]


def is_ratio_reference(old, sampling, mask, args):
    """TRL's rollout importance-sampling ratio pi_old / pi_sampler by its definition (docs of
    ``vllm_importance_sampling_mode``), in float64, broadcast to (B, T)."""
    difference = ((old.double() - sampling.double()) * mask).nan_to_num(0.0)
    mode, low, high = (args.vllm_importance_sampling_mode, args.vllm_importance_sampling_clip_min,
                       args.vllm_importance_sampling_clip_max)
    if mode.startswith("sequence"):
        difference = difference.sum(-1, keepdim=True)
    ratio = difference.exp()
    if mode.endswith("truncate"):
        ratio = ratio.clamp(min=low, max=high)
    else:  # mask: a ratio outside [low, high] drops the token (the sequence)
        keep = torch.ones_like(ratio, dtype=torch.bool)
        if low is not None:
            keep &= ratio >= low
        if high is not None:
            keep &= ratio <= high
        ratio = ratio * keep
    return ratio.expand_as(mask)


def digit_reward_if_one_in_prompt(prompts, completions, **kwargs):
    """digit_reward for prompts with the word "one"; 0 for the others, whose groups then have one reward and are
    dropped by dynamic sampling, so that refill rounds generate (through vLLM)."""
    rewards = digit_reward(completions, **kwargs)
    return [r if "one" in completion_text(p) else 0.0 for r, p in zip(rewards, prompts)]


def largest_difference(a, b, where=None) -> float:
    difference = (a.double() - b.double()).abs()
    return (difference if where is None else difference[where]).max().item()


def instrument(trainer, record):
    """Wrap TRL's vLLM generate and sync, and FIPOTrainer's weighting, to record what they did (see the docstring);
    nothing they compute is changed."""
    generation = trainer.vllm_generation
    seen = {}  # a float64 copy of the model vLLM last sampled from (pi_old), and the generation batch's completions
    generate, sync_weights, apply_weights = generation.generate, generation.sync_weights, trainer._apply_fipo_weights

    def recorded_generate(*args, **kwargs):
        prompt_ids, completion_ids, logprobs, *rest = generate(*args, **kwargs)
        seen["pi_old"] = float64_copy(trainer, trainer.model)
        if seen.get("step") != trainer.state.global_step:  # a new generation batch (else a dynamic-sampling refill)
            seen.update(step=trainer.state.global_step, batch_completions=[])
        seen["batch_completions"] += [tuple(ids) for ids in completion_ids]
        worst = 0.0
        for prompt, completion, sampler in zip(prompt_ids, completion_ids, logprobs):
            if completion:
                ours = float64_logps(trainer, seen["pi_old"], torch.tensor([prompt]), torch.ones(1, len(prompt)),
                                     torch.tensor([completion]), torch.ones(1, len(completion)))[0]
                worst = max(worst, largest_difference(ours, torch.tensor([row[0] for row in sampler])))
        record["generations"].append({"step": trainer.state.global_step, "completions": completion_ids,
                                      "sampler_vs_pi_old": worst})
        return (prompt_ids, completion_ids, logprobs, *rest)

    def recorded_sync():
        before = vllm_prompt_logps(generation.llm, FIXED_SEQUENCE)
        sync_weights()
        after = vllm_prompt_logps(generation.llm, FIXED_SEQUENCE)
        model = model_logps(trainer, FIXED_SEQUENCE)
        record["syncs"].append({"step": trainer.state.global_step, "before": largest_difference(before, model),
                                "after": largest_difference(after, model)})

    def recorded_apply(batch, per_token_logps):
        apply_weights(batch, per_token_logps)
        get = lambda key: dict.get(batch, key)  # noqa: E731 - the private copy refuses reads of the advantages
        mask = get("completion_mask").bool()
        rows = [tuple(ids[:int(n)].tolist()) for ids, n in zip(get("completion_ids"), mask.sum(1))]
        inputs = (get("prompt_ids"), get("prompt_mask"), get("completion_ids"), get("completion_mask"))
        logps64 = float64_logps(trainer, float64_copy(trainer, trainer.model), *inputs)
        old, sampling, is_ratio = get("old_per_token_logps"), get("sampling_per_token_logps"), get(
            "importance_sampling_ratio")
        old64 = logps64 if old is None else float64_logps(trainer, seen["pi_old"], *inputs)
        last = trainer.fipo_last_batch
        reference = fipo_loss_naive(logps64, old64, last["advantages"], mask,
                                    **hyperparameters_from_config(trainer.args))
        record["micro_batches"].append({
            "step": trainer.state.global_step, "pi_old_given": old is not None,
            "from_vllm": all(any(done[:len(row)] == row for done in seen["batch_completions"]) for row in rows),
            "logps": largest_difference(per_token_logps, logps64, mask),
            "old_logps": 0.0 if old is None else largest_difference(old, old64, mask),
            "sampler_vs_pi_old": None if sampling is None or old is None else largest_difference(sampling, old, mask),
            "weights": largest_difference(last["weights"], reference["w"], mask),
            "future_kl": largest_difference(last["future_kl"], reference["future_kl"], mask),
            "weights_not_one": largest_difference(reference["w"], torch.ones_like(reference["w"]), mask),
            "reference_metrics": metrics_from_stats(reference["stats"]), "n_tokens": reference["stats"]["n_tokens"],
            "is_ratio": None if is_ratio is None else largest_difference(
                is_ratio.expand_as(mask), is_ratio_reference(old, sampling, mask, trainer.args), mask),
        })

    generation.generate, generation.sync_weights, trainer._apply_fipo_weights = (
        recorded_generate, recorded_sync, recorded_apply)


def main():
    parser = run_parser()
    parser.add_argument("--is_correction", action="store_true", help="TRL's vLLM importance-sampling correction")
    parser.add_argument("--lora_reference", action="store_true", help="LoRA (TRL merges it to sync) and beta > 0")
    parser.add_argument("--dynamic_sampling", action="store_true", help="refill rounds generate through vLLM")
    options = parser.parse_args()
    extra, peft_config = {}, None
    if options.lora_reference:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        extra.update(beta=0.04, learning_rate=5e-2)
    if options.dynamic_sampling:
        extra.update(dynamic_sampling=True, dynamic_sampling_max_retries=3)
    args = FIPOConfig(**{**dict(
        output_dir=options.output_dir, bf16=False, use_cpu=not torch.cuda.is_available(),
        per_device_train_batch_size=4, num_generations=4,
        max_completion_length=8, max_steps=4, learning_rate=2e-2, fipo_updates_per_generation=2, report_to="none",
        logging_steps=1, save_strategy="steps", save_steps=4, gradient_checkpointing=False, seed=0,
        disable_tqdm=True, use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.05,
        vllm_importance_sampling_correction=options.is_correction), **extra})
    reward = digit_reward_if_one_in_prompt if options.dynamic_sampling else digit_reward
    trainer = FIPOTrainer(model=options.model_path, reward_funcs=reward, args=args,
                          train_dataset=tiny_prompt_dataset(32), peft_config=peft_config)
    record = {"generations": [], "syncs": [], "micro_batches": []}
    instrument(trainer, record)
    trainer.train()
    trainer.vllm_generation.sync_weights()  # the final weights too: vLLM then matches the trained model
    acc = trainer.accelerator
    history = trainer.state.log_history
    record.update(rank=acc.process_index, num_processes=acc.num_processes, global_step=trainer.state.global_step,
                  losses=[h["loss"] for h in history if "loss" in h],
                  metrics={key: [h[key] for h in history if key in h]
                           for key in sorted({k for h in history for k in h})}, history=history,
                  card=open(os.path.join(options.output_dir, "README.md")).read() if acc.is_main_process else None)
    with open(f"{options.result_dir}/rank{acc.process_index}.json", "w") as f:
        json.dump(record, f)
    acc.wait_for_everyone()  # the process group stays up: vLLM's own shutdown at exit tears it down


if __name__ == "__main__":
    main()
