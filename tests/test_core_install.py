"""The core install (onnx, numpy, networkx and onnxruntime, without torch or onnxruntime-training):
analyze, prune and expand on a model built with onnx's helper API. CI also runs this file alone in a
virtual environment with only the core and the newest onnx and onnxruntime."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HEAVY = ("torch", "onnxruntime.training", "sklearn", "matplotlib", "tensorboard")


def _cnn(path) -> None:
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [init("w1", 8, 3, 3, 3), init("w2", 8, 8, 3, 3), init("fc", 4, 8), init("fc_b", 4)]
    for name, values in (("s", np.array([0, 0, 0, .5, .6, .7, .8, .9])), ("b", np.zeros(8)), ("m", np.zeros(8)), ("v", np.ones(8))):
        inits.append(numpy_helper.from_array(values.astype(np.float32), name))
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "s", "b", "m", "v"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc", "fc_b"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_analyze_prune_expand_without_torch(tmp_path):
    model = tmp_path / "cnn.onnx"
    _cnn(model)
    script = f"""
import json, sys
from onnx_morph.cli import main
codes = [main(["analyze", {str(model)!r}, "--json", "--gamma-threshold", "0.3", "--graph", {str(tmp_path / 'g.graphml')!r}]),
         main(["prune", {str(model)!r}, "-o", {str(tmp_path / 'small.onnx')!r}, "--gamma-threshold", "0.3"]),
         main(["expand", {str(tmp_path / 'small.onnx')!r}, "-o", {str(tmp_path / 'wide.onnx')!r}, "--like", {str(model)!r}])]
print(json.dumps({{"codes": codes, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary == {"codes": [0, 0, 0], "heavy": []}
    report, _ = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index("{"):])
    # Three of conv1's eight channels have BatchNorm scale 0: dead.
    assert report["total"]["flops"] > report["effective"]["flops"]
    import networkx as nx

    viewed = nx.read_graphml(str(tmp_path / "g.graphml"))
    edges = {(a, b): attrs for a, b, attrs in viewed.edges(data=True)}
    assert edges["conv1", "bn1"]["shape"] == "1x8x8x8" and edges["conv1", "bn1"]["prunable"] is True
    assert edges["input:x", "conv1"]["prunable"] is False and edges["fc", "output:y"]["prunable"] is False
    small = onnx.load(str(tmp_path / "small.onnx"))
    assert numpy_helper.to_array(next(t for t in small.graph.initializer if t.name.startswith("w1"))).shape[0] == 5
    from onnx_morph.rewrite.surgery.verify import onnxruntime

    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    ort = onnxruntime()
    full = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    pruned = ort.InferenceSession(str(tmp_path / "small.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    # Dead channels (relu(beta) = 0 after a zero scale and shift) contribute nothing: the same function.
    np.testing.assert_allclose(pruned, full, rtol=1e-4, atol=1e-5)
