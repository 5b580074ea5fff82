"""analyze on real torchvision architectures (random init): parameters equal torch's count, MACs
equal torchvision's published GFLOPS (which are MACs), every pinned group says why."""

import pytest
import torch

import onnx_morph
from tools.zoo import export_onnx, import_torchvision

# torchvision's model docs, "GFLOPS" column (multiply-accumulates, 224x224 input).
PUBLISHED_GMACS = {
    "resnet18": 1.81,
    "mobilenet_v2": 0.30,
    "densenet121": 2.83,
    "shufflenet_v2_x1_0": 0.14,
    "efficientnet_b0": 0.39,
    "vgg11": 7.61,
    "convnext_tiny": 4.46,
}


@pytest.fixture(scope="module")
def torchvision():
    return import_torchvision()


@pytest.mark.parametrize("name", sorted(PUBLISHED_GMACS))
def test_architecture(name, torchvision, tmp_path):
    torch.manual_seed(0)
    module = getattr(torchvision.models, name)()
    path = export_onnx(module, (1, 3, 224, 224), tmp_path / f"{name}.onnx", dynamic_batch=True)

    result = onnx_morph.analyze(path, macs=True)

    assert result.total.params == sum(p.numel() for p in module.parameters())
    assert result.total.flops / 1e9 == pytest.approx(PUBLISHED_GMACS[name], abs=0.006)
    assert result.unknown_ops == {}
    for group in result.groups:
        assert group.prunable == (not group.pin_reasons), group
    prunable = [g for g in result.groups if g.prunable]
    assert len(prunable) >= 5
    assert all(g.producers and g.sources for g in prunable if "gamma" in " ".join(g.sources))
    first, last = result.groups[0], result.groups[-1]
    assert first.pin_reasons == ["graph input 'input'"] and first.size == 3
    assert "graph output 'output'" in last.pin_reasons and last.size == 1000


def test_convnext_layernorm_pins_the_residual_stream(torchvision, tmp_path):
    module = torchvision.models.convnext_tiny()
    result = onnx_morph.analyze(export_onnx(module, (1, 3, 224, 224), tmp_path / "convnext.onnx"))
    pinned_by_norm = [g for g in result.groups if any("LayerNormalization" in r for r in g.pin_reasons)]
    # 4 stage widths (96, 192, 384, 768) carry the residual streams normalized by LayerNorm.
    assert sorted({g.size for g in pinned_by_norm}) == [96, 192, 384, 768]
    mlp_hidden = [g for g in result.groups if g.prunable]
    assert sorted({g.size for g in mlp_hidden}) == [384, 768, 1536, 3072]
