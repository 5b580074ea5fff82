"""Sanity checks for the test model zoo: every model exports to a valid ONNX
graph whose onnxruntime outputs match torch."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tools import zoo


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_export_matches_torch(name, tmp_path):
    factory, shape = zoo.ZOO[name]
    module = factory()
    path = zoo.export_onnx(module, shape, tmp_path / f"{name}.onnx")

    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = module(x).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(["output"], {"input": x.numpy()})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_export_is_deterministic(tmp_path):
    factory, shape = zoo.ZOO["BasicBlock"]
    a = zoo.export_onnx(factory(), shape, tmp_path / "a.onnx").read_bytes()
    b = zoo.export_onnx(factory(), shape, tmp_path / "b.onnx").read_bytes()
    assert a == b


def test_dynamic_batch(tmp_path):
    factory, shape = zoo.ZOO["ConvStack"]
    path = zoo.export_onnx(factory(), shape, tmp_path / "dyn.onnx", dynamic_batch=True)
    dim0 = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "batch"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"input": np.zeros((3, *shape[1:]), np.float32)})
    assert out.shape[0] == 3


def test_shuffle_reshape_shapes_inferred_with_data_prop(tmp_path):
    factory, shape = zoo.ZOO["ShuffleUnit"]
    model = onnx.load(str(zoo.export_onnx(factory(), shape, tmp_path / "s.onnx")))
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    vi = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    shapes = [
        [d.dim_value for d in vi[n.output[0]].type.tensor_type.shape.dim]
        for n in inferred.graph.node
        if n.op_type == "Reshape"
    ]
    assert shapes == [[1, 2, 8, 16, 16], [1, 16, 16, 16]]


def test_import_torchvision_builds_resnet18():
    tv = zoo.import_torchvision()
    assert zoo.import_torchvision() is tv
    model = tv.models.resnet18(weights=None)
    assert model.fc.in_features == 512
