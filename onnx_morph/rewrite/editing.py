"""Graph-editing helpers shared by the passes that rewrite a model."""

from __future__ import annotations

import onnx

from onnx_morph.graph.channel_graph import outer_references


class Names:
    """Fresh tensor and node names for additions to a graph: `fresh("w")` is "w", then "w_1", ...
    whatever the graph already holds (one set, kept up to date, so many additions stay linear)."""

    def __init__(self, graph: onnx.GraphProto):
        self.taken = {t.name for t in graph.initializer} | {v.name for v in graph.input} | {
            o for n in graph.node for o in n.output} | {n.name for n in graph.node}

    def fresh(self, name: str) -> str:
        candidate, k = name, 1
        while candidate in self.taken:
            candidate, k = f"{name}_{k}", k + 1
        self.taken.add(candidate)
        return candidate


def drop_unused(graph: onnx.GraphProto, prefix: str = "") -> None:
    """Remove nodes and initializers nothing reads any more (replaced shape computations, old weights);
    with `prefix`, only those whose names start with it (what a pass added)."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output) or not node.output or not node.name.startswith(prefix):
            kept.append(node)
            needed.update(i for i in node.input if i)
            needed.update(outer_references(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    for index in reversed([i for i, t in enumerate(graph.initializer)
                           if t.name not in needed and t.name.startswith(prefix)]):
        del graph.initializer[index]  # in place: re-adding the kept ones would copy tensors over 2 GB
