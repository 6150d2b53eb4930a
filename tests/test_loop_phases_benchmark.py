"""benchmarks/prototypes/loop_overhead.py on the CPU (its smoke test): the real trainer's step split into host
phases, each phase counted once (none negative, nested timers not added twice), summing to the step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_loop_phases_cover_the_step_once(tmp_path):
    out = tmp_path / "phases.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "prototypes" / "loop_overhead.py"),
                             "data.num_workers=0", "--steps", "8", "--json", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    r = json.loads(out.read_text())
    phases = r["host_ms_per_step"]
    for name in ("forward", "backward", "prepare next batch", "optimizer", "ema", "grad norm (launch)"):
        assert phases[name] > 0, name
    assert min(phases.values()) >= 0, phases  # a phase counted twice would make "train_step, other" negative
    top_level = sum(phases.values())  # "grad norm (read)" is the norm's launch-and-read timer less its launch
    assert abs(top_level - r["ms_per_step"]) < 0.1, (top_level, r["ms_per_step"])
    assert r["steps_per_s"] > 0 and r["device"] == "cpu"
