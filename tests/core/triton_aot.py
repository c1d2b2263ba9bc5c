"""Compile qkvlab.nn.triton_read's kernel for a CUDA GPU ahead of time, with no GPU: Triton's own compiler down to
PTX and a cubin (ptxas, which the triton wheel ships). Prints one line a configuration: G D dtype rotate scaled
separate registers spill-bytes. Run without TRITON_INTERPRET (tests/core/test_triton_read.py runs it that way).

    python tests/core/triton_aot.py [sm_80]
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from qkvlab.nn import triton_read

CASES = [  # (G, D, cache dtype, rotate, scaled, separate)
    *[(g, d, "bf16", True, False, False) for g in (1, 2, 4, 8) for d in (64, 128)],
    (3, 48, "fp32", True, False, False),
    (1, 64, "i8", True, True, False),
    (2, 64, "i8", False, True, True),
    (1, 64, "fp16", False, False, True),
]


def main(arch: int) -> None:
    kernel = triton_read._kernel()
    names = list(inspect.signature(kernel.fn).parameters)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    for G, D, dtype, rotate, scaled, separate in CASES:
        block_g, block_t, block_d = triton_read.blocks(G, D)
        constexprs = dict(BLOCK_G=block_g, BLOCK_T=block_t, BLOCK_D=block_d, ROTATE=rotate, SCALED=scaled,
                          SEPARATE=separate, HAS_MASK=True)
        pointers = dict(Q="*fp32", K=f"*{dtype}", V=f"*{dtype}", KS="*bf16", VS="*bf16", ROT="*fp32", MASK="*i8",
                        M_OUT="*fp32", L_OUT="*fp32", ACC_OUT="*fp32")
        signature = {n: pointers.get(n, "constexpr" if n in constexprs else "i32") for n in names}
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={(names.index(n),): v for n, v in constexprs.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(compiled.asm["ptx"])
            f.flush()
            info = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}", f.name, "-o", os.devnull],
                                  capture_output=True, text=True, check=True).stderr
        registers = int(re.search(r"Used (\d+) registers", info).group(1))
        spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", info))
        print(G, D, dtype, int(rotate), int(scaled), int(separate), block_t, registers, spills, flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1].removeprefix("sm_")) if len(sys.argv) > 1 else 80)
