"""Compile every Triton kernel ahead of time for real GPU targets, without a GPU.

    python -m cex_kernels.triton.aot [--arch 80 90] [--json report.json]

The Triton interpreter (used by the CPU tests) accepts programs that a GPU rejects; this is
the check that they really compile. For each kernel spec listed by a module's
``aot_specs()`` (every autotune config of every dtype) and each compute capability it runs
``triton.compile(..., target=GPUTarget("cuda", cc, 32))``, then reads the resource usage of the cubin
(registers per thread, stack/local bytes = spills, shared memory) and, for specs that ask for
it, checks the PTX for operand loads that fell back to scalar loads and for products off the
tensor cores' fastest instruction (wgmma on sm_90). Exit status 1 when a compile fails, a
kernel spills, shared memory exceeds the device limit, or a spec's PTX check fails.
Must run with TRITON_INTERPRET unset (the kernels must be real JIT functions).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

# Opt-in shared memory per block (bytes): A100 163 KiB, H100 227 KiB.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
MODULES = ("cex_kernels.triton.projected_mse", "cex_kernels.triton.softmax_kl",
           "cex_kernels.triton.linear_kl")


def _specs():
    import importlib
    for module_name in MODULES:
        for spec in importlib.import_module(module_name).aot_specs():
            yield module_name, spec


def _cuobjdump_path():
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else "cuobjdump"


def _resource_usage(cubin: bytes) -> dict:
    """Registers, stack and local memory of the cubin Triton produced (``cuobjdump``).

    Local memory (LOCAL) and stack traffic on a kernel without local arrays is where ptxas
    puts spilled registers, so both count as spills.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([_cuobjdump_path(), "--dump-resource-usage", path],
                             capture_output=True, text=True, check=True).stdout
    usage = {key.lower(): int(val) for key, val in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out)}
    return {"registers": usage.get("reg"), "stack_bytes": usage.get("stack", 0),
            "local_bytes": usage.get("local", 0)}


def _narrow_loads(ptx: str) -> list:
    """Scalar 16-bit global loads and async copies narrower than 16 bytes in the PTX: the
    signs that the compiler could not prove an operand contiguous and aligned."""
    found = []
    scalar_half = re.findall(r"\bld\.global(?:\.[a-zA-Z0-9:_]+)*\.b16\b", ptx)
    scalar_half = [op for op in scalar_half if ".v2." not in op and ".v4." not in op]
    if scalar_half:
        found.append(f"{len(scalar_half)} scalar 16-bit loads")
    sizes = re.findall(r"\bcp\.async\.c[ag]\.shared\.global[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)", ptx)
    narrow = [s for s in sizes if int(s, 0) < 16]
    if narrow:
        found.append(f"{len(narrow)} async copies under 16 bytes")
    return found


def compile_one(module_name: str, spec_name: str, cc: int) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    spec = next(s for s in importlib.import_module(module_name).aot_specs() if s["name"] == spec_name)
    row = {"kernel": spec_name, "cc": cc}
    try:
        src = triton.compiler.ASTSource(fn=spec["kernel"], signature=spec["signature"],
                                        constexprs=spec["constexprs"], attrs=spec.get("attrs"))
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": spec["num_warps"],
                                           "num_stages": spec["num_stages"]})
        row["shared_bytes"] = int(compiled.metadata.shared)
        row.update(_resource_usage(compiled.asm["cubin"]))
        problems = []
        if row["stack_bytes"] or row["local_bytes"]:
            problems.append(f"register spills: stack {row['stack_bytes']}B, "
                            f"local {row['local_bytes']}B")
        if spec.get("tensor_cores"):
            needed = "wgmma.mma_async" if cc >= 90 else "mma.sync"
            if needed not in compiled.asm["ptx"]:
                problems.append(f"no {needed}: the products are off the fast tensor-core path")
        if spec.get("vector_loads"):
            narrow = _narrow_loads(compiled.asm["ptx"])
            if narrow:
                problems.append("unvectorized loads: " + ", ".join(narrow))
        if row["shared_bytes"] > SHARED_MEMORY_LIMIT[cc]:
            problems.append(f"shared memory {row['shared_bytes']}B > {SHARED_MEMORY_LIMIT[cc]}B")
        row["ok"] = not problems
        row["problem"] = "; ".join(problems)
    except Exception as exc:  # a compile error is a result to report, not a crash
        row.update(ok=False, problem=f"compile failed: {type(exc).__name__}: {exc}"[:2000])
    return row


def run(archs=(80, 90), jobs=None) -> list:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the AOT compile needs real JIT kernels")
    work = [(m, s["name"], cc) for m, s in _specs() for cc in archs]
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count()) as pool:
        return list(pool.map(compile_one, *zip(*work)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--json", help="write the per-kernel report here")
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args(argv)
    rows = run(tuple(args.arch), args.jobs)
    print(f"{'kernel':<66} {'sm':>3} {'regs':>5} {'spill':>6} {'smem KiB':>9}  status")
    for r in rows:
        spill = r.get("stack_bytes", 0) + r.get("local_bytes", 0)
        smem = r.get("shared_bytes")
        print(f"{r['kernel']:<66} {r['cc']:>3} {str(r.get('registers', '-')):>5} {spill:>6} "
              f"{(smem / 1024 if smem is not None else float('nan')):>9.1f}  "
              f"{'ok' if r['ok'] else 'FAIL: ' + r['problem']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} compiled clean, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
