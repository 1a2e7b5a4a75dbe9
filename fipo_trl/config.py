"""FIPOConfig: GRPOConfig with the FIPO fields and the official FIPO defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers.utils import is_torch_bf16_gpu_available
from trl import GRPOConfig

from fipo_trl.dynamic_sampling import DynamicSamplingConfig
from fipo_trl.kernels.common import DEFAULTS
from fipo_trl.loss import SUPPORTED_LOSS_TYPES, check_hyperparameters, hyperparameters_from_config
from fipo_trl.safety.config_values import check_values
from fipo_trl.safety.rewards import check_reward_timeout
from fipo_trl.safety.versions import check_installed_versions, supported_range, trl_older_than, trl_version

check_installed_versions()  # a TRL/transformers outside the supported range fails here, before any model loads


@dataclass
class FIPOConfig(DynamicSamplingConfig, GRPOConfig):
    r"""
    Configuration for [`FIPOTrainer`]: every [`~trl.GRPOConfig`] field, plus the FIPO fields below.

    FIPO (Future-KL Influenced Policy Optimization, arXiv 2603.19835) is DAPO in which each completion token's
    advantage is multiplied by a detached weight f_t = clip(exp(F_t)), with F_t the discounted sum of the signed
    log-ratio log pi_theta - log pi_old over the token and the tokens after it. Defaults reproduce the paper's
    official Qwen2.5-32B recipe; the Qwen2.5-Math-7B values are given in each help text.

    Unlike GRPOConfig, the defaults make several optimizer updates per generation batch: with exactly one, pi_theta
    equals pi_old at every update, every weight is 1, and FIPO is DAPO.

    Using [`~transformers.HfArgumentParser`] (or the `fipo-trl` command) this class becomes command-line arguments.
    "32B" and "7B" below are the paper's Qwen2.5-32B launcher and Qwen2.5-Math-7B (Table 3) recipes; the step numbers
    (§N) refer to docs/algorithm.md.

    Parameters:
        > Parameters that control the FIPO influence weight

        fipo_decay_rate (`float`, *optional*, defaults to `32.0`):
            Future-KL decay rate tau: gamma = 2^(-1/tau), so a future token's log-ratio counts half after tau tokens
            (§1.3). 32B: `32.0`; 7B: `32.0` (the paper ablates 8/32/128/256).
        fipo_clip_ratio (`float`, *optional*, defaults to `0.2`):
            Clip range epsilon_f of the influence weight f = clip(exp(F)) (§1.4): f in [1, 1 + epsilon_f] when
            `fipo_clip_high_only`, else [1 - epsilon_f, 1 + epsilon_f]. `0` means the official uncapped
            min(exp(F), 10). 32B: `0.2`; 7B: `0.2`.
        fipo_clip_high_only (`bool`, *optional*, defaults to `True`):
            Whether the weight is clipped to [1, 1 + `fipo_clip_ratio`] (tokens are only ever up-weighted) or to
            [1 - `fipo_clip_ratio`, 1 + `fipo_clip_ratio`]. 32B: `True`; 7B: `False`.
        fipo_safety_threshold (`float`, *optional*, defaults to `10.0`):
            Safety rule (§1.5): for a token with negative advantage and importance ratio above this threshold, the
            weight is clamped into [0.8, 1]. `float("inf")` switches the rule off. 32B: `10.0`; 7B: `3.0`.
        fipo_sequence_filter (`bool`, *optional*, defaults to `True`):
            Whether a completion with more than one dual-clipped token (negative advantage, importance ratio >
            `delta`) is dropped from the loss, as the official code does (§1.7). 32B and 7B: `True`.

        > Parameters that control the updates per generation batch

        fipo_updates_per_generation (`int`, *optional*, defaults to `8`):
            Optimizer updates per generation batch when neither `steps_per_generation` nor `generation_batch_size` is
            set: `steps_per_generation` becomes this times `gradient_accumulation_steps`. With `1`, FIPO equals DAPO
            (every weight is 1). 32B and 7B: `8` (8 mini-batches of 64 prompts per rollout of 512, §2.1).

        > Parameters that control the FIPO-is-inert warning (not in the paper)

        fipo_inert_threshold (`float`, *optional*, defaults to `0.05`):
            The trainer warns that FIPO has become DAPO in effect when, over `fipo_inert_window` generation batches,
            fewer than this share of response tokens have a weight further than 1 % from 1
            (`fipo/weight_changed_ratio`). `0` turns the warning off.
        fipo_inert_window (`int`, *optional*, defaults to `2`):
            Generation batches over which `fipo/weight_changed_ratio` is pooled for the FIPO-is-inert warning.

        > Parameters that control the reward functions

        reward_func_timeout_seconds (`float`, *optional*):
            Wall-clock limit of one call of a reward function (one call scores a whole batch of completions): a call
            that overruns stops training with an error naming the function, instead of hanging it. `None`: no limit.
            At most a day. Not in the paper.

        > Parameters that control dynamic sampling (DAPO's filter_groups, §2.2)

        dynamic_sampling (`bool`, *optional*, defaults to `False`):
            Whether prompt groups whose rewards all agree (advantage 0) are dropped and fresh groups generated until
            the generation batch is full again. Needs `scale_rewards` `"group"` or `"none"`. 32B and 7B: on (the
            recipes in examples/recipes/ set it).
        dynamic_sampling_max_retries (`int`, *optional*, defaults to `10`):
            With `dynamic_sampling`: at most this many extra generation batches per step; a batch still short is
            filled with uniform groups at advantage 0 (logged as `dynamic_sampling/filled_groups`). 32B and 7B: `39`
            (the official 10 generation batches of 4 train batches each).
        dynamic_sampling_metric (`str`, *optional*):
            With `dynamic_sampling`: the reward function (by name, e.g. `"math_verify_reward"`) whose values decide
            whether a group is uniform. `None`: the weighted sum of all rewards. 32B and 7B: the correctness reward
            (the official `acc`), without the overlong penalty.

        > GRPOConfig parameters whose defaults FIPO changes

        loss_type (`str`, *optional*, defaults to `"bnpo"`):
            Loss normalisation. `"bnpo"` is the official FIPO one (§1.8): a token mean per micro-batch divided by the
            gradient-accumulation steps, with completions dropped by the sequence filter removed from numerator and
            denominator. Every other TRL loss type works too (docs/loss_types.md); there a dropped completion leaves
            the numerator only. 32B and 7B: `"bnpo"`.
        delta (`float`, *optional*, defaults to `10.0`):
            Dual-clip constant c (§1.2, §1.6, §1.7): it caps the importance ratio in the loss of negative-advantage
            tokens, leaves tokens with ratio > c out of the Future-KL, and drives the sequence filter. Must be > 1 +
            `epsilon_high`. 32B and 7B: `10.0`.
        epsilon (`float`, *optional*, defaults to `0.2`):
            Lower PPO clip epsilon: the ratio is clipped at 1 - `epsilon`. 32B and 7B: `0.2`.
        epsilon_high (`float`, *optional*, defaults to `0.28`):
            Upper PPO clip epsilon (DAPO's clip-higher): the ratio is clipped at 1 + `epsilon_high`. 32B and 7B:
            `0.28`.
        beta (`float`, *optional*, defaults to `0.0`):
            KL coefficient against a reference model. 32B and 7B: `0.0` (no KL loss, no reference model).
        vllm_importance_sampling_correction (`bool`, *optional*, defaults to `False`):
            TRL's correction of the vLLM sampler/trainer mismatch. The official recipe has none (pi_old is recomputed
            by the training model); set `True` to use TRL's correction with vLLM generation.
        bf16 (`bool`, *optional*):
            Unset, it follows the hardware: on where a GPU supports bfloat16, off on a CPU-only machine (where TRL's
            default `True` would fail).

        > Parameters that control the output directory

        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Start a fresh run in an `output_dir` that holds another run's `checkpoint-<step>` folders: they are moved
            to `output_dir/previous-run-<n>/` (kept, never deleted). Without it, and without
            `resume_from_checkpoint`, `FIPOTrainer.train` refuses such an `output_dir`, so two runs' checkpoints
            never mix. (transformers 5 removed its own field of this name.)
    """

    # FIPO fields ---------------------------------------------------------------------------------------------
    fipo_decay_rate: float = field(
        default=DEFAULTS.decay_rate,
        metadata={"help": "Future-KL decay rate tau: gamma = 2^(-1/tau), so a future token's log-ratio counts half "
                  "after tau tokens. Paper: 32 for both the 32B and the 7B recipe (ablated over 8/32/128/256)."},
    )
    fipo_clip_ratio: float = field(
        default=DEFAULTS.clip_ratio,
        metadata={"help": "Clip range epsilon_f of the influence weight f = clip(exp(F)): [1, 1 + epsilon_f] when "
                  "`fipo_clip_high_only`, else [1 - epsilon_f, 1 + epsilon_f]. 0 means the official uncapped "
                  "min(exp(F), 10). Paper: 0.2 (32B: [1, 1.2]; 7B: [0.8, 1.2])."},
    )
    fipo_clip_high_only: bool = field(
        default=DEFAULTS.clip_high_only,
        metadata={"help": "Clip the influence weight to [1, 1 + fipo_clip_ratio] (True) or to "
                  "[1 - fipo_clip_ratio, 1 + fipo_clip_ratio] (False). Paper: True for 32B, False for 7B."},
    )
    fipo_safety_threshold: float = field(
        default=DEFAULTS.safety_threshold,
        metadata={"help": "Safety rule: for a token with negative advantage and importance ratio above this "
                  "threshold, the weight is clamped into [0.8, 1]. Paper: 10.0 for 32B, 3.0 for 7B."},
    )
    fipo_updates_per_generation: int = field(
        default=8,
        metadata={"help": "Optimizer updates per generation batch when neither `steps_per_generation` nor "
                  "`generation_batch_size` is set: steps_per_generation = this x gradient_accumulation_steps. "
                  "Must be > 1 or FIPO equals DAPO. Paper: 8 (8 disjoint mini-batches of 64 prompts per rollout)."},
    )
    fipo_sequence_filter: bool = field(
        default=True,
        metadata={"help": "Drop a completion with more than one dual-clipped token (negative advantage and "
                  "importance ratio > `delta`) from the loss, as the official code does."},
    )
    reward_func_timeout_seconds: float | None = field(
        default=None,
        metadata={"help": "Wall-clock limit of one call of a reward function (it scores a whole batch): a call that "
                  "overruns stops training with an error naming the function instead of hanging it. None: no "
                  "limit; at most a day."},
    )

    fipo_inert_threshold: float = field(
        default=0.05,
        metadata={"help": "The trainer warns that FIPO has become DAPO in effect when, over a window of "
                  "`fipo_inert_window` generation batches, fewer than this share of response tokens have a weight "
                  "further than 1 percent from 1 (`fipo/weight_changed_ratio`). 0 turns the warning off. Not in the "
                  "paper; see docs/trainer.md for the figures behind the default."},
    )
    fipo_inert_window: int = field(
        default=2,
        metadata={"help": "Generation batches over which `fipo/weight_changed_ratio` is pooled for the "
                  "FIPO-is-inert warning (`fipo_inert_threshold`)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start a fresh run in an output_dir that holds another run's checkpoint-<step> folders: "
                  "they are moved to output_dir/previous-run-<n>/ (kept). Without it, and without "
                  "--resume_from_checkpoint, such an output_dir is refused, so two runs' checkpoints never mix."},
    )

    # GRPO fields whose defaults FIPO changes -------------------------------------------------------------------
    loss_type: str = field(
        default="bnpo",
        metadata={"help": "Loss normalisation. 'bnpo' (default) is the official FIPO one: a token mean per "
                  "micro-batch, divided by the gradient-accumulation steps, with filtered completions removed "
                  "from numerator and denominator. Every other TRL loss type also works ('dapo', 'grpo', "
                  "'dr_grpo', 'luspo', 'cispo', 'sapo', 'vespo'): FIPO weights the advantages they read; there a "
                  "filtered completion leaves the numerator only."},
    )
    delta: float | None = field(
        default=DEFAULTS.delta,
        metadata={"help": "Dual-clip constant c. It caps the importance ratio in the loss of negative-advantage "
                  "tokens, leaves tokens with ratio > c out of the Future-KL, and drives the sequence filter. "
                  "Must be > 1 + epsilon_high. Paper: 10 (32B and 7B)."},
    )
    epsilon: float = field(
        default=DEFAULTS.epsilon,
        metadata={"help": "Lower PPO clip epsilon: the ratio is clipped at 1 - epsilon. Paper: 0.2."},
    )
    epsilon_high: float | None = field(
        default=DEFAULTS.epsilon_high,
        metadata={"help": "Upper PPO clip epsilon (DAPO clip-higher): the ratio is clipped at 1 + epsilon_high. "
                  "Paper: 0.28."},
    )
    beta: float = field(
        default=0.0,
        metadata={"help": "KL coefficient against a reference model. Paper: 0 (no KL loss, no reference model)."},
    )
    vllm_importance_sampling_correction: bool = field(
        default=False,
        metadata={"help": "TRL's correction of the vLLM sampler/trainer mismatch. Off by default: the official "
                  "FIPO recipe has no rollout importance-sampling correction (pi_old is recomputed by the "
                  "training model). Set True to use TRL's correction with vLLM generation."},
    )

    def __post_init__(self):
        if self.bf16 is None and not self.fp16:
            # TRL defaults to bf16=True, which transformers refuses on a CPU-only machine with an error that hides
            # every later one. Unset, bf16 follows the hardware; an explicit True is still the user's to keep.
            self.bf16 = is_torch_bf16_gpu_available()
        for name in ("num_iterations", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` = {value!r} is invalid: it must be an integer >= 1. Use 1 (the official "
                                 "recipe reuses each generation batch through fipo_updates_per_generation instead).")
        if (
            self.steps_per_generation is None
            and self.generation_batch_size is None
            and isinstance(self.fipo_updates_per_generation, int)
            and self.fipo_updates_per_generation >= 1
        ):
            self.steps_per_generation = self.fipo_updates_per_generation * self.gradient_accumulation_steps
        check_liger_loss_path(self)  # refused on any machine: this TRL's Liger loss skips FIPO's weights
        check_values(self)  # values TRL accepts that fail after the model loads (or in TRL's own checks)
        super().__post_init__()
        if not isinstance(self.fipo_updates_per_generation, int) or self.fipo_updates_per_generation < 1:
            raise ValueError(f"`fipo_updates_per_generation` = {self.fipo_updates_per_generation!r} is invalid: it "
                             "must be an integer >= 1. Use the official 8.")
        check_hyperparameters(**hyperparameters_from_config(self), prefix="fipo_")  # errors name the fields
        check_reward_timeout(self.reward_func_timeout_seconds)
        threshold = self.fipo_inert_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ValueError(f"`fipo_inert_threshold` = {threshold!r} is invalid: it must be a share in [0, 1] "
                             "(0 turns the FIPO-is-inert warning off; default 0.05).")
        window = self.fipo_inert_window
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"`fipo_inert_window` = {window!r} is invalid: it must be an integer >= 1 (generation "
                             "batches; default 2).")
        check_trl_compatibility(self)

    def __getstate__(self):
        # The Hub token is a secret, but transformers pickles the training arguments into training_args.bin in
        # every checkpoint and uploads it with the model. Keep it out of every pickle: a resumed run reads the
        # token again (argument or HF_TOKEN).
        state = self.__dict__.copy()
        state["hub_token"] = None
        return state

    @property
    def fipo_updates_per_generation_batch(self) -> float:
        """Optimizer updates per generation batch. Fractional when optimizer steps straddle generation batches
        (e.g. steps_per_generation 4 x num_iterations 2 over gradient_accumulation_steps 3: 8/3); FIPO stays exact
        there, since each micro-batch carries the pi_old of its own generation batch."""
        return self.steps_per_generation * self.num_iterations / self.gradient_accumulation_steps

    @property
    def fipo_straddles_generation_batches(self) -> bool:
        """True when some optimizer step takes micro-batches from two generation batches."""
        micro_steps, window = self.steps_per_generation * self.num_iterations, self.gradient_accumulation_steps
        return micro_steps % window != 0 and window % micro_steps != 0

    @property
    def fipo_is_degenerate(self) -> bool:
        """True when every generation batch is used for exactly one optimizer update, so that TRL does not keep
        old log-probs, log pi_theta == log pi_old at every update and FIPO is DAPO. The condition is TRL's own
        test for computing ``old_per_token_logps`` (GRPOTrainer._generate_and_score_completions)."""
        return self.gradient_accumulation_steps % (self.steps_per_generation * self.num_iterations) == 0

    @property
    def fipo_schedule_warnings(self) -> list[str]:
        """What is off in the update schedule: FIPO degenerate (it is DAPO), or optimizer steps that straddle
        generation batches. FIPOTrainer warns with these at init."""
        messages = []
        if self.fipo_is_degenerate:
            messages.append(
                f"FIPO is degenerate with this config and will train exactly like DAPO: steps_per_generation "
                f"({self.steps_per_generation}) x num_iterations ({self.num_iterations}) divides "
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps}), so each generation batch gets "
                "one optimizer update, log pi_theta == log pi_old at every update and every FIPO weight is 1. Fix: "
                "leave steps_per_generation and generation_batch_size unset (FIPOConfig then makes "
                "fipo_updates_per_generation = 8 updates per generation batch, the official recipe), or set "
                "steps_per_generation = k x gradient_accumulation_steps with k > 1.")
        if self.fipo_straddles_generation_batches:
            messages.append(
                f"Optimizer steps straddle generation batches: steps_per_generation ({self.steps_per_generation}) x "
                f"num_iterations ({self.num_iterations}) is not a multiple of gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps}), so each generation batch gets "
                f"{self.fipo_updates_per_generation_batch:.3g} optimizer updates and some updates mix micro-batches "
                "of two generation batches. FIPO's weights stay exact (each micro-batch uses its own pi_old); only "
                "the updates per generation batch are fractional. For a whole number, set steps_per_generation to a "
                "multiple of gradient_accumulation_steps, or leave it unset (fipo_updates_per_generation).")
        return messages


def check_trl_compatibility(args) -> None:
    """Settings FIPO cannot serve; checked by FIPOConfig and again by FIPOTrainer. FIPO only multiplies each token's
    advantage by its weight f > 0, so every TRL loss type and both importance-sampling levels are well defined
    (docs/loss_types.md gives the loss per type); an unknown one would fail late in TRL, so it fails here."""
    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        raise ValueError(f"`loss_type` = {args.loss_type!r} is not a TRL loss type. Use one of "
                         f"{list(SUPPORTED_LOSS_TYPES)} ('bnpo' reproduces the official per-micro-batch token mean).")
    if args.importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"`importance_sampling_level` = {args.importance_sampling_level!r} is invalid. Set "
                         "importance_sampling_level='token' (the official FIPO setting) or 'sequence' (GSPO).")
    if args.loss_type == "luspo" and trl_older_than("1.10"):
        raise ValueError(
            f"`loss_type` = 'luspo' needs TRL 1.10 or later with FIPO: TRL {trl_version()} averages LUSPO's loss over "
            "every position, padding included, once the advantages are per token (FIPO's are), which scales each "
            f"completion's loss by its length / T. Fix: upgrade TRL to 1.10 or later (fipo_trl supports "
            f"{supported_range('trl')}), or use another loss_type, e.g. the official 'bnpo'.")
    check_liger_loss_path(args)


def check_liger_loss_path(args) -> None:
    """TRL up to 1.13 computes the whole GRPO loss in Liger's fused kernel when use_liger_kernel=True
    (GRPOTrainer.compute_liger_loss), past the _compute_loss that FIPO hooks: training would stop at its first step.
    Later TRL uses Liger for the model's layers only, and FIPO works. Checked on the TRL installed, not its version."""
    if not getattr(args, "use_liger_kernel", False):
        return
    from trl import GRPOTrainer

    if hasattr(GRPOTrainer, "compute_liger_loss"):
        raise ValueError(
            f"`use_liger_kernel=True` cannot be used with TRL {trl_version()}: this TRL computes the GRPO loss in "
            "Liger's fused kernel (GRPOTrainer.compute_liger_loss), which skips FIPO's weights. Fix: set "
            "use_liger_kernel=False, or upgrade TRL to 1.14 or later, where use_liger_kernel only patches the "
            "model's layers and the loss stays FIPO's.")
