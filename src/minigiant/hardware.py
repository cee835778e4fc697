"""What this machine multiplies fast, for the settings that default to ``auto``.

bfloat16 is a large win only where the CPU multiplies it natively (x86 AMX-BF16 or AVX512-BF16, Arm's BF16
extension): there the teacher forward runs ~5× faster than in float32. Everywhere else PyTorch emulates it,
and a bf16 matrix product is *slower* than float32 — measured on an AVX2-only AMD EPYC: 1,543 ms against
28 ms for a 1024×576 @ 576×1536 product, which made a distillation step take minutes instead of seconds.
So ``auto`` means bf16 only where it is native.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from pathlib import Path

import torch

NATIVE_BF16_FLAGS = {"amx_bf16", "avx512_bf16", "bf16"}  # x86 /proc/cpuinfo flags; Arm's "Features" name it bf16


def cpu_flags() -> set[str] | None:
    """The CPU feature flags the kernel reports (Linux), or None where there is no /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags or None


def _bf16_measured_faster() -> bool:
    """Where the flags are unknown (macOS): time one product in each dtype and keep the faster."""
    a, b = torch.randn(256, 512), torch.randn(512, 512)

    def seconds(dtype) -> float:
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm-up
        start = time.perf_counter()
        for _ in range(3):
            x @ y
        return time.perf_counter() - start

    return seconds(torch.bfloat16) < seconds(torch.float32)


@functools.lru_cache(maxsize=None)
def native_bf16() -> bool:
    """Whether bfloat16 matrix products are native (and so faster than float32) on this CPU."""
    flags = cpu_flags()
    if flags is None:
        return _bf16_measured_faster()
    return bool(NATIVE_BF16_FLAGS & flags)


def resolve_precision(setting: str) -> str:
    """``auto`` → ``bf16`` where the CPU multiplies it natively, else ``fp32``; other settings unchanged."""
    if setting != "auto":
        return setting
    return "bf16" if native_bf16() else "fp32"


def describe_cpu() -> dict:
    """``{"cpu", "cores", "isa", "native_bf16"}``: what benchmarks record beside their timings."""
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    flags = cpu_flags() or set()
    isa = "AMX" if "amx_bf16" in flags else "AVX512" if "avx512f" in flags else "AVX2" if "avx2" in flags else platform.machine()
    return {"cpu": name, "cores": os.cpu_count(), "isa": isa, "native_bf16": native_bf16()}


def process_rank() -> int:
    """This process's rank in a distributed launch (``torchrun``, ``accelerate launch``); 0 without one."""
    return int(os.environ.get("RANK", "0"))
