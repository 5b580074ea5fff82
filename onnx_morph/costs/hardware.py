"""Peak compute and memory bandwidth for the roofline latency model."""

from __future__ import annotations

import math
from dataclasses import dataclass

from onnx_morph.errors import OptionError


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_gflops: float
    bandwidth_gbs: float
    note: str = ""


# MorphNet's table (GFLOP/s, GB/s), then current parts from vendors' datasheets
# (dense FP16/BF16 tensor throughput unless noted).
HARDWARE: dict[str, Hardware] = {h.name.lower(): h for h in (
    Hardware("K80", 8740, 480, "MorphNet"),
    Hardware("P4", 5500, 192, "MorphNet"),
    Hardware("T4", 8100, 300, "MorphNet"),
    Hardware("P100", 9300, 732, "MorphNet"),
    Hardware("V100", 125000, 900, "MorphNet"),
    Hardware("TPUv2", 22500, 300, "MorphNet"),
    Hardware("A100", 312000, 1555, "A100 40GB SXM, dense FP16 tensor"),
    Hardware("H100", 989000, 3350, "H100 SXM, dense FP16 tensor"),
    Hardware("L4", 121000, 300, "L4, dense FP16 tensor"),
    Hardware("OrinNano", 10000, 68, "Jetson Orin Nano 8GB, approximate dense FP16"),
)}


def parse_hardware(spec: str) -> Hardware:
    """'V100', or 'PEAK_GFLOPS,BANDWIDTH_GBS' for hardware not in the table."""
    known = HARDWARE.get(spec.lower())
    if known is not None:
        return known
    parts = spec.split(",")
    try:
        peak, bandwidth = (float(p) for p in parts)
    except ValueError:
        names = ", ".join(h.name for h in HARDWARE.values())
        raise OptionError(
            f"unknown hardware '{spec}': use one of {names}, or PEAK_GFLOPS,BANDWIDTH_GBS"
        ) from None
    if not (math.isfinite(peak) and math.isfinite(bandwidth)) or peak <= 0 or bandwidth <= 0:
        raise OptionError(f"hardware '{spec}': peak compute and bandwidth must be finite and positive")
    return Hardware(f"custom({peak:g} GFLOP/s, {bandwidth:g} GB/s)", peak, bandwidth)


def parse_cost(cost: str, allowed: tuple[str, ...]):
    """'flops', 'params', ... or 'latency:HW' into the resource name and its hardware; 'latency:measured=FILE'
    gives a measured LatencyTable (check it against the model with its `check`)."""
    name, _, spec = cost.partition(":")
    if name not in allowed:
        listed = ", ".join("latency:HW" if c == "latency" else c for c in allowed)
        raise OptionError(f"unknown cost '{cost}': use one of {listed}")
    if name == "latency":
        if not spec:
            raise OptionError("the latency cost needs hardware: latency:V100, latency:PEAK_GFLOPS,BANDWIDTH_GBS, "
                              "or latency:measured=TABLE.json")
        if spec.startswith("measured="):
            from onnx_morph.costs.measured import load_table

            return name, load_table(spec.partition("=")[2])
        return name, parse_hardware(spec)
    if spec:
        raise OptionError(f"cost '{name}' takes no ':{spec}'")
    return name, None
