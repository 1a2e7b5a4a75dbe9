"""Evaluation samples that survive a kill: ``fipo-trl eval`` appends each generate call's samples to
``<output_dir>/eval_samples.jsonl``, flushed to disk, and a rerun with the same sampling arguments resumes from that
file (its header line holds the arguments; a rerun with other ones is refused rather than mixing two settings).
Results files are written whole or not at all."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from fipo_trl.safety.inputs import is_int

# The arguments that decide what the samples are: a resumed run must agree on all of them. (batch_size, pass_k,
# num_problems, timeout_seconds and the backend do not change what a sample is.)
SAMPLING_ARGS = ("model_name_or_path", "dataset_name", "dataset_config", "dataset_split", "problem_column",
                 "answer_column", "prompt_template", "use_chat_template", "k", "max_new_tokens", "temperature",
                 "top_p", "seed", "dtype")


def sampling_header(args) -> dict:
    return {"eval_samples_header": {name: getattr(args, name) for name in SAMPLING_ARGS}}


def _sample(line: bytes, k: int):
    """A saved sample line as a dict, or None when it is damaged (not JSON, not an object, a field missing or of
    the wrong type, not --k completions)."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if (isinstance(entry, dict) and is_int(entry.get("index")) and isinstance(entry.get("problem"), str)
            and isinstance(entry.get("reference"), str) and isinstance(entry.get("completions"), list)
            and len(entry["completions"]) == k and all(isinstance(c, str) for c in entry["completions"])):
        return entry
    return None


def read_saved_samples(path: Path, args, problems: list[str],
                       references: list[str]) -> dict[int, list[str]] | None:
    """The completions already saved in ``path`` (resuming), by problem index, after checking they were made with
    the same sampling arguments and for the same problems. None when there is nothing to resume (no file, an empty
    one, or a header with no sample: it never blocks a rerun). A last line cut short by a crash is dropped from the
    file; a damaged line elsewhere is skipped and reported, and its problem is sampled again."""
    if not path.exists():
        return None
    raw = path.read_bytes()
    lines = raw.splitlines(keepends=True)
    if lines and not lines[-1].endswith(b"\n"):  # the line being written when the run died
        with path.open("r+b") as f:  # appending after a half line would corrupt the file
            f.truncate(len(raw) - len(lines.pop()))
    if not lines:
        return None
    try:
        header = json.loads(lines[0])["eval_samples_header"]
    except (ValueError, TypeError, KeyError):
        header = None
    if not isinstance(header, dict):
        raise ValueError(f"--output_dir {str(path.parent)!r}: {path} is not an eval samples file (its first line is "
                         f"not the header of the sampling arguments). Fix: pass another --output_dir, or move that "
                         f"file away.")
    if len(lines) == 1:  # a header and no sample: a rerun with other arguments starts over
        return None
    current = sampling_header(args)["eval_samples_header"]
    changed = [f"--{name}: {header.get(name)!r} there, {current[name]!r} now" for name in SAMPLING_ARGS
               if header.get(name) != current[name]]
    if changed:
        raise ValueError(f"--output_dir {str(path.parent)!r} already holds samples made with other arguments "
                         f"({'; '.join(changed)}); resuming would mix samples of two settings. Fix: pass another "
                         f"--output_dir, or delete {path} to start over.")
    saved, damaged = {}, []
    for number, line in enumerate(lines[1:], start=2):
        entry = _sample(line, args.k)
        if entry is None:
            damaged.append(number)
            continue
        i = entry["index"]
        if i >= len(problems) or i in saved:  # past --num_problems, or sampled again after a damaged line
            continue
        if entry["problem"] != problems[i] or entry["reference"] != references[i]:
            raise ValueError(f"--output_dir {str(path.parent)!r}: sample {i} in {path} is for another problem than "
                             f"problem {i} of --dataset_name now (the data changed?). Fix: pass another --output_dir, "
                             f"or delete {path} to start over.")
        saved[i] = entry["completions"]
    if damaged:
        shown = ", ".join(map(str, damaged[:10])) + (", ..." if len(damaged) > 10 else "")
        warnings.warn(f"{path}: skipped {len(damaged)} damaged line(s) (line {shown}); the {len(saved)} intact "
                      "samples are kept, and the problems of the damaged lines are sampled again. The damaged lines "
                      "stay in the file, unread.", UserWarning, stacklevel=2)
    return saved


def append_samples(path: Path, indices, problems, references, completions) -> None:
    """Append one JSON line per problem, flushed to disk before returning: a crash afterwards loses none of them."""
    lines = "".join(json.dumps({"index": i, "problem": p, "reference": r, "completions": c}) + "\n"
                    for i, p, r, c in zip(indices, problems, references, completions))
    with path.open("a") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())


def write_atomically(path: Path, text: str) -> None:
    """Write a results file whole or not at all (a crash mid-write keeps the previous file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
