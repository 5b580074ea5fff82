#!/usr/bin/env python
"""Sweep every torchvision classification architecture through analyze and prune; write docs/coverage.md.

    python -m tools.sweep_models [--models resnet18 ...] [--output docs/coverage.md] [--workdir DIR]
                                 [--timeout SECONDS] [--jobs N]

For each architecture (random init, ``weights=None``, nothing is downloaded; batch 1; the input
size of its default weights, or the model's own ``image_size``):

1. export to ONNX through ``tools/zoo.py``'s ``export_onnx`` (TorchScript exporter, BatchNorm kept);
2. ``onnx_morph.analyze``: every group is prunable or pinned with a reason;
3. a seeded random 30% of the channel classes of each prunable group (each group keeps one) goes
   into a mask document, ``onnx_morph.rewrite.prune(path, Mask(...))`` removes them, the result must
   pass ``onnx.checker`` (full check) and, in onnxruntime on random inputs, match the original with
   the removed channels multiplied by zero (``rewrite.verify.masked_original``) to 1e-4 relative;
   ``analyze`` of the pruned model must cost what the masks said it would.

Each architecture runs in a child process (``--one NAME``), so one that crashes or runs out of
memory or time is a failed row, not a failed sweep. tests/test_sweep.py runs ``check_architecture``
on a fast subset in the default test run and on the rest with ``-m slow``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

REPO = pathlib.Path(__file__).resolve().parent.parent

KILL_FRACTION = 0.3
REL_TOL = 1e-4


@dataclass
class Row:
    """One architecture's results; `status` is "pass", "unverified" (over 2 GB: onnxruntime cannot
    take it from memory, so prune skips the comparison) or "fail", with `why`."""

    model: str
    input_side: int = 0
    nodes: int = 0
    groups: int = 0
    prunable_groups: int = 0
    prunable_channels: int = 0
    removed_channels: int = 0
    flops_kept: float = 0.0
    max_rel: float | None = None
    pins: dict[str, int] = field(default_factory=dict)
    status: str = "fail"
    why: str = ""
    seconds: float = 0.0


def architectures() -> list[str]:
    """Every classification model torchvision builds (its top-level `models` namespace)."""
    from tools.zoo import import_torchvision

    tv = import_torchvision()
    return sorted(tv.models.list_models(module=tv.models))


def input_side(name: str, module) -> int:
    """The model's own fixed image size (ViT), else the crop size of its default weights' transforms."""
    from tools.zoo import import_torchvision

    side = getattr(module, "image_size", None)
    if isinstance(side, int):
        return side
    tv = import_torchvision()
    return int(tv.models.get_model_weights(name).DEFAULT.transforms.keywords.get("crop_size", 224))


def export_architecture(name: str, folder: pathlib.Path) -> tuple[pathlib.Path, int]:
    """Build `name` with random weights (seeded) and export it at batch 1; returns (path, input side)."""
    import torch
    from tools.zoo import export_onnx, import_torchvision

    tv = import_torchvision()
    torch.manual_seed(0)
    module = tv.models.get_model(name, weights=None).eval()
    with torch.no_grad():  # ViT's head starts at zero: every output would be 0 and every comparison vacuous
        for parameter in module.parameters():
            if parameter.dim() >= 2 and not parameter.any():
                parameter.normal_(0.0, 0.02)
    side = input_side(name, module)
    # Eval-mode nn.MultiheadAttention (ViT) takes a fused fast path that the TorchScript exporter
    # cannot export; the regular path computes the same attention.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return export_onnx(module, (1, 3, side, side), folder / f"{name}.onnx"), side
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def random_kill(graph, seed: int):
    """Alive classes with a random KILL_FRACTION of each prunable group removed (at least one kept)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    alive = np.ones(graph.num_classes, dtype=bool)
    for group in graph.groups:
        if group.prunable:
            count = min(round(KILL_FRACTION * group.size), group.size - 1)
            if count > 0:
                alive[rng.choice(group.classes, size=count, replace=False)] = False
    return alive


def pin_summary(groups) -> dict[str, int]:
    """Pinned groups per reason, node names elided (graph inputs/outputs are always pinned; left out)."""
    counts: dict[str, int] = {}
    for group in groups:
        for reason in dict.fromkeys(re.sub(r"'[^']*'", "'…'", r) for r in group.pin_reasons):
            if not reason.startswith(("graph input", "graph output")):
                counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def check_architecture(name: str, path: pathlib.Path, row: Row) -> Row:
    """Analyze and prune one exported model; raises AssertionError (with the reason) on a failure."""
    import numpy as np
    import onnx

    import onnx_morph
    from onnx_morph.costs import op_costs, totals_of
    from onnx_morph.rewrite import Mask, prune
    from onnx_morph.rewrite.surgery.select import mask_document
    from onnx_morph.rewrite.surgery.surgery import keep_masks
    from onnx_morph.rewrite.surgery.verify import deviation, masked_original, random_inputs, run

    analysis = onnx_morph.analyze(path)
    graph = analysis.graph
    row.nodes = len(graph.model.graph.node)
    row.groups = len(analysis.groups)
    prunable = [g for g in analysis.groups if g.prunable]
    row.prunable_groups = len(prunable)
    row.prunable_channels = sum(g.size for g in prunable)
    row.pins = pin_summary(analysis.groups)
    for group in analysis.groups:
        assert group.prunable == (not group.pin_reasons), f"group {group.id} is pinned without a reason"
    if not prunable:
        raise AssertionError("no prunable group")

    alive = random_kill(graph, zlib.crc32(name.encode()))
    result = prune(path, Mask(mask_document(graph, alive)))
    row.removed_channels = result.removed_channels
    assert result.removed_channels == int((~alive).sum()), "prune removed other channels than the masks"
    assert np.array_equal(result.alive, alive)
    pruned = result.model
    after = onnx_morph.analyze(pruned).total
    effective = totals_of(op_costs(graph, alive))  # what the cost model predicts for the masks
    assert after.flops == effective.flops, f"pruned FLOPs {after.flops:.6g}, the cost model said {effective.flops:.6g}"
    row.flops_kept = after.flops / analysis.total.flops if analysis.total.flops else 1.0
    if result.masked_deviation is None:
        row.status, row.why = "unverified", "over 2 GB: prune skips the checker and onnxruntime comparison"
        return row
    onnx.checker.check_model(pruned, full_check=True)

    # prune() compared against the masked original on its own 2 inputs; check again on fresh ones.
    original = graph.model.materialized()
    feeds = random_inputs(graph, samples=1, seed=1)
    masked = masked_original(graph, original, keep_masks(graph, alive))
    expected = run(graph, masked, feeds)
    assert all(np.abs(out).max() > 0 for out in expected[0]), "the masked original's outputs are all zero"
    row.max_rel = max(result.masked_deviation.max_rel, deviation(expected, run(graph, pruned, feeds)).max_rel)
    assert row.max_rel < REL_TOL, f"pruned output differs from the masked original by {row.max_rel:.2e} relative"
    row.status, row.why = "pass", ""
    return row


def sweep_one(name: str, folder: pathlib.Path) -> Row:
    """Export, analyze and prune `name`; every failure becomes the row's `why`."""
    row = Row(name)
    start = time.perf_counter()
    try:
        try:
            path, row.input_side = export_architecture(name, folder)
        except Exception as exc:  # noqa: BLE001 - an export failure is torch's, reported as such
            row.why = f"torch export: {_one_line(exc)}"
            return row
        check_architecture(name, path, row)
    except AssertionError as exc:
        row.why = _one_line(exc)
    except Exception as exc:  # noqa: BLE001 - any other error is a failure of onnx-morph, reported
        row.why = f"{type(exc).__name__}: {_one_line(exc)}"
    finally:
        row.seconds = time.perf_counter() - start
    return row


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200] + ("…" if len(text) > 200 else "")


def _child(name: str, workdir: pathlib.Path, timeout: float) -> Row:
    cmd = [sys.executable, "-m", "tools.sweep_models", "--one", name, "--workdir", str(workdir)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return Row(name, why=f"timed out after {timeout:.0f} s", seconds=timeout)
    line = next((l for l in reversed(proc.stdout.splitlines()) if l.startswith("ROW ")), None)
    if line is None:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return Row(name, why=f"crashed (exit {proc.returncode}): {tail[0][:200]}", seconds=time.perf_counter() - start)
    return Row(**json.loads(line[4:]))


# Patterns once pinned that prune exactly (tests/test_pins.py): before, after, and the deviation of the
# pruned model from the original with the removed channels zeroed, on fresh inputs (the sweep's check).
PATTERNS = [
    ("L2 normalization over C (`x / x.norm(dim=1)`, `F.normalize`)",
     "pinned: ReduceL2 node reduces over the channel axis", "prunable: a zero channel adds 0", "0.0"),
    ("ReduceSum, ReduceSumSquare, ReduceL1, ReduceLogSum over C", "pinned: reduces over the channel axis",
     "prunable", "0.0"),
    ("ReduceMean, ReduceMax, ReduceMin, ReduceProd, ReduceLogSumExp over C (CBAM)",
     "pinned: reduces over the channel axis", "pinned, saying why (the mean's divisor, a zero maximum, ...)", ""),
    ("DepthToSpace DCR and CRD (`nn.PixelShuffle`), SpaceToDepth", "pinned: unknown op",
     "prunable in units of blocksize^2 channels", "0.0 (DCR, CRD), 9.9e-08 (SpaceToDepth)"),
    ("GroupNorm as torch exports it (Reshape, InstanceNormalization, Reshape, Mul, Add)",
     "pinned: Conv reads channels on axis 1, the input's are on (1, 2, 3)", "prunable in whole groups", "0.0"),
    ("GroupNormalization op, opset 18 (per-group scale) and 21 (per-channel)",
     "pinned: GroupNormalization changes the channel dimension (onnx infers no output shape)",
     "prunable in whole groups; `num_groups` shrinks", "1.2e-07 (18), 1.1e-07 (21)"),
    ("LSTM, GRU, RNN input features", "pinned: unknown op", "prunable (columns of W); hidden size pinned, "
     "named; W computed at run time (unfolded export, > 1024 elements) pinned, named", "0.0"),
    ("Selective kernel: softmax over paths of a `[B, paths, C]` attention (SKNet)",
     "pinned: Mul combines operands whose channel layouts differ; Softmax normalizes over the channel axis",
     "prunable: branch width in every path and the attention conv", "0.0"),
    ("Split attention (ResNeSt): radix softmax after a conv with one group per radix path",
     "one unit (grouped conv)", "unchanged: the grouped conv makes the block's width one unit", ""),
    ("Softmax over all channels", "pinned: Softmax normalizes over the channel axis", "unchanged", ""),
]


def render(rows: list[Row], total_seconds: float) -> str:
    passed = [r for r in rows if r.status == "pass"]
    unverified = [r for r in rows if r.status == "unverified"]
    lines = [
        "# Coverage: torchvision classification architectures",
        "",
        "Written by `python -m tools.sweep_models` (tests/test_sweep.py runs the same check). Each model: random",
        "init, batch 1, its default input size, exported with the TorchScript exporter (BatchNorm kept);",
        "`analyze`; a seeded random 30% of every prunable group's channels removed with `prune --mask`; the",
        "result passes `onnx.checker` (full check) and matches the original with those channels zeroed to",
        f"{REL_TOL:g} relative in onnxruntime, and `analyze` of it gives the FLOPs the cost model predicted.",
        "",
        (f"**{len(passed)} of {len(rows)} pass**, {len(unverified)} unverified (over 2 GB), "
         f"{len(rows) - len(passed) - len(unverified)} fail. Sweep time {total_seconds / 60:.1f} min."),
        "",
        "| model | input | nodes | groups | prunable groups | prunable channels | removed | FLOPs kept | max rel dev | result |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        why = r.why.replace("|", "/")
        result = {"pass": "pass", "unverified": f"unverified: {why}"}.get(r.status, f"**fail**: {why}")
        dev = "" if r.max_rel is None else f"{r.max_rel:.1e}"
        kept = f"{100 * r.flops_kept:.0f}%" if r.flops_kept else ""
        lines.append(f"| {r.model} | {r.input_side or ''} | {r.nodes or ''} | {r.groups or ''} | {r.prunable_groups or ''} "
                     f"| {r.prunable_channels or ''} | {r.removed_channels or ''} | {kept} | {dev} | {result} |")
    reasons: dict[str, list[str]] = {}
    for r in rows:
        for reason, count in r.pins.items():
            reasons.setdefault(reason, []).append(f"{r.model} ({count})")
    lines += ["", "## Why groups are pinned", "",
              "Besides graph inputs and outputs; pinned groups per reason, node names elided.", "",
              "| reason | models (pinned groups) |", "|---|---|"]
    for reason, models in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"| {reason.replace('|', '/')} | {', '.join(models)} |")
    lines += ["", "## Patterns", "",
              "Small models built in tests/test_pins.py, checked like the sweep (30% of each prunable group removed,",
              "compared with the original with those channels zeroed, on fresh inputs).", "",
              "| pattern | before | after | max rel dev |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(cells)} |" for cells in PATTERNS]
    return "\n".join(lines) + "\n"


HAND_WRITTEN = "## Coupling patterns"


def _hand_written(path: pathlib.Path) -> str:
    """The hand-written sections of the existing file (from HAND_WRITTEN on), kept across sweeps."""
    text = path.read_text() if path.exists() else ""
    return "" if HAND_WRITTEN not in text else "\n" + text[text.index(HAND_WRITTEN):]


def parse(text: str) -> tuple[list[Row], float]:
    """The rows and total time of a table written by render() (for --update)."""
    rows: dict[str, Row] = {}
    total = 0.0
    section = None
    for line in text.split(HAND_WRITTEN)[0].splitlines():
        if line.startswith("**") and "Sweep time" in line:
            total = 60 * float(line.rsplit("Sweep time", 1)[1].split()[0])
        elif line.startswith("| model |"):
            section = "models"
        elif line.startswith("| reason |"):
            section = "reasons"
        elif line.startswith("| pattern |"):
            section = None  # PATTERNS, rewritten from the constant
        elif line.startswith("| ") and not line.startswith("|---") and section == "models":
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            name, side, nodes, groups, pgroups, pchannels, removed, kept, dev, result = cells
            status, _, why = result.replace("**", "").partition(": ")
            rows[name] = Row(name, int(side or 0), int(nodes or 0), int(groups or 0), int(pgroups or 0),
                             int(pchannels or 0), int(removed or 0), float(kept.rstrip("%") or 0) / 100,
                             float(dev) if dev else None, {}, status.strip(), why)
        elif line.startswith("| ") and not line.startswith("|---") and section == "reasons":
            reason, models = [c.strip() for c in line.strip("|").rsplit(" | ", 1)]
            for entry in models.split(", "):
                name, _, count = entry.rpartition(" (")
                if name in rows:
                    rows[name].pins[reason] = int(count.rstrip(")"))
    return list(rows.values()), total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", help="architectures (default: all)")
    parser.add_argument("--output", default=str(REPO / "docs" / "coverage.md"))
    parser.add_argument("--workdir", help="where exports go (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per architecture")
    parser.add_argument("--jobs", type=int, default=1, help="architectures in parallel")
    parser.add_argument("--update", action="store_true",
                        help="re-run only --models and keep the other rows of the existing --output")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        folder = pathlib.Path(args.workdir)
        folder.mkdir(parents=True, exist_ok=True)
        row = sweep_one(args.one, folder)
        for leftover in folder.glob(f"{args.one}.onnx*"):
            leftover.unlink()
        print("ROW " + json.dumps(asdict(row)), flush=True)
        return 0

    names = args.models or architectures()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sweep_") as scratch:
        workdir = pathlib.Path(args.workdir or scratch)

        def one(name: str) -> Row:
            row = _child(name, workdir, args.timeout)
            print(f"{row.model:24} {row.status:4} {row.seconds:7.1f}s {row.why}", flush=True)
            return row

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            rows = list(pool.map(one, names))
    seconds = time.perf_counter() - start
    if args.update and pathlib.Path(args.output).exists():
        previous, previous_seconds = parse(pathlib.Path(args.output).read_text())
        fresh = {r.model: r for r in rows}
        rows = sorted([*(fresh.pop(r.model, r) for r in previous), *fresh.values()], key=lambda r: r.model)
        seconds += previous_seconds
    text = render(rows, seconds) + _hand_written(pathlib.Path(args.output))
    from onnx_morph.rewrite.surgery.save import write_text

    write_text(text, args.output)
    print(f"wrote {args.output}: {sum(r.status == 'pass' for r in rows)} of {len(rows)} pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
