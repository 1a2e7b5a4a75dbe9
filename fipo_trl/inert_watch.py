"""The FIPO-is-inert watch beside the ``fipo/*`` metrics: it pools the weight stats of each micro-batch over a window
of generation batches and says when FIPO acts as DAPO, i.e. f is so close to 1 on almost every token that the weight
no longer changes the update (``FIPOConfig.fipo_inert_threshold``; docs/trainer.md has the measurements)."""

from __future__ import annotations


class InertFIPOWatch:
    """Pools the weight stats of ``micro_batches_per_window`` micro-batches; ``add`` returns the window's figures
    when it closes inert and a warning is due (at most once per ``QUIET_WINDOWS + 1`` windows)."""

    QUIET_WINDOWS = 10  # after a warning, the next this-many windows stay silent

    def __init__(self, threshold: float, micro_batches_per_window: int):
        self.threshold, self.window = threshold, micro_batches_per_window
        self.sums = dict.fromkeys(("n_weight_changed", "n_tokens", "sum_weight", "n_upper_clipped"), 0.0)
        self.seen = self.quiet = 0

    @classmethod
    def for_config(cls, args) -> InertFIPOWatch | None:
        """The watch a run with ``args`` keeps (None: turned off). Each micro-batch of a generation batch is used
        steps_per_generation x num_iterations times."""
        if args.fipo_inert_threshold <= 0:
            return None
        return cls(args.fipo_inert_threshold, args.fipo_inert_window * args.steps_per_generation * args.num_iterations)

    def add(self, stats: dict[str, float]) -> dict[str, float] | None:
        """Add one micro-batch's stats; return the window's figures when it closes inert and a warning is due."""
        for key in self.sums:
            self.sums[key] += stats[key]
        self.seen += 1
        if self.seen < self.window:
            return None
        tokens = self.sums["n_tokens"]
        figures = {"changed": self.sums["n_weight_changed"] / max(tokens, 1.0),
                   "mean": self.sums["sum_weight"] / max(tokens, 1.0),
                   "at_cap": self.sums["n_upper_clipped"] / max(tokens, 1.0)}
        self.sums = dict.fromkeys(self.sums, 0.0)
        self.seen = 0
        if self.quiet:
            self.quiet -= 1
            return None
        if tokens and figures["changed"] < self.threshold:
            self.quiet = self.QUIET_WINDOWS
            return figures
        return None


def inert_message(figures: dict[str, float], args) -> str:
    """The warning for an inert window: its figures, and what moved the share in our measurements."""
    updates = args.steps_per_generation * args.num_iterations / args.gradient_accumulation_steps
    return (
        f"FIPO is close to inert: over the last {args.fipo_inert_window} generation batches only "
        f"{figures['changed']:.1%} of response tokens had a weight f further than 1 % from 1 "
        f"(fipo/weight_changed_ratio; the warning threshold fipo_inert_threshold is {args.fipo_inert_threshold:g})"
        f", f mean {figures['mean']:.4f}, {figures['at_cap']:.1%} at the cap. The update is then nearly DAPO's. "
        "f moves only as far as the policy moves within a generation batch (docs/trainer.md has the figures). "
        "What raised it in our measurements: more optimizer updates per generation batch (now "
        f"{updates:g}; fipo_updates_per_generation: 2 -> 8 took SmolLM2-135M from 18 % to 45 %). A policy "
        "that stops moving because every group's rewards agree (advantage 0: a solved or too hard task) shows "
        "here too: check the reward std, or drop such groups with dynamic_sampling. A larger learning_rate "
        f"(now {args.learning_rate:g}) or fipo_decay_rate (now {args.fipo_decay_rate:g}) changed it little or "
        "not at all. "
        "Set fipo_inert_threshold=0 to silence this check."
    )
