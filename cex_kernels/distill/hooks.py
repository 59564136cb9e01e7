"""Hidden states taken with forward hooks, so any ``nn.Module`` (plain PyTorch or Hugging Face
``transformers``) works unchanged: no monkey-patching, no ``output_hidden_states``.

A module called several times in one forward (ALBERT's shared layer) is named with a call
index: ``"albert.encoder.albert_layer_groups.0@2"`` is its third call (0-based). Naming such a
module without an index is an error (:meth:`HiddenStateCapture.check_calls`), so setup and
training can never disagree on which call is meant.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook once the last needed hidden state is captured: the rest of the
    forward pass (and its FLOPs) is skipped."""


def split_call(spec: str) -> Tuple[str, Optional[int]]:
    """``"name@k"`` -> ``("name", k)``; ``"name"`` -> ``("name", None)``."""
    name, sep, index = spec.rpartition("@")
    if not sep:
        return spec, None
    if not index.isdigit():
        raise ValueError(f"module spec {spec!r}: the call index after '@' must be an integer >= 0")
    return name, int(index)


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
    ``run(model); cap.hidden["layers.2"]``. A name may carry a call index (``"shared@1"``:
    the second call); without one the first call is kept. With ``stop_after`` the hook on
    that module (call) raises :class:`StopForward` (caught by :meth:`run`). ``calls`` counts
    each hooked module's calls. Hooks are removed on exit and tensors released by :meth:`clear`.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], stop_after: Optional[str] = None):
        self.model, self.names, self.stop_after = model, list(names), stop_after
        self.hidden: Dict[str, torch.Tensor] = {}
        self.calls: Dict[str, int] = {}
        self._handles = []

    def _hook(self, module_name, specs):
        def hook(module, inputs, output):
            k = self.calls.get(module_name, 0)
            self.calls[module_name] = k + 1
            for spec, index in specs:
                if (index or 0) == k:
                    self.hidden[spec] = first_tensor(output)
                    if spec == self.stop_after:
                        raise StopForward(spec)
        return hook

    def __enter__(self):
        modules = dict(self.model.named_modules())
        by_module: Dict[str, list] = {}
        for spec in dict.fromkeys(self.names + ([self.stop_after] if self.stop_after else [])):
            name, index = split_call(spec)
            by_module.setdefault(name, []).append((spec, index))
        for name, specs in by_module.items():
            self._handles.append(modules[name].register_forward_hook(self._hook(name, specs)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def run(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``; returns its result, or None when stopped early."""
        self.calls = {}
        try:
            return fn(*args, **kwargs)
        except StopForward:
            return None

    def check_calls(self, which: str) -> None:
        """After a full (not stopped) forward: every named module ran, a module run several
        times is named with a call index, and the index exists."""
        for spec in self.names:
            name, index = split_call(spec)
            n = self.calls.get(name, 0)
            if n == 0:
                raise ValueError(f"layer_map: {which} module {name!r} is never called in the "
                                 "forward pass, so its hook would capture nothing")
            if index is None and n > 1:
                raise ValueError(f"layer_map: {which} module {name!r} is called {n} times per "
                                 f"forward (a shared layer); name the call: {name + '@0'!r} .. "
                                 f"{name + '@' + str(n - 1)!r}")
            if index is not None and index >= n:
                raise ValueError(f"layer_map: {which} {spec!r}: the module is called only {n} "
                                 f"time(s) per forward (indices 0..{n - 1})")

    def clear(self):
        self.hidden = {}
