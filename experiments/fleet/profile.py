"""A real device's budget, measured on the device (ECLM's local profiler).

Under ``flower-supernode`` there is no fleet table to sample from: memory comes from the
kernel, compute speed from a short matmul benchmark scaled to training speed, bandwidth
from arguments (measuring it needs a peer).
"""

from __future__ import annotations

import os
import time

from experiments.fleet.budgets import DeviceBudget

MEMINFO_PATH = "/proc/meminfo"  # Linux: MemAvailable, kernel >= 3.14
PROFILE_MEMORY_FRACTION = 0.8  # assumption: leave 20 % of MemAvailable to the OS and Flower
PROFILE_MATMUL_SIZE = 256  # 2 x 256^3 = 33.6 MFLOP per matmul: a few ms even on a Pi
PROFILE_BENCH_SECONDS = 0.2  # benchmark length; whole profile stays < 0.5 s
MATMUL_TO_TRAIN_EFFICIENCY = 0.25  # assumption: training reaches ~1/4 of dense-GEMM speed
# (GEMM reaches roughly half to most of peak; the table assumes training at 5-20 % of peak)


def available_memory_bytes(meminfo_path: str = MEMINFO_PATH) -> int:
    """Memory the kernel could give a new process: ``MemAvailable`` from /proc/meminfo.

    Falls back to free physical pages (``os.sysconf``) where the file or line is missing.
    """
    try:
        with open(meminfo_path, encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError) as error:
        raise RuntimeError(f"cannot read {meminfo_path} nor os.sysconf free pages") from error


def measure_matmul_flops(size: int = PROFILE_MATMUL_SIZE, seconds: float = PROFILE_BENCH_SECONDS) -> float:
    """FLOP/s of repeated fp32 ``size x size`` matmuls on the CPU for about ``seconds``."""
    if size < 1 or not seconds > 0:
        raise ValueError(f"size={size} must be >= 1 and seconds={seconds} > 0")
    import torch  # lazy: the server side never profiles

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    out = torch.empty(size, size)
    with torch.no_grad():
        torch.mm(a, b, out=out)  # warm-up: allocations, thread pool
        reps, start = 0, time.perf_counter()
        while True:
            torch.mm(a, b, out=out)
            reps += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
    return 2.0 * size**3 * reps / elapsed


def profile_local_budget(
    uplink_bps: float,
    downlink_bps: float,
    *,
    availability: float = 1.0,
    memory_fraction: float = PROFILE_MEMORY_FRACTION,
    train_efficiency: float = MATMUL_TO_TRAIN_EFFICIENCY,
    matmul_size: int = PROFILE_MATMUL_SIZE,
    bench_seconds: float = PROFILE_BENCH_SECONDS,
    meminfo_path: str = MEMINFO_PATH,
) -> DeviceBudget:
    """Measure this machine's budget (real device under ``flower-supernode``).

    Memory is ``MemAvailable x memory_fraction``; speed is a short matmul benchmark x
    ``train_efficiency``; bandwidth is taken from the arguments (measuring it needs a peer).

    Returns
    -------
    DeviceBudget
        With ``device_class="profiled"``.
    """
    if not 0 < memory_fraction <= 1 or not 0 < train_efficiency <= 1:
        raise ValueError(
            f"memory_fraction={memory_fraction} and train_efficiency={train_efficiency} must be in (0, 1]"
        )
    return DeviceBudget(
        device_class="profiled",
        memory_bytes=float(available_memory_bytes(meminfo_path) * memory_fraction),
        flops_per_s=measure_matmul_flops(matmul_size, bench_seconds) * train_efficiency,
        uplink_bps=float(uplink_bps),
        downlink_bps=float(downlink_bps),
        availability=float(availability),
    )
