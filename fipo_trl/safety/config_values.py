"""FIPOConfig's values that TRL and transformers accept but that fail only after the model has loaded (in
generate, torch or TRL), crash in TRL's own checks, or train silently wrong. Each error names the field and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

# Counts TRL and transformers accept below their minimum: (minimum, what the value means).
MINIMUM_COUNTS = {
    "num_generations": (2, "completions per prompt; GRPO's advantages compare at least 2"),
    "max_completion_length": (1, "tokens per completion"),
    "per_device_train_batch_size": (1, "completions per device per micro-batch"),
    "per_device_eval_batch_size": (1, "completions per device per eval batch"),
}


# Numbers whose range neither TRL nor transformers checks: torch or generate refuse them after the model has loaded,
# or they do silently nothing. (field, valid?, the rule and fix)
NUMBER_RULES = [
    ("temperature", lambda v: v > 0, "sampling needs a temperature > 0 (GRPO compares several sampled completions per "
     "prompt). Fix: use e.g. the official 1.0"),
    ("top_p", lambda v: 0 < v <= 1, "it must be in (0, 1]; 1 keeps every token"),
    ("top_k", lambda v: v >= 0, "it must be an integer >= 0 (0: no top-k cut)"),
    ("min_p", lambda v: 0 <= v <= 1, "it must be in [0, 1], or unset"),
    ("repetition_penalty", lambda v: v > 0, "it must be > 0 (1: no penalty)"),
    ("learning_rate", lambda v: v >= 0, "it must be >= 0 (e.g. 1e-6)"),
    ("beta", lambda v: v >= 0, "the KL coefficient must be >= 0 (0, the official FIPO value, needs no reference "
     "model)"),
    ("weight_decay", lambda v: v >= 0, "it must be >= 0 (0: none)"),
    ("max_grad_norm", lambda v: v >= 0, "it must be >= 0 (0 turns gradient clipping off)"),
    ("adam_beta1", lambda v: 0 <= v < 1, "it must be in [0, 1) (default 0.9)"),
    ("adam_beta2", lambda v: 0 <= v < 1, "it must be in [0, 1) (default 0.999)"),
    ("adam_epsilon", lambda v: v >= 0, "it must be >= 0 (default 1e-8)"),
]
OPTIONAL_NUMBERS = {"top_k", "min_p", "max_grad_norm"}  # None: the feature is off


def check_values(args) -> None:
    """Values GRPOConfig accepts that fail only after the model has loaded (in generate, torch or TRL), crash in
    TRL's own checks (num_generations 0: ZeroDivisionError) or train silently wrong (nan, max_steps 0, beta < 0).
    Each error names the field and the fix."""
    for item in dataclasses.fields(args):
        value = getattr(args, item.name, None)
        for number in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(number, float) and not math.isfinite(number):
                example = "" if item.default in (dataclasses.MISSING, None) else f", e.g. the default {item.default!r}"
                rule = "every number in it must be finite" if number is not value else "it must be a finite number"
                raise ValueError(f"`{item.name}` = {value!r} is invalid: {rule}. Fix: pass a finite value{example}.")
    for name, (minimum, meaning) in MINIMUM_COUNTS.items():
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"`{name}` = {value!r} is invalid: it must be an integer >= {minimum} ({meaning}).")
    if args.num_generations_eval is not None and (not isinstance(args.num_generations_eval, int)
                                                  or args.num_generations_eval < 1):
        raise ValueError(f"`num_generations_eval` = {args.num_generations_eval!r} is invalid: it must be an integer "
                         ">= 1, or unset to use num_generations.")
    for name in ("steps_per_generation", "generation_batch_size"):  # 0 divides by zero in TRL and FIPO
        value = getattr(args, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"`{name}` = {value!r} is invalid: it must be an integer >= 1, or unset (FIPO then makes "
                             "fipo_updates_per_generation updates per generation batch).")
    if isinstance(args.max_steps, bool) or not isinstance(args.max_steps, int) or (
            args.max_steps < 1 and args.max_steps != -1):
        raise ValueError(f"`max_steps` = {args.max_steps!r} is invalid (transformers would train one step at 0): it "
                         "must be an integer >= 1, or -1 to train for num_train_epochs.")
    if args.max_steps == -1 and isinstance(args.num_train_epochs, (int, float)) and args.num_train_epochs <= 0:
        raise ValueError(f"`num_train_epochs` = {args.num_train_epochs!r} with max_steps = -1 trains nothing. Fix: "
                         "set num_train_epochs > 0, or max_steps >= 1.")
    for name in ("seed", "data_seed"):  # numpy's seed range; set_seed fails there only after the model loads
        value = getattr(args, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32):
            raise ValueError(f"`{name}` = {value!r} is invalid: it must be an integer in [0, 2**32 - 1].")
    if str(getattr(args.save_strategy, "value", args.save_strategy)) == "steps" and not args.save_steps > 0:
        raise ValueError(f"`save_steps` = {args.save_steps!r} is invalid with save_strategy='steps': it must be > 0 "
                         "(a step count, or a fraction of the run below 1). Fix: e.g. save_steps=500, or "
                         "save_strategy='no'.")
    for name, valid, rule in NUMBER_RULES:
        value = getattr(args, name)
        if value is None and name in OPTIONAL_NUMBERS:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):
            raise ValueError(f"`{name}` = {value!r} is invalid: {rule}.")
    check_hub_model_id(args)



def check_hub_model_id(args) -> None:
    """The repository a push would create must be a valid Hub id: checked here, not after training (transformers
    then warns and pushes nothing). Without hub_model_id, transformers names it after output_dir's last folder."""
    if args.hub_model_id is None and not args.push_to_hub:
        return
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id = args.hub_model_id
    if repo_id is None:
        repo_id = Path(args.output_dir or "trainer_output").absolute().name
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        if args.hub_model_id is not None:
            raise ValueError(f"`hub_model_id` = {repo_id!r} is not a valid Hub repository id: {error} Fix: use "
                             "'name' or 'user/name' (letters, digits, '-', '_', '.').") from None
        raise ValueError(f"push_to_hub: the repository would be named after `output_dir`'s last folder, {repo_id!r}, "
                         f"which is not a valid Hub repository id: {error} Fix: set hub_model_id to 'name' or "
                         "'user/name'.") from None


def check_deepspeed_config(args) -> None:
    """A DeepSpeed config (``--deepspeed``, or accelerate's ``deepspeed_config_file``) whose batch geometry disagrees
    with the trainer's flags: transformers refuses it only once training starts, after the model has loaded."""
    source = getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not source:
        return
    where = "--deepspeed" if isinstance(source, dict) else repr(str(source))
    if isinstance(source, dict):
        config = source
    else:
        try:
            config = json.loads(Path(source).read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"the DeepSpeed config {where} cannot be read ({error}). Fix: pass a JSON DeepSpeed "
                             "config file.") from None
    if not isinstance(config, dict):
        raise ValueError(f"the DeepSpeed config {where} is not a JSON object. Fix: pass a DeepSpeed config file.")
    expected = {"train_micro_batch_size_per_gpu": ("per_device_train_batch_size", args.per_device_train_batch_size),
                "gradient_accumulation_steps": ("gradient_accumulation_steps", args.gradient_accumulation_steps),
                "train_batch_size": ("per_device_train_batch_size x gradient_accumulation_steps x processes",
                                     args.per_device_train_batch_size * args.gradient_accumulation_steps
                                     * args.world_size)}
    for key, (flag, value) in expected.items():
        if config.get(key) not in (None, "auto") and config[key] != value:
            raise ValueError(
                f"the DeepSpeed config {where} sets {key} = {config[key]!r}, but the trainer's {flag} is {value}: "
                "DeepSpeed and the trainer would split the batch differently (transformers refuses it only after "
                f"the model has loaded). Fix: set {key} to \"auto\" in the DeepSpeed config (it then follows the "
                "trainer's flags), or change the flags to match it.")
