"""Dynamic sampling (DAPO's ``filter_groups``) for any GRPOTrainer: a trainer mixin and a config mixin.

A prompt group whose G completions all get the same reward has advantage 0 for every completion: it adds nothing to
the loss numerator but still counts in the token-mean denominator. The official DAPO/FIPO recipe drops such groups and
generates more until the batch is full. Here, after TRL has generated and scored a generation batch, uniform groups are
dropped and fresh prompt groups are generated (up to ``dynamic_sampling_max_retries`` extra generation batches per
step) until the batch again holds its usual number of groups; the surplus is cut off. If the retries run out, the
shortfall is filled with dropped groups whose advantages are set to 0 (logged as ``filled_groups``), so the batch
keeps the size TRL splits into micro-batches.

Advantages come from TRL's own computation on each generated batch. With ``scale_rewards`` "group" or "none" and
``multi_objective_aggregation="sum_then_normalize"`` a completion's advantage depends on its own group only, so these
are exactly the advantages of the kept groups; other settings normalise over the whole batch and are rejected.

Fresh groups come from a separate, seeded stream over the training dataset (not from the trainer's dataloader), so
the epoch accounting of the Trainer is unchanged. Its position is saved with every checkpoint (next to the RNG
states), so a run resumed on a generation-batch boundary draws the same refill prompts as an uninterrupted one.

Any number of processes: TRL gathers the rewards of the whole generation batch to every rank, so every rank takes the
same keep decision per group. Each rank's generated rows are gathered too, the kept groups are assembled in the same
global order on every rank, and each rank trains on its own contiguous slice of that batch, exactly as TRL slices a
generation batch. A refill is a whole generation batch drawn from the same seeded stream on every rank (each rank
generates its slice), so every rank makes the same number of retries and no collective can hang.
"""

from __future__ import annotations

import itertools
import json
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

__all__ = ["DynamicSampler", "DynamicSamplingConfig", "DynamicSamplingMixin", "PromptGroupStream",
           "check_dynamic_sampling_args", "concat_generation_outputs", "group_keep_mask", "select_rows"]

# How each tensor of TRL's generation output is padded (value) and on which side, for concatenating batches whose
# padded widths differ. Any other key (multimodal inputs, new TRL fields) is refused by name.
_LEFT_PADDED = {"prompt_ids": "pad", "prompt_mask": 0}
_RIGHT_PADDED = {"completion_ids": "pad", "completion_mask": 0, "old_per_token_logps": 0.0,
                 "ref_per_token_logps": 0.0, "sampling_per_token_logps": 0.0, "tool_mask": 1,
                 "importance_sampling_ratio": 1.0}
_PER_ROW = {"advantages"}
_RECOMPUTED = {"num_items_in_batch"}


def check_dynamic_sampling_args(args) -> None:
    """Settings dynamic sampling cannot serve correctly; raises with the fix."""
    if args.scale_rewards not in ("group", "none") or args.multi_objective_aggregation != "sum_then_normalize":
        raise ValueError(
            f"dynamic_sampling=True needs advantages computed per group (scale_rewards='group' or 'none' with "
            f"multi_objective_aggregation='sum_then_normalize'), got scale_rewards={args.scale_rewards!r}, "
            f"multi_objective_aggregation={args.multi_objective_aggregation!r}: batch-level normalisation would mix "
            "in the dropped groups.")
    if not isinstance(args.dynamic_sampling_max_retries, int) or args.dynamic_sampling_max_retries < 0:
        raise ValueError(f"dynamic_sampling_max_retries = {args.dynamic_sampling_max_retries!r}: must be an integer "
                         ">= 0.")


def group_keep_mask(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """(N,) rewards of N / G consecutive groups -> (N / G,) bool: True where the group's rewards are not all equal.
    NaN rewards (unscorable completions) are ignored; a group with fewer than two finite rewards is dropped."""
    groups = rewards.float().view(-1, num_generations)
    finite = torch.isfinite(groups)
    high = torch.where(finite, groups, torch.full_like(groups, -torch.inf)).amax(dim=1)
    low = torch.where(finite, groups, torch.full_like(groups, torch.inf)).amin(dim=1)
    return (finite.sum(dim=1) >= 2) & (high > low)


def select_rows(output: dict, rows: torch.Tensor) -> dict:
    """The rows ``rows`` of one generation output (every per-row tensor indexed; 0-dim entries kept)."""
    return {key: value[rows.to(value.device)] if torch.is_tensor(value) and value.dim() > 0 else value
            for key, value in output.items()}


def _pad_to(tensor: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
    missing = width - tensor.size(1)
    if missing == 0:
        return tensor
    filler = torch.full((tensor.size(0), missing, *tensor.shape[2:]), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([filler, tensor] if left else [tensor, filler], dim=1)


def concat_generation_outputs(outputs: list[dict], pad_token_id: int) -> dict:
    """Concatenate TRL generation outputs row-wise, padding prompts on the left and completions on the right to a
    common width, dropping columns that are padding in every row, and recounting ``num_items_in_batch``."""
    keys = set(outputs[0])
    for output in outputs[1:]:
        if set(output) != keys:
            raise ValueError(f"Generation outputs with different keys: {sorted(keys)} vs {sorted(output)}.")
    unknown = keys - set(_LEFT_PADDED) - set(_RIGHT_PADDED) - _PER_ROW - _RECOMPUTED
    if unknown:
        raise ValueError(f"dynamic_sampling cannot merge the generation-output fields {sorted(unknown)} (multimodal "
                         "or new TRL fields). Set dynamic_sampling=False.")
    merged = {}
    for key in keys - _RECOMPUTED:
        parts = [output[key] for output in outputs]
        if any(part is None for part in parts):
            merged[key] = None
            continue
        if key in _PER_ROW:
            merged[key] = torch.cat(parts)
            continue
        left = key in _LEFT_PADDED
        value = (_LEFT_PADDED if left else _RIGHT_PADDED)[key]
        value = pad_token_id if value == "pad" else value
        width = max(part.size(1) for part in parts)
        merged[key] = torch.cat([_pad_to(part, width, value, left) for part in parts])
    # Trim columns that are padding in every row (left of the prompts, right of the completions).
    prompt_used = merged["prompt_mask"].bool().any(dim=0).nonzero()
    start = int(prompt_used[0]) if len(prompt_used) else 0
    for key in _LEFT_PADDED:
        merged[key] = merged[key][:, start:]
    completion_used = merged["completion_mask"].bool().any(dim=0).nonzero()
    end = int(completion_used[-1]) + 1 if len(completion_used) else 1
    for key in _RIGHT_PADDED:
        if merged.get(key) is not None and merged[key].dim() > 1 and merged[key].size(1) > 1:
            merged[key] = merged[key][:, :end]
    loss_mask = merged["completion_mask"]
    if merged.get("tool_mask") is not None:
        loss_mask = loss_mask * merged["tool_mask"]
    merged["num_items_in_batch"] = loss_mask.sum()  # TRL's count: the loss tokens of the whole generation batch
    return merged


def gather_generation_output(output: dict, accelerator, pad_token_id: int) -> dict:
    """Every rank's rows of one generation output, in rank order (TRL's layout of a generation batch), on every
    rank. Per-token tensors are padded to a common width first, prompts on the left, completions on the right."""
    if accelerator.num_processes == 1:
        return output
    from accelerate.utils import gather, pad_across_processes

    gathered = {}
    for key, value in output.items():
        if key in _RECOMPUTED or value is None:
            gathered[key] = value
            continue
        is_bool = value.dtype == torch.bool  # gloo cannot reduce bools: travel as bytes
        tensor = value.to(torch.uint8) if is_bool else value
        if key in _LEFT_PADDED or key in _RIGHT_PADDED:
            pad = (_LEFT_PADDED | _RIGHT_PADDED)[key]
            tensor = pad_across_processes(tensor, dim=1, pad_index=pad_token_id if pad == "pad" else pad,
                                          pad_first=key in _LEFT_PADDED)
        tensor = gather(tensor)
        gathered[key] = tensor.bool() if is_bool else tensor
    return gathered


class PromptGroupStream:
    """Endless stream of fresh prompt rows, each repeated ``num_generations`` times in a row (TRL's RepeatSampler
    layout). Map-style datasets are read epoch by epoch in a random order that depends only on (seed, epoch), so the
    stream's whole state is two integers (``state_dict``); iterable ones are read in order."""

    def __init__(self, dataset, num_generations: int, seed: int):
        self.dataset = dataset
        self.num_generations = num_generations
        self.seed = seed
        self.epoch, self.position = 0, 0  # rows of the current epoch already drawn
        self._order: list[int] | None = None

    def _epoch_order(self) -> list[int] | None:
        if not (hasattr(self.dataset, "__len__") and hasattr(self.dataset, "__getitem__")):
            return None
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.dataset), generator=generator).tolist()

    def _rows_from(self, position: int) -> Iterator:
        if self._order is None:
            self._order = self._epoch_order()
        if self._order is None:
            return itertools.islice(iter(self.dataset), position, None)
        return (self.dataset[index] for index in self._order[position:])

    def draw(self, num_prompts: int) -> list[dict]:
        rows = []
        for _ in range(2):  # at most one epoch boundary per draw
            taken = list(itertools.islice(self._rows_from(self.position), num_prompts - len(rows)))
            rows += taken
            self.position += len(taken)
            if len(rows) == num_prompts:
                break
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if len(rows) < num_prompts:
            raise ValueError(f"dynamic_sampling: the training dataset has fewer than {num_prompts} prompts.")
        return [dict(row) for row in rows for _ in range(self.num_generations)]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"dynamic_sampling: the checkpoint's refill stream was seeded with {state['seed']}, "
                             f"this run with {self.seed}; resume with the same `seed`.")
        self.epoch, self.position, self._order = state["epoch"], state["position"], None


class DynamicSampler:
    """The fill loop, with everything it needs passed in (no trainer internals).

    ``sampler(rows, generate)`` returns one generation batch of mixed groups and its statistics; ``generate(rows)``
    is TRL's generate-and-score on this rank's rows, returning the generation output and the (N, n_funcs) rewards of
    the whole generation batch (gathered across ranks, as TRL's ``_calculate_rewards`` returns them).
    """

    STATE_FILE = "dynamic_sampling_state_{rank}.json"  # in each checkpoint, one per process like the RNG states

    def __init__(self, *, dataset, num_generations: int, max_retries: int, seed: int, accelerator, pad_token_id: int,
                 reward_weights: torch.Tensor, metric_index: int | None = None):
        self.num_generations = num_generations
        self.max_retries = max_retries
        self.accelerator = accelerator
        self.pad_token_id = pad_token_id
        self.reward_weights = reward_weights
        self.metric_index = metric_index
        # A stream of its own, seeded apart from the trainer's sampler so refills are not the batch's own prompts.
        self.stream = PromptGroupStream(dataset, num_generations, seed=seed + 1)
        self.calls = 0  # generation steps served; DynamicSamplingMixin checks it to know the hook ran

    def deciding_rewards(self, per_func: torch.Tensor) -> torch.Tensor:
        """(N,) rewards that decide a group's fate: the chosen reward function, or the weighted sum (NaN where every
        function returned None, as TRL treats such completions)."""
        if self.metric_index is not None:
            return per_func[:, self.metric_index]
        rewards = (per_func * self.reward_weights.to(per_func.device)[None]).nansum(dim=1)
        rewards[torch.isnan(per_func).all(dim=1)] = torch.nan
        return rewards

    def __call__(self, rows: list[dict], generate: Callable[[list[dict]], tuple[dict, torch.Tensor]]
                 ) -> tuple[dict, dict[str, float]]:
        """One generation batch of mixed groups for this rank, and the statistics to log. Everything below the
        generation works on the gathered (global) batch, identically on every rank; only the last step takes this
        rank's slice."""
        self.calls += 1
        accelerator, pad_token_id = self.accelerator, self.pad_token_id
        local_rows = len(rows)
        num_rows = local_rows * accelerator.num_processes
        local = slice(accelerator.process_index * local_rows, (accelerator.process_index + 1) * local_rows)
        target_groups = num_rows // self.num_generations
        kept, dropped = [], []
        kept_groups = generated = dropped_groups = retries = 0
        while True:
            output, rewards_per_func = generate(rows)
            output = gather_generation_output(output, accelerator, pad_token_id)
            keep = group_keep_mask(self.deciding_rewards(rewards_per_func), self.num_generations)
            generated += len(keep)
            dropped_groups += int((~keep).sum())
            kept_groups += int(keep.sum())
            row_keep = keep.repeat_interleave(self.num_generations)
            if row_keep.any():
                kept.append(select_rows(output, row_keep.nonzero().squeeze(1)))
            if (~row_keep).any() and sum(len(d["advantages"]) for d in dropped) < num_rows:
                dropped.append(select_rows(output, (~row_keep).nonzero().squeeze(1)))
            if kept_groups >= target_groups or retries == self.max_retries:
                break
            retries += 1
            rows = self.stream.draw(target_groups)[local]  # a whole generation batch; this rank generates its slice
        filled_groups = max(target_groups - kept_groups, 0)
        if filled_groups:
            warnings.warn(f"dynamic_sampling: only {kept_groups} of {target_groups} prompt groups had differing "
                          f"rewards after {retries} retries; filling the batch with {filled_groups} uniform groups "
                          "(advantage 0). Raise dynamic_sampling_max_retries, or check the data's difficulty.",
                          UserWarning, stacklevel=3)
            for filler in dropped:
                filler["advantages"] = torch.zeros_like(filler["advantages"])  # uniform group: no learning signal
            kept.extend(dropped)
        batch = concat_generation_outputs(kept, pad_token_id)
        # the first num_rows rows: whole groups (rows stay grouped); TRL counts the loss tokens of the global batch
        batch = concat_generation_outputs([select_rows(batch, torch.arange(num_rows))], pad_token_id)
        num_items_in_batch = batch["num_items_in_batch"]
        batch = concat_generation_outputs([select_rows(batch, torch.arange(num_rows)[local])], pad_token_id)
        batch["num_items_in_batch"] = num_items_in_batch
        stats = {"dropped_groups": dropped_groups, "dropped_ratio": dropped_groups / generated,
                 "generated_groups": generated, "kept_groups": min(kept_groups, target_groups), "retries": retries,
                 "filled_groups": filled_groups}
        return batch, {name: float(value) for name, value in stats.items()}

    def save_state(self, checkpoint_dir: str, rank: int) -> None:
        path = os.path.join(checkpoint_dir, self.STATE_FILE.format(rank=rank))
        with open(path, "w") as f:
            json.dump(self.stream.state_dict(), f)

    def load_state(self, checkpoint_dir: str, rank: int) -> None:
        path = os.path.join(checkpoint_dir, self.STATE_FILE.format(rank=rank))
        if not os.path.isfile(path):
            warnings.warn(f"dynamic_sampling: {path} is missing (a checkpoint from an older fipo_trl?); the refill "
                          "stream restarts from its beginning, so refill prompts differ from an uninterrupted run.",
                          UserWarning, stacklevel=2)
            return
        with open(path) as f:
            self.stream.load_state_dict(json.load(f))


@dataclass
class DynamicSamplingConfig:
    """The dynamic-sampling fields, to mix into a ``GRPOConfig`` subclass before it (FIPOConfig does):
    ``@dataclass class MyConfig(DynamicSamplingConfig, GRPOConfig)``."""

    dynamic_sampling: bool = field(
        default=False,
        metadata={"help": "Drop prompt groups whose rewards all agree (advantage 0) and generate fresh groups until "
                  "the generation batch is full again, as the official DAPO/FIPO recipe does (filter_groups). "
                  "Any number of processes; needs scale_rewards 'group' or 'none'. Paper: on."},
    )
    dynamic_sampling_max_retries: int = field(
        default=10,
        metadata={"help": "With dynamic_sampling: at most this many extra generation batches per step; if the batch "
                  "is still short, it is filled with uniform groups at advantage 0 (logged as "
                  "dynamic_sampling/filled_groups). Official: up to 10 generation batches of 4x the train batch, "
                  "i.e. 39 retries of one train batch."},
    )
    dynamic_sampling_metric: str | None = field(
        default=None,
        metadata={"help": "With dynamic_sampling: the reward function (by name, e.g. 'math_verify_reward') whose "
                  "values decide whether a group is uniform. None: the weighted sum of all rewards. Official: the "
                  "accuracy ('acc'), i.e. the correctness reward without the overlong penalty."},
    )

    def __post_init__(self):
        if hasattr(super(), "__post_init__"):  # the GRPOConfig it is mixed into
            super().__post_init__()
        if self.dynamic_sampling:  # at config time: before any model is loaded
            check_dynamic_sampling_args(self)


class DynamicSamplingMixin:
    """DAPO's filter_groups for any ``GRPOTrainer``: ``class MyTrainer(DynamicSamplingMixin, GRPOTrainer)`` with a
    config that has the :class:`DynamicSamplingConfig` fields. It wraps TRL's ``_generate_and_score_completions``
    (reading the rewards through ``_calculate_rewards``), logs ``dynamic_sampling/*``, saves the refill stream with
    each checkpoint, and stops training with an error if TRL stops calling the hook."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._last_rewards_per_func: torch.Tensor | None = None
        self._dynamic_sampler = None
        if not getattr(self.args, "dynamic_sampling", False):
            return
        check_dynamic_sampling_args(self.args)
        metric = self.args.dynamic_sampling_metric
        if metric is not None and metric not in self.reward_func_names:
            raise ValueError(f"dynamic_sampling_metric = {metric!r} is not one of the reward functions "
                             f"{self.reward_func_names}.")
        self._dynamic_sampler = DynamicSampler(
            dataset=self.train_dataset, num_generations=self.num_generations,
            max_retries=self.args.dynamic_sampling_max_retries, seed=self.args.seed, accelerator=self.accelerator,
            pad_token_id=self.processing_class.pad_token_id if hasattr(self.processing_class, "pad_token_id")
            else self.processing_class.tokenizer.pad_token_id, reward_weights=self.reward_weights,
            metric_index=None if metric is None else self.reward_func_names.index(metric))

    def _calculate_rewards(self, *args, **kwargs):
        self._last_rewards_per_func = super()._calculate_rewards(*args, **kwargs)
        return self._last_rewards_per_func

    def _generate_and_score_completions(self, inputs):
        if self._dynamic_sampler is None or not self.model.training:
            return super()._generate_and_score_completions(inputs)

        def generate(rows):
            self._last_rewards_per_func = None
            output = super(DynamicSamplingMixin, self)._generate_and_score_completions(rows)
            if self._last_rewards_per_func is None:
                raise RuntimeError("dynamic_sampling: TRL's _generate_and_score_completions no longer calls "
                                   "_calculate_rewards, so the rewards of the generated groups are unknown. Set "
                                   "dynamic_sampling=False or install the TRL version fipo_trl supports.")
            return output, self._last_rewards_per_func

        batch, stats = self._dynamic_sampler(inputs, generate)
        for name, value in stats.items():
            self._metrics["train"][f"dynamic_sampling/{name}"].append(value)
        return batch

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if self._dynamic_sampler is not None and not self._dynamic_sampler.calls:
            raise RuntimeError("dynamic_sampling=True but the trainer's _generate_and_score_completions never ran: "
                               "this TRL version generates elsewhere, so uniform groups would not be dropped. Set "
                               "dynamic_sampling=False or install the TRL version fipo_trl supports.")
        return loss

    # The refill stream's position travels with the RNG states of each checkpoint (one file per process, like them).
    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self._dynamic_sampler is not None:
            self._dynamic_sampler.save_state(output_dir, self.args.process_index)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if self._dynamic_sampler is not None and checkpoint is not None:
            self._dynamic_sampler.load_state(checkpoint, self.args.process_index)
