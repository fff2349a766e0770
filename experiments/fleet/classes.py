"""Kinds of edge device with published (or declared-estimated) capabilities.

:data:`DEVICE_CLASSES` is the table the fleet draws from (``experiments/fleet/budgets.py`` samples one
device's budget within its class's ranges). Every figure names its source beside its constant;
shares that no publication gives (training efficiency, free memory) are marked ASSUMPTION.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# --------------------------------------------------------------------------- units
GIB = 1024**3  # bytes in one GiB (RAM is sold in binary gigabytes)
MBIT_PER_S = 1e6 / 8  # bytes/s in one Mbit/s

# --------------------------------------------------------------------------- efficiencies
# Training sustains only a share of a chip's peak fp32 rate (small batches, memory-bound
# layers, backward-pass overheads). These shares are ASSUMPTIONS, not measurements.
CPU_TRAIN_EFFICIENCY = (0.05, 0.20)  # assumption: out-of-order ARM cores (A72/A73/A76/A77)
IN_ORDER_CPU_TRAIN_EFFICIENCY = (0.03, 0.10)  # assumption: in-order Cortex-A53-only SoCs,
# lower because Geekbench 5 FP (nanoreview.net, SD 765G vs SD 450) differs ~4.7x while the
# two SoCs' peak rates below differ only ~2x.
GPU_TRAIN_EFFICIENCY = (0.10, 0.30)  # assumption: fp32 CUDA training on Jetson GPUs

# --------------------------------------------------------------------------- peak fp32 rates
# peak = cores x clock x fp32 FLOP per cycle per core (an FMA counts as 2 FLOP).
# Cortex-A72: one 4-lane fp32 FMA per cycle = 8 FLOP/cycle, measured by VFP Benchmark on
#   a Cortex-A72 (wlog.flatlib.jp, 2015-10-30: 15.9 GFLOPS on one 2.0 GHz core).
# Cortex-A73: taken as 8 FLOP/cycle like the A72 (ESTIMATE).
# Cortex-A76/A77: two 128-bit FMA pipes = 16 FLOP/cycle (Arm core descriptions; ESTIMATE).
# Cortex-A53/A55: 64-bit NEON datapath, a 128-bit FMA every 2 cycles = 4 FLOP/cycle (ESTIMATE).
RPI4B_PEAK_FLOPS = 4 * 1.5e9 * 8  # 48 GFLOP/s: BCM2711, 4x Cortex-A72 @ 1.5 GHz
JETSON_NANO_PEAK_FLOPS = 128 * 2 * 921.6e6  # 236 GFLOP/s: 128 Maxwell cores @ 921.6 MHz;
# NVIDIA quotes 472 GFLOPS fp16, which Maxwell GM20B runs at twice the fp32 rate.
XAVIER_NX_PEAK_FLOPS = 384 * 2 * 1100e6  # 845 GFLOP/s: 384 Volta cores @ 1100 MHz max
SD450_PEAK_FLOPS = 8 * 1.8e9 * 4  # 58 GFLOP/s: Snapdragon 450, 8x Cortex-A53 @ 1.8 GHz
SD665_PEAK_FLOPS = 4 * 2.0e9 * 8 + 4 * 1.8e9 * 4  # 93 GFLOP/s: 4x A73 @ 2.0 + 4x A53 @ 1.8
SD765G_PEAK_FLOPS = (2.4e9 + 2.2e9) * 16 + 6 * 1.8e9 * 4  # 117 GFLOP/s: 2x A76 + 6x A55
SD865_PEAK_FLOPS = (2.84e9 + 3 * 2.42e9) * 16 + 4 * 1.8e9 * 4  # 190 GFLOP/s: 4x A77 + 4x A55

# --------------------------------------------------------------------------- links (bytes/s)
# All link figures are ESTIMATES of application-level throughput, not PHY rates.
# WiFi 5, 1x1 (Raspberry Pi 4B's CYW43455, 433 Mbit/s PHY): tens to ~150 Mbit/s in practice.
WIFI5_1X1_BPS = (20 * MBIT_PER_S, 150 * MBIT_PER_S)
# WiFi 5, 2x2 (867 Mbit/s PHY: Xavier NX dev kit's card; an M.2 card such as Intel 8265
# on a Jetson Nano, which has no on-board WiFi).
WIFI5_2X2_BPS = (30 * MBIT_PER_S, 250 * MBIT_PER_S)
# LTE downlink: OpenSignal "State of LTE" (Nov 2016) global mean 17.4 Mbit/s, national means
# 6.4 (India) to >40 (Singapore, Korea); Ookla Speedtest Global Index (Oct 2020) global
# mobile mean 39.2 Mbit/s down, 11.6 Mbit/s up.
LTE_DOWNLINK_BPS = (5 * MBIT_PER_S, 50 * MBIT_PER_S)
LTE_UPLINK_BPS = (2 * MBIT_PER_S, 15 * MBIT_PER_S)

# --------------------------------------------------------------------------- training memory
# Share of RAM free for training: ALL ASSUMPTIONS (no published figure). A headless Pi OS
# leaves most RAM free; Jetson GPUs share RAM with an Ubuntu desktop (L4T); Android keeps
# many background apps resident and kills them only under pressure.
SBC_TRAIN_MEMORY_FRACTION = (0.4, 0.7)  # assumption: Raspberry Pi OS, headless
JETSON_TRAIN_MEMORY_FRACTION = (0.3, 0.6)  # assumption: L4T desktop + CUDA context
PHONE_TRAIN_MEMORY_FRACTION = (0.2, 0.4)  # assumption: Android with background apps


def _sustained(peak_flops: float, efficiency: tuple[float, float]) -> tuple[float, float]:
    """Sustained training FLOP/s range = peak x (low, high) efficiency."""
    return (peak_flops * efficiency[0], peak_flops * efficiency[1])


@dataclass(frozen=True)
class DeviceClass:
    """A kind of edge device with published (or declared-estimated) capabilities.

    Attributes
    ----------
    name : str
        Key in :data:`DEVICE_CLASSES`.
    ram_bytes : int
        Installed RAM.
    train_memory_fraction : tuple of float
        (low, high) share of RAM free for training.
    flops_per_s : tuple of float
        (low, high) sustained fp32 training FLOP/s.
    uplink_bps, downlink_bps : tuple of float
        (low, high) link throughput in bytes/s.
    link : str
        The link the bandwidths describe.
    sources : tuple of str
        Where each figure comes from (or that it is an estimate).
    """

    name: str
    ram_bytes: int
    train_memory_fraction: tuple[float, float]
    flops_per_s: tuple[float, float]
    uplink_bps: tuple[float, float]
    downlink_bps: tuple[float, float]
    link: str
    sources: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.ram_bytes <= 0:
            raise ValueError(f"device class {self.name!r}: ram_bytes={self.ram_bytes} must be > 0")
        for key in ("train_memory_fraction", "flops_per_s", "uplink_bps", "downlink_bps"):
            low, high = getattr(self, key)
            if not 0 < low <= high:
                raise ValueError(
                    f"device class {self.name!r}: {key}=({low}, {high}) must satisfy 0 < low <= high"
                )
        if self.train_memory_fraction[1] > 1:
            raise ValueError(
                f"device class {self.name!r}: train_memory_fraction high="
                f"{self.train_memory_fraction[1]} must be <= 1"
            )
        if not self.sources or not all(self.sources):
            raise ValueError(f"device class {self.name!r}: give at least one non-empty source")


_PI_SOURCES = (
    "Raspberry Pi 4 Model B product brief (raspberrypi.com): BCM2711, 4x Cortex-A72 @ 1.5 GHz, "
    "2/4/8 GB LPDDR4, 802.11ac 1x1 WiFi",
    "peak 48 GFLOP/s fp32 = 4 cores x 1.5 GHz x 8 FLOP/cycle (Cortex-A72 rate measured with "
    "VFP Benchmark, wlog.flatlib.jp 2015-10-30); training share CPU_TRAIN_EFFICIENCY (assumption)",
    "WiFi throughput and free-memory share: estimates (see module constants)",
)
_PHONE_SOURCES = (
    "LTE: OpenSignal State of LTE (Nov 2016) and Ookla Speedtest Global Index (Oct 2020); range is an estimate",
    "SoC tiers ordered as on AI-Benchmark (ai-benchmark.com, ECLM 7.1 ref [1]); AI-Benchmark reports "
    "inference scores, not FLOP/s, so FLOP/s come from core counts and clocks (estimate)",
    "RAM-to-SoC pairing is representative, not a specific phone; free-memory share is an assumption",
)


def _pi(name: str, ram_gib: int) -> DeviceClass:
    """A Raspberry Pi 4B with ``ram_gib`` GiB: same SoC and radio for every RAM size."""
    return DeviceClass(
        name=name,
        ram_bytes=ram_gib * GIB,
        train_memory_fraction=SBC_TRAIN_MEMORY_FRACTION,
        flops_per_s=_sustained(RPI4B_PEAK_FLOPS, CPU_TRAIN_EFFICIENCY),
        uplink_bps=WIFI5_1X1_BPS,
        downlink_bps=WIFI5_1X1_BPS,
        link="WiFi 5 (802.11ac 1x1)",
        sources=_PI_SOURCES,
    )


def _phone(name: str, ram_gib: int, soc: str, peak: float, efficiency: tuple[float, float]) -> DeviceClass:
    """A phone tier: RAM size paired with a representative Snapdragon SoC, on LTE."""
    return DeviceClass(
        name=name,
        ram_bytes=ram_gib * GIB,
        train_memory_fraction=PHONE_TRAIN_MEMORY_FRACTION,
        flops_per_s=_sustained(peak, efficiency),
        uplink_bps=LTE_UPLINK_BPS,
        downlink_bps=LTE_DOWNLINK_BPS,
        link="LTE",
        sources=(f"{soc} (Qualcomm product page; CPU-only training)", *_PHONE_SOURCES),
    )


def _jetson(name: str, ram_gib: int, peak: float, link: str, sources: tuple[str, ...]) -> DeviceClass:
    """A Jetson module: CUDA training on a GPU sharing RAM with the CPU, over a 2x2 WiFi 5 card."""
    return DeviceClass(
        name=name,
        ram_bytes=ram_gib * GIB,
        train_memory_fraction=JETSON_TRAIN_MEMORY_FRACTION,
        flops_per_s=_sustained(peak, GPU_TRAIN_EFFICIENCY),
        uplink_bps=WIFI5_2X2_BPS,
        downlink_bps=WIFI5_2X2_BPS,
        link=link,
        sources=sources,
    )


# Published sources, one line per figure family (details beside the constants above):
# - Raspberry Pi 4B: Raspberry Pi 4 Model B product brief; Cortex-A72 FLOP/cycle from VFP
#   Benchmark (wlog.flatlib.jp). WiFi throughput: estimate.
# - Jetson Nano 4 GB: NVIDIA Jetson Nano Developer Kit spec (128-core Maxwell, 472 GFLOPS
#   fp16, 4 GB LPDDR4 shared with the CPU).
# - Jetson Xavier NX 8 GB: NVIDIA Jetson Xavier NX data sheet DA-09366-001 (384 CUDA cores,
#   48 Tensor cores, 1100 MHz max, 21 TOPS int8, 8 GB LPDDR4x); fp32 845 GFLOPS also listed in
#   the TechPowerUp GPU database.
# - Phones: Qualcomm Snapdragon 450/665/765G/865 specs (core types and clocks); tier order as
#   on AI-Benchmark (ai-benchmark.com, ECLM 7.1 ref [1]); LTE from OpenSignal and Ookla.
# - Every training-efficiency share and free-memory share is an assumption (named above).
DEVICE_CLASSES: Mapping[str, DeviceClass] = {
    c.name: c
    for c in (
        _pi("raspberry_pi_4b_2gb", 2),
        _pi("raspberry_pi_4b_4gb", 4),
        _jetson(
            "jetson_nano_4gb", 4, JETSON_NANO_PEAK_FLOPS, "WiFi 5 (802.11ac 2x2, M.2 card)",
            (
                "NVIDIA Jetson Nano Developer Kit spec: 128-core Maxwell GPU, 472 GFLOPS fp16 "
                "(fp32 = half: 128 x 2 x 921.6 MHz = 236 GFLOPS), 4 GB LPDDR4 shared",
                "training share GPU_TRAIN_EFFICIENCY, WiFi card and free memory: estimates",
            ),
        ),
        _jetson(
            "jetson_xavier_nx_8gb", 8, XAVIER_NX_PEAK_FLOPS, "WiFi 5 (802.11ac 2x2)",
            (
                "NVIDIA Jetson Xavier NX data sheet DA-09366-001: 384 CUDA + 48 Tensor cores @ "
                "1100 MHz, 21 TOPS int8, 8 GB LPDDR4x; fp32 = 384 x 2 x 1.1 GHz = 845 GFLOPS",
                "training share GPU_TRAIN_EFFICIENCY, WiFi throughput and free memory: estimates",
            ),
        ),
        _phone("phone_3gb", 3, "Snapdragon 450: 8x Cortex-A53 @ 1.8 GHz", SD450_PEAK_FLOPS,
               IN_ORDER_CPU_TRAIN_EFFICIENCY),
        _phone("phone_4gb", 4, "Snapdragon 665: 4x A73 @ 2.0 + 4x A53 @ 1.8 GHz", SD665_PEAK_FLOPS,
               CPU_TRAIN_EFFICIENCY),
        _phone("phone_6gb", 6, "Snapdragon 765G: A76 @ 2.4 + A76 @ 2.2 + 6x A55 @ 1.8 GHz",
               SD765G_PEAK_FLOPS, CPU_TRAIN_EFFICIENCY),
        _phone("phone_8gb", 8, "Snapdragon 865: A77 @ 2.84 + 3x A77 @ 2.42 + 4x A55 @ 1.8 GHz",
               SD865_PEAK_FLOPS, CPU_TRAIN_EFFICIENCY),
    )
}
