"""fipo_trl: FIPO (arXiv 2603.19835) for Hugging Face TRL.

``fipo_weights`` and ``fipo_loss`` are importable without loading TRL; ``FIPOConfig`` and ``FIPOTrainer`` load TRL on
first use.
"""

from importlib.metadata import version as _version

from .loss import FIPOLossOutput, FIPOWeights, fipo_loss, fipo_weights

__version__ = _version("fipo_trl")  # written once, in pyproject.toml

_LAZY = {"FIPOConfig": "config", "FIPOTrainer": "trainer"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FIPOConfig", "FIPOLossOutput", "FIPOTrainer", "FIPOWeights", "fipo_loss", "fipo_weights", "__version__"]
