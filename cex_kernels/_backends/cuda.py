"""The ``cuda`` backend's adapter: the compiled CUDA kernels in ``cex_kernels._C``, one
function per kernel slot (contracts in the registry, ``_backends/__init__.py``). Each
launches on the tensors' device and its current stream."""
import torch

from cex_kernels._backends import _C


def _launch(fn, first, *args):
    with torch.cuda.device(first.device):
        return fn(first, *args, torch.cuda.current_stream(first.device).cuda_stream)


def projected_mse(student, *args):
    return _launch(_C.projected_mse_fwd_cuda, student, *args)


def softmax_kl(student, *args):
    return _launch(_C.softmax_kl_fwd_cuda, student, *args)
