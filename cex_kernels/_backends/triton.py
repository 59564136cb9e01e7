"""The ``triton`` backend's adapter: one function per kernel slot (contracts in the
registry, ``_backends/__init__.py``). Triton is imported on the first call, not before."""


def projected_mse(*args):
    from cex_kernels.triton import projected_mse as kernels
    return kernels.projected_mse_fwd(*args)


def softmax_kl(*args):
    from cex_kernels.triton import softmax_kl as kernels
    return kernels.softmax_kl_fwd(*args)


def tvd(*args):
    from cex_kernels.triton import softmax_kl as kernels
    return kernels.tvd_fwd(*args)
