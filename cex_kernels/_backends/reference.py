"""The ``reference`` backend's adapter: the eager PyTorch kernels of
``cex_kernels/reference.py``, one per kernel slot (contracts in the registry,
``_backends/__init__.py``)."""
from cex_kernels.reference import projected_mse_rows as projected_mse  # noqa: F401
from cex_kernels.reference import softmax_kl_rows as softmax_kl  # noqa: F401
from cex_kernels.reference import tvd_row_kernel as tvd  # noqa: F401
