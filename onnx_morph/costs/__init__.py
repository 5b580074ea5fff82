"""Resource functions (FLOPs, parameters, activations, memory, roofline latency)."""

from onnx_morph.costs.hardware import HARDWARE, Hardware, parse_hardware
from onnx_morph.costs.resources import OpCost, alive_along, bilinear_count, flop_cost, op_costs

__all__ = ["HARDWARE", "Hardware", "parse_hardware", "OpCost", "alive_along", "bilinear_count", "flop_cost", "op_costs"]
