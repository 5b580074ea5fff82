"""`expand`: MorphNet's expansion step. A learned (pruned) structure is scaled by one width
multiplier until it meets a FLOP or parameter budget, and comes back freshly initialized, ready
to train from scratch."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_morph.costs import Totals, op_costs, total_cost, totals_of
from onnx_morph.errors import OptionError
from onnx_morph.graph import ChannelGraph, ChannelGroup, build_channel_graph, load_model
from onnx_morph.graph.channel_graph import node_view
from onnx_morph.graph.load import check_model
from onnx_morph.handlers import handler_for
from onnx_morph.rewrite.surgery.criteria import Budget
from onnx_morph.rewrite.surgery.prune import LayerWidth, layer_widths
from onnx_morph.rewrite.surgery.surgery import resize_channels
from onnx_morph.rewrite.surgery.verify import random_inputs, run

_LARGEST_MULTIPLIER = 64.0


@dataclass
class ExpandResult:
    """The expanded model; `predicted` is the cost model's count before surgery, `after` the count
    measured on the written model (they agree)."""

    model: onnx.ModelProto
    multiplier: float
    budget: Budget
    before: Totals
    after: Totals
    predicted: float
    widths: list[LayerWidth]
    notes: list[str] = field(default_factory=list)


def width_copies(graph: ChannelGraph, multiplier: float, round_to: int = 1) -> np.ndarray:
    """How many copies of each channel class a uniform `multiplier` gives: each prunable group's
    width becomes round(multiplier * width) (a multiple of `round_to`, at least one), spread as
    evenly as possible over its classes; pinned classes stay single, and so do attention heads
    (see spans_channel_grid)."""
    copies = np.ones(graph.num_classes, dtype=np.int64)
    for group in graph.groups:
        if not group.prunable or spans_channel_grid(graph, group):
            continue
        width = max(round_to, round(multiplier * group.size / round_to) * round_to)
        base, extra = divmod(width, group.size)
        copies[group.classes] = base
        copies[group.classes[:extra]] += 1
    return copies


def spans_channel_grid(graph: ChannelGraph, group: ChannelGroup) -> bool:
    """Whether the group's channels are laid out over several axes somewhere (heads x head size):
    a copied head would have to grow one axis of the grid, which the copies of its elements do not say."""
    return any(len(graph.tensors[t].axes or ()) > 1 for t in group.tensors)


def find_multiplier(graph: ChannelGraph, budget: Budget) -> tuple[float, np.ndarray]:
    """The largest multiplier whose widths, rounded to multiples of `budget.round_to`, fit the budget
    (bisection: cost never falls as the multiplier grows), and its copies."""
    round_to = budget.round_to

    def cost(m: float) -> float:
        return total_cost(graph, width_copies(graph, m, round_to), budget.resource)

    low, high = 0.0, 1.0
    while cost(high) <= budget.target:
        if high >= _LARGEST_MULTIPLIER:
            raise OptionError(f"the {budget.resource} budget {budget.target:.4g} is out of reach: {high:g} times every "
                              f"prunable width gives only {cost(high):.4g} (the prunable groups carry little of it)")
        low, high = high, high * 2
    if cost(low) > budget.target:
        raise OptionError(f"the {budget.resource} budget {budget.target:.4g} is below {cost(low):.4g}, the least this "
                          f"model can reach (pinned channels stay, and every prunable group keeps at least {round_to})")
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if cost(middle) <= budget.target else (low, middle)
    return low, width_copies(graph, low, round_to)


def fresh_parameters(model: onnx.ModelProto, seed: int = 0, graph: ChannelGraph | None = None) -> onnx.ModelProto:
    """The model with every layer's trained constants re-initialized as its handler says (Conv and
    Linear weights uniform in +-1/sqrt(fan_in), normalization scale 1 and shift 0); constants no
    handler claims (shape constants, preprocessing) keep their values. `graph`: the model's channel
    graph, when the caller has built it."""
    graph = graph or build_channel_graph(load_model(model))
    rng = np.random.default_rng(seed)
    fresh: dict[str, np.ndarray] = {}
    for name in graph.relations:
        view = node_view(graph, name)
        for index, value in handler_for(view.op_type, view.node.domain).initial_values(view, rng).items():
            root = graph.param_root(view.node.input[index])
            if root is not None:
                fresh[root[0]] = value if root[1] is None else np.transpose(value, np.argsort(root[1]))
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for tensor in result.graph.initializer:
        if tensor.name in fresh:
            tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(fresh[tensor.name]), tensor.name))
    return result


def expand(
    model: str | os.PathLike | onnx.ModelProto,
    *,
    target_flops: float | None = None,
    target_params: float | None = None,
    round_to: int = 1,
    seed: int = 0,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> ExpandResult:
    """Scale every prunable group's width by one multiplier, the largest whose FLOPs (or
    parameters) fit the target; tied channels (residual streams, concats, depthwise pairs) scale
    together because they are one group. Pinned groups keep their width."""
    if (target_flops is None) == (target_params is None):
        raise OptionError("give exactly one of target_flops, target_params")
    if round_to < 1:
        raise OptionError(f"round_to must be at least 1, not {round_to}")
    resource, target = ("flops", target_flops) if target_flops is not None else ("params", target_params)
    if not target > 0:
        raise OptionError(f"target_{resource} must be positive, not {target}")
    graph = build_channel_graph(load_model(model, input_shapes))
    if not any(g.prunable for g in graph.groups):
        raise OptionError(f"{graph.model.source}: no channel group can change width "
                          "(see `onnx-morph analyze` for the reasons)")
    budget = Budget(**{resource: float(target)}, round_to=round_to)
    multiplier, copies = find_multiplier(graph, budget)
    resized = resize_channels(graph, copies, graph.model.materialized()).model
    expanded = build_channel_graph(load_model(resized, input_shapes))
    resized = fresh_parameters(resized, seed, expanded)  # same shapes: the graph still describes it
    check_model(resized)
    run(expanded, resized, random_inputs(expanded, samples=1))
    everything = np.ones(graph.num_classes, dtype=bool)
    after = totals_of(op_costs(expanded, np.ones(expanded.num_classes, dtype=bool)))
    return ExpandResult(
        model=resized,
        multiplier=multiplier,
        budget=budget,
        before=totals_of(op_costs(graph, everything)),
        after=after,
        predicted=total_cost(graph, copies, resource),
        widths=layer_widths(graph, copies),
        notes=list(graph.model.notes) + _head_notes(graph),
    )


def _head_notes(graph: ChannelGraph) -> list[str]:
    heads = sum(1 for g in graph.groups if g.prunable and spans_channel_grid(graph, g))
    return [f"{heads} groups of attention heads keep their head count"] if heads else []


def expand_file(source: str | os.PathLike, output: str | os.PathLike, **options) -> ExpandResult:
    """expand() and an atomic save; the input file is never overwritten."""
    from onnx_morph.rewrite.surgery.save import refuse_overwrite, save_model

    refuse_overwrite(output, source)
    result = expand(source, **options)
    save_model(result.model, output, source=source)
    return result
