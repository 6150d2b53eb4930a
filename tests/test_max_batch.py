"""benchmarks/max_batch.py under torchrun (2 CPU processes, gloo, FSDP): when one rank runs out of memory, the launch
ends at once instead of leaving the other rank in a collective until the process-group timeout (on 2 H200s that
cost 180 s), and the next launch of the same command goes on from the JSON to the same answer. Also the rates
benchmarks/multi_gpu.py reports from a run's metrics, and the FLOPs a step counts."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers_training import free_port

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from max_batch import next_size  # noqa: E402

# Rank 1 alone "runs out of memory" above LIMIT clips: the asymmetric failure seen on the GPUs.
WRAPPER = """
import sys
import torch
sys.path.insert(0, {benchmarks!r})
import max_batch
from mardini.training.trainer import Trainer

real = Trainer.train_step

def train_step(self, batches):
    batch = next(batches)
    if self.layout.rank == 1 and batch["video"].shape[0] > {limit}:
        raise torch.OutOfMemoryError("simulated")
    return real(self, iter([batch]))

Trainer.train_step = train_step
max_batch.main()
"""

OVERRIDES = ["model=tiny", "data=synthetic", "train.cpu=true", "train.parallel=fsdp", "data.num_workers=0",
             "train.trackers=[]", "train.progress=false", "train.max_steps=4"]


def launch(script: Path, out: Path, timeout_s: int) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script), "--ac", "0", "--sizes", "1,2", "--max-size", "8", "--timeout-s", str(timeout_s),
           "--json", str(out), "--", *OVERRIDES]
    began = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=4 * timeout_s)
    return done, time.time() - began


@pytest.mark.slow
def test_one_rank_out_of_memory_ends_the_launch_and_the_next_goes_on(tmp_path):
    script, out = tmp_path / "wrapped_max_batch.py", tmp_path / "max_batch.json"
    script.write_text(WRAPPER.format(benchmarks=str(BENCHMARKS), limit=2))
    timeout_s = 120  # a rank left waiting would hold the launch this long

    first, seconds = launch(script, out, timeout_s)
    assert first.returncode != 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert seconds < timeout_s / 2, f"the launch waited {seconds:.0f} s: the other rank was not stopped"
    assert "rank 1 ran out of memory at micro-batch 4" in first.stdout + first.stderr
    tries = json.loads(out.read_text())["results"][0]["tries"]
    assert [(t["batch"], t["fits"]) for t in tries] == [(1, True), (2, True), (4, False)]
    assert tries[-1]["rank"] == 1

    second, _ = launch(script, out, timeout_s)  # bisects: 3 fails too
    assert second.returncode != 0
    third, _ = launch(script, out, timeout_s)  # nothing left to try: answers without a step
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-2000:]
    result = json.loads(out.read_text())["results"][0]
    assert [(t["batch"], t["fits"]) for t in result["tries"]] == [(1, True), (2, True), (4, False), (3, False)]
    assert (result["largest_fitting"], result["smallest_failing"], result["done"]) == (2, 3, True)


def fit(batch, gib):
    return {"batch": batch, "fits": True, "peak_mem_gib": gib}


def test_next_size_predicts_from_memory_then_bisects_to_an_eighth():
    sizes = [4, 6]
    assert next_size([], sizes, 140.0, 0.97, 10, 1024)[0] == 4
    assert next_size([fit(4, 80.0)], sizes, 140.0, 0.97, 10, 1024)[0] == 6
    # 20 GiB per clip from 4 -> 6 clips, 0 fixed: 0.97 x 140 GiB holds 6.79 -> 6, already fitted: 7
    size, model = next_size([fit(4, 80.0), fit(6, 120.0)], sizes, 140.0, 0.97, 10, 1024)
    assert size == 7 and model["gib_per_sample"] == 20.0 and model["predicted_max"] == 6
    assert next_size([fit(4, 80.0), fit(6, 120.0), {"batch": 7, "fits": False}], sizes, 140.0, 0.97, 10,
                     1024)[0] is None  # a gap of 1: done
    # with activation checkpointing: 54 fits, 66 fails -> 60; then 60 fits, 66 fails: 6 <= 60 / 8: done
    big = [fit(48, 101.6), fit(54, 112.8), {"batch": 66, "fits": False}]
    assert next_size(big, [48, 54], 140.0, 0.97, 10, 1024)[0] == 60
    assert next_size([*big, fit(60, 125.0)], [48, 54], 140.0, 0.97, 10, 1024)[0] is None
    # no memory figures (CPU): doubling up to --max-size; listed sizes above a known failure are skipped
    assert next_size([fit(1, 0.0), fit(2, 0.0)], [1, 2], None, 0.97, 10, 8)[0] == 4
    assert next_size([fit(8, 0.0)], [8], None, 0.97, 10, 8)[0] is None
    assert next_size([{"batch": 2, "fits": False}], [2, 4], None, 0.97, 10, 8)[0] == 1
    # at most max_extra tries beyond the listed sizes
    assert next_size([fit(1, 0.0), fit(2, 0.0), fit(4, 0.0)], [1, 2], None, 0.97, 1, 64)[0] is None


def test_median_rate_is_the_steady_state_and_the_mean_keeps_the_stalls():
    """benchmarks/multi_gpu.py's two rates over a run's second half: a recompilation stall (16 s) and an evaluation
    (9 s) among 1-s steps leave the median step at 1 s and pull the mean down; slow steps are those over 3x the
    median."""
    from train_throughput import median_rate, steady_rate, step_seconds

    durations = [90.0] + [1.0] * 23 + [9.0] + [1.0] * 5 + [16.0] + [1.0] * 9  # steps 1-40 (the first: compilation)
    metrics, now = [], 0.0
    for step, seconds in enumerate(durations, start=1):
        now += seconds
        metrics.append({"step": step, "time": now})
    seconds = step_seconds(metrics)  # steps 21-40: 19 intervals
    assert len(seconds) == 19 and sorted(seconds)[-3:] == [1.0, 9.0, 16.0]
    assert median_rate(metrics) == 1.0
    assert abs(steady_rate(metrics) - 19 / (17 + 9 + 16)) < 1e-12
    assert sum(s > 3 / median_rate(metrics) for s in seconds) == 2
    sparse = [m for m in metrics if m["step"] % 5 == 0]  # logged every 5 steps: per-step seconds of each interval
    assert step_seconds(sparse) == [1.0, 4.0, 1.0]  # steps 26-30, 31-35 (the stall spread over 5), 36-40


def test_benchmark_flop_count_adds_a_generator_pass_per_noise_draw():
    """The throughput benchmarks' MFU divides by the step's FLOPs: with train.noise_draws=2 the generator runs twice
    per clip and the planner (and the motion features) once, so the step's count grows by one generator pass."""
    from train_throughput import model_flops_per_step

    from mardini.cli import compose_config
    from mardini.models.config import as_model_config
    from mardini.models.flops import generator_flops

    overrides = ["experiment=small_synthetic"]
    one, shape = model_flops_per_step(overrides)
    two, _ = model_flops_per_step(overrides + ["train.noise_draws=2"])
    cfg = as_model_config(compose_config(overrides).model)
    h, w = shape["latent_hw"]
    lowres = (h // cfg.lowres_factor, w // cfg.lowres_factor)
    one_pass = generator_flops(cfg, shape["frames"], (h, w), lowres, round(shape["mean_generated_frames"]),
                               shape["batch_per_process"])
    assert one_pass > 0 and two - one == 3 * one_pass
