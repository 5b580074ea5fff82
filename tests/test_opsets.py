"""The same torch module exported at opsets 11 to 20 gives the same groups and costs, although
the exports differ (Split/Unsqueeze/Reduce attributes became inputs; LayerNorm is decomposed
before opset 17; chunk becomes a Shape->Gather->Div->Slice computation)."""

import pytest

import onnx_morph
from tools.zoo import ZOO, export_onnx


def _summary(path):
    result = onnx_morph.analyze(path)
    return [(g.size, g.prunable) for g in result.groups], result.total.flops, result.total.params


@pytest.mark.parametrize("name", sorted(ZOO))
def test_groups_and_costs_do_not_depend_on_opset(name, tmp_path):
    factory, shape = ZOO[name]
    reference = _summary(export_onnx(factory(), shape, tmp_path / "20.onnx", opset=20, dynamic_batch=True))
    for opset in (11, 13, 17):
        path = export_onnx(factory(), shape, tmp_path / f"{opset}.onnx", opset=opset, dynamic_batch=True)
        assert _summary(path) == reference, f"opset {opset}"
