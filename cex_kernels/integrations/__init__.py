"""The fused losses inside other trainers. Each name imports its framework on first use, so
``import cex_kernels`` (and this package) never imports ``transformers``, ``trl`` or
``torchtune``:

- :class:`DistillationTrainer` (``pip install cex-kernels[hf]``): a ``transformers.Trainer``
  running one-shot KD and curriculum extraction with HF's loop (:mod:`.hf`).
- :class:`CexGKDTrainer`, :func:`generalized_jsd_loss` (``pip install cex-kernels[trl]``):
  TRL's ``GKDTrainer`` with its generalized JSD computed by the fused ``jsd``;
  :class:`CexLinearGKDTrainer`: the same through ``linear_kl``, no logits (:mod:`.trl`).
- :class:`LinearForwardKLLoss`: torchtune's ``ForwardKLWithChunkedOutputLoss`` computed by
  ``linear_kl`` from the final hidden states, the logits never materialized
  (:mod:`.torchtune`; needs no torchtune).
"""
import importlib

_WHERE = {"DistillationTrainer": "hf", "CexGKDTrainer": "trl", "CexLinearGKDTrainer": "trl",
          "generalized_jsd_loss": "trl", "LinearForwardKLLoss": "torchtune"}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_WHERE[name]}")
    return getattr(module, name)


def __dir__():
    return __all__
