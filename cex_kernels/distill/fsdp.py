"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the trainer: ``TrainConfig(fsdp=True)``
under ``torchrun`` with more than one process.

- **Sharding.** Student and teacher are sharded the same way, after the method's setup
  (which probes the full models): every *block* gets its own ``fully_shard`` (a Hugging Face
  model's ``_no_split_modules`` classes, else the items of its ``nn.ModuleList`` s), then
  the root. Each rank keeps 1/W of every parameter; a block's parameters are all-gathered
  just before it runs and freed after it (``reshard_after_forward``).
- **Phases.** FSDP2 shards per parameter, so ``requires_grad`` freezes parameters of a block
  while others of it train, as without FSDP; the optimizer is built over the sharded
  ``DTensor`` parameters. Gradients are reduce-scattered (averaged over ranks) after the last
  micro-batch only (``set_requires_gradient_sync``).
- **Hooks.** The forward hooks that capture hidden states are registered on the sharded
  blocks after FSDP's own, so they see the block's ordinary (unsharded) output; the fixed
  projections are small and replicated.
- **Teacher.** Sharded and run under ``inference_mode`` on every rank (all ranks run the
  same forward: the all-gathers are collective).
- **Forwards without a backward** (teacher, eval, the warm-up in :func:`shard`): FSDP2
  keeps a root's parameters gathered after its forward, for the backward it expects, so
  the trainer frees them (:func:`reshard`); and eval forwards of the student run to their
  end (no early stop at a projected layer), since FSDP2's state only returns to idle
  after a complete forward or a backward.
- **Mixed precision.** ``TrainConfig(fsdp_param_dtype="bfloat16")``: parameters are
  all-gathered and computed in bf16, gradients reduced in float32 into float32 shards
  (``MixedPrecisionPolicy(param_dtype, reduce_dtype=float32)``).
- **Checkpoints.** ``torch.distributed.checkpoint`` (DCP): every rank writes its shards of
  the student and optimizer into ``out_dir/checkpoint-<step>/`` and rank 0 adds
  ``trainer.pt`` (phase, step, data position, every rank's RNG); a resume loads them into the
  sharded model, exactly. ``out_dir`` must be a filesystem every rank sees (multi-node: a
  shared one). The final student is gathered (full state dict) and saved by rank 0.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

from cex_kernels.distill import checkpoint as ckpt_io

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def blocks_of(model: nn.Module) -> List[nn.Module]:
    """The modules to shard one by one: a Hugging Face model's ``_no_split_modules``
    classes, else the items of its ``nn.ModuleList`` s (outermost first)."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in classes]
    if found:
        return found
    blocks, seen = [], set()
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and id(m) not in seen:
            for item in m:
                blocks.append(item)
                seen.update(id(x) for x in item.modules())
    return blocks


def shard(model: nn.Module, param_dtype: Optional[str] = None, *, sample=None,
          forward_fn=None) -> nn.Module:
    """``fully_shard`` each block of ``model``, then the root (in place). With ``sample``:
    one ``forward_fn(model, sample)`` in eval mode under ``no_grad`` (no dropout, no RNG
    drawn), so FSDP2's lazy initialization happens now: outside ``inference_mode``, where
    it would make a teacher's parameters inference tensors, and while every parameter the
    user left trainable requires grad (FSDP2 fixes each block's reduce dtype from the
    parameters requiring grad at that moment; a block frozen then would later reduce bf16
    gradients into float32 shards), and every block, even one a projected-MSE phase never
    reaches, has its unsharded parameters (FSDP2's end-of-backward callback reads them)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=torch.float32) \
        if param_dtype else MixedPrecisionPolicy()
    for block in blocks_of(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    if sample is not None:
        training = model.training
        model.eval()
        with torch.no_grad():
            forward_fn(model, sample)
        model.train(training)
        reshard(model)
    return model


def reshard(model: nn.Module) -> None:
    """Free a sharded model's gathered root parameters: FSDP2 keeps the root unsharded after
    a forward (expecting its backward), which a no-grad forward never runs, and the optimizer
    and checkpoints must see the sharded parameters. A model that is not sharded: nothing."""
    if callable(getattr(model, "reshard", None)):
        model.reshard()


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module):
    """Accumulate gradients locally (no reduce-scatter) inside the block."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def grad_norm_value(norm) -> float:
    """``clip_grad_norm_``'s result as a float (a ``DTensor`` over sharded gradients)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def save(path: str, model: nn.Module, optimizer, trainer_state: dict, rank: int) -> None:
    """A sharded checkpoint directory: DCP shards of ``model`` (and ``optimizer``) from every
    rank, plus ``trainer_state`` from rank 0; written under a temporary name and renamed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict)
    tmp = os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path))
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    state = {"student": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=tmp)
    if rank == 0:
        ckpt_io.atomic_save(trainer_state, os.path.join(tmp, ckpt_io.TRAINER_STATE))
        if os.path.exists(path):
            ckpt_io.remove(path)
        os.replace(tmp, path)
    dist.barrier()


def load_model(path: str, model: nn.Module) -> None:
    """The student's shards of a sharded checkpoint, into the sharded ``model``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    state = {"student": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["student"])


def load_optimizer(path: str, model: nn.Module, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=path)
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def full_state_dict(model: nn.Module) -> dict:
    """The whole model's weights on CPU, gathered from every rank: a collective (every rank
    calls it); rank 0 gets the full dict, the others an empty one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
