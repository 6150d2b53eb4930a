"""Tests for mardini.training: exact resume, crash safety, DDP equivalence, config validation, non-finite losses,
fine-tuning, run outputs, learning signal, trackers, the LR / EMA formulas and the deterministic data stream.

Every run uses the tiny model on 9-frame 32x32 synthetic clips (see helpers_training.tiny_config) for a handful of
steps, single-threaded so that runs in this process and in subprocesses are bit-for-bit comparable. Tests marked
slow train for more than a few seconds; the distributed one starts two gloo processes with torchrun.
"""

from __future__ import annotations

import json
import math
import os
import re
import logging
import shutil
import signal
import time
from dataclasses import is_dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers_training import single_thread, torchrun  # noqa: F401 (single_thread: autouse fixture)
from helpers_training import (NUM_FRAMES, SCRIPT_PRELUDE, assert_optimizer_equal, assert_state_equal, checkpoint,
                              checkpoint_names, cfg_to_yaml, ema_weights, export_weights, max_abs_diff,
                              model_weights, optimizer_state, paper_curriculum, read_metrics, run_script, tiny_config,
                              trainer_state, two_stage_curriculum, unwrapped_state)
from mardini.diffusion import Diffusion, DiffusionConfig
from mardini.export import load_model
from mardini.masking import CurriculumConfig, CurriculumStage, MaskSampler, MaskStrategyConfig, interpolation_only
from mardini.training import checkpoint as ckpt
from mardini.training import trainer as trainer_module
from mardini.training.config import validate_config
from mardini.training.data import EpochPermutation, StreamBatchSampler, StreamLayout, draw_randomness
from mardini.training.ema import EMA
from mardini.training.optim import build_optimizer, build_scheduler, lr_factor
from mardini.training.progress import ProgressLog, format_duration
from mardini.training.trainer import NonFiniteLossError, Trainer, TrainingOutOfMemoryError

N = 3  # resume tests: stop after N steps, train to 2N; the curriculum switches stage at SWITCH in (N, 2N]
SWITCH = 4


def resume_config(out, **train):
    """The run the resume / crash tests reproduce: 2N steps, grad_accum 2, checkpoints every N steps, a warm-up +
    cosine LR and a curriculum whose stage changes between N and 2N."""
    kw = dict(max_steps=2 * N, grad_accum=2, batch_size=2, warmup_steps=2, checkpoint_every=N, keep_last=2)
    kw.update(train)
    return tiny_config(out, curriculum=two_stage_curriculum(SWITCH, 2 * N), **kw)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """2N steps without interruption; also the source of an export and checkpoints for fine-tuning tests."""
    out = tmp_path_factory.mktemp("straight")
    Trainer(resume_config(out)).fit()
    return out


def stop_at(trainer: Trainer, step: int) -> None:
    """Deliver a real SIGTERM (pre-emption) right after `step` is logged; fit() then checkpoints and returns."""
    original = trainer._append_metrics

    def append(record):
        original(record)
        if record["step"] == step:
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), "fit() installed no handler"
            os.kill(os.getpid(), signal.SIGTERM)

    trainer._append_metrics = append


def assert_same_run(reference: Path, other: Path, steps=range(1, 2 * N + 1)) -> None:
    """Final model, EMA export, optimizer moments and logged losses of `other` equal those of `reference`."""
    final_ref, final = checkpoint(reference, 2 * N), checkpoint(other, 2 * N)
    assert_state_equal(model_weights(final_ref), model_weights(final), "final model weights")
    assert_state_equal(ema_weights(final_ref), ema_weights(final), "final EMA weights")
    assert_state_equal(export_weights(reference), export_weights(other), "exported EMA weights")
    assert_optimizer_equal(optimizer_state(final_ref), optimizer_state(final))
    assert trainer_state(final_ref) == trainer_state(final)
    ref_metrics = {m["step"]: m for m in read_metrics(reference)}
    metrics = read_metrics(other)
    assert [m["step"] for m in metrics] == list(steps), "metrics.jsonl must hold each step exactly once"
    for m in metrics:
        assert m["loss"] == ref_metrics[m["step"]]["loss"], f"loss differs at step {m['step']}"
        assert m["lr"] == ref_metrics[m["step"]]["lr"], f"lr differs at step {m['step']}"


# ================================================================================================ 1. resume
@pytest.mark.slow
def test_exact_resume_auto_and_explicit_path(straight_run, tmp_path):
    sampler = MaskSampler(two_stage_curriculum(SWITCH, 2 * N), 2 * N)
    assert sampler.stage_index(N - 1) == 0 and sampler.stage_index(2 * N - 1) == 1  # the resumed half switches

    stopped = tmp_path / "stopped"
    trainer = Trainer(resume_config(stopped))
    stop_at(trainer, N)
    assert trainer.fit() == trainer.checkpoint_dir  # stopped by SIGTERM, not finished
    assert checkpoint_names(stopped) == [f"step_{N:06d}"]
    assert not (stopped / "export").exists()
    assert [m["step"] for m in read_metrics(stopped)] == list(range(1, N + 1))
    assert_state_equal(model_weights(checkpoint(straight_run, N)), model_weights(checkpoint(stopped, N)),
                       "step-N model weights")

    # resume=<explicit path> into a fresh run folder: its log starts after the checkpoint
    explicit = tmp_path / "explicit"
    resumed = Trainer(resume_config(explicit, resume=str(checkpoint(stopped, N))))
    assert resumed.step == N and resumed.ema.num_updates == N
    resumed.fit()
    assert_same_run(straight_run, explicit, steps=range(N + 1, 2 * N + 1))

    # resume=auto in the stopped run's own folder
    resumed = Trainer(resume_config(stopped, resume="auto"))
    assert resumed.step == N
    resumed.fit()
    assert_same_run(straight_run, stopped)


def out_of_memory_at(trainer: Trainer, step: int, where: str) -> None:
    """Raise torch.OutOfMemoryError in training step `step` (1-based): in its second micro-step's forward
    (where="forward") or in the optimizer's update (where="update"), as a too-large batch does on a GPU."""
    def fail():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    if where == "update":
        real_step = trainer.optimizer.step
        trainer.optimizer.step = lambda *a, **kw: fail() if trainer.step == step - 1 else real_step(*a, **kw)
        return
    real, calls = trainer._micro_step, []

    def micro_step(inputs, at):
        calls.append(at)
        return fail() if calls.count(step - 1) == 2 else real(inputs, at)
    trainer._micro_step = micro_step


@pytest.mark.slow
def test_out_of_memory_keeps_the_steps_since_the_last_checkpoint_and_resumes_at_a_smaller_batch(
        straight_run, tmp_path):
    """Out of memory in a step's forward (one process) leaves the weights, optimizer, EMA and schedule at the last
    completed step: they are checkpointed before the run stops, so none of the steps since the periodic checkpoint
    is lost, and resumed with half the micro-batch and twice the accumulation (the global batch, hence the samples,
    masks and noise, unchanged) the run ends where the uninterrupted one does. Out of memory inside the update
    leaves a state that is neither step: then only the periodic checkpoint stands."""
    out = tmp_path / "forward"
    trainer = Trainer(resume_config(out))  # 2N steps, batch 2 x 2 micro-steps, checkpoints every N
    out_of_memory_at(trainer, N + 2, "forward")
    with pytest.raises(TrainingOutOfMemoryError) as err:
        trainer.fit()
    assert f"in training step {N + 2}" in str(err.value), err.value
    assert f"the last checkpoint, step_{N + 1:06d} (the last completed step, saved now), continues with " \
        "train.resume=auto" in str(err.value), err.value
    assert checkpoint_names(out) == [f"step_{N:06d}", f"step_{N + 1:06d}"]
    saved = model_weights(checkpoint(out, N + 1))
    resumed = Trainer(resume_config(out, resume="auto", batch_size=1, grad_accum=4))
    assert resumed.step == N + 1
    resumed.fit()
    final, reference = model_weights(checkpoint(out, 2 * N)), model_weights(checkpoint(straight_run, 2 * N))
    assert max_abs_diff(final, reference) < 1e-6, max_abs_diff(final, reference)  # float summation order only
    assert max_abs_diff(final, saved) > 1e-4  # and it did train on (by 8e-4)
    losses = {m["step"]: m["loss"] for m in read_metrics(straight_run)}
    assert all(abs(m["loss"] - losses[m["step"]]) < 1e-5 for m in read_metrics(out))

    out = tmp_path / "update"
    trainer = Trainer(resume_config(out))
    out_of_memory_at(trainer, N + 2, "update")
    with pytest.raises(TrainingOutOfMemoryError) as err:
        trainer.fit()
    assert f"the last checkpoint, step_{N:06d}, continues with train.resume=auto" in str(err.value), err.value
    assert checkpoint_names(out) == [f"step_{N:06d}"]


class StuckItems(torch.utils.data.Dataset):
    """The wrapped dataset, except that reading one of `items` never returns ("hang": a decoder or a network file
    system stuck on a file) or kills the worker reading it ("die": the host's out-of-memory killer)."""

    def __init__(self, inner, items: set[int], how: str):
        self.inner, self.items, self.how = inner, items, how

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> dict:
        if index in self.items:
            if self.how == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)
        return self.inner[index]


def stuck_at(trainer: Trainer, step: int, how: str) -> list[int]:
    """Make the dataset items of training step `step`'s first micro-batch (1-based) hang or kill their reader.
    Returns those items in the batch's order."""
    permutation = EpochPermutation(trainer.dataset, trainer.cfg.seed)
    items = [permutation.index_of(p) for p in trainer.layout.positions(step - 1, 0)]
    trainer.dataset = StuckItems(trainer.dataset, set(items), how)
    return items


def worker_config(out, timeout: float = 4.0, **train):
    """resume_config's run reading its data in one worker, waiting at most `timeout` s for a batch."""
    cfg = resume_config(out, **train)
    cfg.data.num_workers, cfg.data.timeout = 1, timeout
    return cfg


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_stuck_data_worker_stops_the_run_naming_its_samples_and_keeps_every_completed_step(straight_run, tmp_path):
    """A worker stuck on one sample held the run forever (SIGTERM too). Now the wait for one batch ends after
    data.timeout with a one-line error naming the batch's samples, after a checkpoint of the last completed step
    (the wait happens before the step's update); resumed, the run ends where the uninterrupted one does, and no
    worker is left behind."""
    import multiprocessing

    out = tmp_path / "stuck"
    trainer = Trainer(worker_config(out))  # 2N steps, 2 micro-steps, checkpoints every N
    items = stuck_at(trainer, N + 3, "hang")  # read ahead during step N + 2: steps 1..N+1 completed
    start = time.monotonic()
    with pytest.raises(trainer_module.DataLoaderError) as err:
        trainer.fit()
    message = str(err.value)
    assert message.startswith(f"no batch from the DataLoader workers in data.timeout=4 s for training step {N + 3} "
                              f"(the dataset's items {items[0]}, {items[1]}): check or remove"), message
    assert f"the last checkpoint, step_{N + 1:06d} (the last completed step, saved now), continues with " \
        "train.resume=auto" in message, message
    assert "\n" not in message
    assert time.monotonic() - start < 120
    assert not multiprocessing.active_children(), "the stuck worker outlived the run"
    assert checkpoint_names(out) == [f"step_{N:06d}", f"step_{N + 1:06d}"]
    Trainer(worker_config(out, resume="auto")).fit()
    assert_same_run(straight_run, out)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_stop_signal_while_a_data_worker_is_stuck_stops_at_once_with_a_checkpoint(straight_run, tmp_path):
    """SIGTERM arriving while the run waits for a stuck worker (no data.timeout) is not held until the batch comes:
    the run checkpoints its last completed step and stops as pre-empted, and resumes exactly."""
    import threading

    out = tmp_path / "stopped"
    trainer = Trainer(worker_config(out, timeout=0))
    stuck_at(trainer, N + 3, "hang")

    def terminate_once_waiting():
        metrics = out / "metrics.jsonl"
        while not metrics.exists() or metrics.read_text().count("\n") < N + 1:
            time.sleep(0.05)
        time.sleep(1.0)  # step N + 2 then waits for step N + 3's batch, which never comes
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_once_waiting, daemon=True).start()
    start = time.monotonic()
    assert trainer.fit() == trainer.checkpoint_dir
    assert trainer.preempted and time.monotonic() - start < 120
    assert checkpoint_names(out) == [f"step_{N:06d}", f"step_{N + 1:06d}"]
    Trainer(worker_config(out, timeout=0, resume="auto")).fit()
    assert_same_run(straight_run, out)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_dead_data_worker_ends_the_run_in_one_line_and_it_resumes_exactly(straight_run, tmp_path):
    """A worker killed (SIGKILL, as the out-of-memory killer does) is reported by torch wherever the main process
    is: one line saying what to change and where the run resumes, which then ends where the uninterrupted run does."""
    out = tmp_path / "died"
    trainer = Trainer(worker_config(out))
    stuck_at(trainer, N + 3, "die")
    with pytest.raises(trainer_module.DataLoaderError) as err:
        trainer.fit()
    message = str(err.value)
    assert re.match(r"DataLoader worker \(pid \d+\) is killed by signal: Killed: if the host ran out of memory", message)
    assert "lower data.num_workers or data.prefetch_factor" in message and "train.resume=auto" in message, message
    Trainer(worker_config(out, resume="auto")).fit()
    assert_same_run(straight_run, out)


@pytest.mark.slow
def test_exact_resume_with_muon(tmp_path):
    """Muon's momentum buffers and AdamW's moments of the other groups travel through the checkpoint."""
    straight = tmp_path / "straight"
    Trainer(resume_config(straight, optimizer="muon")).fit()
    state = optimizer_state(checkpoint(straight, 2 * N))["state"]
    assert {"momentum_buffer"} in [set(s) for s in state.values()], "no parameter took Muon steps"
    stopped = tmp_path / "stopped"
    trainer = Trainer(resume_config(stopped, optimizer="muon"))
    stop_at(trainer, N)
    trainer.fit()
    Trainer(resume_config(stopped, optimizer="muon", resume="auto")).fit()
    assert_same_run(straight, stopped)
    with pytest.raises(ValueError, match="train.optimizer=adamw but checkpoint .* train.optimizer=muon"):
        Trainer(resume_config(tmp_path / "other", resume=str(checkpoint(straight, N))))


@pytest.mark.parametrize("batch_size, grad_accum", [(1, 2), (4, 2)], ids=["smaller", "larger"])
def test_resume_with_another_global_batch_goes_on_from_the_samples_seen(straight_run, tmp_path, monkeypatch,
                                                                       batch_size, grad_accum):
    """The stream position of a step was step x global batch, so a run resumed with half the global batch replayed
    samples it had trained on (and with twice, skipped as many). It now goes on from the samples seen: positions
    contiguous from there, none repeated or skipped, and the count saved for the next resume."""
    seen_before = trainer_state(checkpoint(straight_run, N))["samples_seen"]
    assert seen_before == N * 4  # batch 2 x grad_accum 2
    positions = []
    original = trainer_module.draw_randomness

    def record(batch_positions, step, *args, **kwargs):
        positions.append((step, list(batch_positions)))
        return original(batch_positions, step, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "draw_randomness", record)
    out = tmp_path / "run"
    trainer = Trainer(resume_config(out, resume=str(checkpoint(straight_run, N)), batch_size=batch_size,
                                    grad_accum=grad_accum))
    trainer.fit()
    global_batch = batch_size * grad_accum
    assert [step for step, _ in positions] == [s for s in range(N, 2 * N) for _ in range(grad_accum)]
    flat = [p for _, batch in positions for p in batch]
    assert flat == list(range(seen_before, seen_before + N * global_batch)), flat
    assert trainer_state(checkpoint(out, 2 * N))["samples_seen"] == seen_before + N * global_batch


def test_inputs_prepared_ahead_are_those_of_their_own_step(tmp_path, monkeypatch):
    """train_step prepares the next micro-batch while the GPU runs a backward; every micro-step must still get the
    inputs of its own (step, micro-batch), as if each were read and prepared in order when needed (grad_accum 2 and
    a curriculum that changes between steps, so a micro-batch prepared with the wrong step shows)."""
    seen = []
    original = Trainer._micro_step

    def micro_step(self, inputs, step):
        z_hi, _, rnd = inputs
        seen.append((step, z_hi.clone(), rnd.mask.clone(), rnd.t.clone(), rnd.noise.clone()))
        return original(self, inputs, step)

    monkeypatch.setattr(Trainer, "_micro_step", micro_step)
    Trainer(resume_config(tmp_path / "run")).fit()
    reference = Trainer(resume_config(tmp_path / "reference"))
    batches = iter(reference._dataloader())
    expected = [(step, reference._prepare(next(batches), step)) for step in range(2 * N) for _ in range(2)]
    reference._release_lock()
    assert [s for s, *_ in seen] == [s for s, _ in expected]
    for (_, z_hi, mask, t, noise), (_, (z_hi_ref, _, rnd)) in zip(seen, expected):
        assert torch.equal(z_hi, z_hi_ref) and torch.equal(mask, rnd.mask)
        assert torch.equal(t, rnd.t) and torch.equal(noise, rnd.noise)


def test_noise_draws_reach_the_model_through_the_trainer(tmp_path, monkeypatch):
    """train.noise_draws = 2: every micro-step's inputs carry two noise levels and noises per clip (one mask per
    clip), the first of each those a one-draw run uses at the same step, and the run trains with finite losses."""
    seen = {}
    original = Trainer._micro_step

    def micro_step(self, inputs, step):
        seen.setdefault(self.cfg.train.noise_draws, []).append(inputs[2])
        return original(self, inputs, step)

    monkeypatch.setattr(Trainer, "_micro_step", micro_step)
    for draws in (1, 2):
        Trainer(tiny_config(tmp_path / f"draws{draws}", max_steps=2, noise_draws=draws, log_every=1)).fit()
    assert len(seen[1]) == len(seen[2]) == 2
    for one, two in zip(seen[1], seen[2]):
        assert two.t.shape == (4,) and two.noise.shape[0] == 4 and torch.equal(two.mask, one.mask)
        assert torch.equal(two.t[::2], one.t) and torch.equal(two.noise[::2], one.noise)
    records = read_metrics(tmp_path / "draws2")
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)


def test_learned_motion_estimate_logs_its_loss_beside_the_diffusion_loss(tmp_path):
    """With a learned estimate the total loss is diffusion + weight x motion; both parts reach metrics.jsonl (per
    step, grad_accum averaged), so a run shows whether the matcher or the generator is learning."""
    cfg = tiny_config(tmp_path / "run", max_steps=2, grad_accum=2)
    cfg.model.motion = OmegaConf.merge(cfg.model.motion, dict(estimate="learned", temperature=0.3, residual=True,
                                                              loss_weight=0.5))
    Trainer(cfg).fit()
    records = read_metrics(tmp_path / "run")
    assert len(records) == 2
    for r in records:
        assert r["motion_loss"] > 0 and r["diffusion_loss"] > 0
        assert math.isclose(r["loss"], r["diffusion_loss"] + 0.5 * r["motion_loss"], rel_tol=1e-5)
    plain = tiny_config(tmp_path / "plain", max_steps=1)
    Trainer(plain).fit()
    assert "motion_loss" not in read_metrics(tmp_path / "plain")[0]


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", resume="auto"))
    assert trainer.step == 0 and trainer.ema.num_updates == 0


def test_resume_from_incomplete_checkpoint_fails(tmp_path):
    broken = tmp_path / "step_000001"
    broken.mkdir()
    # named as incomplete, not as a checkpoint of another config (it holds none to compare)
    with pytest.raises(ValueError, match="cannot be resumed: it is not a complete checkpoint .no COMPLETE"):
        Trainer(tiny_config(tmp_path / "run", resume=str(broken)))


def test_resume_auto_skips_a_damaged_newest_checkpoint_and_a_named_one_is_refused(tmp_path, caplog):
    run = tmp_path / "run"
    Trainer(tiny_config(run, max_steps=2, checkpoint_every=1, keep_last=3)).fit()
    newest = checkpoint(run, 2) / ckpt.MODEL_FILE
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a copy cut short; COMPLETE is there
    (checkpoint(run, 1) / "random_states_0.pkl").unlink()  # resumable, and said (Accelerate only logs it at INFO)

    with caplog.at_level(logging.WARNING):
        trainer = Trainer(tiny_config(run, max_steps=2, resume="auto"))
    assert trainer.step == 1 and "skipped step_000002 (model.safetensors cannot be read" in caplog.text
    assert "holds the RNG state of 0 of these 1 ranks" in caplog.text
    assert_state_equal(model_weights(checkpoint(run, 1)), unwrapped_state(trainer), "weights of step 1")
    with pytest.raises(ValueError, match=r"step_000002 cannot be resumed: model.safetensors cannot be read"):
        Trainer(tiny_config(tmp_path / "other", resume=str(checkpoint(run, 2))))
    with pytest.raises(ValueError, match=r"checkpoints cannot be resumed: .*; it is a folder of checkpoints: pass one "
                                         r"of them \(the newest readable: train.resume=.*step_000001\)"):
        Trainer(tiny_config(tmp_path / "other", resume=str(run / "checkpoints")))
    with pytest.raises(ValueError, match=r"; it is an export \(weights, no training state\): fine-tune from it with "
                                         r"train.init_from=.*export"):
        Trainer(tiny_config(tmp_path / "other", resume=str(run / "export")))

    (checkpoint(run, 1) / "optimizer.bin").unlink()
    with pytest.raises(ValueError, match=r"no checkpoint in .* can be read: step_000002 .*; step_000001 "
                                         r"\(optimizer.bin is missing\)"):
        Trainer(tiny_config(run, max_steps=2, resume="auto"))


# ========================================================================================== 2. crash safety
CRASH_SCRIPT = SCRIPT_PRELUDE + """
import os, signal
import mardini.training.checkpoint as ckpt
from mardini.training.trainer import Trainer

real_save_file = ckpt.save_file

def save_file_then_die(tensors, filename, *args, **kwargs):
    if ".tmp-step_{step:06d}" in str(filename):
        with open(filename, "wb") as f:  # half-written file, then the process dies
            f.write(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save_file(tensors, filename, *args, **kwargs)

ckpt.save_file = save_file_then_die
Trainer(load_cfg(sys.argv[1])).fit()
raise SystemExit("not killed")
"""


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_keeps_previous_checkpoint(straight_run, tmp_path):
    run = tmp_path / "run"
    (tmp_path / "cfg.yaml").write_text(cfg_to_yaml(resume_config(run)))
    proc = run_script(tmp_path, "crash.py", CRASH_SCRIPT.replace("{step:06d}", f"{2 * N:06d}"),
                      [tmp_path / "cfg.yaml"], check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]

    entries = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert entries == [f".tmp-step_{2 * N:06d}", f"step_{N:06d}"]
    assert not (run / "checkpoints" / f".tmp-step_{2 * N:06d}" / ckpt.COMPLETE).exists()
    assert ckpt.latest_checkpoint(run / "checkpoints") == checkpoint(run, N)
    assert trainer_state(checkpoint(run, N))["step"] == N
    assert_state_equal(model_weights(checkpoint(straight_run, N)), model_weights(checkpoint(run, N)),
                       "step-N checkpoint of the killed run")
    assert [m["step"] for m in read_metrics(run)] == list(range(1, 2 * N + 1))  # logged before the kill

    trainer = Trainer(resume_config(run, resume="auto"))
    assert trainer.step == N
    trainer.fit()
    assert_same_run(straight_run, run)
    assert not list((run / "checkpoints").glob(".tmp-*")), "the leftover of the killed write must be removed"


# =================================================================================================== 3. DDP
DDP_SCRIPT = SCRIPT_PRELUDE + """
from mardini.training.trainer import Trainer
Trainer(load_cfg(sys.argv[1])).fit()
"""



@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_two_cpu_processes_match_single_process(tmp_path):
    """2 processes x 2 accumulated micro-batches of b clips train as one process on one batch of 4b: the gradients
    are averaged over ranks and micro-batches (the logged gradient norm shows a wrong scale, which gradient clipping
    and Adam would hide from the weights)."""
    steps, b = 4, 2
    common = dict(max_steps=steps, warmup_steps=1, checkpoint_every=steps, curriculum=interpolation_only())
    ddp = tmp_path / "ddp"
    (tmp_path / "ddp.yaml").write_text(cfg_to_yaml(tiny_config(ddp, batch_size=b, grad_accum=2, **common)))
    launcher = torchrun()
    run_script(tmp_path, "ddp_run.py", DDP_SCRIPT, [tmp_path / "ddp.yaml"], launcher=launcher, timeout=300)

    single = tmp_path / "single"
    Trainer(tiny_config(single, batch_size=4 * b, grad_accum=1, **common)).fit()

    state_ddp, state_single = trainer_state(checkpoint(ddp, steps)), trainer_state(checkpoint(single, steps))
    assert state_ddp["world_size"] == 2 and state_single["world_size"] == 1
    assert state_ddp["samples_seen"] == state_single["samples_seen"] == steps * 2 * b * 2
    diff = max_abs_diff(model_weights(checkpoint(ddp, steps)), model_weights(checkpoint(single, steps)))
    assert diff < 1e-5, f"DDP and single-process weights differ by {diff}"
    assert max_abs_diff(export_weights(ddp), export_weights(single)) < 1e-5

    m_ddp, m_single = read_metrics(ddp), read_metrics(single)
    assert [m["step"] for m in m_ddp] == list(range(1, steps + 1)), "only rank 0 may write metrics.jsonl"
    for a, s in zip(m_ddp, m_single):
        assert a["loss"] == pytest.approx(s["loss"], rel=1e-5), f"step {a['step']}: {a['loss']} vs {s['loss']}"
        assert a["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-4), \
            f"step {a['step']}: gradient norm {a['grad_norm']} vs {s['grad_norm']}"
    assert sorted(p.name for p in (ddp / "samples").iterdir()) == sorted(p.name for p in (single / "samples").iterdir())


# ========================================================================================== 4. bad configs
@pytest.mark.parametrize("case, overrides, keys", [
    ("negative lr", {"train.lr": -1e-4}, ["train.lr"]),
    ("stage without a step", {"curriculum": two_stage_curriculum(99, 100)},
     ["curriculum.stages[1]", "gets no step at train.max_steps=10"]),
    ("run shorter than the stages", {"curriculum": paper_curriculum(), "train.max_steps": 2},
     ["curriculum.stages[", "train.max_steps=2", "at least 4"]),
    ("resume <path> + init_from", {"train.resume": "some/checkpoint", "train.init_from": "some/export"},
     ["train.init_from", "train.resume"]),
    ("latent channels", {"model.latent_channels": 16}, ["model.latent_channels", "12"]),
    ("unknown optimizer", {"train.optimizer": "sgd"}, ["train.optimizer", "adamw"]),
    ("muon on sharded weights", {"train.optimizer": "muon", "train.parallel": "fsdp"},
     ["train.optimizer=muon", "train.parallel=fsdp"]),
    # `inf > 0` passes every range check: an infinite learning rate trained NaN weights and exported them
    ("infinite lr", {"train.lr": float("inf")}, ["train.lr", "finite"]),
    ("NaN autoencoder scale", {"autoencoder.scale": float("nan")}, ["autoencoder.scale", "finite"]),
    ("RoPE base 0", {"model.rope_theta": 0.0}, ["model.rope_theta"]),
    ("ddpm sampler steps beyond its timesteps", {"diffusion.formulation": "ddpm", "diffusion.prediction": "v",
                                                 "diffusion.sampler": "ddim", "train.sample_steps": 5000},
     ["train.sample_steps", "diffusion.num_train_timesteps"]),
])
def test_bad_config_fails_before_training_naming_the_key(tmp_path, case, overrides, keys):
    out = tmp_path / "run"
    cfg = tiny_config(out, max_steps=10)
    validate_config(cfg)  # the unedited config is fine
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, OmegaConf.structured(value) if is_dataclass(value) else value, merge=False)
    with pytest.raises(ValueError) as err:
        validate_config(cfg)
    for key in keys:
        assert key in str(err.value), f"{case}: {key!r} not in {err.value}"
    with pytest.raises(ValueError, match=re.escape(keys[0])):
        Trainer(cfg)
    assert not out.exists(), "a rejected config must not create the run folder"


def compose_checked():
    """compose_config after one composition of the default tree, which must succeed."""
    from mardini.cli import compose_config

    compose_config([])
    return compose_config


@pytest.fixture(scope="module")
def hydra_compose():
    """The real config tree: a composition error fails the tests that use it (it once turned into a skip)."""
    return compose_checked()


def test_hydra_compose_fixture_fails_on_a_broken_config_tree(tmp_path, monkeypatch):
    import shutil

    import mardini.cli as cli

    broken = tmp_path / "configs"
    shutil.copytree(cli.CONFIG_DIR, broken)
    (broken / "train" / "default.yaml").write_text("max_steps: [not, an, int]\n")
    monkeypatch.setattr(cli, "CONFIG_DIR", broken)
    with pytest.raises(Exception, match="max_steps"):
        compose_checked()


def test_hydra_unknown_key_fails_naming_it(hydra_compose):
    with pytest.raises(Exception, match="foo"):
        hydra_compose(["train.foo=1"])
    with pytest.raises(Exception, match="train.lr"):
        hydra_compose(["train.lr=-1"])


def test_hydra_appended_unknown_key_fails_naming_it(hydra_compose):
    """`+train.foo=1` opens the struct flag in Hydra, so the schema alone does not catch it; the validation must."""
    with pytest.raises(Exception, match="foo"):
        hydra_compose(["+train.foo=1"])


# ===================================================================================== 5. non-finite losses
def nan_on_calls(monkeypatch, calls: set[int]) -> None:
    """Make the k-th call of Trainer._micro_step (0-based, counted over the whole run) return a NaN loss."""
    original = Trainer._micro_step
    count = {"n": 0}

    def micro_step(self, batch, step):
        loss = original(self, batch, step)
        k, count["n"] = count["n"], count["n"] + 1
        return loss * float("nan") if k in calls else loss

    monkeypatch.setattr(Trainer, "_micro_step", micro_step)


def record_params(trainer: Trainer) -> list:
    """Wrap train_step: snapshots[i] = parameters after i optimizer steps."""
    snapshots = [unwrapped_state(trainer)]
    original = trainer.train_step

    def train_step(batches):
        result = original(batches)
        snapshots.append(unwrapped_state(trainer))
        return result

    trainer.train_step = train_step
    return snapshots


def test_isolated_nonfinite_loss_is_skipped_and_counted(tmp_path, monkeypatch):
    bad_step = 3  # 1-based; its second micro-batch is NaN (its first already accumulated gradients)
    nan_on_calls(monkeypatch, {2 * (bad_step - 1) + 1})
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(out, max_steps=5, grad_accum=2))
    snapshots = record_params(trainer)
    trainer.fit()

    for step in range(1, 6):
        unchanged = all(torch.equal(snapshots[step][k], snapshots[step - 1][k]) for k in snapshots[step])
        assert unchanged == (step == bad_step), f"step {step}: parameters {'un' if unchanged else ''}changed"
    metrics = read_metrics(out)
    assert [m["skipped"] for m in metrics] == [s == bad_step for s in range(1, 6)]
    assert math.isnan(metrics[bad_step - 1]["loss"]) and math.isnan(metrics[bad_step - 1]["grad_norm"])
    state = trainer_state(checkpoint(out, 5))
    assert (state["nonfinite_total"], state["nonfinite_in_row"], state["ema_updates"]) == (1, 0, 4)
    assert_state_equal(model_weights(checkpoint(out, 5)), snapshots[-1], "final checkpoint")


def test_consecutive_nonfinite_losses_stop_with_checkpoint(tmp_path, monkeypatch):
    K, first_bad = 3, 3  # steps 3, 4, 5 are NaN
    nan_on_calls(monkeypatch, set(range(first_bad - 1, 100)))
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(out, max_steps=10, max_nonfinite=K))
    snapshots = record_params(trainer)
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit()
    last = first_bad + K - 1
    assert "checkpoint saved" in str(err.value) and "train.max_nonfinite" in str(err.value)
    assert str(trainer.checkpoint_dir) in str(err.value)
    saved = checkpoint(out, last)
    assert ckpt.latest_checkpoint(out / "checkpoints") == saved
    state = trainer_state(saved)
    assert (state["step"], state["nonfinite_total"], state["nonfinite_in_row"]) == (last, K, K)
    assert_state_equal(model_weights(saved), snapshots[first_bad - 1], "weights after the last good step")
    assert [m["skipped"] for m in read_metrics(out)] == [s >= first_bad for s in range(1, last + 1)]


def test_nonfinite_ema_weights_are_not_exported(tmp_path, monkeypatch):
    # Non-finite losses in the last steps (fewer than train.max_nonfinite) or weights broken by a finite but huge
    # step: the run must fail loudly instead of exporting a model that samples NaN.
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(out, max_steps=2))
    original = trainer.full_ema_state

    def broken_ema():
        state = original()
        name = next(k for k, v in state.items() if v.is_floating_point())
        state[name] = torch.full_like(state[name], float("nan"))
        return state

    monkeypatch.setattr(trainer, "full_ema_state", broken_ema)
    with pytest.raises(NonFiniteLossError, match="non-finite values at step 2.*nothing exported"):
        trainer.fit()
    assert not (out / "export").exists()
    assert ckpt.latest_checkpoint(out / "checkpoints") == checkpoint(out, 2), "the final checkpoint stays"


DDP_NAN_SCRIPT = SCRIPT_PRELUDE + """
import os
from mardini.training.trainer import Trainer
original = Trainer._micro_step

def micro_step(self, batch, step):  # rank 1 alone sees a NaN loss at step index 1 (the 2nd optimizer step)
    loss = original(self, batch, step)
    return loss * float("nan") if step == 1 and os.environ["RANK"] == "1" else loss

Trainer._micro_step = micro_step
trainer = Trainer(load_cfg(sys.argv[1]))
trainer.fit()
import torch  # each rank's replica after the run: they must not have diverged
model = trainer.accelerator.unwrap_model(trainer.model)
torch.save({"model": model.state_dict(), "ema": trainer.ema.state_dict()}, f"replica_{os.environ['RANK']}.pt")
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """The step checks finiteness once, on the all-reduced gradient norm: a NaN on rank 1 alone must still skip
    the update on both ranks (else the replicas diverge) and be counted once."""
    out = tmp_path / "ddp"
    (tmp_path / "ddp.yaml").write_text(cfg_to_yaml(tiny_config(out, max_steps=3, batch_size=2, warmup_steps=1,
                                                                 curriculum=interpolation_only())))
    launcher = torchrun()
    run_script(tmp_path, "ddp_nan.py", DDP_NAN_SCRIPT, [tmp_path / "ddp.yaml"], launcher=launcher, timeout=300)
    metrics = read_metrics(out)
    assert [m["skipped"] for m in metrics] == [False, True, False]
    assert math.isnan(metrics[1]["grad_norm"]) and math.isfinite(metrics[2]["grad_norm"])
    state = trainer_state(checkpoint(out, 3))
    assert (state["nonfinite_total"], state["ema_updates"]) == (1, 2)
    replicas = [torch.load(tmp_path / f"replica_{rank}.pt", weights_only=True) for rank in range(2)]
    assert_state_equal(replicas[0]["model"], replicas[1]["model"], "rank 0 and rank 1 weights")
    assert_state_equal(replicas[0]["ema"], replicas[1]["ema"], "rank 0 and rank 1 EMA weights")


# ========================================================================================== 6. fine-tuning
def test_init_from_export_loads_weights_with_fresh_optimizer_and_frozen_planner(straight_run, tmp_path):
    export = straight_run / "export"
    weights = export_weights(straight_run)
    out = tmp_path / "ft"
    # resume=auto: one command for every attempt of a fine-tuning run (init_from while it has no checkpoint)
    cfg = tiny_config(out, max_steps=2, init_from=str(export), freeze_planner=True, resume="auto")
    trainer = Trainer(cfg)
    assert_state_equal(unwrapped_state(trainer), weights, "weights after init_from")
    assert_state_equal(trainer.ema.state_dict(), weights, "EMA after init_from")
    assert trainer.step == 0 and trainer.ema.num_updates == 0
    assert len(trainer.optimizer.state) == 0 and trainer.scheduler.last_epoch == 0
    trainer.fit()

    final = model_weights(checkpoint(out, 2))
    planner = [k for k in final if k.startswith("planner.")]
    generator = [k for k in final if k.startswith("generator.")]
    assert planner and generator
    assert all(torch.equal(final[k], weights[k]) for k in planner), "a frozen planner must not move"
    assert all(torch.equal(export_weights(out)[k], weights[k]) for k in planner), "nor its EMA"
    assert any(not torch.equal(final[k], weights[k]) for k in generator), "the generator must train"
    opt = optimizer_state(checkpoint(out, 2))
    steps = {float(torch.as_tensor(s["step"])) for s in opt["state"].values()}
    assert steps == {2.0}, f"a fresh optimizer counts only the new steps, got {steps}"
    n_trainable = sum(1 for k in generator) + sum(1 for k in final if not k.startswith(("planner.", "generator.")))
    assert len(opt["state"]) == n_trainable, "frozen parameters must not be in the optimizer"
    assert trainer_state(checkpoint(out, 2))["step"] == 2
    again = Trainer(cfg)  # the same command again (a requeue): the run's own checkpoint wins over init_from
    assert again.step == 2
    assert_state_equal(unwrapped_state(again), final, "weights of a requeued fine-tuning run")
    again._release_lock()


def test_freezing_a_network_without_init_from_warns_it_stays_random(tmp_path, caplog):
    """train.freeze_planner / freeze_generator without train.init_from (and nothing to resume) froze the network's
    random initial weights without a word; with train.init_from it freezes trained ones, silently."""
    def frozen_warnings(run, **train):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mardini.train"):
            trainer = Trainer(tiny_config(tmp_path / run, max_steps=1, **train))
        trainer._release_lock()
        return [r.getMessage() for r in caplog.records if "random initial weights" in r.getMessage()], trainer

    for key in ("freeze_planner", "freeze_generator"):
        warned, _ = frozen_warnings(key, **{key: True})
        assert len(warned) == 1 and warned[0].startswith(f"train.{key}=true without train.init_from"), warned
        assert "train.init_from=" in warned[0]
    warned, trainer = frozen_warnings("plain")
    assert warned == []
    assert frozen_warnings("ft", freeze_planner=True, init_from=str(trainer.export()))[0] == []


def test_planner_loss_is_logged_and_fine_tuning_may_add_or_drop_its_readout(straight_run, tmp_path):
    """model.planner.loss_weight: the total is diffusion + weight x plan loss, both parts in metrics.jsonl. Its read-out
    is read by that loss alone, so fine-tuning crosses recipes: from an export without one the run starts a fresh
    read-out (every other weight loaded), and from an export with one a run without the loss drops it."""
    cfg = tiny_config(tmp_path / "pl", max_steps=2)
    cfg.model.planner.loss_weight = 0.5
    Trainer(cfg).fit()
    for r in read_metrics(tmp_path / "pl"):
        assert r["plan_loss"] > 0 and r["diffusion_loss"] > 0 and "motion_loss" not in r
        assert math.isclose(r["loss"], r["diffusion_loss"] + 0.5 * r["plan_loss"], rel_tol=1e-5)
    readout = {"planner.readout.weight", "planner.readout.bias"}
    source = export_weights(straight_run)
    cfg = tiny_config(tmp_path / "add", init_from=str(straight_run / "export"))
    cfg.model.planner.loss_weight = 0.5
    trainer = Trainer(cfg)
    state = unwrapped_state(trainer)
    trainer._release_lock()
    assert set(state) - set(source) == readout
    assert_state_equal({k: v for k, v in state.items() if k not in readout}, source, "weights after adding the loss")
    trainer = Trainer(tiny_config(tmp_path / "drop", init_from=str(tmp_path / "pl" / "export")))
    state = unwrapped_state(trainer)
    trainer._release_lock()
    trained = export_weights(tmp_path / "pl")
    assert readout <= set(trained)
    assert_state_equal(state, {k: v for k, v in trained.items() if k not in readout}, "weights after dropping it")


def test_init_from_checkpoint_uses_its_ema_weights(straight_run, tmp_path):
    source = checkpoint(straight_run, 2 * N)
    ema, raw = ema_weights(source), model_weights(source)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # so the test can tell which one was loaded
    trainer = Trainer(tiny_config(tmp_path / "ft", init_from=str(source)))
    assert_state_equal(unwrapped_state(trainer), ema, "weights after init_from=<checkpoint>")
    assert trainer.step == 0


def test_resume_under_another_freeze_is_refused_naming_the_key(straight_run, tmp_path):
    """The optimizer state holds the parameters that trained: resuming with another train.freeze_* failed inside
    torch ("loaded state dict contains a parameter group that doesn't match ..."), naming no setting."""
    source = checkpoint(straight_run, N)
    with pytest.raises(ValueError, match=r"trained with train\.freeze_planner=False; this run has "
                                         r"train\.freeze_planner=True: .* resume with train\.freeze_planner=False, "
                                         rf"or .* train\.init_from={re.escape(str(source))}$"):
        Trainer(resume_config(tmp_path / "frozen", resume=str(source), freeze_planner=True))


def test_init_from_a_folder_of_checkpoints_names_one_and_other_latents_are_named(straight_run, tmp_path, caplog):
    """train.init_from=<run>/checkpoints said only "config.json is missing"; it now names the newest checkpoint in
    it. Weights trained on other latents (here the identity autoencoder's scale, as when a run's scale is changed to
    match a latent cache) loaded without a word; they load with a warning naming the settings."""
    with pytest.raises(FileNotFoundError, match=r"checkpoints is not a mardini export: config.json is missing \(a "
                                                r"folder of checkpoints: give one of them, e.g. the newest, "
                                                rf"{re.escape(str(checkpoint(straight_run, 2 * N)))}\)"):
        Trainer(tiny_config(tmp_path / "folder", init_from=str(straight_run / "checkpoints")))
    cfg = tiny_config(tmp_path / "scale", init_from=str(straight_run / "export"))
    trained = cfg.autoencoder.scale
    cfg.autoencoder.scale = trained * 2
    with caplog.at_level(logging.WARNING, logger="mardini.train"):
        Trainer(cfg)._release_lock()
    assert (f"export was trained on other latents (autoencoder.scale={trained}; this run has "
            f"autoencoder.scale={trained * 2}): pass those settings") in caplog.text, caplog.text


def test_init_from_mismatched_model_names_parameter_and_shapes(straight_run, tmp_path):
    """Weights of another size: the first line names every setting that differs (here the width and the head count
    together, so that one fix suffices), then a few of the tensors, not all of them."""
    cfg = tiny_config(tmp_path / "ft", init_from=str(straight_run / "export"))
    heads = cfg.model.planner.num_heads
    cfg.model.planner.dim, cfg.model.planner.num_heads = 32, heads // 2
    with pytest.raises(ValueError) as err:
        Trainer(cfg)
    first, *rest = str(err.value).splitlines()
    assert first.startswith(f"train.init_from={straight_run / 'export'} was trained with "), first
    assert f"model.planner.dim=64 model.planner.num_heads={heads};" in first, first
    assert f"pass model.planner.dim=64 model.planner.num_heads={heads} to fine-tune it" in first, first
    shapes = next(line for line in rest if "shape mismatch" in line)
    assert re.search(r"planner\.[\w.]+: checkpoint \(64[,)].* vs model \(32[,)]", shapes), shapes
    count = int(re.search(r"shape mismatch: (\d+) tensor", shapes).group(1))
    assert count > 4 and shapes.count(" vs model ") == 4 and f"and {count - 4} more" in shapes, shapes


def test_init_from_mismatch_names_only_the_settings_loading_needs(straight_run, tmp_path):
    """Weights that do not fit: the settings to pass are those that change the weights' shapes (found by building the
    model both ways), not every model setting that differs; the others (the RoPE base, the motion prior) are named
    apart as not needed, settings of how the network is computed (the attention kernel) not at all. A difference of
    the second kind alone loads."""
    cfg = tiny_config(tmp_path / "ft", init_from=str(straight_run / "export"))
    theta, smoothness = cfg.model.rope_theta, cfg.model.motion.smoothness
    cfg.model.planner.dim, cfg.model.sdpa_kernel = 32, "math"
    cfg.model.rope_theta, cfg.model.motion.smoothness = theta * 2, smoothness * 10
    with pytest.raises(ValueError) as err:
        Trainer(cfg)
    first = str(err.value).splitlines()[0]
    assert "was trained with model.planner.dim=64; this run has model.planner.dim=32: pass model.planner.dim=64 to " \
           f"fine-tune it (model.rope_theta={theta} model.motion.smoothness={smoothness} differ too; loading does " \
           "not need them)." in first, first
    assert "sdpa_kernel" not in first, first
    cfg.model.planner.dim = 64  # the settings it says are not needed: the weights load
    Trainer(cfg)._release_lock()


def test_fine_tuning_may_add_the_null_plan_and_a_resume_may_not(straight_run, tmp_path):
    """model.plan_dropout > 0 adds a weight (the null plan of classifier-free guidance): fine-tuning from weights
    trained without it starts it at zeros and loads the rest; a resume under it is refused in one clear error, not
    a state-dict traceback (its parameters and optimizer state would not fit)."""
    from mardini.export import read_weights

    cfg = tiny_config(tmp_path / "ft", init_from=str(straight_run / "export"))
    cfg.model.plan_dropout = 0.1
    trainer = Trainer(cfg)
    trainer._release_lock()
    model, trained = trainer.accelerator.unwrap_model(trainer.model), read_weights(straight_run / "export", "ema")
    assert torch.equal(model.null_plan.detach(), torch.zeros_like(model.null_plan))
    assert "null_plan" not in trained and all(torch.equal(v, trained[k]) for k, v in model.state_dict().items()
                                              if k in trained)
    cfg = resume_config(tmp_path / "resumed", resume=str(checkpoint(straight_run, N)))
    cfg.model.plan_dropout = 0.1
    with pytest.raises(ValueError, match=r"trained with model.plan_dropout=0.0; this run has model.plan_dropout=0.1, "
                                         r"which adds or drops weights: pass model.plan_dropout=0.0 to resume"):
        Trainer(cfg)
    cfg.model.plan_dropout = 0.0  # the same run resumes
    Trainer(cfg)._release_lock()


@pytest.mark.parametrize("source", ["export", "checkpoint"])
def test_init_from_another_objective_is_refused_naming_the_key(straight_run, tmp_path, source):
    """Weights trained to predict the clean sample must not be fine-tuned as a velocity model (or the reverse)."""
    path = straight_run / "export" if source == "export" else checkpoint(straight_run, 2 * N)
    trained = tiny_config(tmp_path / "same", init_from=str(path)).diffusion.prediction
    other = {"sample": "velocity", "velocity": "sample"}[trained]
    cfg = tiny_config(tmp_path / "ft", init_from=str(path))
    cfg.diffusion.prediction = other
    with pytest.raises(ValueError, match=f"diffusion.prediction={trained} to fine-tune"):
        Trainer(cfg)
    Trainer(tiny_config(tmp_path / "same", init_from=str(path)))  # the same objective loads
    cfg = tiny_config(tmp_path / "ft_input", init_from=str(path))
    cfg.diffusion.input_data_std = 1.0 if cfg.diffusion.input_data_std == 0 else 0.0
    with pytest.raises(ValueError, match="diffusion.input_data_std="):
        Trainer(cfg)
    cfg = tiny_config(tmp_path / "ft_ddpm", init_from=str(path))  # diffusion=ddpm_v: the fix is the group's option
    cfg.diffusion.formulation, cfg.diffusion.prediction, cfg.diffusion.sampler = "ddpm", "v", "ddim"
    std = cfg.diffusion.input_data_std
    fix = "diffusion=rectified_flow" + ("" if std == 1.0 else f" diffusion.input_data_std={std}")
    with pytest.raises(ValueError, match=f"trained with diffusion.formulation=rectified_flow "
                                         f"diffusion.prediction={trained}; .*: set {re.escape(fix)} to fine-tune it"):
        Trainer(cfg)


@pytest.mark.parametrize("source", ["export", "checkpoint"])
def test_init_from_another_head_split_is_refused(straight_run, tmp_path, source):
    """Another head count keeps every weight's shape, so the weights would load without error into a network that
    computes something else with them; fine-tuning must refuse, naming the setting that loads them as trained."""
    path = straight_run / "export" if source == "export" else checkpoint(straight_run, 2 * N)
    cfg = tiny_config(tmp_path / "ft", init_from=str(path))
    trained = cfg.model.planner.num_heads
    cfg.model.planner.num_heads = trained // 2
    with pytest.raises(ValueError, match=rf"pass model.planner.num_heads={trained} "):
        Trainer(cfg)
    cfg = tiny_config(tmp_path / "ft_generator", init_from=str(path))
    cfg.model.generator.num_heads = cfg.model.generator.num_heads // 2
    with pytest.raises(ValueError, match="model.generator.num_heads="):
        Trainer(cfg)


def test_init_from_another_output_meaning_is_refused(straight_run, tmp_path):
    """motion.residual changes what the generator's output means (the difference from the motion estimate, not the
    frame) without changing a weight's shape: fine-tuning across it must be refused by name, like another objective."""
    source = tmp_path / "residual_export"
    shutil.copytree(straight_run / "export", source)
    config = json.loads((source / "config.json").read_text())
    config["model"]["motion"].update(estimate="bilateral", residual=True, residual_scale=2.0)
    (source / "config.json").write_text(json.dumps(config))
    cfg = tiny_config(tmp_path / "ft", init_from=str(source))
    cfg.model.motion.estimate = "bilateral"
    with pytest.raises(ValueError, match=r"pass model.motion.residual=True model.motion.residual_scale=2.0 "):
        Trainer(cfg)


def test_resume_refuses_another_network_but_not_another_kernel(straight_run, tmp_path):
    """Resuming continues the network the checkpoint trained: a model setting that changes what it computes is
    refused by name; one that only chooses how it is computed (the attention kernel) is not."""
    source = str(checkpoint(straight_run, N))
    cfg = resume_config(tmp_path / "theta", resume=source)
    cfg.model.rope_theta = cfg.model.rope_theta * 2
    with pytest.raises(ValueError, match=r"train.resume=.* model.rope_theta="):
        Trainer(cfg)
    cfg = resume_config(tmp_path / "kernel", resume=source)
    cfg.model.sdpa_kernel = "math"
    assert Trainer(cfg).step == N
    # The planner's loss adds weights: refused by name, also for a checkpoint saved before the key existed.
    old = tmp_path / "old_checkpoint"
    shutil.copytree(source, old)
    saved = OmegaConf.load(old / "config.yaml")
    del saved.model.planner["loss_weight"], saved.model.motion["plan_layout"]
    OmegaConf.save(saved, old / "config.yaml")
    for path in (source, old):
        cfg = resume_config(tmp_path / "plan_loss", resume=str(path))
        cfg.model.planner.loss_weight = 1.0
        with pytest.raises(ValueError, match=r"train.resume=.* pass model.planner.loss_weight=0.0 "):
            Trainer(cfg)
        cfg.model.motion.estimate, cfg.model.motion.plan_layout = "bilateral", True  # the layout: refused by name too
        with pytest.raises(ValueError, match=r"pass model.planner.loss_weight=0.0 model.motion.estimate=none "
                                             r"model.motion.plan_layout=False "):
            Trainer(cfg)


def test_resume_takes_this_runs_learning_rate_and_refuses_another_objective(straight_run, tmp_path):
    """A resume with another train.lr (or weight decay) continues at the new rate on the same schedule, as its
    config.yaml says, instead of the checkpoint's (the optimizer's saved param groups and the schedule's base rates
    once won silently); a resume that would read the network's output as another objective is refused by name."""
    from mardini.training.optim import lr_factor

    source = str(checkpoint(straight_run, N))
    cfg = resume_config(tmp_path / "lr", resume=source, lr=2.5e-4, weight_decay=0.01)
    trainer = Trainer(cfg)
    groups = trainer.optimizer.param_groups
    assert [g["initial_lr"] for g in groups] == [2.5e-4] * len(groups)
    assert max(g["weight_decay"] for g in groups) == 0.01
    trainer.fit()
    t = cfg.train
    lrs = {m["step"]: m["lr"] for m in read_metrics(tmp_path / "lr")}
    for step in range(N + 1, 2 * N + 1):
        expected = 2.5e-4 * lr_factor(step - 1, t.warmup_steps, t.max_steps, t.lr_schedule, t.min_lr_ratio)
        assert lrs[step] == pytest.approx(expected, rel=1e-12)
    cfg = resume_config(tmp_path / "objective", resume=source)
    cfg.diffusion.prediction = "velocity"
    with pytest.raises(ValueError, match=r"train.resume=.* diffusion.prediction=sample; .* to continue it"):
        Trainer(cfg)


def test_a_finished_run_resumed_redoes_the_end_of_run_videos_and_the_export(straight_run, tmp_path):
    """A run stopped after its final checkpoint (Ctrl-C or a failure while writing the videos or the export) is
    finished by train.resume=auto: both are written again, without a training step."""
    run = Path(shutil.copytree(straight_run, tmp_path / "run"))
    shutil.rmtree(run / "samples")
    shutil.rmtree(run / "export")
    steps = len(read_metrics(run))
    Trainer(resume_config(run, resume="auto")).fit()
    assert sorted(p.name for p in (run / "samples").glob("*.mp4")) == \
        sorted(p.name for p in (straight_run / "samples").glob("*.mp4")) != []
    assert (run / "export" / "model.safetensors").exists() and len(read_metrics(run)) == steps


def test_a_warm_up_longer_than_the_run_is_named(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mardini.train"):
        Trainer(tiny_config(tmp_path / "warm", max_steps=4, warmup_steps=1000))._release_lock()
    assert "train.warmup_steps=1000 >= train.max_steps=4" in caplog.text
    assert "eval_every" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="mardini.train"):  # an evaluation the run never reaches
        Trainer(tiny_config(tmp_path / "eval", max_steps=4, eval_every=100))._release_lock()
    assert "train.eval_every=100 > train.max_steps=4: this run makes no periodic evaluation" in caplog.text
    assert "mask_ratio" not in caplog.text
    hard = CurriculumConfig(stages=[CurriculumStage(start=0.0, end=None, mask_ratio=[0.9, 0.99],
                                                    strategies=[MaskStrategyConfig(name="interpolation")])])
    with caplog.at_level(logging.WARNING, logger="mardini.train"):  # at most 7 of 9 frames lie between kept ones
        Trainer(tiny_config(tmp_path / "ratio", max_steps=4, curriculum=hard))._release_lock()
    # the key that sets the frame count of this run's clips (it once named data.num_frames, which does not exist)
    assert ("curriculum.stages[0] interpolation: no mask of 9 frames has a ratio in mask_ratio=[0.9, 0.99]; it uses "
            "the closest, 0.778 (set that stage's mask_ratio within reach, or change data.synthetic.num_frames)"
            ) in caplog.text


def test_data_workers_are_capped_at_the_usable_cpus(tmp_path, caplog, monkeypatch):
    """More DataLoader workers than CPUs only contend (PyTorch warns that they may freeze): the loader gets as many as
    the process may use, and says so; fewer are kept as asked."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    cfg = tiny_config(tmp_path / "workers")
    cfg.data.num_workers = 8
    trainer = Trainer(cfg)
    with caplog.at_level(logging.INFO, logger="mardini.train"):
        assert trainer._dataloader().num_workers == 2
    assert "data.num_workers=8, but this process may use 2 CPU(s)" in caplog.text
    trainer.cfg.data.num_workers = 1
    assert trainer._dataloader().num_workers == 1
    trainer._release_lock()


def test_resume_auto_under_a_fresh_timestamp_names_the_run_to_continue(tmp_path, caplog):
    """train.resume=auto with the default run_name (a new timestamp each launch) finds nothing to continue: the run
    starts fresh and says which run_name holds the newest checkpoint; under a chosen name it says nothing more."""
    Trainer(tiny_config(tmp_path / "2026-01-01_00-00-00", max_steps=1)).fit()
    with caplog.at_level(logging.INFO, logger="mardini.train"):
        trainer = Trainer(tiny_config(tmp_path / "2026-01-01_00-09-00", max_steps=1, resume="auto"))
    assert trainer.step == 0 and "pass run_name=2026-01-01_00-00-00 to continue it" in caplog.text, caplog.text
    trainer._release_lock()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mardini.train"):
        Trainer(tiny_config(tmp_path / "my_run", max_steps=1, resume="auto"))._release_lock()
    assert "starting fresh" in caplog.text and "pass run_name" not in caplog.text, caplog.text


def test_a_resume_under_another_schedule_says_what_changed(tmp_path, caplog):
    """Extending a run (train.max_steps=...) or changing its warm-up is allowed; the resume names the changed settings
    and the learning rate they give now. The same settings resume silently."""
    Trainer(tiny_config(tmp_path / "run", max_steps=2, curriculum=interpolation_only())).fit()
    with caplog.at_level(logging.INFO, logger="mardini.train"):
        Trainer(tiny_config(tmp_path / "run", max_steps=2, resume="auto"))._release_lock()
    assert "resumed from" in caplog.text and "the checkpoint's run" not in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mardini.train"):
        trainer = Trainer(tiny_config(tmp_path / "run", max_steps=8, warmup_steps=4, resume="auto"))
    lr = trainer.cfg.train.lr * lr_factor(2, 4, 8, trainer.cfg.train.lr_schedule, trainer.cfg.train.min_lr_ratio)
    assert (f"resumed at step 2 with train.max_steps=8 (the checkpoint's run: 2), train.warmup_steps=4 (the "
            f"checkpoint's run: 1)") in caplog.text and f"(learning rate now {lr:.3g})" in caplog.text, caplog.text
    trainer._release_lock()


def test_progress_lines_give_speed_and_time_left_from_after_the_first_step(caplog):
    """With the bar off, the log says how long the launch's first step took (compilation included), then at most every
    progress_log_s seconds the step, the mean finite loss since the last line, the speed and the time left at that
    speed; start-up time never enters the speed. With the bar on, only the first step's line."""
    now = [0.0]
    progress = ProgressLog(start_step=100, max_steps=110, samples_per_step=16, every_s=5.0, lines=True,
                           clock=lambda: now[0])
    losses = {101: 9.0, 102: 1.0, 103: float("nan"), 104: 2.0, 105: 3.0, 106: 4.0, 107: 5.0}
    with caplog.at_level(logging.INFO, logger="mardini.train"):
        now[0] = 30.0
        progress.update(101, losses[101])  # the launch's first step (a resumed run starts at 100): 30 s
        for step in range(102, 111):
            now[0] += 1.0 if step <= 106 else 2.0
            progress.update(step, losses.get(step, 6.0))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == ("step 101: the launch's first step took 30.0 s (compilation, data workers and warm-up "
                        "included)"), lines
    # 5 steps in 5 s after the first (its 30 s and its loss 9 left out; the NaN skipped), then 3 steps in 6 s; the
    # last step always has its line
    assert lines[1] == "step 106/110 (96 %): loss 2.5000, 1.00 steps/s (16.0 clips/s), about 4 s left", lines
    assert lines[2] == "step 109/110 (99 %): loss 5.6667, 0.50 steps/s (8.0 clips/s), about 2 s left", lines
    assert lines[3] == "step 110/110 (100 %): loss 6.0000, 0.50 steps/s (8.0 clips/s), about 0 s left", lines
    assert len(lines) == 4
    caplog.clear()
    quiet = ProgressLog(start_step=0, max_steps=1000, samples_per_step=1, every_s=5.0, lines=False,
                        clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="mardini.train"):
        for step in range(1, 50):
            now[0] += 10.0
            quiet.update(step, 1.0)
    assert [r.getMessage()[:26] for r in caplog.records] == ["step 1: the launch's first"]
    assert quiet.losses == []  # with the bar on nothing accumulates over a long run
    assert format_duration(3725.4) == "1 h 2 min" and format_duration(75) == "1 min 15 s"


def test_a_run_without_its_bar_logs_its_progress(tmp_path, caplog):
    """train.progress=false (batch jobs logging to files): progress lines in the run's log; progress_log_s=0: none."""
    with caplog.at_level(logging.INFO, logger="mardini.train"):
        Trainer(tiny_config(tmp_path / "lines", max_steps=3, progress_log_s=1e-9)).fit()
    assert "the launch's first step took" in caplog.text and "step 2/3 (66 %): loss" in caplog.text, caplog.text
    assert re.search(r"step 3/3 \(100 %\): loss [0-9.]+, [0-9.]+ steps/s \([0-9.]+ clips/s\), about 0 s left",
                     caplog.text), caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mardini.train"):
        Trainer(tiny_config(tmp_path / "none", max_steps=3, progress_log_s=0)).fit()
    assert "the launch's first step took" in caplog.text and "step 2/3" not in caplog.text, caplog.text
    with pytest.raises(ValueError, match="train.progress_log_s"):
        validate_config(tiny_config(tmp_path / "bad", progress_log_s=-1))


def test_init_from_missing_folder_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.init_from"):
        Trainer(tiny_config(tmp_path / "ft", init_from=str(tmp_path / "nowhere")))
    (tmp_path / "frame.png").write_bytes(b"not a folder")
    with pytest.raises(NotADirectoryError, match=r"train.output_dir=.*frame.png is a file"):
        Trainer(tiny_config(tmp_path / "frame.png"))
    with pytest.raises(NotADirectoryError, match=r"train.init_from=.*frame.png is a file, not an export or checkpoint"):
        Trainer(tiny_config(tmp_path / "ft", init_from=str(tmp_path / "frame.png")))
    broken = tmp_path / "export"
    broken.mkdir()
    (broken / "config.json").write_text("{model: 1")  # once a bare JSON error that named no file
    with pytest.raises(ValueError, match=re.escape(f"{broken / 'config.json'} is not valid JSON")):
        Trainer(tiny_config(tmp_path / "ft", init_from=str(broken)))


# ============================================================================================== 7. outputs
@pytest.mark.slow
def test_run_outputs_samples_export_checkpoints_config(tmp_path):
    import imageio.v3 as iio

    out = tmp_path / "run"
    cfg = tiny_config(out, max_steps=5, checkpoint_every=1, keep_last=2, sample_every=2, warmup_steps=2,
                      lr_schedule="cosine", min_lr_ratio=0.2)
    trainer = Trainer(cfg)
    assert trainer.fit() == out / "export"

    # checkpoints: only the newest keep_last survive, and no leftovers
    assert checkpoint_names(out) == ["step_000004", "step_000005"]
    # samples at sample_every and at the end, both tasks, readable, with every frame
    videos = sorted(p.name for p in (out / "samples").glob("*.mp4"))
    assert videos == sorted(f"step_{s:06d}_{task}.mp4" for s in (2, 4, 5) for task in ("interpolation", "i2v"))
    for name in videos:
        frames = iio.imread(out / "samples" / name, plugin="pyav")
        assert frames.ndim == 4 and frames.shape[0] == NUM_FRAMES and frames.shape[-1] == 3, frames.shape
        assert frames.shape[1] >= 32 and frames.shape[2] >= 2 * 32
    # the export holds the EMA weights and rebuilds the model
    model, config = load_model(out / "export")
    assert config["step"] == 5 and config["num_frames"] == NUM_FRAMES
    assert config["model"]["planner"]["dim"] == 64 and config["model"]["generator"]["dim"] == 48
    assert_state_equal(model.state_dict(), ema_weights(checkpoint(out, 5)), "export vs checkpoint EMA")
    assert_state_equal(model.state_dict(), trainer.ema.state_dict(), "export vs trainer EMA")
    # the resolved config
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.train.max_steps == 5 and saved.model.latent_channels == 12
    # the logged LR follows the schedule (lr logged at step k is the one step k-1 used)
    for m in read_metrics(out):
        expected = cfg.train.lr * lr_factor(m["step"] - 1, 2, 5, "cosine", 0.2)
        assert m["lr"] == pytest.approx(expected, rel=1e-9)

    with pytest.raises(FileExistsError, match=re.escape("train.resume=auto")):
        Trainer(tiny_config(out, max_steps=5))


def test_rejected_rerun_leaves_run_config_untouched(tmp_path):
    """A second run refused because the folder holds checkpoints must not overwrite the first run's config.yaml."""
    out = tmp_path / "run"
    Trainer(tiny_config(out, max_steps=1, lr=1e-3)).save_checkpoint()
    before = (out / "config.yaml").read_text()
    with pytest.raises(FileExistsError):
        Trainer(tiny_config(out, max_steps=1, lr=5e-4))
    assert (out / "config.yaml").read_text() == before


def test_weights_and_cache_shards_follow_the_umask(tmp_path):
    """safetensors' save_file creates its files 0600 whatever the umask: an export, a checkpoint (Accelerate's weights
    and the EMA's) and a latent cache's shards were unreadable to teammates, while the json beside them was not."""
    from mardini.autoencoders import IdentityAutoencoder
    from mardini.data.latent_cache import build_latent_cache
    from mardini.data.synthetic import SyntheticVideoConfig, SyntheticVideoDataset

    old = os.umask(0o022)
    try:
        trainer = Trainer(tiny_config(tmp_path / "run", max_steps=1))
        files = [*trainer.save_checkpoint().glob("*.safetensors"), *trainer.export().glob("*.safetensors")]
        trainer._release_lock()
        ds = SyntheticVideoDataset(SyntheticVideoConfig(num_videos=2, num_frames=3, height=8, width=8))
        build_latent_cache(tmp_path / "cache", ds, IdentityAutoencoder(patch_size=2), progress=False)
    finally:
        os.umask(old)
    files += sorted((tmp_path / "cache").glob("shard_*.safetensors"))
    names = {f.name for f in files}
    assert {"model.safetensors", "ema.safetensors", "shard_000000.safetensors"} <= names, names
    modes = {str(f.relative_to(tmp_path)): oct(f.stat().st_mode & 0o777) for f in files}
    assert modes == dict.fromkeys(modes, "0o644")


def test_validation_clips_follow_data_config_and_val_seed(tmp_path, monkeypatch):
    """Validation clips must have the configured size (5 frames, 16x16 here) and come from data.val_seed, a
    stream disjoint from the training clips."""
    from mardini.data.synthetic import SyntheticVideoConfig, SyntheticVideoDataset
    import mardini.training.trainer as trainer_module

    cfg = tiny_config(tmp_path / "run", max_steps=1, num_sample_videos=2)
    cfg.data.synthetic.num_frames, cfg.data.synthetic.height, cfg.data.synthetic.width = 5, 16, 16
    cfg.model.max_frames = 5
    seen = {}

    def fake_validation_videos(model, autoencoder, diffusion, videos, *args, **kwargs):
        seen["videos"] = videos
        return {}, {}, {}

    monkeypatch.setattr(trainer_module, "validation_videos", fake_validation_videos)
    Trainer(cfg).sample()
    syn = dict(OmegaConf.to_container(cfg.data.synthetic), seed=cfg.data.val_seed, num_videos=2)
    expected = torch.stack([SyntheticVideoDataset(SyntheticVideoConfig(**syn))[i]["video"] for i in range(2)])
    assert tuple(seen["videos"].shape) == (2, 5, 3, 16, 16)
    assert torch.equal(seen["videos"], expected)


# ======================================================================================= 8. learning signal
@pytest.mark.slow
def test_loss_decreases_on_synthetic_data(tmp_path):
    out = tmp_path / "run"
    start = time.perf_counter()
    Trainer(tiny_config(out, max_steps=80, batch_size=4, lr=2e-3, warmup_steps=5, lr_schedule="constant",
                        num_sample_videos=1)).fit()
    elapsed = time.perf_counter() - start
    losses = [m["loss"] for m in read_metrics(out)]
    assert len(losses) == 80 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.85 * first, f"mean loss {first:.4f} (first 20 steps) -> {last:.4f} (last 20)"
    print(f"loss {first:.4f} -> {last:.4f} in {elapsed:.1f}s")


# ============================================================================================== 9. trackers
@pytest.mark.slow
def test_tensorboard_and_offline_wandb_trackers(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    (tmp_path / "wandb_dir").mkdir()
    # Logging the sample videos must not read them back: a machine that can write mp4 but has no decoder (decord,
    # PyAV) once lost the export at the end of a GPU run this way.
    from mardini.data import backends

    def no_reader(task, *modules):
        if "decord" in modules:
            raise backends.MissingBackendError(f"{task}: no decoder in this test")
        return real_require(task, *modules)

    real_require = backends.require
    monkeypatch.setattr(backends, "require", no_reader)
    out = tmp_path / "run"
    Trainer(tiny_config(out, max_steps=2, log_every=1, trackers=["tensorboard", "wandb"],
                        wandb_mode="offline")).fit()
    assert (out / "export" / "model.safetensors").exists()
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, f"no tensorboard event file under {out}"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    assert {"samples/interpolation", "samples/i2v"} <= set(acc.Tags()["images"])
    runs = list(out.rglob("offline-run-*"))
    assert runs and any(p.is_dir() and list(p.glob("*.wandb")) for p in runs), f"no offline wandb run in {out}"


# ===================================================================================== 10. LR schedule, EMA
def test_lr_factor_warmup_then_cosine_to_floor():
    W, S, floor = 4, 20, 0.1
    assert [lr_factor(s, W, S, "cosine", floor) for s in range(W)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_factor(W, W, S, "cosine", floor) == pytest.approx(1.0)
    assert lr_factor((W + S) // 2, W, S, "cosine", floor) == pytest.approx(floor + (1 - floor) / 2)
    for s in range(W, S + 1):
        progress = (s - W) / (S - W)
        expected = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        assert lr_factor(s, W, S, "cosine", floor) == pytest.approx(expected)
    assert lr_factor(S, W, S, "cosine", floor) == pytest.approx(floor)
    assert lr_factor(S + 50, W, S, "cosine", floor) == pytest.approx(floor)  # stays at the floor
    after = [lr_factor(s, W, S, "cosine", floor) for s in range(W, S + 1)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert [lr_factor(s, W, S, "constant", floor) for s in (W, S, S + 5)] == [1.0, 1.0, 1.0]
    assert lr_factor(0, 0, S, "cosine", floor) == pytest.approx(1.0)  # no warm-up


def test_scheduler_applies_lr_factor():
    cfg = tiny_config("unused", max_steps=10, warmup_steps=3, lr=2e-3, min_lr_ratio=0.0).train
    model = torch.nn.Linear(3, 3)
    opt = build_optimizer(model, cfg)
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.weight_decay, 0.0]  # matrices decay, biases not
    sched = build_scheduler(opt, cfg)
    for s in range(12):
        assert opt.param_groups[0]["lr"] == pytest.approx(2e-3 * lr_factor(s, 3, 10, "cosine", 0.0))
        opt.step()
        sched.step()


def test_ema_below_its_decay_is_the_warmups_power_average():
    """Until (1 + t) / (w + t) reaches train.ema_decay (step 8 991 for 0.999 at w = 10) the warm-up alone sets the
    EMA: after 320 updates (the default job) decays 0.999 and 0.9995 give the same weights, bit for bit (measured:
    the same export figures), while the warm-up constant w moves them; the average weighs update s as (s / t)^(w-2)."""
    def averaged(decay, warmup, steps=320):
        ema = EMA(torch.nn.Linear(1, 1, bias=False), decay, warmup)
        model = torch.nn.Linear(1, 1, bias=False)
        for s in range(1, steps + 1):  # the parameter's value at update s is s: the EMA is the mean update index
            model.weight.data.fill_(float(s))
            ema.update(model)
        return float(ema.shadow["weight"])

    assert averaged(0.999, 10) == averaged(0.9995, 10) == averaged(0.99999, 10)
    assert averaged(0.999, 5) < averaged(0.999, 10) < averaged(0.999, 20)
    for w in (5, 10, 20):  # the mean of s under weights s^(w-2) on 1..t: about t (w-1) / w
        assert averaged(0.999, w) == pytest.approx(320 * (w - 1) / w, rel=0.02), w


def test_ema_warmup_lerp_matches_hand_computation():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[1].bias.requires_grad_(False)  # frozen parameters are not averaged
    decay = 0.9
    ema = EMA(model, decay)
    expected = {k: v.detach().clone() for k, v in model.named_parameters()}
    frozen_init = model[1].bias.detach().clone()
    for t in range(100):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        d = min(decay, (1 + t) / (10 + t))
        assert ema.current_decay() == pytest.approx(d)
        ema.update(model)
        for name, p in model.named_parameters():
            if p.requires_grad:
                expected[name] = d * expected[name] + (1 - d) * p.detach()
    assert ema.num_updates == 100 and ema.current_decay() == decay  # warm-up over: capped at decay
    for name in expected:
        torch.testing.assert_close(ema.shadow[name], expected[name], rtol=1e-6, atol=1e-6)
    assert torch.equal(ema.shadow["1.bias"], frozen_init)
    # first update by hand: decay 1/10, so the shadow moves 90% of the way
    m = torch.nn.Linear(2, 2)
    e = EMA(m, 0.999)
    p0 = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    e.update(m)
    torch.testing.assert_close(e.shadow["weight"], 0.1 * p0 + 0.9 * (p0 + 1.0))

    target = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    ema.copy_to(target)
    assert all(torch.equal(p, ema.shadow[n]) for n, p in target.named_parameters())
    other = EMA(target, decay)
    other.load_state_dict(ema.state_dict(), ema.num_updates)
    assert other.num_updates == 100 and all(torch.equal(other.shadow[k], ema.shadow[k]) for k in ema.shadow)
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({}, 0)


# ============================================================================================ 11. data stream
@pytest.mark.parametrize("b", [1, 3])
def test_stream_layout_partition_independent_of_world_and_accum(b):
    single = StreamLayout(micro_batch=4 * b, grad_accum=1, world_size=1, rank=0)
    split = [StreamLayout(micro_batch=b, grad_accum=2, world_size=2, rank=r) for r in range(2)]
    assert single.samples_per_step == split[0].samples_per_step == 4 * b
    seen = []
    for step in range(5):
        parts = [layout.positions(step, micro) for layout in split for micro in range(2)]
        flat = [p for part in parts for p in part]
        assert len(flat) == len(set(flat)) and all(len(part) == b for part in parts)
        assert sorted(flat) == single.positions(step, 0) == list(range(4 * b * step, 4 * b * (step + 1)))
        seen += flat
    assert sorted(seen) == list(range(20 * b))  # steps tile the stream without gaps or overlaps


def test_stream_batch_sampler_resumes_at_its_step():
    layout = StreamLayout(micro_batch=2, grad_accum=2, world_size=2, rank=1)
    full = iter(StreamBatchSampler(layout))
    batches = [next(full) for _ in range(10)]
    resumed = iter(StreamBatchSampler(layout, start_step=3))
    assert [next(resumed) for _ in range(4)] == batches[6:10]
    assert batches[0] == layout.positions(0, 0) and batches[1] == layout.positions(0, 1)


def test_epoch_permutation_covers_each_index_once_per_epoch():
    class Items:
        def __len__(self):
            return 7

        def __getitem__(self, i):
            return {"index": i}

    ds = EpochPermutation(Items(), seed=3)
    epochs = [[ds[p]["index"] for p in range(e * 7, (e + 1) * 7)] for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(7))
    assert len({tuple(o) for o in epochs}) > 1, "each epoch draws a fresh permutation"
    assert ds[9]["position"] == 9
    again = EpochPermutation(Items(), seed=3)
    assert [again[p]["index"] for p in reversed(range(21))] == [i for o in epochs for i in o][::-1]
    assert [EpochPermutation(Items(), seed=4)[p]["index"] for p in range(7)] != epochs[0]


def test_draw_randomness_per_position_independent_of_batch():
    sampler = MaskSampler(paper_curriculum(), 100)
    diffusion = Diffusion(DiffusionConfig())
    args = dict(seed=5, mask_sampler=sampler, diffusion=diffusion, num_frames=9, latent_shape=(12, 4, 4),
                plan_dropout=0.3, device=torch.device("cpu"))
    alone = draw_randomness([7], step=60, **args)
    batch = draw_randomness([2, 7, 11, 30], step=60, **args)
    assert batch.mask.shape == (4, 9) and batch.noise.shape == (4, 9, 12, 4, 4)
    assert torch.equal(batch.mask[1], alone.mask[0]) and torch.equal(batch.t[1], alone.t[0])
    assert torch.equal(batch.drop_plan[1], alone.drop_plan[0]) and torch.equal(batch.noise[1], alone.noise[0])
    assert not torch.equal(batch.noise[0], batch.noise[1])
    # the gather attention's shapes, read on the host: the most generated and the most reference frames
    generated = batch.mask.sum(1)
    assert batch.frame_counts == (int(generated.max()), int((9 - generated).max()))
    later = draw_randomness([7], step=61, **args)
    assert not torch.equal(later.noise[0], alone.noise[0]), "randomness must depend on the step"
    reseeded = draw_randomness([7], step=60, **{**args, "seed": 6})
    assert not torch.equal(reseeded.noise[0], alone.noise[0]), "randomness must depend on the seed"


def test_draw_randomness_several_noise_draws_per_position():
    """train.noise_draws: each position's k levels and noises follow one another; its first noise, its mask and its
    plan drop are those of one draw (the same stream), its levels stratified (Diffusion.sample_t)."""
    args = dict(step=60, seed=5, mask_sampler=MaskSampler(paper_curriculum(), 100), diffusion=Diffusion(DiffusionConfig()),
                num_frames=9, latent_shape=(12, 4, 4), plan_dropout=0.3, device=torch.device("cpu"))
    one = draw_randomness([2, 7], **args)
    three = draw_randomness([2, 7], **args, draws=3)
    assert three.t.shape == (6,) and three.noise.shape == (6, 9, 12, 4, 4) and three.mask.shape == (2, 9)
    assert torch.equal(three.mask, one.mask) and torch.equal(three.drop_plan, one.drop_plan)
    assert three.frame_counts == one.frame_counts
    assert torch.equal(three.noise[0], one.noise[0]) and torch.equal(three.noise[3], one.noise[1])
    assert torch.equal(three.t[[0, 3]], one.t)
    assert not torch.equal(three.noise[0], three.noise[1])
    gaps = torch.remainder(three.t.view(2, 3).diff(dim=1), 1.0)
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / 3), rtol=0, atol=1e-4)


@pytest.fixture
def restores_determinism():
    """train.deterministic switches the process (like a seed); put every switch back for the other tests."""
    import torch._inductor.config as inductor_config

    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, inductor_config.deterministic, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, inductor_config.deterministic = saved[1:4]
    if saved[4] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[4]


def test_deterministic_runs_switch_every_kernel_choice_and_repeat_bit_for_bit(tmp_path, restores_determinism, caplog):
    """train.deterministic=true: PyTorch's deterministic algorithms, Inductor's deterministic mode, cuDNN without
    autotuning and cuBLAS's reproducible workspace are all on once the trainer is built, and two runs of one seed,
    with the curriculum's masks, the EMA and the end-of-run validation, raise no "no deterministic implementation"
    error on this path and end with identical weights (on the GPU this is what the mode buys; BENCHMARKS.md)."""
    from mardini.training.determinism import determinism_enabled

    assert not determinism_enabled(), "another test left the process deterministic"
    runs = []
    for name in ("a", "b"):
        with caplog.at_level(logging.INFO, logger="mardini"):
            trainer = Trainer(tiny_config(tmp_path / name, max_steps=3, deterministic=True))
        assert any(r.getMessage().startswith("train.deterministic: deterministic kernels only") for r in caplog.records)
        assert determinism_enabled() and not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        trainer.fit()
        runs.append(tmp_path / name)
    assert_state_equal(model_weights(checkpoint(runs[0], 3)), model_weights(checkpoint(runs[1], 3)), "model weights")
    assert_state_equal(export_weights(runs[0]), export_weights(runs[1]), "exported EMA weights")


def test_deterministic_with_an_attention_library_outside_pytorch_warns(tmp_path, restores_determinism, caplog,
                                                                       monkeypatch):
    """fa4 and xformers kernels are not switched by PyTorch's deterministic mode: the run says so at the start."""
    monkeypatch.setattr(trainer_module, "check_backend", lambda *a, **k: None)  # no xformers on this machine
    cfg = tiny_config(tmp_path / "x", max_steps=1, deterministic=True)
    cfg.model.attn_backend = "xformers"
    with caplog.at_level(logging.WARNING, logger="mardini"):
        Trainer(cfg)  # built, not run: xformers is imported at the first forward pass
    assert any("model.attn_backend=xformers" in r.getMessage() and "reruns may still differ" in r.getMessage()
               for r in caplog.records)
