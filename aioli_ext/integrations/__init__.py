"""Integrations with training frameworks; each one is imported only when used.

``aioli_ext.integrations.huggingface`` (needs the ``hf`` extra: ``pip install aioli_ext[hf]``): a
``transformers`` Trainer whose batches come from a :class:`~aioli_ext.sampler.MixtureSampler` at a mixer's
proportions. Importing this package, or ``aioli_ext``, never imports ``transformers``.
"""
import importlib

_HUGGINGFACE_NAMES = ("MixingCallback", "MixingTrainer", "MixingTrainerMixin", "MIXING_STATE_FILE")


def __getattr__(name):
    if name in _HUGGINGFACE_NAMES:
        return getattr(importlib.import_module(".huggingface", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_HUGGINGFACE_NAMES)
