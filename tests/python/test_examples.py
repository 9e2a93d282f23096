"""The examples run: examples/retrieval_train.py --short trains SparseK and window-only attention
on the CPU (the reference backward) and writes its accuracy curves."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_retrieval_train_short(tmp_path):
    script = os.path.join(ROOT, "examples", "retrieval_train.py")
    run = subprocess.run([sys.executable, script, "--short", "--device", "cpu",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    with open(tmp_path / "retrieval_curves.json") as f:
        result = json.load(f)
    runs = result["runs"]
    assert len(runs) == 2
    for curve in runs.values():
        assert curve["step"][0] == 0 and curve["step"][-1] == result["config"]["steps"]
        assert len(curve["accuracy"]) == len(curve["step"]) >= 3
        assert all(0.0 <= a <= 1.0 for a in curve["accuracy"])
    sparsek, window = (runs[name]["accuracy"][-1] for name in runs)
    # The pair lies outside the window: only the learned selection reaches it.
    assert sparsek >= window + 0.3, (sparsek, window)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "retrieval_curves.png").stat().st_size > 0
