"""Compile hf_dynorm's Triton kernels for an NVIDIA GPU without one, and print what the machine code does.

    python tests/kernel_ptx.py ARCH:IO_DTYPE ...     e.g. 90:bf16 (H100/H200) 80:fp32 (A100)

Triton lowers each kernel to PTX and ptxas (bundled with Triton) assembles it, all on the CPU. Printed as JSON per
target and kernel: the global memory instructions in the PTX (`ld.global.v4.b32` is a 128-bit load) and ptxas's resource
use (registers, and STACK/LOCAL bytes, which are register spills). tests/test_kernels.py runs this in a
subprocess: Triton's interpreter, which the rest of the suite uses, must be off here.

The specialization is the one Triton picks at a launch on the common shapes: tensors 16-byte aligned, and rows,
channels and row stride divisible by 16 (SmolLM2's 576, and 2048, 4096).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hf_dynorm import kernels

# argument name -> Triton type; STREAM is the input/output dtype under test, parameters and partial sums are fp32
ARGUMENT_TYPES = {"X": "*STREAM", "Y": "*STREAM", "G": "*STREAM", "DX": "*STREAM", "W": "*STREAM", "B": "*STREAM",
                  "P": "*fp32", "DP": "*fp32", "DW": "*fp32", "DB": "*fp32", "A": "*i64", "OWN": "*fp32",
                  "CPL": "*fp32", "rows": "i32", "channels": "i32", "stride": "i32", "tiles_per_program": "i32",
                  "anchor_count": "i32"}
DIVISIBLE_BY_16 = {"rows", "channels", "stride"}
COMMON = {"PER_CHANNEL": False, "HAS_BIAS": True, "BLOCK_ROWS": kernels.BLOCK_ROWS, "BLOCK_C": kernels.BLOCK_C}
KERNELS = {
    "forward dyisru": (kernels._forward_kernel, {"IS_DYT": False, **COMMON}),
    "forward dyt": (kernels._forward_kernel, {"IS_DYT": True, **COMMON}),
    "forward anchored dyisru": (kernels._anchored_forward_kernel, {"BLOCK_A": 16, **COMMON}),
    "backward dyisru": (kernels._backward_kernel, {"IS_DYT": False, **COMMON}),
    "backward dyt": (kernels._backward_kernel, {"IS_DYT": True, **COMMON}),
}


def compile_kernel(function, constexprs: dict, arch: int, stream: str):
    names = function.arg_names
    signature = {name: "constexpr" if name in constexprs else ARGUMENT_TYPES[name].replace("STREAM", stream)
                 for name in names}
    aligned = {(names.index(name),): [["tt.divisibility", 16]] for name in names
               if signature[name].startswith("*") or name in DIVISIBLE_BY_16}
    source = ASTSource(fn=function, signature=signature, constexprs=constexprs, attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})


def resource_usage(cubin: bytes) -> dict[str, int]:
    """ptxas's REG/STACK/SHARED/LOCAL figures for a cubin, read with the cuobjdump that Triton bundles (or the one
    TRITON_CUOBJDUMP_PATH names)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", file.name],
                                capture_output=True, text=True, check=True).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", report)}


def describe(arch: int, stream: str) -> dict:
    report = {}
    for name, (function, constexprs) in KERNELS.items():
        compiled = compile_kernel(function, constexprs, arch, stream)
        report[name] = {"memory_instructions": sorted(set(re.findall(r"\b(?:ld|st)\.global[.\w]*",
                                                                     compiled.asm["ptx"]))),
                        "resources": resource_usage(compiled.asm["cubin"])}
    return report


def main() -> None:
    targets = [target.split(":") for target in sys.argv[1:]]
    print(json.dumps({f"{arch}:{stream}": describe(int(arch), stream) for arch, stream in targets}))


if __name__ == "__main__":
    main()
