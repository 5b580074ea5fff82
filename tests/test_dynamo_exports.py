"""torch's default exporter (dynamo=True: onnxscript, opset 18+, `node_Conv_292` names, module paths in
metadata) gives the same analysis and exact pruning as the TorchScript exporter, for every zoo family."""

from __future__ import annotations

import numpy as np
import pytest

import onnx_morph
from onnx_morph.rewrite import Mask, prune
from onnx_morph.rewrite.surgery.select import mask_document

pytest.importorskip("onnxscript", reason="torch's dynamo exporter needs the onnxscript package")

from tools import zoo  # noqa: E402

FAMILIES = sorted(n for n in zoo.ZOO if n != "UnknownOpNet")  # its stand-in op is a TorchScript-only trick


@pytest.mark.parametrize("name", FAMILIES)
def test_default_exporter_analyzes_and_prunes_like_torchscript(name, tmp_path):
    factory, shape = zoo.ZOO[name]
    module = factory()
    dynamo = onnx_morph.analyze(zoo.export_onnx(module, shape, tmp_path / "d.onnx", exporter="dynamo"))
    script = onnx_morph.analyze(zoo.export_onnx(module, shape, tmp_path / "t.onnx"))
    assert dynamo.total.params == script.total.params == sum(p.numel() for p in module.parameters())
    assert dynamo.total.flops == script.total.flops
    assert sorted(g.size for g in dynamo.groups if g.prunable) == sorted(g.size for g in script.groups if g.prunable)
    if any(g.prunable for g in dynamo.groups):
        alive = np.ones(dynamo.graph.num_classes, dtype=bool)
        for group in dynamo.graph.groups:
            if group.prunable and group.size > 1:
                alive[group.classes[1::3]] = False  # a third of every prunable group
        result = prune(tmp_path / "d.onnx", Mask(mask_document(dynamo.graph, alive)))
        assert result.removed_channels == int((~alive).sum()) > 0
        assert result.masked_deviation.max_rel < 1e-4


def test_reports_name_the_module(tmp_path):
    factory, shape = zoo.ZOO["BasicBlock"]
    analysis = onnx_morph.analyze(zoo.export_onnx(factory(), shape, tmp_path / "d.onnx", exporter="dynamo"))
    convs = [op.node for op in analysis.ops if op.op_type == "Conv"]
    assert all(n.startswith("node_") for n in convs)
    assert {analysis.graph.module_paths[n] for n in convs} == {"stem.conv", "conv1", "conv2", "downsample.0"}
    from onnx_morph.report import render

    header = next(line for line in render(analysis).splitlines() if line.startswith("node "))
    assert header.split()[-1] == "module"
    assert analysis.to_json()["modules"][convs[0]] == "stem.conv"
