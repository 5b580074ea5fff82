"""`python -m tools.bench_tradeoff --quick`: MorphNet (Gamma and gates), the uniform multiplier and network slimming each train,
prune (or shrink uniformly) to the budget and report a test accuracy, in one run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOL = [sys.executable, "-m", "tools.bench_tradeoff"]  # run from the repository root
METHODS = {"MorphNet (Gamma, FLOPs)": "morphnet", "MorphNet (LogisticSigmoid gates, FLOPs)": "gates",
           "uniform width multiplier": "uniform", "network slimming (L1 on gammas)": "slimming"}


def test_quick_tradeoff_has_a_row_per_method_within_the_budget(tmp_path):
    proc = subprocess.run([*TOOL, "--quick", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]

    lines = (tmp_path / "table.md").read_text().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]
            if line.startswith("|")]
    assert sorted(METHODS[r["method"]] for r in rows) == sorted(METHODS.values())
    for row in rows:
        budget = float(row["budget"].rstrip("%")) / 100
        assert budget == 0.5
        assert 0 < float(row["FLOPs / seed"]) <= budget
        accuracy = float(row["test accuracy (mean ± std)"].split("%")[0]) / 100
        assert 0 <= accuracy <= 1

    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in runs) == sorted(METHODS.values())
    for run in runs:
        assert 0 <= run["accuracy"] <= 1
        assert run["flops"] <= run["budget"] * run["seed_flops"]
        if run["method"] != "uniform":
            assert any(after < before for _, before, after in run["widths"])  # pruning removed channels
    png = tmp_path / "tradeoff.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_prune_after_trains_the_pruned_model_at_the_shrink_rate(tmp_path):
    """--prune-after 1 with --quick: 1 regularized epoch, prune, 1 plain epoch at the shrink rate, 1 fine-tune epoch."""
    proc = subprocess.run([*TOOL, "--quick", "--prune-after", "1", "--methods", "morphnet,uniform",
                           "--out", str(tmp_path), "--work", str(tmp_path / "work")], capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {r["method"]: r for r in map(json.loads, (tmp_path / "runs.jsonl").read_text().splitlines())}
    assert runs["morphnet"]["regularized_epochs"] == 1
    assert 0 <= runs["morphnet"]["pruned_accuracy"] <= 1 and 0 <= runs["morphnet"]["accuracy"] <= 1
    tuned = tmp_path / "work" / "morphnet-seed0-x32" / "finetune-0.50"
    steps = {phase: len((tuned / phase / "train_log.csv").read_text().splitlines()) - 1 for phase in ("phase1", "phase2")}
    assert steps == {"phase1": 1024 // 64, "phase2": 1024 // 64}
    assert "the first 1 regularized, then pruned, the other 1 plain" in (tmp_path / "table.md").read_text()



def test_training_graph_gives_the_regularizers_exact_gradient(tmp_path):
    """onnxruntime-training 1.19.2 differentiates MatMul(matrix, 1-D vector) wrongly; the regularizer
    graph avoids that form, so every BatchNorm scale gets the gradient of the numpy regularizer."""
    import numpy as np
    import torch

    from onnx_morph.examples import export, small_resnet
    from onnx_morph.graph import build_channel_graph, load_model
    from onnx_morph.rewrite.training.artifacts import STRENGTH, make_training_artifacts, native_stderr_silenced
    from onnx_morph.rewrite.training.regularizer import RegularizerOptions
    from onnx_morph.rewrite.surgery.verify import onnxruntime

    torch.manual_seed(0)
    module = small_resnet(width=4)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)  # no ties in the max over a residual group's sources
    path = export(module, (1, 1, 28, 28), tmp_path / "seed.onnx")
    for cost in ("flops", "activations"):
        art = make_training_artifacts(path, tmp_path / cost, regularizer=RegularizerOptions(cost=cost), batch_size=4)
        reg = art.regularizer.build(build_channel_graph(load_model(art.base_model)))
        onnxruntime()
        from onnxruntime.training import api

        with native_stderr_silenced():
            state = api.CheckpointState.load_checkpoint(str(art.checkpoint))
            trainer = api.Module(str(art.training_model), state, str(art.eval_model))
        trainer.train()
        x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
        grads = []
        for strength in (0.0, 1.0):
            feeds = {art.inputs[0]: x, art.labels: np.arange(4), STRENGTH: np.array(strength, np.float32)}
            trainer.lazy_reset_grad()
            trainer(*[feeds[n] for n in trainer.input_names()])
            grads.append({s.param: np.asarray(state.parameters[s.param].grad).copy() for s in reg.sources})
        params = {s.param: np.asarray(state.parameters[s.param].data, dtype=np.float64) for s in reg.sources}
        for source in reg.sources:
            expected = np.zeros(source.channels)
            for c in range(source.channels):
                up, down = ({**params, source.param: params[source.param].copy()} for _ in range(2))
                up[source.param][c] += 1e-4
                down[source.param][c] -= 1e-4
                expected[c] = (reg.evaluate(up)[1] - reg.evaluate(down)[1]) / 2e-4
            got = grads[1][source.param] - grads[0][source.param]
            np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max(),
                                       err_msg=f"{cost}: {source.param}")
