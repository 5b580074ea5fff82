"""Graph-editing helpers shared by the passes that rewrite a model."""

from __future__ import annotations

import onnx

from onnx_morph.graph.channel_graph import outer_references


def drop_unused(graph: onnx.GraphProto) -> None:
    """Remove nodes and initializers nothing reads any more (replaced shape computations, old weights)."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output) or not node.output:
            kept.append(node)
            needed.update(i for i in node.input if i)
            needed.update(outer_references(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    for index in reversed([i for i, t in enumerate(graph.initializer) if t.name not in needed]):
        del graph.initializer[index]  # in place: re-adding the kept ones would copy tensors over 2 GB
