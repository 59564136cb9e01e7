"""Guards for the oldest versions we support (torch 2.6, Triton 3.6) that the newest
versions, which the suite runs on, would not catch."""
import __future__
import importlib
import pkgutil

import cex_kernels


def _modules():
    for info in pkgutil.walk_packages(cex_kernels.__path__, "cex_kernels."):
        if ".triton" in info.name or info.name.endswith(("cli", "_C")):
            continue  # Triton kernels and the CLI register no op
        yield importlib.import_module(info.name)


def test_custom_op_modules_keep_real_annotations():
    """torch 2.6's ``torch.library.custom_op`` infers the schema from the annotations and
    cannot resolve string ones, so a module that registers an op must not use
    ``from __future__ import annotations`` (torch 2.11+ resolves them; 2.6 raised
    "Unsupported type annotation Tuple[Tensor, Tensor]")."""
    offenders = []
    for module in _modules():
        source = open(module.__file__).read()
        registers = "torch.library.custom_op" in source
        stringified = getattr(module, "annotations", None) is __future__.annotations
        if registers and stringified:
            offenders.append(module.__name__)
    assert not offenders, f"string annotations in custom-op modules: {offenders}"
    assert any("custom_op" in open(m.__file__).read() for m in _modules())
