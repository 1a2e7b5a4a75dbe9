"""What FIPOTrainer checks before the model loads, in one call: every error here costs seconds, not a model load
or a training step. `fipo-trl` shows these errors as one line (``inputs.checking_inputs``)."""

from __future__ import annotations

from fipo_trl.kernels.env import check_environment
from fipo_trl.safety.config_values import check_deepspeed_config
from fipo_trl.safety.data import check_train_dataset, check_training_data
from fipo_trl.safety.inputs import checking_inputs
from fipo_trl.safety.machine import check_liger_machine, check_vllm_machine


def check_before_load(model, reward_funcs, args, pargs: tuple, kwargs: dict) -> None:
    """The checks of ``FIPOTrainer(model, reward_funcs, args, *pargs, **kwargs)`` that need no model: the config
    against this TRL, the FIPO_TRL_* environment, the training data, and the machine (vLLM; Liger for a model given
    by name; a model already loaded waits for TRL's own argument checks, see ``check_after_trl_init``)."""
    from fipo_trl.config import check_trl_compatibility

    # GRPOTrainer's positional order after args: train_dataset, eval_dataset, processing_class, ...
    train_dataset = kwargs["train_dataset"] if "train_dataset" in kwargs else (pargs[0] if pargs else None)
    processing_class = kwargs.get("processing_class", pargs[2] if len(pargs) > 2 else None)
    with checking_inputs():
        check_trl_compatibility(args)
        check_environment()  # a bad FIPO_TRL_* value fails here, not at the first loss
        check_train_dataset(train_dataset, args)
        check_training_data(train_dataset, args, model, reward_funcs, processing_class)
        check_vllm_machine(args)
        check_deepspeed_config(args)
        if isinstance(model, str):  # before the load
            check_liger_machine(args)


def check_after_trl_init(model, args) -> None:
    """For a model passed already loaded: the Liger check after TRL's own argument errors (as with GRPOTrainer),
    still before any step."""
    if not isinstance(model, str):
        with checking_inputs():
            check_liger_machine(args)
