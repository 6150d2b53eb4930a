"""The README's main job: `mardini-train` with the default config, as a new user runs it."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch

from mardini.evaluation.learning import held_out_clips, interpolation_report
from mardini.inference import MarDiniPipeline

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_default_mardini_train_finishes_learns_and_writes_outputs(tmp_path):
    exe = shutil.which("mardini-train")
    command = [exe] if exe else [sys.executable, "-m", "mardini.train"]
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path))
    start = time.time()
    result = subprocess.run(command + [f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    elapsed = time.time() - start
    assert result.returncode == 0, result.stderr[-3000:]
    # its last line says where the export is and what to do with it, as the user would type it
    assert result.stdout.strip().splitlines()[-1].endswith(
        "finished: the export is run/export; score it on held-out clips with `python benchmarks/demo_quality.py "
        "run/export`, generate with `mardini-sample --model run/export --task ...`"), result.stdout[-1000:]
    # the README: "under three minutes on 2 cores" (141-173 s); twice that is a regression, not a slow machine
    # (the subprocess's own timeout, 600 s, would end it before any bound of 600 s could fail)
    assert elapsed < 360, f"the default job took {elapsed:.0f} s on this machine"
    run = tmp_path / "run"

    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 320
    first, last = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    assert last < 0.7 * first, (first, last)

    for task in ("interpolation", "i2v"):
        frames = iio.imread(run / "samples" / f"step_000320_{task}.mp4", plugin="pyav")
        assert frames.shape[0] == 9
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000200", "step_000320"]

    pipe = MarDiniPipeline.from_pretrained(run / "export")
    image = torch.rand(3, 32, 32) * 2 - 1
    video = pipe.interpolate(image, -image, num_steps=2)
    assert video.shape == (9, 3, 32, 32) and torch.equal(video[0], image) and torch.equal(video[-1], -image)
    assert (run / "wandb").is_dir() and any((run / "mardini").iterdir())  # offline wandb run, tensorboard events

    # It learned the task, on validation clips it never saw (the learning benchmark, mardini.evaluation.learning).
    # Before issue 11's fixes this model's best guess was 7 dB below a blend of the given frames; with the paper
    # curriculum and no motion input it stayed 0.3 / 0.1 dB (best guess) and 0.8 / 0.7 dB (samples) below it. With the
    # motion-compensated input, training on the judged task and the planner's own loss (the defaults since): 25.0 dB
    # sampled, 25.6 posterior mean, blend 22.8 (32 clips, 25 steps; BENCHMARKS.md, "A shorter default job").
    videos = held_out_clips(pipe.config["data"], 16)
    report = interpolation_report(pipe, videos, num_steps=10)
    blend, best_guess = report["blend_psnr"], report["posterior_mean_psnr"]
    assert report["psnr"] > blend + 1.0, report
    assert best_guess > blend + 1.0, report
    assert report["posterior_mean_psnr_null_plan"] < best_guess - 2, report  # it reads the plan
