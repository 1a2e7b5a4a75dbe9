"""GRPO vs DAPO vs FIPO on a task where reasoning longer pays off (examples/reasoning_task.py), several seeds.

    python examples/long_reasoning_study.py --output_dir examples/results/long_reasoning        # 5 seeds x 3 arms
    python examples/long_reasoning_study.py --variants fipo-tau8 fipo-tau128 fipo-clip1 dapo-16 fipo-16 \\
        --reference examples/results/long_reasoning/study.json --output_dir examples/results/long_reasoning_ablation
    python examples/long_reasoning_study.py --quick --output_dir /tmp/study                      # seconds

The paper's claim: under FIPO responses grow longer and accuracy rises faster or ends higher than under DAPO. Every
arm starts from the same warm-started model per seed, sees the same prompts in the same order, and makes the same
number of optimizer updates of the same size on the same number of sampled completions:

- grpo: TRL's GRPOTrainer with TRL's loss defaults, one update per generation batch (fully on-policy);
- dapo: GRPOTrainer with the official loss settings (token-mean bnpo, clip-higher 0.28, dual clip 10, no KL) and 8
  updates per generation batch, as the official runs;
- fipo: FIPOTrainer, identical to dapo except for FIPO's Future-KL weight.

Variants for the ablation change one knob of an arm (``VARIANTS``). Per seed the script warm-starts one model
(seed = warm-start seed = RL seed), runs every arm from it in parallel worker processes, evaluates each final model
on 512 held-out problems x 4 samples at T = 1 (avg@4, a fixed sampling seed), and writes to --output_dir:

- study.md: the table, the significance tests and the wall time; study.json: every number and curve;
- curves.png: accuracy, length, share of full chains and FIPO's weight, mean ± std over seeds;
- future_kl_by_position.png: F and f against the token's position in the response;
- influence/step-N.html: the first seed's FIPO run at its last update, longest completions first.

Settings were chosen on dev seeds (100, 101), not among the reported seeds. Needs matplotlib and scipy:
pip install 'fipo_trl[demo]'.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MAX_COMPLETION_LENGTH = 64  # a full chain of 8 operands is 45 tokens
SHARED = dict(  # every arm
    per_device_train_batch_size=64,  # completions per optimizer update: 8 prompts x 8 completions
    num_generations=8,
    max_completion_length=MAX_COMPLETION_LENGTH,
    temperature=1.0,
    learning_rate=3e-4,
    lr_scheduler_type="constant",
    vllm_importance_sampling_correction=False,
    bf16=False, gradient_checkpointing=False, save_strategy="no", report_to="none", disable_tqdm=True,
)
OFFICIAL_LOSS = dict(loss_type="bnpo", epsilon=0.2, epsilon_high=0.28, delta=10.0, beta=0.0)
UPDATES_PER_GENERATION = 8
# name: (trainer, config overrides). grpo/dapo/fipo are the study; the rest change one knob for the ablation.
VARIANTS = {
    "grpo": ("grpo", {"steps_per_generation": 1}),
    "dapo": ("dapo", {}),
    "fipo": ("fipo", {}),
    "fipo-tau8": ("fipo", {"fipo_decay_rate": 8.0}),  # a short Future-KL horizon (paper's ablation: 8/32/128/256)
    "fipo-tau128": ("fipo", {"fipo_decay_rate": 128.0}),  # a long one: the whole response
    "fipo-clip1": ("fipo", {"fipo_clip_ratio": 1.0}),  # weight cap 2.0 instead of 1.2
    "dapo-16": ("dapo", {"steps_per_generation": 16}),  # twice the updates per batch: further off-policy
    "fipo-16": ("fipo", {"steps_per_generation": 16}),
}
STUDY = ("grpo", "dapo", "fipo")
PANELS = [
    ("rewards/accuracy/mean", "accuracy (sampled, T=1)"),
    ("completions/mean_length", "response length (tokens)"),
    ("rewards/stepwise_share/mean", "share of full chains"),
    ("fipo/influence_weights_mean", "FIPO weight f: mean"),
    ("fipo/IW_upper_clip_ratio", "FIPO weight f: share at the cap"),
]
KEPT_METRICS = {"step", *(key for key, _ in PANELS), "fipo/future_kl_mean", "fipo/active", "fipo/weight_changed_ratio",
                "reward"}
TEST_PROBLEMS, TEST_SEED, TRAIN_PROMPTS = 512, 10_000, 8192
DEFAULT_OUTPUT_DIR = "outputs/long-reasoning"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--variants", nargs="+", default=list(STUDY), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--max_steps", type=int, default=240, help="optimizer steps per run (a multiple of 16)")
    parser.add_argument("--logging_steps", type=int, default=8, help="a multiple of 8: whole generation batches")
    parser.add_argument("--max_warm_start_steps", type=int, default=2000,
                        help="per initialisation; the warm start stops once full chains are right half the time on "
                             "dev problems, and an initialisation that misses that is replaced (4 attempts)")
    parser.add_argument("--warm_start_target", type=float, default=0.5,
                        help="competence target: the share of the warm start's full chains that are right on dev "
                             "problems (0.25 for the early-stopped variant: reasoning present but unreliable)")
    parser.add_argument("--warm_start_check_every", type=int, default=250,
                        help="supervised steps between checks of the target (the skill appears abruptly: a low "
                             "target needs frequent checks)")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one torch thread each")
    parser.add_argument("--warm_start_attempts", type=int, default=4, help="initialisations tried per seed")
    parser.add_argument("--test_problems", type=int, default=TEST_PROBLEMS, help="held-out problems (x 4 samples)")
    parser.add_argument("--warm_start_cache", metavar="DIR",
                        help="keep each seed's warm-started model here and reuse it when present (e.g. for the "
                             "ablation, which then starts from the very models of the study)")
    parser.add_argument("--reference", nargs="+", default=[],
                        help="study.json of earlier runs that join this report where this run has no run of the same "
                             "arm and seed (the ablation's baselines; seeds run before a study was extended)")
    parser.add_argument("--report_only", metavar="JSON",
                        help="rewrite study.md and the plots from an earlier run's study.json, without training")
    parser.add_argument("--interim", action="store_true",
                        help="write study.md and the plots from the runs output_dir holds so far, without training "
                             "(a long study's reading in progress: its runs are kept one file each)")
    parser.add_argument("--quick", action="store_true", help="smoke run of the whole pipeline in seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.max_steps, args.logging_steps, args.max_warm_start_steps, args.workers = [0, 1], 8, 8, 20, 1
        args.warm_start_attempts, args.test_problems = 1, 32
        args.variants = [v for v in args.variants if VARIANTS[v][1].get("steps_per_generation", 8) <= 8]
    if any(VARIANTS[v][1].get("steps_per_generation", UPDATES_PER_GENERATION) > args.max_steps for v in args.variants):
        parser.error("--max_steps must cover one generation batch of every variant")
    return args


def training_args(variant: str, output_dir: str, *, seed: int, max_steps: int, logging_steps: int):
    """The config of one arm: SHARED, plus the official loss for dapo/fipo, plus the variant's overrides."""
    trainer, overrides = VARIANTS[variant]
    kwargs = {**SHARED, "output_dir": output_dir, "seed": seed, "max_steps": max_steps,
              "logging_steps": logging_steps}
    from reasoning_task import REWARD_WEIGHTS

    kwargs["reward_weights"] = REWARD_WEIGHTS
    if trainer == "grpo":
        from trl import GRPOConfig

        return GRPOConfig(**kwargs, **overrides)  # TRL's loss defaults
    kwargs.update(OFFICIAL_LOSS, steps_per_generation=UPDATES_PER_GENERATION)
    kwargs.update(overrides)
    if trainer == "dapo":
        from trl import GRPOConfig

        return GRPOConfig(**kwargs)
    from fipo_trl import FIPOConfig

    return FIPOConfig(**kwargs)


class FutureKLByPosition:
    """Sums F and f of every response token by its position, separately for the two halves of training, from the
    weights the trainer computed (``FIPOTrainer.fipo_last_batch``: the last micro-batch of each optimizer step)."""

    def __init__(self, trainer, max_steps: int, length: int):
        from transformers import TrainerCallback

        self.totals = {half: {"F": [0.0] * length, "f": [0.0] * length, "n": [0.0] * length}
                       for half in ("first half", "second half")}
        outer = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                batch = trainer.fipo_last_batch
                if batch is None:
                    return
                totals = outer.totals["first half" if state.global_step <= max_steps // 2 else "second half"]
                mask = batch["mask"].float()
                for key, values in (("F", batch["future_kl"].float() * mask), ("f", batch["weights"].float() * mask),
                                    ("n", mask)):
                    for position, value in enumerate(values.sum(0).tolist()):  # completions are <= length wide
                        totals[key][position] += value

        self.callback = Callback()

    def means(self) -> dict:
        return {half: {key: [s / n if n else None for s, n in zip(totals[key], totals["n"])] for key in ("F", "f")}
                | {"tokens": totals["n"]} for half, totals in self.totals.items()}


def train_one(variant: str, seed: int, model_path: str, max_steps: int, logging_steps: int,
              influence_dir: str | None = None, test_problems: int = TEST_PROBLEMS) -> dict:
    """One run; its curves, held-out evaluation and wall time (picklable, for worker processes). With
    ``influence_dir``, a FIPO run also writes the token-influence page of its last update there."""
    import torch
    from transformers.trainer_callback import PrinterCallback

    torch.set_num_threads(1)  # tiny model: more threads only add contention between parallel runs
    from reasoning_task import REWARD_FUNCS, evaluate, problems, task_dataset

    trainer_name = VARIANTS[variant][0]
    if trainer_name == "fipo":
        from fipo_trl import FIPOTrainer as trainer_cls
    else:
        from trl import GRPOTrainer as trainer_cls
    with tempfile.TemporaryDirectory() as output_dir:
        config = training_args(variant, output_dir, seed=seed, max_steps=max_steps, logging_steps=logging_steps)
        # The prompts depend on the seed only, so every arm of a seed sees the same prompts in the same order.
        trainer = trainer_cls(model=model_path, reward_funcs=REWARD_FUNCS, args=config,
                              train_dataset=task_dataset(TRAIN_PROMPTS, seed=seed))
        trainer.remove_callback(PrinterCallback)  # one line per run below, not ~40 keys per logging step
        by_position = None
        if trainer_name == "fipo":
            by_position = FutureKLByPosition(trainer, max_steps, MAX_COMPLETION_LENGTH)
            trainer.add_callback(by_position.callback)
            if influence_dir:
                from fipo_trl.tools.influence import TokenInfluenceCallback

                # The last step is the 8th update on its generation batch: the most off-policy one, largest F.
                trainer.add_callback(TokenInfluenceCallback(trainer, every_n_steps=max_steps, max_completions=6,
                                                            subdir=influence_dir, longest_first=True))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        held_out = evaluate(trainer.model, trainer.processing_class, problems(test_problems, seed=TEST_SEED))
    print(f"{variant} seed {seed}: {seconds:.0f} s, held-out accuracy {held_out['accuracy']:.1%}, "
          f"full chains {held_out['stepwise_share']:.1%}, length {held_out['mean_length']:.1f}", flush=True)
    history = [{k: v for k, v in entry.items() if k in KEPT_METRICS} for entry in trainer.state.log_history]
    return {"variant": variant, "seed": seed, "log_history": history, "held_out": held_out,
            "future_kl_by_position": by_position.means() if by_position else None, "train_seconds": seconds}


def warm_start_one(seed: int, workdir: str, max_warm_start_steps: int, attempts: int = 4,
                   test_problems: int = TEST_PROBLEMS, target: float = 0.5,
                   check_every: int = 250) -> tuple[int, str, dict]:
    """The seed's warm-started model under ``workdir`` (made, or reused when ``workdir/seed-N/warm_start.json``
    says it was finished with the same step limit) and its held-out evaluation before RL."""
    import torch

    torch.set_num_threads(1)
    from reasoning_task import evaluate, prepare_model, problems
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = os.path.join(workdir, f"seed-{seed}", "warm_start.json")
    settings = {"max_warm_start_steps": max_warm_start_steps, "target_chain_accuracy": target,
                "check_every": check_every}
    saved = json.loads(Path(record).read_text()) if os.path.exists(record) else None
    # records written before the target was a setting were made with the default target
    if saved and {"target_chain_accuracy": 0.5, "check_every": 250, **saved}.items() >= settings.items():
        path, warm = saved["path"], saved["warm_start"]
    else:
        path, warm = prepare_model(os.path.join(workdir, f"seed-{seed}"), seed=seed,
                                   max_warm_start_steps=max_warm_start_steps, attempts=attempts,
                                   target_chain_accuracy=target, check_every=check_every)
        with open(record, "w") as f:
            json.dump({"path": str(path), "warm_start": warm, **settings}, f)
    before = evaluate(AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                      problems(test_problems, seed=TEST_SEED))
    print(f"warm start seed {seed}: {warm}; held-out {before}", flush=True)
    return seed, str(path), {**before, "warm_start": warm}


def curve_mean(history: list[dict], key: str) -> float:
    """The mean of a logged metric over the run: the area under its curve, i.e. how fast it rose (NaN when the run
    never logged it, e.g. FIPO's weight in a DAPO run)."""
    values = [entry[key] for entry in history if key in entry]
    return sum(values) / len(values) if values else float("nan")


# (label, how to read it from a run, how to show it: "percent", "tokens" or "weight")
MEASURES = [
    ("held-out accuracy after RL (avg@4)", lambda run: run["held_out"]["accuracy"], "percent"),
    ("held-out accuracy of full chains", lambda run: run["held_out"]["accuracy_stepwise"], "percent"),
    ("held-out share of full chains", lambda run: run["held_out"]["stepwise_share"], "percent"),
    ("held-out response length (tokens)", lambda run: run["held_out"]["mean_length"], "tokens"),
    ("training accuracy, mean over the run",
     lambda run: curve_mean(run["log_history"], "rewards/accuracy/mean"), "percent"),
    ("share of full chains, mean over the run",
     lambda run: curve_mean(run["log_history"], "rewards/stepwise_share/mean"), "percent"),
    ("response length, mean over the run",
     lambda run: curve_mean(run["log_history"], "completions/mean_length"), "tokens"),
    ("FIPO weight f, mean over the run",
     lambda run: curve_mean(run["log_history"], "fipo/influence_weights_mean"), "weight"),
    ("share of tokens at the weight cap, mean over the run",
     lambda run: curve_mean(run["log_history"], "fipo/IW_upper_clip_ratio"), "percent"),
]


def cell(values: list[float], kind: str) -> str:
    """Mean ± std over seeds of the defined values, as a percentage, tokens (1 decimal) or a weight (3)."""
    from seed_statistics import defined, mean_std

    if kind == "percent" or not defined(values):
        return mean_std(values, percent=kind == "percent")
    kept = defined(values)
    digits = 1 if kind == "tokens" else 3
    std = statistics.stdev(kept) if len(kept) > 1 else 0.0
    return f"{statistics.mean(kept):.{digits}f} ± {std:.{digits}f}"


def matching_dapo(variant: str, variants: list[str]) -> str | None:
    """The DAPO arm that differs from ``variant`` only by FIPO's weight, if present (``dapo-16`` for ``fipo-16``),
    else the study's ``dapo``; None for DAPO arms themselves."""
    trainer, overrides = VARIANTS[variant]
    if trainer == "dapo" and variant == "dapo":
        return None
    updates = overrides.get("steps_per_generation")
    same = [v for v in variants if VARIANTS[v][0] == "dapo" and VARIANTS[v][1].get("steps_per_generation") == updates]
    return same[0] if same and same[0] != variant else ("dapo" if "dapo" in variants else None)


def report(runs: list[dict], args, before: dict[int, dict], wall: float) -> str:
    from seed_statistics import PAIRED_HEADER, mean_std, paired_significance_row

    variants = list(dict.fromkeys(run["variant"] for run in runs))
    seeds = sorted({run["seed"] for run in runs})
    lines = [f"Long-reasoning study: tiny Llama (2 layers, width 128) on the last digit of a sum of 3-8 digits, "
             f"{args.max_steps} optimizer steps of 64 completions per run, seeds {', '.join(map(str, seeds))}; "
             "mean ± std over seeds. Warm-start target: full chains right "
             f"{args.warm_start_target:.0%} of the time on dev problems, checked every {args.warm_start_check_every} "
             "steps.", ""]
    count = {v: len({run["seed"] for run in runs if run["variant"] == v}) for v in variants}
    header = "| measure | " + " | ".join(f"{v} ({count[v]} seeds)" for v in variants) + " |"
    lines += [header, "|---|" + "---|" * len(variants)]
    for label, read, kind in MEASURES:
        cells = [cell([read(run) for run in runs if run["variant"] == variant], kind) for variant in variants]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    seconds = [f"{statistics.mean(run['train_seconds'] for run in runs if run['variant'] == v):.0f}" for v in variants]
    lines.append("| train time per run (s) | " + " | ".join(seconds) + " |")
    before = {int(seed): b for seed, b in before.items()}  # JSON keys are strings
    before_values = list(before.values())
    lines += ["", f"Warm-started models before RL (the same {args.test_problems} held-out problems x 4 samples): "
              "accuracy "
              f"{mean_std([b['accuracy'] for b in before_values], percent=True)}, full chains "
              f"{mean_std([b['stepwise_share'] for b in before_values], percent=True)} of answers, right "
              f"{mean_std([b['accuracy_stepwise'] for b in before_values], percent=True)} of the time, other answers "
              f"right {mean_std([b['accuracy_other'] for b in before_values], percent=True)}, length "
              f"{statistics.mean(b['mean_length'] for b in before_values):.1f} tokens. Warm starts (init seed: "
              "supervised steps): " + ", ".join(f"{b['warm_start']['init_seed']}: {b['warm_start']['steps']}"
                                     + ("" if b["warm_start"]["reached"] else " (target missed)")
                                     for b in before_values) + "."]
    missed = sorted(seed for seed, b in before.items() if not b["warm_start"]["reached"])
    subsets = [("all seeds", seeds)]
    if missed:  # reported, not dropped; shown without them too
        subsets.append((f"without the seeds whose warm start missed its target ({', '.join(map(str, missed))})",
                        [seed for seed in seeds if seed not in missed]))
    for other in variants:
        # FIPO arms against the DAPO arm that differs only by the weight; arms with another update count also
        # against the same method at the study's 8 updates per batch
        same_method = VARIANTS[other][0] if "steps_per_generation" in VARIANTS[other][1] else None
        baselines = dict.fromkeys([matching_dapo(other, variants), same_method if same_method in variants else None])
        for baseline in baselines:
            if baseline is None or baseline == other:
                continue
            for subset, kept in subsets:
                # every arm of a seed starts from that seed's warm start and sees the same prompts: paired tests
                lines += ["", f"{other} − {baseline}, per seed, {subset} (paired tests over the seeds both arms "
                          "ran):", "", PAIRED_HEADER]
                for label, read, kind in MEASURES[:7]:  # the weight rows are FIPO's alone
                    a, b = ({run["seed"]: read(run) for run in runs if run["variant"] == arm and run["seed"] in kept}
                            for arm in (other, baseline))
                    lines.append(paired_significance_row(label, a, b, percent=kind == "percent"))
    lines += ["", f"Wall time {wall / 60:.1f} min ({args.workers} runs in parallel on this machine)." if wall == wall
              else "Interim report: the runs finished so far (`--interim`); the study is still running."]
    return "\n".join(lines) + "\n"


MIN_TOKENS_PER_POSITION = 200


def plot_by_position(runs: list[dict], path: str) -> None:
    """F and f against the position of the token in the response, mean ± std over seeds, per half of training."""
    from fipo_trl.tools.plots import require_matplotlib

    Figure, FigureCanvasAgg = require_matplotlib()
    figure = Figure(figsize=(10, 3.6), dpi=90, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    colors = {"first half": "tab:blue", "second half": "tab:orange"}
    fipo_runs = [run for run in runs if run["future_kl_by_position"] and run["variant"] == "fipo"]
    for axis, key, title in ((axes[0], "F", "Future-KL F by response position"),
                             (axes[1], "f", "FIPO weight f by response position")):
        for half, color in colors.items():
            curves = [run["future_kl_by_position"][half][key] for run in fipo_runs]
            counts = [run["future_kl_by_position"][half]["tokens"] for run in fipo_runs]
            # positions every run reached often enough for a mean (the tail holds a few over-long completions)
            positions = [p for p in range(MAX_COMPLETION_LENGTH)
                         if all(n[p] >= MIN_TOKENS_PER_POSITION for n in counts)]
            if not curves or not positions:
                continue
            mean = [statistics.mean(c[p] for c in curves) for p in positions]
            std = [statistics.pstdev([c[p] for c in curves]) for p in positions]
            axis.plot(positions, mean, color=color, label=f"{half} of training ({len(curves)} seeds)")
            axis.fill_between(positions, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                              color=color, alpha=0.25, linewidth=0)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("token position in the response")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.savefig(path)


def run_file(output_dir: str, variant: str, seed: int) -> str:
    """Where one finished run is kept: a study spans sessions, so every run is written as soon as it ends."""
    return os.path.join(output_dir, "runs", f"{variant}-seed{seed}.json")


def train_and_keep(path: str, *job) -> dict:
    """``train_one(*job)``, written to ``path`` (atomically: a kill mid-write leaves no half file)."""
    run = train_one(*job)
    with open(path + ".tmp", "w") as f:
        json.dump(run, f)
    os.replace(path + ".tmp", path)
    return run


def warm_start_and_keep(path: str, *job) -> tuple[int, str, dict]:
    result = warm_start_one(*job)
    with open(path, "w") as f:
        json.dump(result[2], f)
    return result


def main(argv=None):
    args = parse_args(argv)
    if args.interim:  # the report of the runs finished so far; the study goes on with the same command
        runs, before = collect_runs(args, finished_only=True)
        write_report(runs, args, before, float("nan"), write_json=False)
        return
    if args.report_only:
        with open(args.report_only) as f:
            data = json.load(f)
        for name in ("seeds", "max_steps", "workers", "test_problems", "warm_start_target", "warm_start_check_every"):
            setattr(args, name, data["args"].get(name, getattr(args, name)))
        args.output_dir = args.output_dir if args.output_dir != DEFAULT_OUTPUT_DIR else os.path.dirname(
            os.path.abspath(args.report_only))
        os.makedirs(args.output_dir, exist_ok=True)
        write_report(data["runs"], args, data["before_rl"], data["wall_seconds"], write_json=False)
        return
    import torch

    torch.set_num_threads(1)
    from seed_statistics import run_jobs

    os.makedirs(os.path.join(args.output_dir, "runs"), exist_ok=True)
    start = time.perf_counter()
    # The first seed's FIPO run writes the token-influence page (to output_dir/influence/step-<max_steps>.html).
    influence_dir = os.path.abspath(os.path.join(args.output_dir, "influence"))
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.warm_start_cache or scratch
        os.makedirs(workdir, exist_ok=True)
        # Runs already on disk (an interrupted study, rerun with the same command) are kept, not redone.
        todo = [(variant, seed) for seed in args.seeds for variant in args.variants
                if not os.path.exists(run_file(args.output_dir, variant, seed))]
        before_path = lambda seed: os.path.join(args.output_dir, "runs", f"before-seed{seed}.json")  # noqa: E731
        pending = list(dict.fromkeys(seed for _, seed in todo))
        # a few seeds at a time (as many as workers), so that finished runs reach the disk early in a long study
        for first in range(0, len(pending), args.workers):
            seeds = pending[first:first + args.workers]
            warm = run_jobs(warm_start_and_keep, [
                (before_path(seed), seed, workdir, args.max_warm_start_steps, args.warm_start_attempts,
                 args.test_problems, args.warm_start_target, args.warm_start_check_every) for seed in seeds],
                args.workers)
            models = {seed: path for seed, path, _ in warm}
            jobs = [(run_file(args.output_dir, variant, seed), variant, seed, models[seed], args.max_steps,
                     args.logging_steps, influence_dir if (variant, seed) == ("fipo", args.seeds[0]) else None,
                     args.test_problems) for variant, seed in todo if seed in models]
            run_jobs(train_and_keep, jobs, args.workers)
    wall = time.perf_counter() - start
    runs, before = collect_runs(args)
    write_report(runs, args, before, wall)


def collect_runs(args, *, finished_only: bool = False) -> tuple[list[dict], dict]:
    """The runs of args.seeds x args.variants kept in output_dir/runs (with ``finished_only``, those that exist so
    far: the interim reading of a study in progress) and the warm starts' evaluations, joined by the --reference
    runs of arms and seeds that output_dir lacks; sets args.seeds to the seeds reported."""
    runs, before = [], {}
    for seed in args.seeds:
        before_path = os.path.join(args.output_dir, "runs", f"before-seed{seed}.json")
        if finished_only and not os.path.exists(before_path):
            continue
        with open(before_path) as f:
            before[seed] = json.load(f)
        for variant in args.variants:
            path = run_file(args.output_dir, variant, seed)
            if finished_only and not os.path.exists(path):
                continue
            with open(path) as f:
                runs.append(json.load(f))
    for reference in args.reference:  # earlier runs join the report where this one has no run of that arm and seed
        with open(reference) as f:
            earlier = json.load(f)
        have = {(run["variant"], run["seed"]) for run in runs}
        runs += [run for run in earlier["runs"] if (run["variant"], run["seed"]) not in have]
        for seed, evaluation in earlier["before_rl"].items():
            before.setdefault(int(seed), evaluation)
    args.seeds = sorted({run["seed"] for run in runs})
    return runs, {seed: before[seed] for seed in args.seeds if seed in before}


def write_report(runs: list[dict], args, before: dict, wall: float, *, write_json: bool = True) -> None:
    """study.md, curves.png, future_kl_by_position.png and (``write_json``) study.json in args.output_dir."""
    from fipo_trl.tools.plots import plot_training_curves

    variants = list(dict.fromkeys(run["variant"] for run in runs))
    plot_training_curves({v: [r["log_history"] for r in runs if r["variant"] == v] for v in variants},
                         os.path.join(args.output_dir, "curves.png"), panels=PANELS,
                         title=f"tiny Llama, last digit of a sum of 3-8 digits: mean ± std over {len(args.seeds)} "
                               "seeds")
    if any(run["future_kl_by_position"] and run["variant"] == "fipo" for run in runs):
        plot_by_position(runs, os.path.join(args.output_dir, "future_kl_by_position.png"))
    table = report(runs, args, before, wall)
    with open(os.path.join(args.output_dir, "study.md"), "w") as f:
        f.write(table)
    if write_json:
        with open(os.path.join(args.output_dir, "study.json"), "w") as f:
            json.dump({"args": vars(args), "wall_seconds": wall, "before_rl": before, "runs": runs}, f)
    print("\n" + table)
    written = "study.md, study.json" if write_json else "study.md"
    print(f"Written: {written}, curves.png, future_kl_by_position.png in {args.output_dir}")


if __name__ == "__main__":
    main()
