"""Hidden states taken with forward hooks, so any ``nn.Module`` (plain PyTorch or Hugging Face
``transformers``) works unchanged: no monkey-patching, no ``output_hidden_states``.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook once the last needed hidden state is captured: the rest of the
    forward pass (and its FLOPs) is skipped."""


def first_tensor(output):
    """A module's hidden state: the output itself, or the first element of a tuple/list
    (HF blocks return ``(hidden, present, attn)``), or ``output[0]`` of a ModelOutput."""
    while isinstance(output, (tuple, list)) or (hasattr(output, "to_tuple") and
                                                not isinstance(output, torch.Tensor)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"expected a tensor (or a tuple starting with one) as module output, "
                        f"got {type(output).__name__}")
    return output


class HiddenStateCapture:
    """Captures the outputs of named submodules during a forward pass.

    ``with HiddenStateCapture(model, ["layers.0", "layers.2"], stop_after="layers.2") as cap:``
    ``run(model); cap.hidden["layers.2"]``. With ``stop_after`` the hook on that module
    raises :class:`StopForward` (caught by :meth:`run`). Hooks are removed on exit and the
    captured tensors released by :meth:`clear`.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], stop_after: Optional[str] = None):
        self.model, self.names, self.stop_after = model, list(names), stop_after
        self.hidden: Dict[str, torch.Tensor] = {}
        self._handles = []

    def _hook(self, name):
        def hook(module, inputs, output):
            self.hidden[name] = first_tensor(output)
            if name == self.stop_after:
                raise StopForward(name)
        return hook

    def __enter__(self):
        modules = dict(self.model.named_modules())
        for name in set(self.names) | ({self.stop_after} - {None}):
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def run(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``; returns its result, or None when stopped early."""
        try:
            return fn(*args, **kwargs)
        except StopForward:
            return None

    def clear(self):
        self.hidden = {}
