"""The ``fipo-trl`` command: TRL's ``trl grpo`` script with FIPOTrainer/FIPOConfig, plus ``eval``.

    fipo-trl [train] [flags]         train (the default subcommand); `fipo-trl --help` lists every flag
    fipo-trl train --config examples/recipes/qwen2.5-1.5b-single-gpu.yaml
    fipo-trl eval --model_name_or_path outputs/my-run --k 16 ...       avg@k / pass@k / cons@k (`fipo-trl eval --help`)
    accelerate launch --config_file <accelerate config> -m fipo_trl.tools.cli train --config recipe.yaml

With no model (no --model_name_or_path and no --config, or a recipe without one) ``train`` builds a tiny Llama locally
(no download) and trains it on built-in arithmetic prompts: the embedded default, a CPU smoke run.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trl import (
    DatasetMixtureConfig,
    ModelConfig,
    ScriptArguments,
    TrlParser,
    get_dataset,
    get_peft_config,
    get_quantization_config,
)

from fipo_trl.config import FIPOConfig
from fipo_trl.kernels.env import check_environment, show_traceback
from fipo_trl.safety.hub import warn_hub_failure
from fipo_trl.safety.inputs import check_config_file, check_output_dir, checking_inputs, is_input_error
from fipo_trl.safety.lock import acquire_output_dir_lock, release_output_dir_lock
from fipo_trl.safety.machine import check_liger_machine, check_vllm_machine
from fipo_trl.safety.resume import check_output_dir_before_load

# The embedded default when no model is named (no --model_name_or_path, no --config); flags still win.
EMBEDDED_DEFAULTS = dict(
    output_dir="outputs/fipo-tiny", max_steps=16, per_device_train_batch_size=4, num_generations=4,
    max_completion_length=12, learning_rate=5e-3, logging_steps=1, save_strategy="steps", save_steps=8,
    report_to="none", gradient_checkpointing=False, seed=0, disable_tqdm=False, fipo_updates_per_generation=4,
    overwrite_output_dir=True,  # the quick start reruns as it is: the last run's checkpoints move to previous-run-N/
)
TOY_REWARD = "fipo_trl.tools.tiny.digit_reward"


@dataclass
class FIPOScriptArguments(ScriptArguments):
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={"help": "Reward functions: 'math_verify_reward' (DAPO's +-1 verifier, reference answer in the "
                  "'solution' or 'answer' column), 'overlong_penalty' (DAPO's soft length penalty, see "
                  "--overlong_buffer_length), or dotted import paths ('my_lib.rewards.correctness'). Default: "
                  "'math_verify_reward'; the embedded tiny run uses a toy digit reward."},
    )
    overlong_buffer_length: int | None = field(
        default=None,
        metadata={"help": "Buffer of the 'overlong_penalty' reward, in tokens: the penalty is 0 up to "
                  "max_completion_length - buffer and -1 at max_completion_length. Default max_completion_length / 5 "
                  "(the official 4096 of 20480 for 32B and 2048 of 10240 for 7B)."},
    )
    overlong_penalty_factor: float = field(
        default=1.0, metadata={"help": "Scale of the 'overlong_penalty' reward. Official: 1.0."},
    )
    reward_timeout_seconds: float = field(
        default=5.0,
        metadata={"help": "Hard wall-clock limit of one math-verify check in 'math_verify_reward' (a check that "
                  "overruns scores -1)."},
    )
    data_files: list[str] | None = field(
        default=None,
        metadata={"help": "Local data files for a builder named by --dataset_name, e.g. `--dataset_name json "
                  "--data_files train.jsonl` (a single file can also be passed as --dataset_name itself)."},
    )
    merge_adapter: bool = field(
        default=False,
        metadata={"help": "With a LoRA adapter (--use_peft): also save the base model with the adapter merged in, "
                  "to <output_dir>/merged, loadable without peft."},
    )


def load_reward_funcs(names: list[str], training_args: FIPOConfig, script_args: FIPOScriptArguments) -> list:
    """Resolve --reward_funcs: the short names of the rewards fipo_trl ships, else dotted import paths."""
    from fipo_trl.rewards import MathVerifyReward, overlong_penalty

    funcs = []
    for name in names:
        if name in ("math_verify_reward", "math_verify"):
            funcs.append(MathVerifyReward(timeout_seconds=script_args.reward_timeout_seconds))
        elif name == "overlong_penalty":
            max_length = training_args.max_completion_length
            buffer = script_args.overlong_buffer_length
            buffer = max(1, max_length // 5) if buffer is None else buffer
            funcs.append(overlong_penalty(max_length, buffer, script_args.overlong_penalty_factor))
        elif "." in name:
            funcs.append(_import_reward(name))
        else:
            raise ValueError(f"--reward_funcs {name!r}: expected 'math_verify_reward', 'overlong_penalty' or a dotted "
                             "import path such as 'my_rewards.correctness'.")
    return funcs


def check_script_flags(script_args: FIPOScriptArguments, training_args: FIPOConfig, model_args: ModelConfig,
                       reward_names: list[str]) -> None:
    """The script's own flags (FIPOConfig checks its fields itself): each error names the flag and the fix."""
    from fipo_trl.rewards import MAX_CHECK_SECONDS

    if script_args.merge_adapter and not model_args.use_peft:
        raise ValueError("--merge_adapter merges the run's LoRA adapter into the base model, but this run trains no "
                         "adapter. Fix: add --use_peft true, or drop --merge_adapter.")
    if model_args.use_peft:  # peft accepts these and fails (or trains nothing) once the model is wrapped
        r, alpha, dropout = model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"--lora_r {r!r}: the LoRA rank must be an integer >= 1. Fix: pass e.g. --lora_r 16.")
        if not _is_number(alpha) or alpha <= 0:
            raise ValueError(f"--lora_alpha {alpha!r}: must be a finite number > 0. Fix: pass e.g. --lora_alpha 32.")
        if not _is_number(dropout) or not 0 <= dropout < 1:
            raise ValueError(f"--lora_dropout {dropout!r}: must be in [0, 1). Fix: pass e.g. --lora_dropout 0.05.")
    timeout = script_args.reward_timeout_seconds
    if not _is_number(timeout) or not 0 < timeout <= MAX_CHECK_SECONDS:
        raise ValueError(f"--reward_timeout_seconds {timeout!r}: one math-verify check's limit must be a number of "
                         f"seconds in (0, {MAX_CHECK_SECONDS}]. Fix: pass e.g. 5 (the default).")
    buffer, factor = script_args.overlong_buffer_length, script_args.overlong_penalty_factor
    max_length = training_args.max_completion_length
    if buffer is not None and (isinstance(buffer, bool) or not isinstance(buffer, int)
                               or not 1 <= buffer <= max_length):
        raise ValueError(f"--overlong_buffer_length {buffer!r}: the penalty's buffer must be a whole number of tokens "
                         f"in [1, --max_completion_length {max_length}]. Fix: pass e.g. {max(1, max_length // 5)} (a "
                         "fifth, the official ratio), or leave it unset for that default.")
    if not _is_number(factor) or factor <= 0:
        raise ValueError(f"--overlong_penalty_factor {factor!r}: the penalty's scale must be a finite number > 0 (a "
                         "negative one would reward overlong completions). Fix: pass the official 1.0; to turn the "
                         "penalty off, drop overlong_penalty from --reward_funcs.")
    if "overlong_penalty" not in reward_names and (buffer is not None or factor != 1.0):
        flags = " and ".join(flag for flag, unset in (("--overlong_buffer_length", buffer is None),
                                                      ("--overlong_penalty_factor", factor == 1.0)) if not unset)
        raise ValueError(f"{flags} would be ignored: 'overlong_penalty' is not in --reward_funcs {reward_names}. Fix: "
                         "add overlong_penalty to --reward_funcs, or drop the flag.")


def check_eval_split(dataset, script_args: FIPOScriptArguments, training_args: FIPOConfig) -> None:
    """An eval strategy needs the split it evaluates on; TRL finds out only after the model has loaded."""
    if training_args.eval_strategy == "no":
        return
    split, strategy = script_args.dataset_test_split, getattr(training_args.eval_strategy, "value", "")
    if split not in dataset:
        raise ValueError(f"--eval_strategy {strategy}: the dataset has no {split!r} split to evaluate on (its splits: "
                         f"{list(dataset)}). Fix: pass --dataset_test_split <one of them>, or --eval_strategy no.")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _import_reward(dotted: str):
    """A reward function by dotted path. The current directory is importable for this import only (rewards next to
    the user's recipe, as `trl grpo` allows), so it never shadows other modules later."""
    module, _, attribute = dotted.rpartition(".")
    sys.path.insert(0, os.getcwd())
    try:
        function = getattr(importlib.import_module(module), attribute)
    except ImportError as error:
        raise ValueError(f"--reward_funcs {dotted!r}: cannot import module {module!r} ({error}). Fix: check the "
                         f"spelling, install the package, or run from the folder that holds {module}.py.") from None
    except AttributeError:
        raise ValueError(f"--reward_funcs {dotted!r}: module {module!r} has no attribute {attribute!r}.") from None
    finally:
        sys.path.remove(os.getcwd())
    if not callable(function):
        raise ValueError(f"--reward_funcs {dotted!r} is a {type(function).__name__}, not a function.")
    return function


USAGE = """Train with FIPO (arXiv 2603.19835): TRL's GRPO script with FIPOTrainer/FIPOConfig.
Subcommands: `fipo-trl train [flags]` (the default) and `fipo-trl eval [flags]` (avg@k / pass@k / cons@k; see
`fipo-trl eval --help`). `--config recipe.yaml` reads the flags from a YAML file (examples/recipes/); flags given on
the command line win. With no model (no --model_name_or_path, no --config) a tiny model is built and trained
locally."""


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((FIPOScriptArguments, FIPOConfig, ModelConfig, DatasetMixtureConfig), prog=prog,
                     description=USAGE)


def parse_train_args(argv: list[str]):
    check_config_file(argv)  # missing, unparsable or with a key twice: one clear line, before TRL reads it
    parser = make_parser(prog="fipo-trl train")
    if not any(arg.startswith(("--model_name_or_path", "--config")) for arg in argv):
        parser.set_defaults(**EMBEDDED_DEFAULTS)  # defaults only: flags still win
    return parser.parse_args_and_config(argv)


def _check_local_data_files(data_files, flag: str) -> None:
    """Check the local files among ``data_files`` (a path, a list, or a {split: path(s)} dict) before datasets reads
    them (fipo_trl.safety.data.check_data_file); Hub paths and globs are datasets' to resolve."""
    from fipo_trl.safety.data import check_data_file

    values = data_files.values() if isinstance(data_files, dict) else [data_files]
    for value in values:
        for file in [value] if isinstance(value, (str, os.PathLike)) else list(value or []):
            if Path(file).is_file():
                check_data_file(file, flag)


def _describe_data_files(data_files) -> str:
    files = [data_files] if isinstance(data_files, str) else list(data_files.values() if isinstance(data_files, dict)
                                                                   else data_files or [])
    return ", ".join(os.path.basename(str(f)) for f in files)


def load_training_data(script_args, dataset_args, embedded: bool):
    """(splits, the dataset's name for the model card). Sources, in order: a `datasets:` mixture, --dataset_name (a
    Hub id, a local folder, a local .json/.jsonl/.csv/.parquet file, or a builder such as `json` with
    --data_files), the embedded tiny task. Every failure is a ValueError naming the flag."""
    from datasets import load_dataset

    from fipo_trl.safety.data import check_data_file, check_dataset_source, data_file_builder, supported_files

    split = script_args.dataset_train_split
    if dataset_args.datasets:  # a mixture (--config with `datasets:`) wins over --dataset_name, as in `trl grpo`
        for entry in dataset_args.datasets:
            check_dataset_source(entry.path, "datasets: path")
            _check_local_data_files(entry.data_files, f"datasets: {entry.path} data_files")
        dataset = get_dataset(dataset_args)
        name = ", ".join(d.path if not d.data_files else f"{d.path}: {_describe_data_files(d.data_files)}"
                         for d in dataset_args.datasets)
    elif script_args.dataset_name:
        path, name = Path(script_args.dataset_name), script_args.dataset_name
        data_files = script_args.data_files
        check_dataset_source(name)
        if path.is_file() or data_file_builder(path):  # a single local file
            if not data_file_builder(path):
                raise ValueError(f"--dataset_name {name!r}: a {path.suffix} file cannot be read as a dataset. Fix: "
                                 f"use one of {supported_files()} (JSON lines: one object per line, with a "
                                 "'prompt' column).")
            if not path.is_file():
                raise ValueError(f"--dataset_name {name!r}: no such file.")
            check_data_file(path, "--dataset_name")
            builder, data_files = data_file_builder(path), str(path)
            name = f"{builder}: {path.name}"  # a local file, never taken for a Hub id by the card
        else:
            builder = name
            if data_files:
                _check_local_data_files(data_files, "--data_files")
                name = f"{name}: {_describe_data_files(data_files)}"
        dataset = load_dataset(builder, name=script_args.dataset_config, data_files=data_files,
                               streaming=script_args.dataset_streaming)
    elif embedded:
        from fipo_trl.tools.tiny import tiny_prompt_dataset

        return {split: tiny_prompt_dataset(64)}, None
    else:
        raise ValueError("No training data: pass --dataset_name (a Hub id, a local folder or file, or `json` with "
                         "--data_files), or a `datasets:` mixture in --config.")
    if split not in dataset:
        raise ValueError(f"--dataset_train_split {split!r}: the dataset has the splits {list(dataset)}. Fix: pass "
                         f"--dataset_train_split {next(iter(dataset))}.")
    return dataset, name


def lora_config(model_args):
    """TRL's get_peft_config. A TRL that passes LoRA options the installed peft lacks (TRL 1.9-1.15 pass
    ``target_parameters``, peft >= 0.17) gets an error naming the fix, before anything loads."""
    try:
        return get_peft_config(model_args)
    except TypeError as error:
        import peft

        raise ValueError(f"--use_peft: TRL's get_peft_config cannot build a LoraConfig with the installed peft "
                         f"{peft.__version__} ({error}). Fix: pip install -U 'peft>=0.17', or pass "
                         "peft_config=LoraConfig(...) to FIPOTrainer in Python (that works from peft 0.13)."
                         ) from error


def train(argv: list[str]):
    """Train with FIPO; returns the trainer."""
    from fipo_trl.tools.callbacks import PrintFIPOMetricsCallback
    from fipo_trl.trainer import FIPOTrainer

    with checking_inputs():  # every flag and the data are checked here, before anything loads
        script_args, training_args, model_args, dataset_args = parse_train_args(argv)
        check_output_dir(training_args.output_dir)
        check_liger_machine(training_args)
        check_vllm_machine(training_args)
        embedded = model_args.model_name_or_path is None
        reward_names = script_args.reward_funcs or ([TOY_REWARD] if embedded else ["math_verify_reward"])
        check_script_flags(script_args, training_args, model_args, reward_names)
        reward_funcs = load_reward_funcs(reward_names, training_args, script_args)
        dataset, dataset_name = load_training_data(script_args, dataset_args, embedded)
        check_eval_split(dataset, script_args, training_args)
        # a resume flag that resolves to a usable checkpoint, or a fresh run that mixes no checkpoints
        check_output_dir_before_load(training_args, model_args.model_name_or_path, bool(model_args.use_peft))
        peft_config = lora_config(model_args)
        if training_args.process_index == 0:  # the run's lock, last: no bad input leaves a folder or a held lock
            acquire_output_dir_lock(training_args.output_dir)
    if embedded:
        from fipo_trl.tools.tiny import build_tiny_model

        # "_" keeps it out of every Hub upload of output_dir (transformers ignores "_*" there)
        model_args.model_name_or_path = str(build_tiny_model(f"{training_args.output_dir}/_base-model"))
    else:
        model_init_kwargs = dict(revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code,
                                 attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)
        quantization_config = get_quantization_config(model_args)
        if quantization_config is not None:
            from trl import get_kbit_device_map

            model_init_kwargs.update(quantization_config=quantization_config, device_map=get_kbit_device_map())
        training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}

    callbacks = [PrintFIPOMetricsCallback()]
    if importlib.util.find_spec("matplotlib") is not None:  # the card's curves plot (training_curves.png)
        from fipo_trl.tools.plots import TrainingCurvesCallback

        callbacks.append(TrainingCurvesCallback())
    trainer = FIPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset.get(script_args.dataset_test_split) if training_args.eval_strategy != "no" else None,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        trainer.create_model_card(dataset_name=dataset_name)
    trainer.accelerator.print(f"Model and model card saved to {training_args.output_dir}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
    if script_args.merge_adapter and model_args.use_peft and trainer.accelerator.is_main_process:
        save_merged_model(trainer, push=training_args.push_to_hub)
    if training_args.process_index == 0:
        release_output_dir_lock(training_args.output_dir)
    return trainer


def save_merged_model(trainer, push: bool) -> None:
    """Merge the LoRA adapter into the base weights and save the result to <output_dir>/merged (loadable without
    peft); with push, also upload it to <hub_model_id>-merged (the adapter repo keeps the FIPO card)."""
    args = trainer.args
    merged_dir = f"{args.output_dir}/merged"
    merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
    merged.save_pretrained(merged_dir)
    trainer.processing_class.save_pretrained(merged_dir)
    trainer.accelerator.print(f"Merged model saved to {merged_dir}")
    if push:
        repo_id = f"{trainer.hub_model_id}-merged"
        try:
            from huggingface_hub import HfApi

            api = HfApi(token=args.hub_token)
            api.create_repo(repo_id, private=args.hub_private_repo, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=merged_dir, commit_message="Merged FIPO LoRA adapter")
            trainer.accelerator.print(f"Merged model pushed to {repo_id}")
        except Exception as error:  # noqa: BLE001 - a Hub failure must not lose the run: the model is on disk
            warn_hub_failure(trainer, "push the merged model", error, repo_id=repo_id)


def main(argv: list[str] | None = None) -> None:
    """The console script: returns None (exit status 0) on success. A bad input (a ValueError raised while the
    inputs are checked, before anything loads) prints one line, ``fipo-trl: error: ...``, and exits with status 2,
    as argparse does (``FIPO_TRL_TRACEBACK=1`` shows the full traceback instead). An error raised later, while
    loading or training (a reward function's, say), keeps its full traceback and exits with status 1."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        with checking_inputs():
            check_environment()  # a bad FIPO_TRL_* value fails here, before anything loads
        if argv and argv[0] == "eval":
            from fipo_trl.tools.evaluation import main as evaluate_main

            evaluate_main(argv[1:])
        else:
            train(argv[1:] if argv and argv[0] == "train" else argv)
    except ValueError as error:
        if not is_input_error(error):  # raised after the inputs were checked: its traceback says where
            raise
        try:
            full = show_traceback()
        except ValueError:  # the bad value is the error being reported
            full = False
        if full:  # the full traceback, e.g. for an error from deep inside
            raise
        print(f"fipo-trl: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
