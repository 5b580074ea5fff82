"""A model exported at a fixed batch size, made to run at any batch, for training at another one.

Exporters fix the batch wherever the example input's size was traced: the graph's inputs and
outputs and reshape targets (`x.view(1, -1)`). The graph inputs' and batch-sized outputs' first
dims become a symbolic `batch`, and each handler rewrites the constants that froze it
(`batch_free`). The result is only used after onnxruntime shows it computes, on two samples in one
batch, what the original computes on each alone; otherwise the export is refused with how to
export instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_morph.errors import ModelLoadError
from onnx_morph.graph import ChannelGraph
from onnx_morph.graph.channel_graph import node_view
from onnx_morph.handlers import handler_for
from onnx_morph.rewrite.surgery.verify import onnxruntime, random_inputs, run, runtime_errors

BATCH = "batch"
_TOLERANCE = 1e-4


@dataclass(frozen=True)
class FlexibleBatch:
    """The rewritten model (None when the batch was dynamic throughout) and what changed, for the user."""

    model: onnx.ModelProto | None
    note: str | None = None


def flexible_batch(graph: ChannelGraph) -> FlexibleBatch:
    """`graph`'s model with a dynamic batch, checked in onnxruntime; ModelLoadError when that fails."""
    loaded = graph.model
    batches = {shape[0] for shape in loaded.input_shapes.values() if shape}
    if len(batches) != 1:
        raise ModelLoadError(f"{loaded.source}: the inputs' first dims differ ({sorted(batches)}); onnx-morph trains "
                             "models whose inputs share a batch dimension")
    batch = batches.pop()
    model = loaded.materialized()
    changed = _dynamic_interface(model, loaded, batch) + _batch_free_constants(model, graph, batch)
    if not changed:
        return FlexibleBatch(None)
    _check_same_function(graph, model, batch)
    return FlexibleBatch(model, f"the export fixes the batch at {batch} ({', '.join(changed)}): made dynamic, checked "
                                "in onnxruntime; the artifacts train at their batch size and the trained model "
                                "takes any batch")


def _dynamic_interface(model: onnx.ModelProto, loaded, batch: int) -> list[str]:
    """The first dim of every data input, and of every output of the batch's size, made symbolic."""
    changed = []
    initializers = {t.name for t in model.graph.initializer}
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for value in values:
            dims = value.type.tensor_type.shape.dim
            if value.name in initializers or not len(dims) or dims[0].HasField("dim_param"):
                continue
            if kind == "output" and loaded.shapes.get(value.name, (None,))[0] != batch:
                continue
            dims[0].Clear()
            dims[0].dim_param = BATCH
            changed.append(f"{kind} '{value.name}'")
    del model.graph.value_info[:]
    return changed


def _batch_free_constants(model: onnx.ModelProto, graph: ChannelGraph, batch: int) -> list[str]:
    changed = []
    for name, proto in zip(graph.order, model.graph.node):
        node = graph.nodes[name]
        values = handler_for(node.op_type, node.domain).batch_free(node_view(graph, name), batch)
        for index, value in values.items():
            fresh = f"{proto.input[index]}/batch_free/{name}"
            model.graph.initializer.append(numpy_helper.from_array(value, fresh))
            proto.input[index] = fresh
        if values:
            changed.append(f"{node.op_type} '{name}'")
    return changed


def _check_same_function(graph: ChannelGraph, model: onnx.ModelProto, batch: int) -> None:
    """Two samples batched together must give what each gives alone."""
    feeds = random_inputs(graph, samples=2, seed=7)
    alone = run(graph, graph.model.materialized(), feeds)
    together = {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}
    why = None
    try:
        batched = run(graph, model, [together])[0]
    except runtime_errors(onnxruntime()) as exc:
        why = " ".join(str(exc).split())[:200]
    else:
        for index, output in enumerate(batched):
            expected = np.concatenate([np.asarray(r[index]) for r in alone])
            if output.shape != expected.shape or not np.allclose(output, expected, rtol=_TOLERANCE, atol=_TOLERANCE):
                why = f"output '{model.graph.output[index].name}' then differs from the batch-{batch} model's"
                break
    if why is not None:
        raise ModelLoadError(
            f"{graph.model.source}: the export fixes the batch at {batch}, and onnx-morph cannot change it safely "
            f"({why}); export with a dynamic batch instead: torch.onnx.export(..., input_names=['input'], "
            "output_names=['output'], dynamic_axes={'input': {0: 'batch'}, 'output': {0: 'batch'}})")
