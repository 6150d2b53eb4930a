#!/usr/bin/env python
r"""Compare training checkpoints tensor by tensor: model weights, optimizer state and EMA, exactly.

The check behind "a sharded checkpoint saved on N processes resumes on M with identical weights": resume a
checkpoint with train.max_steps equal to its step (the run re-saves it at once, from the new world size) and
compare the two folders. Works on sharded (FSDP, any world size) and DDP checkpoints, in one plain process.

    python scripts/compare_checkpoints.py run_2gpu/checkpoints/step_000060 run_1gpu/checkpoints/step_000060 \
        --json compare.json

Exit status 0 when every checkpoint equals the first (same names, shapes, dtypes and values), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mardini.training.checkpoint import read_checkpoint_tensors  # noqa: E402


def compare(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict:
    """Counts of equal / different tensors per top-level group (model, optim, ema), the largest absolute
    difference, and the names only one side has."""
    groups: dict[str, dict] = {}
    for name in sorted(reference.keys() & other.keys()):
        a, b = reference[name], other[name]
        g = groups.setdefault(name.split(".", 1)[0], {"tensors": 0, "different": 0, "max_abs_diff": 0.0})
        g["tensors"] += 1
        if a.shape != b.shape or a.dtype != b.dtype:
            g["different"] += 1
            g["max_abs_diff"] = float("inf")
        elif not torch.equal(a, b):
            g["different"] += 1
            diff = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else float("inf")
            g["max_abs_diff"] = max(g["max_abs_diff"], diff)
    return {"groups": groups, "only_in_reference": sorted(reference.keys() - other.keys())[:20],
            "only_in_other": sorted(other.keys() - reference.keys())[:20],
            "identical": not (reference.keys() ^ other.keys()) and all(g["different"] == 0 for g in groups.values())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="checkpoint folders (checkpoints/step_XXXXXX); the first is the reference")
    p.add_argument("--json", default="", help="also write the comparison here")
    args = p.parse_args(argv)
    if len(args.checkpoints) < 2:
        p.error("give at least two checkpoint folders")
    reference = read_checkpoint_tensors(args.checkpoints[0])
    elements = sum(t.numel() for t in reference.values())
    print(f"{args.checkpoints[0]}: {len(reference)} tensors, {elements / 1e6:.1f} M elements (reference)")
    results = []
    for path in args.checkpoints[1:]:
        result = {"checkpoint": path, **compare(reference, read_checkpoint_tensors(path))}
        results.append(result)
        verdict = "IDENTICAL" if result["identical"] else "DIFFERENT"
        detail = ", ".join(f"{k}: {g['different']}/{g['tensors']} differ" for k, g in result["groups"].items())
        print(f"{path}: {verdict} ({detail})")
    if args.json:
        Path(args.json).write_text(json.dumps({"reference": args.checkpoints[0], "results": results}, indent=1))
    return 0 if all(r["identical"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
