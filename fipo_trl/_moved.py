"""Module paths that moved when fipo_trl/ was split into the method, ``safety/`` and ``tools/``: importing an old
path (``import fipo_trl.cli``, ``python -m fipo_trl.cli``) still works, with a DeprecationWarning naming the new
path, until 0.3.0 removes them (the changelog's policy: one release). Nothing in fipo_trl imports an old path."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

MOVED = {f"fipo_trl.{old}": f"fipo_trl.{new}" for old, new in {
    "cli": "tools.cli", "evaluation": "tools.evaluation", "model_card": "tools.model_card",
    "influence": "tools.influence", "plots": "tools.plots", "callbacks": "tools.callbacks", "_tiny": "tools.tiny",
    "math_metrics": "tools.math_metrics", "input_checks": "safety.inputs", "data": "safety.data",
    "reward_checks": "safety.rewards", "hub": "safety.hub", "versions": "safety.versions"}.items()}
# An old module whose names now live in several: it re-exports each of their public names.
SPLIT = {"fipo_trl.checkpoints": tuple(f"fipo_trl.safety.{name}" for name in (
    "checkpoint_files", "shard_files", "resume", "resume_checks", "lock", "run_settings", "saving"))}


def _warn(old: str) -> None:
    new = MOVED.get(old) or ", ".join(SPLIT[old])
    warnings.warn(f"{old} moved to {new}; the old path is removed in fipo_trl 0.3.0. Import it from there.",
                  DeprecationWarning, stacklevel=3)


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers only for the old paths: the module it returns is the one at the new path (the same object, so state
    and patches are shared), or, for a split module, a module of the new modules' public names."""

    def find_spec(self, name, path=None, target=None):
        if name in MOVED or name in SPLIT:
            new = importlib.util.find_spec(MOVED[name]) if name in MOVED else None
            spec = importlib.util.spec_from_loader(name, self, origin=new and new.origin,
                                                   is_package=bool(new and new.submodule_search_locations))
            spec.has_location = bool(new)  # `python -m` sets sys.argv[0] (and argparse's prog) from the origin
            return spec
        return None

    def create_module(self, spec):
        _warn(spec.name)
        if spec.name in MOVED:
            return importlib.import_module(MOVED[spec.name])
        module = types.ModuleType(spec.name, f"Deprecated: the names of {', '.join(SPLIT[spec.name])}.")
        for new in SPLIT[spec.name]:
            source = importlib.import_module(new)
            module.__dict__.update({k: v for k, v in vars(source).items() if not k.startswith("__")})
        return module

    def exec_module(self, module):
        pass  # the module was executed at its new path

    def get_code(self, name):  # `python -m fipo_trl.cli` runs the new module's code as __main__
        _warn(name)
        return importlib.util.find_spec(MOVED[name]).loader.get_code(MOVED[name])


def install() -> None:
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
