"""Triton kernels, one family per module, each next to its launcher.

Every module lists its kernels and launch configurations in ``AOT_SPECS`` so that
``python -m cex_kernels.triton.aot`` (and the test suite) can compile each of them ahead of
time for sm_80 and sm_90 without a GPU.
"""
