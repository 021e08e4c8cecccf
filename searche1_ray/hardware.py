"""Which float type is fast on this machine: ``"auto"`` dtypes resolve to bfloat16 on GPUs and on
CPUs with native bf16 matrix units (Intel AMX-BF16 or AVX512-BF16), else to float32.

Measured on two 2-core machines of this workplace: on an AMX machine bf16 matmuls ran ~2x fp32 and
training/rollouts in bf16 were the fast path; on an AVX2-only AMD EPYC a 1024² bf16 matmul ran at
0.8 GFLOP/s against 65 for fp32 (one thread), and vLLM decoded 40 sequences at 53 tok/s in bf16
against 232 in fp32. So bf16 on a CPU without those units is a 4-80x slowdown, not a saving.
No Ray, no torch: reads /proc/cpuinfo (Linux; elsewhere the CPU is taken to lack native bf16).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

log = logging.getLogger(__name__)

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this machine (empty when /proc/cpuinfo is not readable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """True when the CPU multiplies bf16 natively (AMX-BF16 or AVX512-BF16)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def resolve_dtype(dtype: str, on_gpu: bool = False, flags: frozenset[str] | None = None) -> str:
    """``"auto"`` → ``"bfloat16"`` on a GPU or a CPU with native bf16, else ``"float32"``; any
    other name is returned as given (an explicit choice is kept)."""
    if dtype != "auto":
        return dtype
    fast = on_gpu or cpu_has_native_bf16(flags)
    return "bfloat16" if fast else "float32"


def resolve_bf16(bf16: bool | str, on_gpu: bool = False, flags: frozenset[str] | None = None) -> bool:
    """``train.bf16``: True / False as given; ``"auto"`` = bf16 where it is fast (see resolve_dtype)."""
    if bf16 == "auto":
        return resolve_dtype("auto", on_gpu, flags) == "bfloat16"
    return bool(bf16)
