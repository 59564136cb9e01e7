"""Small helpers shared by the Triton launchers."""
import contextlib
import os

import torch

# CEX_TRITON_AUTOTUNE=0 launches each kernel's first config without autotuning (test runs
# on a GPU, where autotuning every small shape would only cost compile time).
AUTOTUNE = os.environ.get("CEX_TRITON_AUTOTUNE", "1") != "0"


def dot_input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision for this dtype: fp32 follows torch's matmul setting
    (exact fp32 unless the user allowed TF32, as ``torch.mm`` does); half types ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def math_mode(dtype: torch.dtype) -> str:
    """tensor_core (fp16/bf16), tf32 (fp32 with TF32 allowed) or fp32 (exact)."""
    if dtype != torch.float32:
        return "tensor_core"
    return "fp32" if dot_input_precision(dtype) == "ieee" else "tf32"


def on_device(device: torch.device):
    """Launch on ``device``: Triton launches on the current CUDA device, so make it the
    tensors' one; nothing to do for CPU tensors (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def aot_spec(kernel, name: str, types: dict, constexprs: dict, divisible=(), *,
             num_warps: int, num_stages: int, vector_loads: bool = False,
             tensor_cores: bool = False) -> dict:
    """One ahead-of-time compile spec for ``cex_kernels.triton.aot``.

    Every argument is an ``i32`` unless ``types`` says otherwise; ``constexprs`` become
    constants (as the JIT makes unit strides and block sizes); ``divisible`` names the
    arguments specialized as multiples of 16, as the JIT does for aligned inputs.
    ``vector_loads``: the compile must load its 16-bit tensors with vector loads and stage
    them through shared memory in 16-byte async copies (a GEMM whose operand loads fell
    back to scalar loads cannot be pipelined, and is several times slower).
    ``tensor_cores``: its products must run on the tensor cores' fastest instruction for
    the target: ``wgmma`` on sm_90, ``mma.sync`` on sm_80.
    """
    arg_names = kernel.arg_names
    signature = {arg: "i32" for arg in arg_names}
    signature.update({arg: t for arg, t in types.items() if arg in signature})
    signature.update({arg: "constexpr" for arg in constexprs})
    attrs = {(arg_names.index(arg),): [["tt.divisibility", 16]] for arg in divisible}
    return dict(name=name, kernel=kernel, signature=signature, constexprs=dict(constexprs),
                attrs=attrs, num_warps=num_warps, num_stages=num_stages,
                vector_loads=vector_loads, tensor_cores=tensor_cores)
