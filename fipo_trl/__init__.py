"""fipo_trl: FIPO (arXiv 2603.19835) for Hugging Face TRL.

``fipo_loss`` is importable without loading TRL; ``FIPOConfig`` and ``FIPOTrainer`` load TRL on first use.
"""

from .loss import FIPOLossOutput, fipo_loss

__version__ = "0.1.0"

_LAZY = {"FIPOConfig": "config", "FIPOTrainer": "trainer"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FIPOConfig", "FIPOLossOutput", "FIPOTrainer", "fipo_loss", "__version__"]
