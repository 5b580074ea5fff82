"""Resource functions (FLOPs, parameters, activations, memory, roofline latency)."""

from onnx_morph.costs.hardware import HARDWARE, Hardware, parse_cost, parse_hardware
from onnx_morph.costs.resources import (
    OpCost, Totals, alive_along, bilinear_count, flop_cost, marginal_cost, op_costs, total_cost, totals_of,
)

__all__ = ["HARDWARE", "Hardware", "parse_cost", "parse_hardware", "OpCost", "alive_along", "bilinear_count", "flop_cost", "op_costs",
           "Totals", "totals_of", "marginal_cost", "total_cost"]
