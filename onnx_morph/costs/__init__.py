"""Resource functions (FLOPs, parameters, activations, memory, roofline latency)."""

from onnx_morph.costs.hardware import HARDWARE, Hardware, parse_cost, parse_hardware
from onnx_morph.costs.params import param_uses
from onnx_morph.costs.resources import OpCost, Totals, alive_along, marginal_cost, op_costs, total_cost, totals_of
from onnx_morph.costs.terms import CostTerms, cost_terms

__all__ = ["HARDWARE", "Hardware", "parse_cost", "parse_hardware", "OpCost", "alive_along", "op_costs",
           "Totals", "totals_of", "marginal_cost", "total_cost", "param_uses", "cost_terms", "CostTerms"]
