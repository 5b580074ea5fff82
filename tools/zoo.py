"""Small deterministic torch models and an ONNX export helper for the test suite.

Every model here is tiny (8-32 channels, 16x16 inputs), keeps its BatchNorm
layers (not fused: export uses ``do_constant_folding=False``) and has stable,
human-readable layer names so that tests can refer to exported initializers
such as ``stem.conv.weight``.

``ZOO`` maps a model name to ``(factory, input_shape)``; the factory builds the
module with a fixed seed so repeated calls give identical weights.
"""

from __future__ import annotations

import math
import pathlib
import warnings
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "export_onnx",
    "import_torchvision",
    "ConvStack",
    "BasicBlock",
    "Bottleneck",
    "InvertedResidual",
    "ResNeXtBlock",
    "DenseBlock",
    "InceptionBlock",
    "SplitBlock",
    "ShuffleUnit",
    "SEBlock",
    "FlattenHead",
    "TransformerBlock",
    "ConvTransposeNet",
    "UnknownOpNet",
    "ZOO",
]


# --------------------------------------------------------------------------- #
# Export helper
# --------------------------------------------------------------------------- #

# Messages of the DeprecationWarnings emitted by the legacy TorchScript exporter
# (torch >= 2.9).  Matched as regex prefixes by ``warnings.filterwarnings``.
_EXPORTER_DEPRECATIONS = (
    r"You are using the legacy TorchScript-based ONNX export",
    r"The feature will be removed",  # setup_onnx_logging inside the same exporter
)


def export_onnx(
    module: nn.Module,
    input_shape: Sequence[int],
    path,
    *,
    opset: Optional[int] = None,
    dynamic_batch: bool = False,
    exporter: str = "torchscript",
) -> pathlib.Path:
    """Export ``module`` to ONNX at ``path`` with the TorchScript exporter, or with torch's default
    (``exporter="dynamo"``: onnxscript-based, BatchNorm kept with ``optimize=False``).

    The module is put in eval mode, torch is seeded with 0 and a random input of
    ``input_shape`` is traced.  Graph input/output are named ``input``/``output``;
    constant folding is disabled so BatchNorm nodes stay in the graph.  ``opset``
    of ``None`` lets torch choose its default.  ``dynamic_batch`` marks axis 0 of
    input and output as the symbolic dim ``batch``.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    torch.manual_seed(0)
    dummy = torch.randn(*input_shape)
    kwargs = dict(
        dynamo=False,
        do_constant_folding=False,
        input_names=["input"],
        output_names=["output"],
    )
    if opset is not None:
        kwargs["opset_version"] = opset
    if dynamic_batch:
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
    if exporter == "dynamo":
        kwargs = dict(dynamo=True, optimize=False, input_names=["input"], output_names=["output"], verbose=False)
        if opset is not None:
            kwargs["opset_version"] = opset
        if dynamic_batch:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
    with warnings.catch_warnings():
        for msg in _EXPORTER_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=msg, category=DeprecationWarning)
        with torch.no_grad():
            torch.onnx.export(module, (dummy,), str(path), **kwargs)
    return path


# --------------------------------------------------------------------------- #
# torchvision import workaround
# --------------------------------------------------------------------------- #

# torchvision 0.28.0's compiled extension does not load next to CPU torch 2.13,
# so its Python-side ``register_fake("torchvision::nms")`` fails with
# "operator torchvision::nms does not exist".  Defining the schemas ourselves
# first lets ``import torchvision`` succeed (models work; the C++ ops do not).
# The Library object must stay alive, or the definitions are removed again.
_TV_LIB: Optional[torch.library.Library] = None
_TV_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _op_exists(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def import_torchvision():
    """Return the ``torchvision`` module, working around its broken C++ ops."""
    global _TV_LIB
    import sys

    if "torchvision" in sys.modules and hasattr(sys.modules["torchvision"], "models"):
        return sys.modules["torchvision"]
    missing = [n for n in _TV_SCHEMAS if not _op_exists(n)]
    if missing:
        if _TV_LIB is None:
            _TV_LIB = torch.library.Library("torchvision", "DEF")
        for name in missing:
            _TV_LIB.define(_TV_SCHEMAS[name])
    import torchvision

    return torchvision


# --------------------------------------------------------------------------- #
# Building blocks
# --------------------------------------------------------------------------- #


class ConvBNAct(nn.Sequential):
    """conv (bias=False) -> BatchNorm2d -> activation; children ``conv``, ``bn``, ``act``."""

    def __init__(self, c_in, c_out, k=3, stride=1, groups=1, act: Optional[type] = nn.ReLU):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        if act is not None:
            self.act = act(inplace=True) if act in (nn.ReLU, nn.ReLU6) else act()


def _randomize_bn(module: nn.Module) -> None:
    """Give every BatchNorm non-trivial running stats / affine params so that
    dropping a BN in an analysis would change outputs (deterministic given seed)."""
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
            with torch.no_grad():
                if getattr(m, "weight", None) is not None:
                    m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.uniform_(-0.2, 0.2)
                if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)


# --------------------------------------------------------------------------- #
# Zoo models
# --------------------------------------------------------------------------- #


class ConvStack(nn.Module):
    """Plain chain, input (1, 3, 16, 16) -> output (1, 16, 8, 8).

    conv1: Conv 3->8 3x3 pad1 + bn1 + ReLU
    conv2: Conv 8->16 3x3 stride2 pad1 + bn2 + ReLU
    conv3: Conv 16->16 1x1 bias=True (no BN) -> output
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 1, bias=True)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.conv3(x)


class BasicBlock(nn.Module):
    """ResNet basic block with projection shortcut, input (1, 3, 16, 16) -> (1, 16, 8, 8).

    stem: Conv 3->8 3x3 + BN + ReLU
    main: conv1 8->16 3x3 stride2 + bn1 + ReLU, conv2 16->16 3x3 + bn2
    shortcut: downsample.0 Conv 8->16 1x1 stride2 + downsample.1 BN
    out = ReLU(main + shortcut)
    """

    def __init__(self):
        super().__init__()
        self.stem = ConvBNAct(3, 8)
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.downsample = nn.Sequential(
            nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16)
        )

    def forward(self, x):
        x = self.stem(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.downsample(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck (expansion 4) with projection shortcut, (1, 3, 16, 16) -> (1, 32, 16, 16).

    stem: Conv 3->16 3x3 + BN + ReLU
    main: conv1 16->8 1x1 + bn1 + ReLU, conv2 8->8 3x3 + bn2 + ReLU,
          conv3 8->32 1x1 + bn3
    shortcut: downsample.0 Conv 16->32 1x1 + downsample.1 BN
    out = ReLU(main + shortcut)
    """

    expansion = 4

    def __init__(self, in_ch=16, width=8):
        super().__init__()
        out_ch = width * self.expansion
        self.stem = ConvBNAct(3, in_ch)
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)
        )

    def forward(self, x):
        x = self.stem(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.downsample(x))


class _MBV2Block(nn.Module):
    """MobileNetV2 inverted residual: expand (1x1+BN+ReLU6, omitted if t == 1),
    depthwise 3x3 (groups=hidden, optional multiplier) + BN + ReLU6, project 1x1 + BN,
    residual add when stride == 1 and c_in == c_out."""

    def __init__(self, c_in, c_out, stride=1, expand=6, dw_mult=1):
        super().__init__()
        hidden = c_in * expand
        self.use_res = stride == 1 and c_in == c_out
        if expand != 1:
            self.expand = ConvBNAct(c_in, hidden, k=1, act=nn.ReLU6)
        self.dw = ConvBNAct(hidden, hidden * dw_mult, k=3, stride=stride, groups=hidden, act=nn.ReLU6)
        self.project = ConvBNAct(hidden * dw_mult, c_out, k=1, act=None)

    def forward(self, x):
        out = x
        if hasattr(self, "expand"):
            out = self.expand(out)
        out = self.project(self.dw(out))
        return x + out if self.use_res else out


class InvertedResidual(nn.Module):
    """MobileNetV2 blocks, input (1, 3, 16, 16) -> (1, 16, 8, 8).

    stem: Conv 3->8 3x3 + BN + ReLU6
    block1 (residual): expand 8->24 1x1+BN+ReLU6, dw 24->24 3x3 g=24 +BN+ReLU6,
                       project 24->8 1x1+BN, + x
    block2 (dw multiplier 2, no expand, stride 2): dw 8->16 3x3 g=8 stride2 +BN+ReLU6,
                       project 16->16 1x1+BN (no residual)
    """

    def __init__(self):
        super().__init__()
        self.stem = ConvBNAct(3, 8, act=nn.ReLU6)
        self.block1 = _MBV2Block(8, 8, stride=1, expand=3)
        self.block2 = _MBV2Block(8, 16, stride=2, expand=1, dw_mult=2)

    def forward(self, x):
        return self.block2(self.block1(self.stem(x)))


class ResNeXtBlock(nn.Module):
    """ResNeXt bottleneck with grouped conv and identity residual, (1, 3, 16, 16) -> (1, 16, 16, 16).

    stem: Conv 3->16 3x3 + BN + ReLU
    conv1 16->16 1x1 + bn1 + ReLU, conv2 16->16 3x3 groups=4 + bn2 + ReLU,
    conv3 16->16 1x1 + bn3; out = ReLU(conv3 + x)
    """

    def __init__(self, ch=16, width=16, groups=4):
        super().__init__()
        self.stem = ConvBNAct(3, ch)
        self.conv1 = nn.Conv2d(ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(ch)

    def forward(self, x):
        x = self.stem(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + x)


class _DenseLayer(nn.Module):
    """BN -> ReLU -> Conv kxk (c_in -> c_out)."""

    def __init__(self, c_in, c_out, k=3):
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False)

    def forward(self, x):
        return self.conv(F.relu(self.bn(x)))


class DenseBlock(nn.Module):
    """DenseNet block, growth 4, input (1, 3, 16, 16) -> (1, 16, 16, 16).

    stem: Conv 3->8 3x3 (bias=False, no BN/act: DenseNet layers are pre-activation)
    layer1: BN(8) -> ReLU -> Conv 8->4 3x3;      f1 = cat([x, l1])      (12 ch)
    layer2: BN(12) -> ReLU -> Conv 12->4 3x3;    f2 = cat([x, l1, l2])  (16 ch)
    head: BN(16) -> ReLU -> Conv 16->16 1x1 (transition-style) -> output
    """

    def __init__(self, c_in=8, growth=4):
        super().__init__()
        self.stem = nn.Conv2d(3, c_in, 3, padding=1, bias=False)
        self.layer1 = _DenseLayer(c_in, growth)
        self.layer2 = _DenseLayer(c_in + growth, growth)
        self.head = _DenseLayer(c_in + 2 * growth, 16, k=1)

    def forward(self, x):
        x = self.stem(x)
        l1 = self.layer1(x)
        l2 = self.layer2(torch.cat([x, l1], dim=1))
        return self.head(torch.cat([x, l1, l2], dim=1))


class InceptionBlock(nn.Module):
    """Inception module, input (1, 3, 16, 16) -> (1, 16, 16, 16).

    stem: Conv 3->8 3x3 + BN + ReLU
    branch1: Conv 8->4 1x1 + BN + ReLU
    branch2: Conv 8->4 1x1 + BN + ReLU -> Conv 4->4 3x3 + BN + ReLU
    branch3: Conv 8->2 1x1 + BN + ReLU -> Conv 2->4 5x5 + BN + ReLU
    branch4: MaxPool 3x3 s1 p1 -> Conv 8->4 1x1 + BN + ReLU
    out = cat([b1, b2, b3, b4], dim=1)
    """

    def __init__(self):
        super().__init__()
        self.stem = ConvBNAct(3, 8)
        self.branch1 = ConvBNAct(8, 4, k=1)
        self.branch2 = nn.Sequential(ConvBNAct(8, 4, k=1), ConvBNAct(4, 4, k=3))
        self.branch3 = nn.Sequential(ConvBNAct(8, 2, k=1), ConvBNAct(2, 4, k=5))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), ConvBNAct(8, 4, k=1))

    def forward(self, x):
        x = self.stem(x)
        return torch.cat(
            [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], dim=1
        )


class SplitBlock(nn.Module):
    """Channel splits, input (1, 3, 16, 16) -> (1, 32, 16, 16).

    stem: Conv 3->16 3x3 + BN + ReLU
    chunk path: a, b = torch.chunk(x, 2, dim=1) (8 + 8);
                chunk_a Conv 8->8 3x3 + BN + ReLU, chunk_b Conv 8->8 3x3 + BN + ReLU
    split path: c, d = torch.split(x, [4, 12], dim=1);
                split_c Conv 4->4 1x1 + BN + ReLU, split_d Conv 12->12 1x1 + BN + ReLU
    out = cat([chunk_a(a), chunk_b(b), split_c(c), split_d(d)], dim=1)
    """

    def __init__(self):
        super().__init__()
        self.stem = ConvBNAct(3, 16)
        self.chunk_a = ConvBNAct(8, 8)
        self.chunk_b = ConvBNAct(8, 8)
        self.split_c = ConvBNAct(4, 4, k=1)
        self.split_d = ConvBNAct(12, 12, k=1)

    def forward(self, x):
        x = self.stem(x)
        a, b = torch.chunk(x, 2, dim=1)
        c, d = torch.split(x, [4, 12], dim=1)
        return torch.cat([self.chunk_a(a), self.chunk_b(b), self.split_c(c), self.split_d(d)], dim=1)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """view(N, g, C//g, H, W) -> transpose(1, 2) -> view(N, C, H, W)."""
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit (stride 1), input (1, 3, 16, 16) -> (1, 16, 16, 16).

    stem: Conv 3->16 3x3 + BN + ReLU
    x1, x2 = x.chunk(2, dim=1)   (8 + 8)
    branch2: Conv 8->8 1x1 + BN + ReLU, dw Conv 8->8 3x3 g=8 + BN,
             Conv 8->8 1x1 + BN + ReLU
    out = channel_shuffle(cat([x1, branch2(x2)], dim=1), groups=2)
    """

    def __init__(self, ch=16):
        super().__init__()
        half = ch // 2
        self.stem = ConvBNAct(3, ch)
        self.branch2 = nn.Sequential(
            ConvBNAct(half, half, k=1),
            ConvBNAct(half, half, k=3, groups=half, act=None),
            ConvBNAct(half, half, k=1),
        )

    def forward(self, x):
        x = self.stem(x)
        x1, x2 = x.chunk(2, dim=1)
        out = torch.cat([x1, self.branch2(x2)], dim=1)
        return channel_shuffle(out, 2)


class SEBlock(nn.Module):
    """Squeeze-excitation, input (1, 3, 16, 16) -> (1, 16, 16, 16).

    features: Conv 3->16 3x3 + BN + ReLU
    se: AdaptiveAvgPool2d(1) -> fc1 Conv 16->4 1x1 (bias) -> ReLU
        -> fc2 Conv 4->16 1x1 (bias) -> Sigmoid
    out = features * se(features)
    """

    def __init__(self, ch=16, reduction=4):
        super().__init__()
        self.features = ConvBNAct(3, ch)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(ch, ch // reduction, 1)
        self.fc2 = nn.Conv2d(ch // reduction, ch, 1)

    def forward(self, x):
        x = self.features(x)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(self.pool(x)))))
        return x * s


class FlattenHead(nn.Module):
    """Conv + flatten + Linear, input (1, 3, 8, 8) -> (1, 10).

    features: Conv 3->8 3x3 + BN + ReLU  -> (1, 8, 8, 8)
    torch.flatten(x, 1)                  -> (1, 512), channel-major (c*64 + h*8 + w)
    fc: Linear 512 -> 10
    """

    def __init__(self):
        super().__init__()
        self.features = ConvBNAct(3, 8)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = self.features(x)
        return self.fc(torch.flatten(x, 1))


class TransformerBlock(nn.Module):
    """Pre-LN transformer block, input (1, 6, 16) [batch, tokens, dim] -> same.

    ln1: LayerNorm(16); q_proj / k_proj / v_proj: Linear 16->16;
    heads: reshape (B, T, 2, 8) -> transpose(1, 2) -> (B, 2, T, 8);
    attn = softmax(q @ k^T / sqrt(8)) @ v; merge: transpose(1, 2) -> reshape (B, T, 16);
    out_proj: Linear 16->16; x = x + attn
    ln2: LayerNorm(16); fc1 Linear 16->32 -> GELU -> fc2 Linear 32->16; x = x + mlp
    """

    def __init__(self, dim=16, heads=2, hidden=32):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.ln1 = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        q = self.q_proj(h).reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.out_proj(o)
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class ConvTransposeNet(nn.Module):
    """Down/up sampling, input (1, 3, 16, 16) -> (1, 3, 16, 16).

    down: Conv 3->8 3x3 stride2 + BN + ReLU         -> (1, 8, 8, 8)
    up: ConvTranspose 8->4 2x2 stride2 (bias=False) -> up_bn BN + ReLU -> (1, 4, 16, 16)
    head: Conv 4->3 3x3 (bias)
    """

    def __init__(self):
        super().__init__()
        self.down = ConvBNAct(3, 8, stride=2)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2, bias=False)
        self.up_bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        x = self.down(x)
        x = F.relu(self.up_bn(self.up(x)))
        return self.head(x)


class UnknownOpNet(nn.Module):
    """Op with unknown channel semantics, input (1, 3, 16, 16) -> (1, 8, 16, 16).

    features: Conv 3->8 3x3 + BN + ReLU
    torch.cumsum(x, dim=1)  (ONNX CumSum along channels: mixes channels)
    head: Conv 8->8 1x1 (bias)
    """

    def __init__(self):
        super().__init__()
        self.features = ConvBNAct(3, 8)
        self.head = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.head(torch.cumsum(self.features(x), dim=1))


# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #


def _seeded(cls: type, seed: int = 0) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        torch.manual_seed(seed)
        m = cls()
        _randomize_bn(m)
        return m.eval()

    factory.__name__ = f"make_{cls.__name__}"
    factory.__doc__ = cls.__doc__
    return factory


_IMG = (1, 3, 16, 16)

ZOO: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...]]] = {
    "ConvStack": (_seeded(ConvStack), _IMG),
    "BasicBlock": (_seeded(BasicBlock), _IMG),
    "Bottleneck": (_seeded(Bottleneck), _IMG),
    "InvertedResidual": (_seeded(InvertedResidual), _IMG),
    "ResNeXtBlock": (_seeded(ResNeXtBlock), _IMG),
    "DenseBlock": (_seeded(DenseBlock), _IMG),
    "InceptionBlock": (_seeded(InceptionBlock), _IMG),
    "SplitBlock": (_seeded(SplitBlock), _IMG),
    "ShuffleUnit": (_seeded(ShuffleUnit), _IMG),
    "SEBlock": (_seeded(SEBlock), _IMG),
    "FlattenHead": (_seeded(FlattenHead), (1, 3, 8, 8)),
    "TransformerBlock": (_seeded(TransformerBlock), (1, 6, 16)),
    "ConvTransposeNet": (_seeded(ConvTransposeNet), _IMG),
    "UnknownOpNet": (_seeded(UnknownOpNet), _IMG),
}


if __name__ == "__main__":  # python -m tools.zoo: export all, print op types
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        for name, (factory, shape) in ZOO.items():
            model = onnx.load(str(export_onnx(factory(), shape, pathlib.Path(tmp) / f"{name}.onnx")))
            ops = sorted({n.op_type for n in model.graph.node})
            opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
            print(f"{name:18s} opset {opset}: {' '.join(ops)}")
