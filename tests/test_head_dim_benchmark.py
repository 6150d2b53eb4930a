"""benchmarks/prototypes/head_dim.py on the CPU (its smoke test): every split of one width is timed with the same
FLOP count, the project's (forward x 3), so its TFLOP/s column compares the splits."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "prototypes" / "head_dim.py"


def test_head_dim_splits_one_width_at_equal_flops(tmp_path, monkeypatch):
    out = tmp_path / "head_dim.json"
    monkeypatch.setattr(sys, "argv", ["head_dim.py", "--device", "cpu", "--kernels", "math", "--batch", "1",
                                      "--tokens", "64", "--width", "128", "--head-dims", "32,64,128", "--iters", "2",
                                      "--json", str(out)])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts benchmarks/ on it
    spec = importlib.util.spec_from_file_location("head_dim", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main()
    rows = json.loads(out.read_text())["rows"]
    assert [(r["head_dim"], r["heads"]) for r in rows] == [(32, 4), (64, 2), (128, 1)]
    assert all(r["ms"] > 0 and abs(r["tflops"] * r["ms"] / 1e3 - r["tflop"]) < 1e-9 for r in rows)
    # QK^T and AV, 2 * 64 queries * 64 keys * 128 (all heads' dims) FLOPs each, forward x 3 for training
    assert {r["tflop"] for r in rows} == {3 * 2 * 2 * 64 * 64 * 128 / 1e12}
