"""The channel graph as GraphML, for a graph viewer (yEd, Gephi, Cytoscape): ops and graph inputs and
outputs as nodes, one edge per tensor and consumer, labelled with the channel groups it carries."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from onnx_morph.errors import OutputError
from onnx_morph.graph.channel_graph import ChannelGraph


def graphml_graph(graph: ChannelGraph):
    """A copy of `graph.nx` whose attributes are GraphML's scalar types; each edge gains `groups`
    (the ids of the channel groups its tensor carries) and `prunable`."""
    import networkx as nx

    group_of = np.full(graph.num_classes, -1, dtype=np.int64)
    pinned = {g.id: not g.prunable for g in graph.groups}
    for group in graph.groups:
        group_of[group.classes] = group.id
    out = nx.MultiDiGraph()
    for node, attrs in graph.nx.nodes(data=True):
        out.add_node(node, **{k: str(v) for k, v in attrs.items() if v is not None})
    for source, target, key, attrs in graph.nx.edges(keys=True, data=True):
        classes = graph.classes(attrs["tensor"])
        groups = sorted({int(g) for g in group_of[classes]} - {-1}) if classes is not None else []
        out.add_edge(source, target, key=key, tensor=attrs["tensor"],
                     shape="x".join(map(str, attrs["shape"])) if attrs.get("shape") is not None else "",
                     channel_axes=",".join(map(str, attrs["channel_axes"] or ())),
                     groups=",".join(map(str, groups)), prunable=bool(groups) and not any(pinned[g] for g in groups))
    return out


def write_graphml(graph: ChannelGraph, path: str | os.PathLike) -> Path:
    """Write `graphml_graph(graph)` to `path` (a temporary file renamed into place)."""
    import networkx as nx

    path = Path(path)
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    try:
        nx.write_graphml(graphml_graph(graph), temporary)
        os.replace(temporary, path)
    except OSError as exc:
        os.unlink(temporary)
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        os.unlink(temporary)
        raise
    return path
