"""The model sweep of tools/sweep_models.py as a test: every torchvision classification architecture
(random init, batch 1, its default input size) analyzes with every group prunable or pinned with a
reason, and a seeded random 30% of each prunable group's channels, removed by `prune --mask`, gives a
checker-valid model that matches the original with those channels zeroed to 1e-4 relative in
onnxruntime and costs what the cost model predicted.

The fast architectures run by default; the rest are marked slow (`pytest -m slow`, or the script,
which writes docs/coverage.md).
"""

from __future__ import annotations

import pytest

from tools import sweep_models

# Small enough to run by default (a few seconds each at their full input size), and between them
# residual adds, concats (DenseNet, Inception, SqueezeNet's Fire), splits and channel shuffles,
# depthwise and grouped convs, squeeze-excitation gates and Flatten -> Gemm heads.
FAST = [
    "squeezenet1_1",
    "squeezenet1_0",
    "shufflenet_v2_x0_5",
    "mobilenet_v3_small",
    "mnasnet0_5",
    "mobilenet_v2",
    "efficientnet_b0",
    "regnet_y_400mf",
    "regnet_x_400mf",
    "resnet18",
    "googlenet",
]


def _all_architectures() -> list[str]:
    try:
        return sweep_models.architectures()
    except Exception:  # noqa: BLE001 - collection must not die; the test below reports it
        return []


ALL = _all_architectures()
PARAMS = [pytest.param(name, marks=[] if name in FAST else [pytest.mark.slow]) for name in ALL]


def test_torchvision_lists_the_architectures():
    assert len(ALL) >= 70, ALL
    assert set(FAST) <= set(ALL)


@pytest.mark.parametrize("name", PARAMS)
def test_architecture_sweep(name, tmp_path):
    path, side = sweep_models.export_architecture(name, tmp_path)
    row = sweep_models.check_architecture(name, path, sweep_models.Row(name, input_side=side))
    assert row.status in ("pass", "unverified"), row
    assert row.prunable_channels > 0 and row.removed_channels > 0
    if row.status == "pass":
        assert row.max_rel < sweep_models.REL_TOL
    assert 0 < row.flops_kept < 1


def test_coverage_table_renders_every_row():
    rows = [sweep_models.Row("a", 224, 10, 3, 1, 8, 2, 0.7, 1e-7, {}, "pass"),
            sweep_models.Row("b", 224, 10, 3, 0, 0, 0, 0.0, None, {"unknown op Einsum at node '…'": 2}, "fail",
                             "no prunable group")]
    text = sweep_models.render(rows, 60.0)
    assert "**1 of 2 pass**, 0 unverified (over 2 GB), 1 fail." in text
    assert "| a | 224 | 10 | 3 | 1 | 8 | 2 | 70% | 1.0e-07 | pass |" in text
    assert "| b | 224 | 10 | 3 |" in text and "**fail**: no prunable group" in text
    assert "| unknown op Einsum at node '…' | b (2) |" in text


def test_coverage_table_parses_back():
    """`--update` re-runs some models and keeps the others' rows as they were written."""
    rows = [sweep_models.Row("a", 224, 10, 3, 1, 8, 2, 0.7, 1e-7, {"r1 'x'": 2, "r2": 1}, "pass"),
            sweep_models.Row("b", 299, 12, 4, 0, 0, 0, 0.0, None, {"r1 'x'": 1}, "fail", "no prunable group"),
            sweep_models.Row("c", 518, 99, 5, 2, 9, 3, 0.5, None, {}, "unverified", "over 2 GB: skipped")]
    text = sweep_models.render(rows, 90.0)
    parsed, seconds = sweep_models.parse(text)
    assert seconds == 90.0
    assert sweep_models.render(parsed, seconds) == text
