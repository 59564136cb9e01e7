"""The ``cpu`` backend's adapter: the compiled C++ kernels in ``cex_kernels._C``, one
function per kernel slot (contracts in the registry, ``_backends/__init__.py``)."""
from cex_kernels._backends import _C


def projected_mse(*args):
    return _C.projected_mse_fwd_cpu(*args)


def softmax_kl(*args):
    return _C.softmax_kl_fwd_cpu(*args)


def tvd(*args):
    return _C.tvd_fwd_cpu(*args)
