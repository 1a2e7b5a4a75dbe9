"""The module paths that moved into fipo_trl.safety and fipo_trl.tools keep working until 0.3.0, with a
DeprecationWarning naming the new path; the public names stay at the top level."""

import importlib
import subprocess
import sys

import pytest

from fipo_trl._moved import MOVED, SPLIT


def fresh_import(name):
    sys.modules.pop(name, None)
    return importlib.import_module(name)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_is_the_module_at_its_new_path_with_a_warning(old):
    with pytest.warns(DeprecationWarning, match=rf"{old} moved to {MOVED[old]}; .* removed in fipo_trl 0.3.0"):
        module = fresh_import(old)
    assert module is importlib.import_module(MOVED[old])  # one module: its state and patches are shared


def test_a_split_module_keeps_every_public_name_of_its_parts():
    (old, parts), = SPLIT.items()
    with pytest.warns(DeprecationWarning, match="fipo_trl.checkpoints moved to fipo_trl.safety.checkpoint_files"):
        module = fresh_import(old)
    for part in parts:
        new = importlib.import_module(part)
        names = [name for name in vars(new) if not name.startswith("__")]
        assert names and all(getattr(module, name) is getattr(new, name) for name in names), part
    from fipo_trl.safety.saving import SafeCheckpointsMixin

    assert module.SafeCheckpointsMixin is SafeCheckpointsMixin


def test_the_new_paths_and_the_public_names_import_without_a_warning():
    new_paths = [*MOVED.values(), *next(iter(SPLIT.values())), "fipo_trl.trainer", "fipo_trl.config"]
    code = "import importlib\n" + "".join(f"importlib.import_module({name!r})\n" for name in new_paths) + (
        "from fipo_trl import FIPOConfig, FIPOTrainer, fipo_loss, fipo_weights\n"
        "from fipo_trl.rewards import math_verify_reward, overlong_penalty\n")  # the public names stay where they were
    run = subprocess.run([sys.executable, "-W", "always::DeprecationWarning", "-c", code],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "moved to" not in run.stderr, run.stderr[-2000:]


def test_python_dash_m_on_the_old_cli_path_still_runs_the_command():
    run = subprocess.run([sys.executable, "-W", "always::DeprecationWarning", "-m", "fipo_trl.cli", "eval", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("usage: fipo-trl eval") and "moved to fipo_trl.tools.cli" in run.stderr
