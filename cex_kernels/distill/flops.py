"""Analytic FLOP counting for the trainer's phases.

Each ``nn.Linear`` (and HF ``Conv1D``) call costs ``2·rows·in·out`` forward; backward adds
the same for the weight gradient when the weight requires grad and again for the input
gradient when the input requires grad (so frozen layers and the teacher, run under
``inference_mode``, cost forward only). Loss matmuls (projected-MSE's ``teacher @ P``) are
added by the method. Attention-score matmuls and elementwise work are not counted: for the
MLPs here the count equals ``torch.utils.flop_counter.FlopCounterMode``'s (see the tests).
"""
from __future__ import annotations

from torch import nn


def linear_dims(module: nn.Module):
    """(in_features, out_features) of a Linear-like module, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return tuple(module.weight.shape)  # HF GPT-2's Conv1D stores (in, out)
    return None


class LinearFlopCounter:
    """Counts matmul FLOPs of every Linear-like call in ``models`` while entered."""

    def __init__(self, *models: nn.Module):
        self.models, self.flops, self._handles = models, 0, []

    def _hook(self, dims):
        n_in, n_out = dims

        def hook(module, inputs, output):
            x = inputs[0]
            per_pass = 2 * (x.numel() // n_in) * n_in * n_out
            self.flops += per_pass
            if module.weight.requires_grad and output.requires_grad:
                self.flops += per_pass
            if x.requires_grad and output.requires_grad:
                self.flops += per_pass
        return hook

    def __enter__(self):
        for model in self.models:
            for m in model.modules():
                dims = linear_dims(m)
                if dims is not None:
                    self._handles.append(m.register_forward_hook(self._hook(dims)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False


def register_projected_mse_flops() -> None:
    """Teach ``FlopCounterMode`` the cost of ``cex::projected_mse`` (``2·N·d_t·d_s`` for the
    product it fuses; its backward only rescales a stored gradient), so both counts agree."""
    import torch
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    import cex_kernels.ops.projected_mse  # noqa: F401  (registers the op)
    op = torch.ops.cex.projected_mse
    if op in flop_registry:
        return

    @register_flop_formula(op)
    def projected_mse_flop(student_shape, teacher_shape, projection_shape, *args, **kwargs) -> int:
        d_t, d_s = projection_shape
        return 2 * student_shape[0] * d_t * d_s
