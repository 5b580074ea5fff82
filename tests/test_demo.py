"""`onnx-morph demo --quick --data digits`: MorphNet's whole loop on the built-in CNN, through the
installed script, on data every machine has (scikit-learn's digits)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(sys.executable).parent / "onnx-morph"


def test_quick_demo_shrinks_prunes_and_fine_tunes(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([str(SCRIPT), "demo", "--quick", "--data", "digits", "-o", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = {}
    for line in proc.stdout.splitlines():
        match = re.match(r"(trained \(regularized\)|pruned \+ fine-tuned|pruned)\s+([\d.]+)%\s+\S+ \((\d+)%\)\s+"
                         r"\S+ \((\d+)%\)\s+([\d.]+) ms", line)
        if match:
            rows[match.group(1)] = [float(v) for v in match.groups()[1:]]
    assert set(rows) == {"trained (regularized)", "pruned", "pruned + fine-tuned"}, proc.stdout
    trained, pruned, tuned = rows["trained (regularized)"], rows["pruned"], rows["pruned + fine-tuned"]
    assert "data: digits resized to 28x28" in proc.stdout and "target: 50% of the cost" in proc.stdout
    assert trained[1] == 100 and pruned[1] <= 50 and pruned[2] < 100  # at the target: at least 30% removed
    assert pruned[1] == tuned[1]
    assert abs(pruned[0] - trained[0]) < 5.0  # removing dead and weakest channels keeps most of what it computes
    assert tuned[0] > 40
    assert "widths:" in proc.stdout and "->" in proc.stdout
    png = out / "morphnet.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    for name in ("seed.onnx", "trained.onnx", "pruned.onnx", "finetuned.onnx", "shrink/train_log.csv",
                 "shrink/masks.json"):
        assert (out / name).exists(), name
