"""Every Triton kernel variant the CUDA path launches, compiled for real GPUs without one: sm_80 (A100) and sm_90
(H100/H200) cubins from Triton's own code generator and ptxas (bundled with the triton wheel), with each cubin's
resource usage read by cuobjdump. It fails on what only the compiler sees (a type error in a branch the interpreter
tests never take, a non-constexpr global) and on what would make the kernel slow on a GPU: register spills (local
memory or a stack frame) and register counts that cut the programs resident per multiprocessor.

The compile runs in one subprocess WITHOUT TRITON_INTERPRET (the interpreter replaces the jit functions): this file
is also that subprocess's script (``python test_triton_compile.py 80 90`` prints one JSON record per variant).

Which variants: a launch specializes on the input dtype, BLOCK, the constexpr switches (STORE_LOSS, STORE_GRAD,
UPPER_ONLY, CHUNK) and the integer arguments (value 1 becomes a constant; pointers and multiples of 16 get an
alignment hint). Compiling the full product (every dtype x every block x every switch x both (B,) and (B, T)
advantages) is ~170 compiles per kernel and target, ~10 minutes here. Register use is decided by the block size
and by how much work the switches add, while the dtype only changes the load's conversion: so every BLOCK is
compiled with every store mode in fp32, and every other dtype, the per-token advantages and the uncapped clip at the
largest block (where registers peak). Integers other than 1 are compiled without the alignment hint (T, the
strides: any value), pointers with it (torch allocations are 16-byte aligned).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

TARGETS = (80, 90)  # A100; H100 / H200
# A register bound with a reason: the hardware allows 255 per thread, but a multiprocessor has 64K registers and 64
# warp slots, and this memory-bound kernel hides latency with resident warps. At <= 128 registers per thread an SM
# holds >= 16 warps (4 programs of 4 warps, or 2 of 8). Measured (Triton 3.9, sm_80 and sm_90): 20-128, the most
# for 512- and 1024-token blocks; ptxas itself stops at 128 (at 8 tokens per thread, 1024 with 4 warps, it capped
# at 168 and spilled 8 bytes on sm_80, hence fipo_triton.warps_for). A change that needs more registers shows here
# first, as a count above 128 or as a spill.
REGISTER_BOUND = 128
COMPILE_TIMEOUT_S = 600

DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
STORE_MODES = {"loss+grad": (True, True), "loss": (True, False), "weights": (False, False)}


def _pointer(dtype):
    return "*" + dtype


def _signature(kernel, pointers, ints, constants):
    """Triton's signature of ``kernel``: pointers as given, integers i32 (a 1 is a constant), the rest fp32."""
    return {name: "constexpr" if name in constants else pointers.get(name) or ("i32" if name in ints else "fp32")
            for name in kernel.arg_names}


def variants():
    """(name, kernel, signature, constexprs, block) of every variant compiled; see the module docstring."""
    from fipo_trl.kernels import fipo_triton as ft
    from fipo_trl.kernels.common import N_STATS

    main_ints = {"T", "n_chunks", "stride_logps", "stride_old", "stride_adv_row", "stride_adv_col", "stride_mask"}

    def main_kernel(name, dtype, adv_dtype, block, chunk, store_mode, upper_only=False, per_token_adv=False):
        store_loss, store_grad = STORE_MODES[store_mode]
        pointers = {"LOGPS": _pointer(dtype), "OLD_LOGPS": _pointer(dtype), "ADVANTAGES": _pointer(adv_dtype),
                    "MASK": "*u8", "KEEP": "*i8"}
        outputs = ("WEIGHTS", "FUTURE_KL", "WEIGHTED_ADV", "GRAD", "ROW_LOSS", "ROW_STATS", "CARRY")
        pointers.update(dict.fromkeys(outputs, "*fp32"))
        constants = {"UPPER_ONLY": upper_only, "STORE_LOSS": store_loss, "STORE_GRAD": store_grad,
                     "N_STATS": N_STATS, "BLOCK": block, "CHUNK": chunk}
        if chunk == 0:
            constants["n_chunks"] = 1  # the row variant launches with n_chunks = 1, which Triton makes a constant
        if per_token_adv:
            constants["stride_adv_col"] = 1  # contiguous (B, T) advantages
        kernel = ft._fipo_kernel
        return name, kernel, _signature(kernel, pointers, main_ints, constants), constants, block

    found = []
    for block in ft.ROW_BLOCK_SIZES:
        for mode in STORE_MODES:
            found.append(main_kernel(f"row fp32 B{block} {mode}", "fp32", "fp32", block, 0, mode))
    for chunk in ft.CHUNK_SIZES:
        for mode in STORE_MODES:
            found.append(main_kernel(f"chunk fp32 B{chunk} {mode}", "fp32", "fp32", chunk, chunk, mode))
    top_row, top_chunk = ft.ROW_BLOCK_SIZES[-1], ft.CHUNK_SIZES[0]
    for dtype, adv_dtype in (("bf16", "fp32"), ("fp16", "fp32"), ("bf16", "bf16")):
        for mode in STORE_MODES:
            found.append(main_kernel(f"row {dtype}/adv {adv_dtype} B{top_row} {mode}", dtype, adv_dtype, top_row,
                                     0, mode))
        found.append(main_kernel(f"chunk {dtype}/adv {adv_dtype} B{top_chunk} loss+grad", dtype, adv_dtype,
                                 top_chunk, top_chunk, "loss+grad"))
    found.append(main_kernel(f"row fp32 B{top_row} loss+grad uncapped", "fp32", "fp32", top_row, 0, "loss+grad",
                             upper_only=True))
    found.append(main_kernel(f"row fp32 B{top_row} loss+grad adv (B,T)", "fp32", "fp32", top_row, 0, "loss+grad",
                             per_token_adv=True))
    found.append(main_kernel(f"chunk fp32 B{top_chunk} loss+grad adv (B,T)", "fp32", "fp32", top_chunk, top_chunk,
                             "loss+grad", per_token_adv=True))

    totals = ft._chunk_totals_kernel
    for chunk in ft.CHUNK_SIZES:
        for dtype in DTYPES.values():
            pointers = {"LOGPS": _pointer(dtype), "OLD_LOGPS": _pointer(dtype), "MASK": "*u8", "TOTALS": "*fp32"}
            constants = {"CHUNK": chunk, "BLOCK": chunk}
            ints = {"T", "n_chunks", "stride_logps", "stride_old", "stride_mask"}
            found.append((f"totals {dtype} B{chunk}", totals, _signature(totals, pointers, ints, constants),
                          constants, chunk))
    carries, rows = ft._chunk_carries_kernel, ft._chunk_rows_kernel
    block = 16
    while block <= ft.MAX_CARRY_BLOCK_SIZE:
        constants = {"BLOCK": block}
        found.append((f"carries B{block}", carries,
                      _signature(carries, {"TOTALS": "*fp32", "CARRY": "*fp32"}, {"n_chunks"}, constants),
                      constants, block))
        for store_loss in (True, False):
            constants = {"STORE_LOSS": store_loss, "N_STATS": N_STATS, "BLOCK": block}
            pointers = {"ROW_STATS": "*fp32", "CHUNK_LOSS": "*fp32", "KEEP": "*i8", "ROW_LOSS": "*fp32"}
            found.append((f"rows B{block} {'loss' if store_loss else 'weights'}", rows,
                          _signature(rows, pointers, {"n_chunks"}, constants), constants, block))
        block *= 2
    return found


RESOURCE_LINE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def compile_all(targets):
    """Compile every variant for every target; one dict per (variant, target) with the cubin's resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fipo_trl.kernels import fipo_triton as ft

    assert not ft.TRITON_INTERPRETED, "compile without TRITON_INTERPRET: the interpreter replaces the jit functions"
    cuobjdump = triton.knobs.nvidia.cuobjdump.path
    records = []
    with tempfile.TemporaryDirectory() as scratch:
        cubin_path = Path(scratch) / "kernel.cubin"
        for name, kernel, signature, constants, block in variants():
            # pointers are 16-byte aligned (tt.divisibility), as every fresh torch allocation
            attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(kernel.arg_names)
                     if signature[arg].startswith("*")}
            source = ASTSource(kernel, signature, constexprs=constants, attrs=attrs)
            for arch in targets:
                started = time.perf_counter()
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                          options=ft.launch_options(block))
                cubin_path.write_bytes(compiled.asm["cubin"])
                usage = subprocess.run([cuobjdump, "-res-usage", str(cubin_path)], capture_output=True, text=True,
                                       check=True).stdout
                registers, stack, shared, local = (int(v) for v in RESOURCE_LINE.search(usage).groups())
                records.append({"variant": name, "sm": arch, "block": block, "registers": registers, "stack": stack,
                                "shared": shared, "local": local, "seconds": time.perf_counter() - started,
                                "fp_fusion": compiled.metadata.enable_fp_fusion,
                                "num_warps": compiled.metadata.num_warps})
    return records


def nvidia_tools_missing() -> str | None:
    """Why the cubins cannot be built here (None when they can): no triton, or no NVIDIA backend tools."""
    try:
        import triton

        triton.knobs.nvidia.ptxas.path  # noqa: B018 (raises RuntimeError when the tool is missing)
        triton.knobs.nvidia.cuobjdump.path  # noqa: B018
    except (ImportError, AttributeError, RuntimeError) as error:
        return f"triton's NVIDIA backend tools are unavailable: {error}"
    return None


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    missing = nvidia_tools_missing()
    if missing:
        pytest.skip(missing)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))  # a real compile, never a cache hit
    run = subprocess.run([sys.executable, __file__, *map(str, TARGETS)], env=env, capture_output=True, text=True,
                         timeout=COMPILE_TIMEOUT_S, cwd=Path(__file__).parent)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.slow
def test_every_launched_variant_compiles_without_spills(compiled):
    from fipo_trl.kernels.fipo_triton import FP_FUSION, warps_for

    names = {name for name, *_ in variants()}
    assert {(r["variant"], r["sm"]) for r in compiled} == {(n, sm) for n in names for sm in TARGETS}
    for record in compiled:
        what = f"{record['variant']} on sm_{record['sm']}: {record}"
        # spilled registers live in local memory, behind a stack frame; either is a slow kernel
        assert record["local"] == 0 and record["stack"] == 0, what
        assert record["registers"] <= REGISTER_BOUND, what
        # the scan's and reductions' scratch: a few hundred bytes (cuobjdump counts 1 KiB reserved on sm_90)
        assert record["shared"] <= 4096, what
        # compiled as launched: the pinned FP fusion and the block's warps
        assert record["fp_fusion"] is FP_FUSION and record["num_warps"] == warps_for(record["block"]), what


if __name__ == "__main__":
    print(json.dumps(compile_all([int(arch) for arch in sys.argv[1:]] or TARGETS)))
