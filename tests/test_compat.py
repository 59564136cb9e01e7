"""Guards for the oldest versions we support (torch 2.6, Triton 3.6) that the newest
versions, which the suite runs on, would not catch."""
import __future__
import importlib
import importlib.util
import pkgutil

import cex_kernels


def _op_modules():
    """The package's modules that register a custom op, found from their source first, so
    modules needing optional dependencies (the integrations) are never imported here."""
    for info in pkgutil.walk_packages(cex_kernels.__path__, "cex_kernels."):
        if ".triton" in info.name or info.name.endswith(("cli", "_C")):
            continue  # Triton kernels and the CLI register no op
        origin = importlib.util.find_spec(info.name).origin
        if origin and origin.endswith(".py") and "torch.library.custom_op" in open(origin).read():
            yield importlib.import_module(info.name)


def test_custom_op_modules_keep_real_annotations():
    """torch 2.6's ``torch.library.custom_op`` infers the schema from the annotations and
    cannot resolve string ones, so a module that registers an op must not use
    ``from __future__ import annotations`` (torch 2.11+ resolves them; 2.6 raised
    "Unsupported type annotation Tuple[Tensor, Tensor]")."""
    modules = list(_op_modules())
    offenders = [m.__name__ for m in modules
                 if getattr(m, "annotations", None) is __future__.annotations]
    assert not offenders, f"string annotations in custom-op modules: {offenders}"
    assert {"cex_kernels.ops.softmax_kl", "cex_kernels.ops.linear_kl",
            "cex_kernels.ops.projected_mse", "cex_kernels.ops._divergence"} <= {
        m.__name__ for m in modules}
