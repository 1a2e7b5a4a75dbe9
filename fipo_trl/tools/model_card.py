"""The model card of a FIPO run, rendered from ``model_cards/fipo_model_card.md`` with huggingface_hub's ModelCard."""

from __future__ import annotations

import html
import importlib.metadata
import os
import re
from importlib import resources

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from fipo_trl.kernels.common import weight_bounds

CURVES_IMAGE = "training_curves.png"  # linked from the card when a run wrote it next to README.md
INFLUENCE_PAGE = "fipo_influence/latest.html"  # written by fipo_trl.tools.influence.TokenInfluenceCallback
MAX_CURVE_ROWS = 12


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("fipo_trl", "trl", "transformers", "torch", "accelerate", "datasets", "peft"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def markdown_text(value) -> str:
    """Any text as inert Markdown on one line (a sentence, a heading, a table cell): runs of whitespace become one
    space, ``&``, ``<`` and ``>`` become entities (no HTML), and Markdown's punctuation is backslash-escaped (no link,
    emphasis, code span, table cell boundary, heading or list)."""
    text = html.escape(" ".join(str(value).split()), quote=False)
    text = re.sub(r"([\\`*_\[\]|~#!])", r"\\\1", text)
    return re.sub(r"^([-+])(?=\s|$)|^(\d+)([.)])(?=\s|$)",
                  lambda m: f"\\{m[1]}" if m[1] else f"{m[2]}\\{m[3]}", text)


def python_literal(value) -> str:
    """``value`` as a Python string literal (its repr) that also cannot end a Markdown code fence (no backquote)."""
    return repr(str(value)).replace("`", "\\x60")


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _generation(args) -> str:
    """Which engine generated the completions, and whether TRL corrected for the sampler's log-probs."""
    if not args.use_vllm:
        return "transformers (`generate`)"
    correction = (f"TRL's importance-sampling correction on (`{args.vllm_importance_sampling_mode}`)"
                  if args.vllm_importance_sampling_correction else "no importance-sampling correction (as official)")
    return f"vLLM, {args.vllm_mode} mode; {correction}"


def _curve_rows(log_history: list[dict]) -> list[dict]:
    """One row per optimizer step that logged FIPO metrics, thinned to at most MAX_CURVE_ROWS evenly spaced rows.
    Rewards and lengths are logged on the generating step of each generation batch only: carried forward."""
    rows, reward, length = [], None, None
    for entry in log_history:
        reward = entry.get("reward", reward)
        length = entry.get("completions/mean_length", length)
        if "fipo/influence_weights_mean" in entry:
            rows.append({"step": entry["step"], "reward": _fmt(reward), "length": _fmt(length),
                         "f_mean": _fmt(entry["fipo/influence_weights_mean"]),
                         "f_max": _fmt(entry.get("fipo/influence_weights_max")),
                         "f_upper": _fmt(entry.get("fipo/IW_upper_clip_ratio")),
                         "active": _fmt(entry.get("fipo/active"))})
    if len(rows) > MAX_CURVE_ROWS:
        stride = (len(rows) - 1) / (MAX_CURVE_ROWS - 1)
        rows = [rows[round(i * stride)] for i in range(MAX_CURVE_ROWS)]
    return rows


def _base_model(model) -> tuple[str | None, str]:
    """(Hub id or None, how to describe it). Local directories are not Hub ids and are not linked."""
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    name = getattr(config, "_name_or_path", "") or ""
    if _is_hub_id(name):
        return name, name
    return None, f"a local model ({os.path.basename(os.path.normpath(name)) or 'unnamed'})"


def _is_hub_id(name: str | None) -> bool:
    """Whether a model or dataset name is a Hub id (it goes in the card's metadata and is linked), not a local path
    or a description."""
    if not isinstance(name, str):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not os.path.exists(name)


def render_model_card(trainer, *, model_name: str | None = None, dataset_name: str | None = None,
                      tags: str | list[str] | None = None,
                      eval_results: dict[str, dict[str, float]] | None = None) -> ModelCard:
    """Render the FIPO model card of ``trainer``'s run.

    eval_results: ``{dataset: {metric: value}}`` (e.g. ``{"AIME-2024": {"avg@32": 0.41}}``); it becomes the card's
    model-index and an evaluation table.
    """
    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    base_model, base_description = _base_model(model)
    is_adapter = hasattr(model, "peft_config")
    repo_id = trainer.hub_model_id or args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
    model_name = model_name or repo_id.split("/")[-1]
    tag_set = {tags} if isinstance(tags, str) else set(tags or ())
    tag_set.update(trainer._tag_names)
    eval_results = eval_results or {}
    card_data = ModelCardData(
        base_model=base_model, datasets=[dataset_name] if _is_hub_id(dataset_name) else None,
        library_name="peft" if is_adapter
        else "transformers", model_name=model_name, tags=sorted(tag_set), pipeline_tag="text-generation",
        eval_results=[EvalResult(task_type="text-generation", dataset_type=dataset, dataset_name=dataset,
                                 metric_type=metric, metric_value=value)
                      for dataset, metrics in eval_results.items() for metric, value in metrics.items()] or None,
    )
    lower, upper = weight_bounds(args.fipo_clip_ratio, args.fipo_clip_high_only)
    updates = f"{args.fipo_updates_per_generation_batch:g}"
    if args.fipo_straddles_generation_batches:
        updates = (f"{args.fipo_updates_per_generation_batch:.3g}: optimizer steps straddled generation batches "
                   f"(steps_per_generation {args.steps_per_generation} × num_iterations {args.num_iterations} over "
                   f"gradient_accumulation_steps {args.gradient_accumulation_steps}); each micro-batch's weights "
                   "used its own π_old")
    fipo = {
        "decay_rate": args.fipo_decay_rate,
        "weight_clip": f"[{lower:g}, {upper:g}]" if args.fipo_clip_ratio else "min(exp F, 10)",
        "safety_threshold": args.fipo_safety_threshold, "delta": args.delta, "epsilon": args.epsilon,
        "epsilon_high": args.epsilon if args.epsilon_high is None else args.epsilon_high,
        "updates_per_generation": updates, "sequence_filter": args.fipo_sequence_filter,
        "loss_type": args.loss_type, "beta": args.beta, "num_generations": args.num_generations,
        "completions_per_step": args.per_device_train_batch_size * args.gradient_accumulation_steps
        * trainer.accelerator.num_processes,
        "learning_rate": args.learning_rate, "max_steps": trainer.state.global_step or args.max_steps,
        "generation": _generation(args),
    }
    template = resources.files("fipo_trl.model_cards").joinpath("fipo_model_card.md").read_text()
    def artifact(path):
        return path if os.path.exists(os.path.join(args.output_dir, path)) else None

    return ModelCard.from_template(
        card_data, template_str=template, model_name=model_name, base_model=base_model,
        base_model_description=base_description, dataset_name=dataset_name, dataset_hub_id=_is_hub_id(dataset_name),
        is_adapter=is_adapter, repo_id=repo_id,
        fipo=fipo, curves=_curve_rows(trainer.state.log_history),
        curves_image=artifact(CURVES_IMAGE), influence_page=artifact(INFLUENCE_PAGE),
        eval_table=[{"dataset": d, "metric": m, "value": _fmt(v)} for d, ms in eval_results.items()
                    for m, v in ms.items()],
        versions=_versions(), fipo_citation=trainer._paper["citation"],
        resume_changes=getattr(trainer, "_fipo_resume_history", []),  # settings changed by a resume
        md=markdown_text, py=python_literal,  # every user-supplied string goes through one of them
    )
