"""`analyze`: load a model, build its channel graph, and cost it with and without dead channels."""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from onnx_morph.costs import Hardware, OpCost, Totals, op_costs, parse_cost, totals_of
from onnx_morph.costs.measured import LatencyTable
from onnx_morph.graph import ChannelGraph, alive_classes, build_channel_graph, load_model

COSTS = ("flops", "params", "activations", "memory", "latency")
JSON_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class GroupReport:
    id: int
    size: int
    alive: int
    prunable: bool
    pin_reasons: list[str]
    producers: list[str]
    consumers: list[str]
    ops: list[str]
    sources: list[str]
    tensors: dict[str, int]


@dataclass
class Analysis:
    """Everything `onnx-morph analyze` reports; `to_json()` gives the documented JSON form."""

    model: str
    opset: int
    input_shapes: dict[str, tuple[int, ...]]
    notes: list[str]
    cost: str
    flop_unit: str
    hardware: Hardware | LatencyTable | None
    gamma_threshold: float | None
    weight_threshold: float | None
    total: Totals
    effective: Totals
    ops: list[OpCost]
    groups: list[GroupReport]
    unknown_ops: dict[str, list[str]]
    graph: ChannelGraph = field(repr=False, compare=False)
    alive: np.ndarray = field(repr=False, compare=False)

    def cost_of(self, item: OpCost | Totals) -> float:
        return {
            "flops": item.flops, "params": item.params, "activations": item.activations,
            "memory": item.memory_bytes, "latency": item.latency_s,
        }[self.cost]

    def to_json(self) -> dict:
        return {
            "schema_version": JSON_SCHEMA_VERSION,
            "model": self.model,
            "opset": self.opset,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "notes": self.notes,
            "cost": self.cost,
            "flop_unit": self.flop_unit,
            "hardware": _hardware_json(self.hardware),
            "gamma_threshold": self.gamma_threshold,
            "weight_threshold": self.weight_threshold,
            "total": asdict(self.total),
            "effective": asdict(self.effective),
            "ops": [asdict(op) for op in self.ops],
            "groups": [asdict(g) for g in self.groups],
            "unknown_ops": self.unknown_ops,
            "modules": self.graph.module_paths,
        }


def analyze(
    model: str | os.PathLike | onnx.ModelProto,
    *,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    cost: str = "flops",
    gamma_threshold: float | None = None,
    weight_threshold: float | None = None,
    macs: bool = False,
) -> Analysis:
    """Channel groups and per-op costs of a model.

    `cost` is one of flops, params, activations, memory, or latency:HW (HW a name from
    onnx_morph.costs.HARDWARE or PEAK_GFLOPS,BANDWIDTH_GBS). With a threshold, channels whose
    BatchNorm scale (or weight-slice RMS) is at or below it are dead and the effective cost drops.
    """
    cost_name, hardware = parse_cost(cost, COSTS)
    with _collector_paused():
        loaded = load_model(model, input_shapes)
        graph = build_channel_graph(loaded)
        if isinstance(hardware, LatencyTable):
            hardware.check(graph)
        alive = alive_classes(graph, gamma_threshold, weight_threshold)
        ops = op_costs(graph, alive, macs=macs, hardware=hardware)
        full = ops if alive.all() else op_costs(graph, np.ones_like(alive), macs=macs, hardware=hardware)
        return Analysis(
            model=loaded.source,
            opset=loaded.opset,
            input_shapes=loaded.input_shapes,
            notes=loaded.notes,
            cost=cost_name,
            flop_unit="MACs" if macs else "FLOPs",
            hardware=hardware,
            gamma_threshold=gamma_threshold,
            weight_threshold=weight_threshold,
            total=totals_of(full, hardware),
            effective=totals_of(ops, hardware),
            ops=ops,
            groups=[_group_report(graph, g, alive) for g in graph.groups],
            unknown_ops=graph.unknown_ops,
            graph=graph,
            alive=alive,
        )


def _hardware_json(hardware: Hardware | LatencyTable | None) -> dict | None:
    if isinstance(hardware, LatencyTable):
        return {"name": hardware.name, "table": hardware.source, "provider": hardware.provider,
                "threads": hardware.threads, "batch": hardware.batch, "device": hardware.device,
                "measured_model_s": hardware.model_seconds, "overhead_s": hardware.overhead_seconds}
    return None if hardware is None else asdict(hardware)


@contextmanager
def _collector_paused():
    """Building the graph allocates many small objects that all stay alive; the cyclic garbage
    collector would scan them again and again (quadratic in the model size)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _group_report(graph: ChannelGraph, group, alive: np.ndarray) -> GroupReport:
    return GroupReport(
        id=group.id,
        size=group.size,
        alive=int(alive[group.classes].sum()),
        prunable=group.prunable,
        pin_reasons=group.pin_reasons,
        producers=list(dict.fromkeys(group.producers)),
        consumers=list(dict.fromkeys(group.consumers)),
        ops=group.ops,
        sources=[f"{s.kind}:{s.param}" for s in group.sources],
        tensors={t: int(index.size) for t, index in group.tensors.items()},
    )
