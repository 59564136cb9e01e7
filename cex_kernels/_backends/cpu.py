"""The ``cpu`` backend's adapter: the compiled C++ kernels in ``cex_kernels._C``, one
function per kernel slot (contracts in the registry, ``_backends/__init__.py``)."""
from cex_kernels._backends import _C


def projected_mse(*args):
    return _C.projected_mse_fwd_cpu(*args)


def softmax_kl(*args, grad_student_out=None):
    return _C.softmax_kl_fwd_cpu(*args, grad_student_out)


def tvd(*args, grad_student_out=None):
    return _C.tvd_fwd_cpu(*args, grad_student_out)


def advise_huge_pages(tensor):
    """Ask for transparent huge pages under a large buffer about to be written in full
    (a hint: ``csrc/cpu/huge_pages.h``)."""
    _C.advise_huge_pages(tensor)
