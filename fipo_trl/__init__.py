"""fipo_trl: FIPO (arXiv 2603.19835) for Hugging Face TRL.

``fipo_weights`` and ``fipo_loss`` are importable without loading TRL; ``FIPOConfig`` and ``FIPOTrainer`` load TRL on
first use.

The package has three parts: the method at the top level (config, trainer, loss, dynamic_sampling, rewards), the
run-safety layer in ``fipo_trl.safety`` (its contract: safety/README.md) and the tools in ``fipo_trl.tools`` (the
``fipo-trl`` command, evaluation, the model card, the influence page, plots). The kernels install as
``fipo_trl.kernels``.
"""

from importlib.metadata import version as _version

from ._moved import install as _install_moved_paths
from .loss import FIPOLossOutput, FIPOWeights, fipo_loss, fipo_weights

_install_moved_paths()  # fipo_trl.cli, fipo_trl.checkpoints, ... keep working, deprecated, until 0.3.0

__version__ = _version("fipo_trl")  # written once, in pyproject.toml

_LAZY = {"FIPOConfig": "config", "FIPOTrainer": "trainer"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FIPOConfig", "FIPOLossOutput", "FIPOTrainer", "FIPOWeights", "fipo_loss", "fipo_weights", "__version__"]
