"""Loading, validation, shape inference, the channel graph and its channel groups."""

from onnx_morph.graph.alive import alive_classes, covered_classes, source_strength
from onnx_morph.graph.channel_graph import ChannelGraph, build_channel_graph
from onnx_morph.graph.groups import ChannelGroup, GroupSource
from onnx_morph.graph.load import LoadedModel, load_model, parse_input_shapes

__all__ = [
    "alive_classes", "covered_classes", "source_strength", "ChannelGraph", "build_channel_graph", "ChannelGroup", "GroupSource",
    "LoadedModel", "load_model", "parse_input_shapes",
]
