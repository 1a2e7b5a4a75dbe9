"""Checks of command-line inputs shared by ``fipo-trl train`` and ``fipo-trl eval``, run before anything loads.

Each raises ValueError naming the flag and the fix. ``checking_inputs`` marks the errors of that phase, so that the
console script shows them as one line and shows the full traceback of any error raised later, while loading or
training (a bug in a reward function, say).
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from numbers import Integral
from pathlib import Path

import yaml

INPUT_ERROR = "fipo_trl_input_error"  # attribute set on a ValueError raised while the inputs are checked


@contextmanager
def checking_inputs():
    """Mark a ValueError raised inside as a bad input: ``fipo-trl`` prints it as one line and exits with status 2."""
    try:
        yield
    except ValueError as error:
        setattr(error, INPUT_ERROR, True)
        raise


def is_input_error(error: BaseException) -> bool:
    return getattr(error, INPUT_ERROR, False)


def is_int(value) -> bool:
    """A whole number given as one (an int or a numpy integer), not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_output_dir(path, flag: str = "--output_dir") -> None:
    """``path`` is a folder this process can write, or one it can create. Nothing is created: a write is tried in
    the nearest existing folder with an anonymous temporary file, so permissions, read-only file systems and ACLs
    all answer as they will at the first save."""
    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise ValueError(f"{flag} {path!r} is empty. Fix: pass the folder to write to, e.g. {flag} outputs/my-run.")
    target = Path(path).expanduser()
    existing = target
    while not existing.exists():
        if existing.is_symlink():
            raise ValueError(f"{flag} {str(path)!r}: {str(existing)!r} is a broken symbolic link. Fix: remove it, or "
                             "pass another folder.")
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == target else f"lies under {str(existing)!r}, which is a file"
        raise ValueError(f"{flag} {str(path)!r} {where}, not a folder. Fix: pass a folder path (it is created if "
                         "missing).")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        where = "" if existing == target else f" (its nearest existing parent {str(existing)!r})"
        raise ValueError(f"{flag} {str(path)!r}{where} is not writable: {error.strerror or error}. Fix: pass a "
                         "folder you can write to, or change its permissions. Checked before anything loads, so "
                         "no work is lost at the first save.") from None


def check_config_file(argv: list[str]) -> None:
    """The ``--config`` recipe TRL's parser will read: it exists, is valid YAML, is a mapping, and has no key twice
    (PyYAML silently keeps the last of two)."""
    if "--config" not in argv:
        return
    index = argv.index("--config")
    if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
        raise ValueError("--config needs a file. Fix: pass --config recipe.yaml (see examples/recipes/).")
    path = argv[index + 1]
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"--config {path!r}: no such file. Fix: check the path (examples/recipes/ has "
                         "recipes).") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--config {path!r} cannot be read ({error}). Fix: pass a UTF-8 YAML file.") from None
    try:
        config = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as duplicate:
        key, first, second = duplicate.args
        where = f"line {first}" if first == second else f"lines {first} and {second}"
        raise ValueError(f"--config {path!r}: the key {key!r} appears twice ({where}); YAML would silently use the "
                         "last one. Fix: keep one of them.") from None
    except yaml.YAMLError as error:
        mark, context = getattr(error, "problem_mark", None), getattr(error, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        if context is not None and getattr(error, "context", None):  # where the unclosed construct began
            problem += f" ({error.context} at line {context.line + 1})"
        raise ValueError(f"--config {path!r} is not valid YAML{where}: {problem}. Fix: correct that line "
                         "(`flag: value`; lists as [a, b]).") from None
    if not isinstance(config, dict):
        raise ValueError(f"--config {path!r} must hold `flag: value` lines (a YAML mapping), not a "
                         f"{type(config).__name__}.")


class _DuplicateKey(Exception):
    """(key, first line, second line) of a key repeated in one YAML mapping."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that repeats a key."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], key_node.start_mark.line + 1)
                seen[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: the safe loader's own error follows
                continue
        return super().construct_mapping(node, deep=deep)
