"""What a run used, recorded in each checkpoint (``fipo_run_settings.json``) and compared when a run resumes.

A resume refuses another architecture or dynamic-sampling seed, and warns about every other change; the model card
lists the changes of earlier resumes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

RUN_SETTINGS_FILE = "fipo_run_settings.json"
# The settings whose change a resumed run is told about (and the card records): the loss, the batch geometry, the
# sampling. A change here does not break the run; what does is in compare_run_settings.
COMPARED_SETTINGS = (
    "fipo_decay_rate", "fipo_clip_ratio", "fipo_clip_high_only", "fipo_safety_threshold", "fipo_sequence_filter",
    "delta", "epsilon", "epsilon_high", "beta", "loss_type", "importance_sampling_level", "num_generations",
    "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation", "num_iterations",
    "learning_rate", "max_completion_length", "temperature", "seed", "dynamic_sampling",
)
# Config entries that fix the shapes of the weights: a checkpoint of another architecture cannot load.
ARCHITECTURE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                     "num_attention_heads", "num_key_value_heads", "n_embd", "n_layer", "n_head", "d_model")


def dataset_identity(dataset) -> dict | None:
    """Rows, columns and a hash of the prompts: enough to tell another dataset from the same one reloaded (the
    datasets fingerprint is random for in-memory datasets)."""
    try:
        rows = len(dataset)
        prompts = dataset["prompt"]
    except (TypeError, KeyError):  # streaming, or no prompt column
        return None
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(json.dumps(prompt, sort_keys=True, default=str).encode())
        digest.update(b"\0")
    return {"rows": rows, "columns": list(dataset.column_names), "prompts_sha256": digest.hexdigest()[:16]}


def run_settings(trainer) -> dict:
    """What this run uses (computed once per trainer; the dataset hash reads every prompt)."""
    cached = getattr(trainer, "_fipo_run_settings", None)
    if cached is None:
        settings = {name: getattr(trainer.args, name, None) for name in COMPARED_SETTINGS}
        settings["world_size"] = trainer.accelerator.num_processes
        cached = {"settings": settings, "dataset": dataset_identity(trainer.train_dataset)}
        trainer._fipo_run_settings = cached
    return cached


def _load_record(checkpoint) -> tuple[dict | None, str | None]:
    """(the checkpoint's settings record, None) or (None, why it cannot be read): missing (a checkpoint from before
    fipo_trl recorded them, or of another tool, or deleted), not JSON, or not the record's shape (hand-edited)."""
    try:
        record = json.loads((Path(checkpoint) / RUN_SETTINGS_FILE).read_text())
    except FileNotFoundError:
        return None, f"it has no {RUN_SETTINGS_FILE}"
    except (OSError, ValueError) as error:
        return None, f"its {RUN_SETTINGS_FILE} is unreadable ({type(error).__name__})"
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        return None, f"its {RUN_SETTINGS_FILE} is not a settings record (no 'settings' mapping)"
    return record, None


def run_settings_problem(checkpoint) -> str | None:
    """Why the checkpoint's settings record cannot be read (None: it can)."""
    return _load_record(checkpoint)[1]


def read_run_settings(checkpoint) -> dict | None:
    """The checkpoint's settings record, or None when it cannot be read (``run_settings_problem`` says why). Parts
    of another shape (a hand edit) are dropped: they cannot be compared."""
    record, _ = _load_record(checkpoint)
    if record is None:
        return None
    return {"settings": record["settings"],
            "dataset": record.get("dataset") if isinstance(record.get("dataset"), dict) else None,
            "resumed": [entry for entry in record.get("resumed") or [] if isinstance(entry, dict)]
            if isinstance(record.get("resumed"), list) else []}


def check_architecture(checkpoint, model_config, model_name: str = "the model") -> None:
    """Refuse a checkpoint whose weights have other shapes than the model's: transformers would fail with a raw
    size mismatch after loading (or, for some layers, load them partly)."""
    try:
        saved = json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, ValueError):
        return  # an adapter checkpoint, or no config: nothing to compare
    current = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    differ = [f"{key}: {saved[key]!r} in the checkpoint, {current[key]!r} in {model_name}" for key in ARCHITECTURE_KEYS
              if key in saved and key in current and saved[key] != current[key]]
    if differ:
        raise ValueError(
            f"resume_from_checkpoint: {checkpoint} is of another model architecture ({'; '.join(differ)}), so its "
            "weights cannot be loaded into this model. Fix: pass the model the run was trained from as "
            "--model_name_or_path, or start a new run (drop --resume_from_checkpoint, in a new --output_dir).")


def check_dynamic_sampling_seed(checkpoint, args) -> None:
    """With dynamic sampling the refill stream resumes from its saved position, which only means something under
    the seed it was drawn with: refuse another seed before anything loads."""
    if not getattr(args, "dynamic_sampling", False):
        return
    saved = (read_run_settings(checkpoint) or {}).get("settings", {}).get("seed")
    if saved is None:
        try:  # checkpoints from before the settings file: the stream's own state has its seed (the run's seed + 1)
            saved = json.loads((Path(checkpoint) / "dynamic_sampling_state_0.json").read_text())["seed"] - 1
        except (OSError, ValueError, KeyError, TypeError):
            return
    if saved != args.seed:
        raise ValueError(f"resume_from_checkpoint: {checkpoint} was trained with seed {saved} and dynamic sampling, "
                         f"this run has seed {args.seed}: the refill stream cannot continue under another seed. "
                         f"Fix: resume with --seed {saved}.")


def compare_run_settings(saved: dict | None, current: dict) -> list[str]:
    """The changes between a checkpoint's recorded settings and this run's, as 'name: old -> new' lines."""
    if not saved:
        return []
    changes = []
    old, new = saved.get("settings", {}), current["settings"]
    for name in new:
        if name in old and old[name] != new[name]:
            note = ""
            if name == "world_size":
                note = (" processes (the per-process RNG states of the other ranks are not restored, and the global "
                        "batch changes with the number of processes)")
            changes.append(f"{name}: {old[name]!r} -> {new[name]!r}{note}")
    old_data, new_data = saved.get("dataset"), current.get("dataset")
    if old_data and new_data and old_data != new_data:
        changes.append(f"train_dataset: another dataset ({old_data.get('rows')} rows, prompts "
                       f"{old_data.get('prompts_sha256')} -> {new_data.get('rows')} rows, prompts "
                       f"{new_data.get('prompts_sha256')}): the resumed data order does not continue the old one")
    return changes



def write_run_settings(trainer, folder: Path) -> None:
    """Record in the checkpoint what the run used (compared when a run resumes from it) and the settings changes
    of earlier resumes (the model card lists them)."""
    record = {**run_settings(trainer), "resumed": getattr(trainer, "_fipo_resume_history", [])}
    (folder / RUN_SETTINGS_FILE).write_text(json.dumps(record, indent=1, default=str))

