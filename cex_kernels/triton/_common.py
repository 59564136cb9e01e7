"""Small helpers shared by the Triton launchers."""
import torch


def dot_input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision for this dtype: fp32 follows torch's matmul setting
    (exact fp32 unless the user allowed TF32, as ``torch.mm`` does); half types ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"
