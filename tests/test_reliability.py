"""Reliability and command-line behaviour (issue 13): scheduler signals, one run per folder, one-line user errors,
start-up checks, nothing overwritten by accident, skip counts, a failed rank ending the job, lazy media backends.

The command-line tests start `python -m mardini.train` (Hydra, as a user runs it) in a subprocess with the tiny
default experiment; every subprocess has a timeout, so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_training import (REPO, checkpoint, checkpoint_names, free_port, read_metrics, run_script,  # noqa: F401
                              single_thread, subprocess_env, tiny_config, torchrun)
from mardini.cli import INTERRUPTED_EXIT_CODE, USER_ERROR_EXIT_CODE
from mardini.data.counter_videos import write_test_video
from mardini.data.decode import VideoDecodeError, read_clip
from mardini.evaluation.cli import main as eval_main
from mardini.inference import cli as sample_cli
from mardini.inference.pipeline import MarDiniPipeline
from mardini.masking import i2v_finetune
from mardini.training import checkpoint as ckpt
from mardini.training import trainer as trainer_module
from mardini.training.runlock import LOCK_NAME, RunLockedError
from mardini.training.trainer import PREEMPTED_EXIT_CODE, Trainer

# Tiny, fast settings for the command-line runs (the default experiment is the tiny synthetic one).
TINY = ["curriculum=interpolation", "train.trackers=[]", "train.progress=false", "train.batch_size=2",
        "train.warmup_steps=1", "train.num_sample_videos=1", "train.sample_steps=1"]


def train_command(run_dir, *overrides) -> list[str]:
    return [sys.executable, "-m", "mardini.train", *TINY, f"hydra.run.dir={run_dir}", *overrides]


def run_train(tmp_path, run_dir, *overrides, env=None, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(run_dir, *overrides), cwd=tmp_path, env=env or subprocess_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)


def lines_in(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def wait_for(condition, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes ({} for no folder)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`, read from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_long_run(run: Path, tmp_path, *overrides) -> subprocess.Popen:
    """A run in its own session with 2 DataLoader workers, returned once it has logged two steps."""
    proc = subprocess.Popen(train_command(run, "train.max_steps=100000", "train.checkpoint_every=100000",
                                          "data.num_workers=2", *overrides),
                            cwd=tmp_path, env=subprocess_env(tmp_path), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: lines_in(run / "metrics.jsonl") >= 2 or proc.poll() is not None, 180, "two steps")
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc


def signal_long_run(run: Path, tmp_path, send) -> tuple[subprocess.Popen, str]:
    """Start a long run, call send(proc) to signal it, and return (proc, its output) once it has ended."""
    proc = start_long_run(run, tmp_path)
    try:
        send(proc)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc, out


# ============================================= 1. SIGTERM to the process group or to every process; Ctrl-C
@pytest.mark.slow
def test_sigterm_to_process_group_with_workers_checkpoints_and_exits_preempted(tmp_path):
    """What `timeout`, SLURM and Kubernetes do: SIGTERM to every process of the job, DataLoader workers included.
    The run must save a checkpoint at the step it reached and exit with the documented pre-emption status."""
    run = tmp_path / "run"
    proc, out = signal_long_run(run, tmp_path, lambda proc: os.killpg(proc.pid, signal.SIGTERM))
    assert proc.returncode == PREEMPTED_EXIT_CODE == 75, out[-4000:]
    assert "killed by signal" not in out and "Traceback" not in out, out[-4000:]
    last = read_metrics(run)[-1]["step"]
    assert ckpt.latest_checkpoint(run / "checkpoints") == checkpoint(run, last)
    assert not (run / LOCK_NAME).exists()


@pytest.mark.slow
def test_sigterm_to_every_process_by_pid_checkpoints_and_exits_preempted(tmp_path):
    """What SLURM (every process of the job step), `pkill -f` and systemd do: SIGTERM to each process by pid, the
    DataLoader workers first. The workers ignore it; the run checkpoints, exits 75 and takes its workers along."""
    run = tmp_path / "run"
    workers = []

    def to_every_process(proc):
        workers.extend(descendants(proc.pid))
        assert len(workers) >= 2, workers
        for pid in [*workers, proc.pid]:
            os.kill(pid, signal.SIGTERM)

    proc, out = signal_long_run(run, tmp_path, to_every_process)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-4000:]
    assert "killed by signal" not in out and "Traceback" not in out, out[-4000:]
    assert "SIGTERM received: checkpoint saved" in out, out[-4000:]
    last = read_metrics(run)[-1]["step"]
    assert ckpt.latest_checkpoint(run / "checkpoints") == checkpoint(run, last)
    wait_for(lambda: not any(map(running, workers)), 30, "the workers to exit")


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_exits_130_without_a_traceback(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) stops like SIGTERM, with the status of an interrupt."""
    run = tmp_path / "run"
    proc, out = signal_long_run(run, tmp_path, lambda proc: os.killpg(proc.pid, signal.SIGINT))
    assert proc.returncode == INTERRUPTED_EXIT_CODE == 130, out[-4000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-4000:]
    assert "SIGINT received: checkpoint saved" in out, out[-4000:]
    last = read_metrics(run)[-1]["step"]
    assert ckpt.latest_checkpoint(run / "checkpoints") == checkpoint(run, last)
    assert not (run / LOCK_NAME).exists()


CTRL_C_TWICE = """
import os, signal, sys, time
from mardini.cli import train_main
from mardini.training.trainer import Trainer

real_step = Trainer.train_step

def long_step(self, batches):  # the second step outlasts the user's patience: Ctrl-C, and again
    result = real_step(self, batches)
    if self.step == 1:
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    return result

Trainer.train_step = long_step
sys.argv = ["mardini-train", *sys.argv[1:]]
train_main()
"""


def test_ctrl_c_twice_stops_at_once_in_one_line(tmp_path):
    """The way out of a long step: a second Ctrl-C stops at once, without a checkpoint, in one line."""
    run = tmp_path / "run"
    result = run_script(tmp_path, "ctrl_c_twice.py", CTRL_C_TWICE,
                        [*TINY, "train.max_steps=100", f"hydra.run.dir={run}"], check=False)
    assert result.returncode == INTERRUPTED_EXIT_CODE, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        "mardini-train: interrupted (Ctrl-C twice: stopped without saving a checkpoint)"], result.stderr[-3000:]
    assert checkpoint_names(run) == [] and not (run / LOCK_NAME).exists()


# ============================================================================= 2. one run per run folder
HOLDER = """
import sys, time
from mardini.training import runlock
runlock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def test_second_run_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, caplog):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True,
                              env=subprocess_env(tmp_path))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"in use by another run \\(pid {holder.pid} on "):
            Trainer(tiny_config(run))
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # the refused run wrote nothing
    finally:
        holder.kill()  # kill -9: no clean-up, the lock file stays
        holder.wait(timeout=60)
    assert (run / LOCK_NAME).exists()
    with caplog.at_level(logging.WARNING, logger="mardini.train"):
        trainer = Trainer(tiny_config(run, max_steps=1))
    assert f"pid {holder.pid}" in caplog.text and "no longer running" in caplog.text
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    trainer.fit()
    assert not (run / LOCK_NAME).exists()  # a run that ends releases the folder


# ============================================================== 3. a fresh start truncates metrics.jsonl
@pytest.mark.parametrize("resume", ["", "auto"])
def test_fresh_start_truncates_metrics_of_an_earlier_attempt(tmp_path, resume):
    """An attempt killed before its first checkpoint left steps 1..5; the fresh start must not append to them."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)))
    trainer = Trainer(tiny_config(run, max_steps=2, resume=resume))
    assert trainer.step == 0 and read_metrics(run) == []


# ======================================================================== 4. one-line user errors
@pytest.mark.slow
def test_train_user_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    run = tmp_path / "run"
    plain = run_train(tmp_path, run, "train.lr=-1")
    assert plain.returncode == USER_ERROR_EXIT_CODE == 2, plain.stderr
    lines = plain.stderr.strip().splitlines()
    assert lines[0] == "mardini-train: error: train.lr must be > 0, got -1.0" and len(lines) == 2, plain.stderr
    assert "Traceback" not in plain.stdout + plain.stderr
    assert not run.exists()  # nothing left behind (Hydra had made the folder)
    debug = subprocess.run(train_command(run, "train.lr=-1") + ["--debug"], cwd=tmp_path, capture_output=True,
                           text=True, env=subprocess_env(tmp_path), timeout=240)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "train.lr must be > 0" in debug.stderr
    full = run_train(tmp_path, run, "train.lr=-1", env=dict(subprocess_env(tmp_path), HYDRA_FULL_ERROR="1"))
    assert full.returncode == 1 and "Traceback" in full.stderr


@pytest.mark.parametrize("override, expected", [
    ("train.lrr=1", "mardini-train: error: unknown config key train.lrr (did you mean train.lr?)"),
    ("model=hugee", "mardini-train: error: model=hugee: no such option (choose one of base, paper, small, tiny)"),
    # a known key with a value of the wrong type (once reported as an unknown key that "means" itself)
    ("train.max_steps=abc", "mardini-train: error: train.max_steps=abc: not a valid integer"),
    ("train.freeze_planner=maybe", "mardini-train: error: train.freeze_planner=maybe: not a valid bool"),
    # configs/accelerate/ sits beside the groups (so Hydra's --help lists it) but holds launcher configs
    # deleting a key of the schema (once "unknown config key train.lr (did you mean train.lr?)"), no "="
    ("~train.lr", "mardini-train: error: ~train.lr: the run config's keys cannot be deleted; set a value instead"),
    ("train.lr", "mardini-train: error: train.lr: an override is key=value or group=option (e.g. train.lr=1e-3"),
    ("accelerate=fsdp_2gpu", "mardini-train: error: accelerate=fsdp_2gpu: configs/accelerate/ holds launcher configs, "
                             "not a config group; launch with them: accelerate launch --config_file "
                             "configs/accelerate/fsdp_2gpu.yaml -m mardini.train"),
])
def test_unknown_key_or_option_is_one_line_with_the_nearest_valid_one(tmp_path, override, expected):
    result = run_train(tmp_path, tmp_path / "run", override)
    assert result.returncode == USER_ERROR_EXIT_CODE, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(expected), result.stderr
    assert not (tmp_path / "run").exists()


def test_help_names_the_command_and_what_configs_accelerate_holds(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mardini.train", "--help"], cwd=tmp_path, capture_output=True,
                            text=True, env=subprocess_env(tmp_path), timeout=120)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and lines[0].startswith("mardini-train [group=option ...] [key=value ...]"), lines[:2]
    assert "model: base, paper, small, tiny" in lines and "  lr: 0.004" in lines, result.stdout  # groups, config
    assert lines[-1].startswith("configs/accelerate/ holds launcher configs"), lines[-1]


def test_config_checks_do_not_import_diffusers():
    """A refused override or --help answers in about 2 s: the run config and the models import without diffusers
    (which alone costs about 2 s more), which is imported where a scheduler or a VAE is built."""
    probe = ("import sys; import mardini.training.config, mardini.models, mardini.diffusion; "
             "from mardini.diffusion import DiffusionConfig, build_scheduler; "
             "assert 'diffusers' not in sys.modules, 'imported with the config'; "
             "build_scheduler(DiffusionConfig(), 4); assert 'diffusers' in sys.modules")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def bad_videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_videos")
    for i in range(4):
        (root / f"broken{i}.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    return root


@pytest.mark.slow
def test_train_with_only_bad_data_fails_in_one_line(tmp_path, bad_videos):
    """The error raised in a DataLoader worker reaches the console as the worker's own one-line message. (The
    validation videos, decoded at start, are a good file elsewhere: unreadable ones stop the run before training.)"""
    write_test_video(tmp_path / "val" / "good.mp4", num_frames=48, fps=24, height=32, width=32)
    result = run_train(tmp_path, tmp_path / "run", "data=video", f"data.video.root={bad_videos}",
                       f"data.video.val_root={tmp_path / 'val'}", "data.video.num_frames=9", "data.video.height=32",
                       "data.video.width=32", "data.num_workers=2")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("mardini-train: error: sample "), result.stderr[-3000:]
    assert "attempts failed" in lines[0] and "broken" in lines[0]
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.slow
def test_a_file_that_never_opens_stops_the_run_in_one_line_naming_it(tmp_path):
    """A file whose opening never returns (here a named pipe with no writer, as a hung network file system does)
    held a data=video run forever, in its real decoder. Now the run stops once data.timeout has passed with status
    2 and one line naming the file, and leaves no process behind."""
    for i in range(3):
        write_test_video(tmp_path / "videos" / f"good{i}.mp4", num_frames=48, fps=24, height=32, width=32)
    os.mkfifo(tmp_path / "videos" / "stuck.mp4")
    write_test_video(tmp_path / "val" / "good.mp4", num_frames=48, fps=24, height=32, width=32)
    start = time.monotonic()
    proc = subprocess.Popen(train_command(tmp_path / "run", "data=video", f"data.video.root={tmp_path / 'videos'}",
                                          f"data.video.val_root={tmp_path / 'val'}", "data.video.num_frames=9",
                                          "data.video.height=32", "data.video.width=32", "data.num_workers=1",
                                          "data.timeout=5", "train.max_steps=8"),
                            cwd=tmp_path, env=subprocess_env(tmp_path), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2, err[-3000:]
    lines = err.strip().splitlines()
    assert lines[0].startswith("mardini-train: error: no batch from the DataLoader workers in data.timeout=5 s "
                               "for training step "), err[-3000:]
    assert str(tmp_path / "videos" / "stuck.mp4") in lines[0], lines[0]
    assert lines[0].endswith("; no checkpoint was saved yet"), lines[0]  # its step-2 batch is read ahead in step 1
    assert "Traceback" not in out + err and time.monotonic() - start < 200
    wait_for(lambda: not [pid for pid in descendants(os.getpid()) if running(pid)], 10, "no process left")


def test_eval_user_error_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["interpolation", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("mardini-eval: error: ") and str(tmp_path / "missing") in lines[0]
    assert len(lines) == 2
    with pytest.raises(Exception, match="missing"):  # --debug: the exception itself, with its traceback
        eval_main(["interpolation", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--debug"])


@pytest.mark.parametrize("main, argv, expected", [
    (sample_cli.main, ["--model", "m", "--task", "i2v", "--inputs", "a.png", "--output", "o.mp4", "--num-frames", "0"],
     "mardini-sample: error: argument --num-frames: must be >= 1, got 0"),
    (sample_cli.main, ["--model", "m", "--task", "zoom"], "mardini-sample: error: argument --task: invalid choice"),
    (eval_main, ["fvd", "a"], "mardini-eval fvd: error: the following arguments are required: folder_b"),
    (eval_main, ["psnr"], "mardini-eval: error: argument command: invalid choice: 'psnr'"),
])
def test_command_line_errors_are_one_line(capsys, main, argv, expected):
    """argparse's own errors come as one line with a pointer to --help, not after the whole usage block."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == USER_ERROR_EXIT_CODE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(expected) and "--help" in lines[1], lines


def test_eval_refusals_are_user_errors(tmp_path, capsys):
    """No I3D weights for fvd or for --fvd require, an unknown baseline: one line, status 2, nothing written."""
    no_weights, out = tmp_path / "weights", tmp_path / "out"
    no_weights.mkdir()
    protocol = ["interpolation", "--data", str(tmp_path), "--out", str(out), "--weights-dir", str(no_weights)]
    cases = [
        (["fvd", str(tmp_path), str(tmp_path), "--weights-dir", str(no_weights)], "no I3D weights (looked for"),
        ([*protocol, "--baselines", "nearest"], "--baselines: unknown baseline(s) ['nearest']; choose from"),
        ([*protocol, "--fvd", "require"], "--fvd require, but no I3D weights"),
        # once named a keyword argument the command line does not have, and an [Errno 17] after the data was read
        (["fvd", str(tmp_path), str(tmp_path), "--num-frames", "4"], "--num-frames 4: I3D needs at least 9 frames"),
        (["interpolation", "--data", str(tmp_path), "--out", str(no_weights / "a.txt")], "a.txt is a file: give a "
                                                                                          "folder"),
        ([*protocol, "--clips", str(no_weights / "a.txt")], "a.txt is not a clips file (not JSON"),
    ]
    (no_weights / "a.txt").write_text("not a folder")
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            eval_main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == USER_ERROR_EXIT_CODE and len(lines) == 2, lines
        assert lines[0].startswith("mardini-eval: error: ") and message in lines[0], lines
    assert not out.exists()


@pytest.mark.parametrize("prog", ["mardini-sample", "mardini-eval"])
def test_ctrl_c_in_sample_and_eval_is_one_line_and_130(prog, tmp_path, capsys, monkeypatch):
    """Ctrl-C while sampling or evaluating: `<prog>: interrupted` and status 130, no traceback; --debug raises."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    if prog == "mardini-sample":
        monkeypatch.setattr(sample_cli, "sample", interrupted)
        main, argv = sample_cli.main, ["--model", str(tmp_path), "--task", "i2v", "--inputs", "x.png", "--output",
                                       str(tmp_path / "o.mp4")]
    else:
        from mardini.evaluation import cli as eval_cli

        monkeypatch.setattr(eval_cli, "run_fvd", interrupted)
        main, argv = eval_main, ["fvd", str(tmp_path), str(tmp_path)]
    with pytest.raises(SystemExit) as stopped:
        try:
            main(argv)
        except KeyboardInterrupt:  # caught here, so that it fails this test instead of stopping pytest
            pytest.fail(f"Ctrl-C escaped {prog} as a KeyboardInterrupt (a traceback)")
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == INTERRUPTED_EXIT_CODE and err == [f"{prog}: interrupted"], err
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--debug"])


# ============================================== 5. a rejected config writes nothing into an existing run folder
@pytest.mark.slow
def test_rejected_runs_leave_an_existing_run_folder_untouched(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints" / "step_000003").mkdir(parents=True)
    (run / "checkpoints" / "step_000003" / ckpt.COMPLETE).write_text("")
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "cli.log", "config.yaml", "metrics.jsonl"):
        (run / name).write_text(f"the first run's {name}\n")

    before = snapshot(run)
    bad_value = run_train(tmp_path, run, "train.lr=-1")
    assert bad_value.returncode == 2 and "train.lr" in bad_value.stderr
    rerun = run_train(tmp_path, run, "train.max_steps=4")  # no train.resume: refused, the folder holds checkpoints
    assert rerun.returncode == 2 and "train.resume=auto" in rerun.stderr
    assert snapshot(run) == before


# ========================================================= 6. start-up checks of what would fail later
@pytest.fixture
def no_model(monkeypatch):
    """Building the model fails the test: a start-up check must fire before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the start-up checks")

    monkeypatch.setattr(trainer_module, "MarDini", refuse)


def test_clip_too_short_for_validation_fails_at_start(tmp_path, no_model):
    cfg = tiny_config(tmp_path / "run", curriculum=i2v_finetune())
    cfg.data.synthetic.num_frames = 2  # trains (image-to-video), but leaves interpolation nothing to generate
    with pytest.raises(ValueError, match="data.synthetic.num_frames=2 is too short for the interpolation"):
        Trainer(cfg)


def test_missing_resume_path_fails_before_the_model_is_built(tmp_path, no_model):
    with pytest.raises(FileNotFoundError, match="train.resume=.*nowhere does not exist"):
        Trainer(tiny_config(tmp_path / "run", resume=str(tmp_path / "nowhere")))


@pytest.mark.parametrize("existing", [False, True], ids=["new_folder", "existing_folder"])
def test_a_run_refused_after_taking_the_lock_leaves_no_trace(tmp_path, no_model, existing):
    """The start-up checks run with the folder locked. A refused run releases it at once, while its exception (which
    holds the half-built Trainer) is still alive, as when mardini-train removes the folder: a folder made for it is
    gone, an existing one is left byte for byte."""
    run = tmp_path / "run"
    if existing:
        (run / "checkpoints" / "step_000003").mkdir(parents=True)
        (run / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    before = snapshot(run)
    short = tiny_config(run, resume="auto", curriculum=i2v_finetune())
    short.data.synthetic.num_frames = 2
    for cfg in (tiny_config(run, resume=str(tmp_path / "nowhere")), short):
        with pytest.raises((FileNotFoundError, ValueError)) as error:
            Trainer(cfg)
        assert run.exists() == existing and snapshot(run) == before, error.value


@pytest.mark.parametrize("backend", ["xformers", "fa4"])
def test_attention_backend_without_kernels_here_fails_at_start(tmp_path, no_model, backend):
    """model.attn_backend=xformers or fa4 on the CPU (no kernels there, installed or not) used to pass the start-up,
    write the run folder and its trackers, and fail in the first training step with a traceback."""
    cfg = tiny_config(tmp_path / "run", cpu=True)  # the CPU on any machine: neither backend has kernels there
    cfg.model.attn_backend = backend
    if backend == "fa4":
        cfg.model.generator.identity_impl = "gather"  # fa4 takes no mask: the config check wants this first
    with pytest.raises(ValueError, match=f"^model.attn_backend={backend}: .*; use model.attn_backend=sdpa$"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()


def test_a_cpu_trainer_after_a_gpu_one_in_the_same_process(tmp_path):
    """Accelerate fixes the device at the first Accelerator of a process: on a GPU machine the CPU-only tests above
    failed with its "cannot be changed" error when a GPU test had run before them in the same session."""
    from accelerate.state import PartialState

    Trainer(tiny_config(tmp_path / "first", cpu=True))._release_lock()
    PartialState._shared_state["device"] = torch.device("cuda", 0)  # as a Trainer on the GPU leaves it
    trainer = Trainer(tiny_config(tmp_path / "second", cpu=True))
    trainer._release_lock()
    assert trainer.accelerator.device.type == "cpu"


def test_a_cpu_step_far_beyond_the_machine_is_announced_with_its_cost(tmp_path, caplog, monkeypatch):
    """`mardini-train data=video data.video.root=...` on the CPU (17 frames at 256 px with the tiny model: 146 TFLOP
    a step) once ran for minutes without a word until the kernel's out-of-memory killer ended it. The start-up now
    logs every run's step cost and warns, with the time and memory the step needs, where a CPU step is heavy; the
    default-sized run is not warned about."""
    monkeypatch.setattr(trainer_module, "_available_memory", lambda: 24 * 2**30)

    def start(name, size, frames, precision="no"):
        cfg = tiny_config(tmp_path / name, max_steps=320, cpu=True, mixed_precision=precision)  # CPU on any machine
        cfg.model.max_frames = frames
        cfg.data.synthetic.update(height=size, width=size, num_frames=frames)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="mardini.train"):
            Trainer(cfg)._release_lock()
        return [r.getMessage() for r in caplog.records if r.name == "mardini.train"]

    small = start("small", 16, 5)
    cost = next(m for m in small if m.startswith("a training step: "))
    assert "tokens per clip (planner 16, generator 16 per frame)" in cost, cost
    assert not any("heavy" in m for m in small), small
    big = start("big", 256, 17)
    warning = next(m for m in big if m.startswith("this step is heavy for a CPU: "))
    tflop = float(warning.split(": ")[1].split(" TFLOP")[0])
    assert 20 < tflop < 60, warning  # batch 2 and the test's narrower generator: 26 (data=video's defaults: 151)
    hours = float(warning.split(" h for train.max_steps=320")[0].rsplit(" ", 1)[1])
    assert hours == pytest.approx(tflop / 0.1 * 320 / 3600, rel=0.01), warning  # at 0.1 TFLOP/s
    assert "(24 GiB available)" in warning and "train on a GPU" in warning, warning
    # Under bf16 autocast the activations are stored in half the bytes (experiment=small_synthetic on the CPU peaked
    # at 15.1 GiB where the fp32 rate said 35): the same step at half the memory.
    fp32_gib = float(warning.split("activations need about ")[1].split(" GiB")[0])
    bf16 = next(m for m in start("bf16", 256, 17, "bf16") if m.startswith("this step is heavy for a CPU: "))
    assert float(bf16.split("activations need about ")[1].split(" GiB")[0]) == pytest.approx(fp32_gib / 2, abs=0.6)


def test_a_new_run_refused_by_the_cli_leaves_no_folder(tmp_path):
    """mardini-train train.resume=<missing> (or any check after the lock) with a new run name: the folders Hydra made
    for it go, parents included, and a folder that was there before stays."""
    (tmp_path / "kept").mkdir()
    result = run_train(tmp_path, tmp_path / "kept" / "experiment" / "nf2", f"train.resume={tmp_path / 'nowhere'}")
    assert result.returncode == USER_ERROR_EXIT_CODE and "train.resume=" in result.stderr, result.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not any((tmp_path / "kept").iterdir())
    result = run_train(tmp_path, "outputs/tiny/nf3", "train.max_steps=-1")  # refused before the lock, default place
    assert result.returncode == USER_ERROR_EXIT_CODE and "train.max_steps" in result.stderr, result.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]


def test_missing_mp4_encoder_fails_at_start_naming_the_packages(tmp_path, no_model, monkeypatch):
    from mardini.data import backends

    real_load = backends.load

    def load(module):
        if module in ("imageio_ffmpeg", "av"):
            raise ImportError(f"no {module} here")
        return real_load(module)

    monkeypatch.setattr(backends, "load", load)
    with pytest.raises(backends.MissingBackendError, match="imageio-ffmpeg or PyAV"):
        Trainer(tiny_config(tmp_path / "run"))


# ===================================================================== 7. mardini-sample input and output
@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("sample_export")
    cfg = tiny_config(run, max_steps=1)
    # Untrained weights (zero output at the adaLN-Zero init) are enough for the command line's checks. A velocity
    # model then passes its noise through, so two seeds give two videos; an untrained clean-sample model would
    # return the same video (zeros) for every seed.
    cfg.diffusion.prediction = "velocity"
    trainer = Trainer(cfg)
    path = trainer.export()
    trainer._release_lock()
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    from PIL import Image

    folder = tmp_path_factory.mktemp("sample_inputs")
    rng = np.random.default_rng(0)
    paths = [folder / f"in{i}.png" for i in range(2)]
    for p in paths:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(p)
    (folder / "broken.png").write_bytes(b"not a png")
    return paths + [folder / "broken.png"]


def sample(capsys, export, task, inputs, output, *extra):
    """Run mardini-sample in this process -> (exit code, stderr lines, stdout)."""
    args = ["--model", str(export), "--task", task, "--inputs", *map(str, inputs), "--output", str(output),
            "--steps", "1", "--device", "cpu", *map(str, extra)]
    try:
        sample_cli.main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


@pytest.fixture
def model_not_loaded(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the checks")

    monkeypatch.setattr(MarDiniPipeline, "from_pretrained", refuse)


def test_sample_rejects_bad_inputs_and_outputs_in_one_line_before_loading(tmp_path, capsys, export, images,
                                                                           model_not_loaded):
    good, _, broken = images
    cases = [
        ([good, tmp_path / "missing.png"], tmp_path / "o.mp4", [], f"--inputs: {tmp_path / 'missing.png'} does not"),
        ([good, broken], tmp_path / "o.mp4", [], f"cannot read {broken} as an image"),
        ([good, good], tmp_path / "o.avi", [], "unsupported suffix '.avi'"),
        ([good, good], tmp_path / "a_file" / "o.mp4", [], "is not a writable folder"),
    ]
    (tmp_path / "a_file").write_text("")
    for inputs, output, extra, message in cases:
        code, err, _ = sample(capsys, export, "interpolate", inputs, output, *extra)
        assert code == 2 and len(err) == 2 and err[0].startswith("mardini-sample: error: "), err
        assert message in err[0], err
    code, err, _ = sample(capsys, tmp_path / "no_export", "interpolate", [good, good], tmp_path / "o.mp4")
    assert code == 2 and "--model" in err[0] and "no such folder" in err[0]
    code, err, _ = sample(capsys, export, "interpolate", [good, good], tmp_path / "o.mp4", "--num-frames", "0")
    assert code == 2 and len(err) == 2 and err[0].endswith("--num-frames: must be >= 1, got 0"), err
    code, err, _ = sample(capsys, export, "slow_motion", [good, good], tmp_path / "o.mp4", "--num-frames", "9")
    assert code == 2 and "--num-frames applies to --task interpolate, i2v, loop, long only, not slow_motion" in err[0]
    assert "the length follows from --factor" in err[0], err
    code, err, _ = sample(capsys, export, "i2v", [good], tmp_path / "o.mp4", "--positions", "3")
    assert code == 2 and "--positions applies to --task long only, not i2v" in err[0], err
    code, err, _ = sample(capsys, export, "interpolate", [good, good], tmp_path / "o.mp4", "--keyframes", "dense")
    assert code == 2 and "--keyframes applies to --task slow_motion, long only, not interpolate" in err[0], err
    code, err, _ = sample(capsys, export, "expand", [good], tmp_path / "o.mp4", "--factor", "8")
    assert code == 2 and "--factor applies to --task slow_motion only, not expand" in err[0], err
    # Options the export's config decides: a sampler of another formulation, guidance without a null plan.
    code, err, _ = sample(capsys, export, "interpolate", [good, good], tmp_path / "o.mp4", "--sampler", "ddim")
    assert code == 2 and err[0].startswith("mardini-sample: error: --sampler ddim: ") and "rectified_flow" in err[0]
    code, err, _ = sample(capsys, export, "interpolate", [good, good], tmp_path / "o.mp4", "--flow-shift", "0")
    assert code == 2 and err[0] == "mardini-sample: error: --flow-shift 0.0: diffusion.flow_shift must be > 0, got 0.0"
    code, err, _ = sample(capsys, export, "interpolate", [good, good], tmp_path / "o.mp4", "--guidance", "2")
    assert code == 2 and "--guidance 2.0: this model was trained without model.plan_dropout" in err[0], err
    code, err, _ = sample(capsys, export, "interpolate", [good, good], tmp_path / "o.mp4", "--attn-backend", "fa4")
    assert code == 2 and err[0].startswith("mardini-sample: error: --attn-backend=fa4: ") and \
        err[0].endswith("use --attn-backend=sdpa"), err  # no kernels on the CPU: refused before loading
    with pytest.raises(FileNotFoundError):  # --debug: the exception itself
        sample_cli.main(["--model", str(export), "--task", "i2v", "--inputs", str(tmp_path / "missing.png"),
                         "--output", str(tmp_path / "o.mp4"), "--debug"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing was written


def test_sample_never_overwrites_without_overwrite(tmp_path, capsys, export, images):
    good = images[0]
    out = tmp_path / "clip.mp4"
    assert sample(capsys, export, "i2v", [good], out)[0] == 0
    assert out.exists() and (tmp_path / "clip_preview.mp4").exists()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    code, err, _ = sample(capsys, export, "i2v", [good], out, "--seed", "1")
    assert code == 2 and f"{out} exists: pass --overwrite" in err[0]
    out.unlink()  # the preview alone is protected too
    code, err, _ = sample(capsys, export, "i2v", [good], out, "--seed", "1")
    assert code == 2 and f"{tmp_path / 'clip_preview.mp4'} exists" in err[0] and not out.exists()
    assert (tmp_path / "clip_preview.mp4").read_bytes() == before["clip_preview.mp4"]
    assert sample(capsys, export, "i2v", [good], out, "--seed", "1", "--overwrite")[0] == 0
    assert (tmp_path / "clip_preview.mp4").read_bytes() != before["clip_preview.mp4"]


def test_long_video_shows_its_plan_and_refuses_past_the_bound(tmp_path, capsys, export, images, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded for a plan that is refused")

    monkeypatch.setattr(MarDiniPipeline, "from_pretrained", no_loading)  # refusals come before loading
    good = images[0]
    start = time.monotonic()
    code, err, _ = sample(capsys, export, "long", [good, good], tmp_path / "long.mp4", "--num-frames", "100000")
    assert code == 2 and "needs at least" in err[0] and "--max-windows 500" in err[0], err
    assert time.monotonic() - start < 30  # refused without planning 100000 frames
    # 40 frames from 2 images in 9-frame windows: at least 5 calls; the plan makes 6 (dense keyframes: 9)
    code, err, out = sample(capsys, export, "long", [good, good], tmp_path / "long.mp4", "--num-frames", "40",
                            "--max-windows", "5")
    assert code == 2 and "the plan has 6 model calls" in err[0] and "--max-windows 5" in err[0], err
    code, err, out = sample(capsys, export, "long", [good, good], tmp_path / "long.mp4", "--num-frames", "40",
                            "--max-windows", "8", "--keyframes", "dense")
    assert code == 2 and "the plan has 9 model calls" in err[0] and "--max-windows 8" in err[0], err
    assert out.startswith("plan: ") and "windows" in out and "(dense keyframes)" in out and "model calls" in out
    # expand and slow_motion are plans of many windows too, bounded the same way (they once ran unbounded)
    start = time.monotonic()
    code, err, _ = sample(capsys, export, "expand", [good], tmp_path / "x.mp4", "--num-new", "100000")
    assert code == 2 and "--num-new 100000 needs at least" in err[0] and "--max-windows 500" in err[0], err
    code, err, _ = sample(capsys, export, "slow_motion", [good, good], tmp_path / "x.mp4", "--factor", "100000")
    assert code == 2 and "--factor 100000 (100001 frames) needs at least" in err[0], err
    assert time.monotonic() - start < 30
    # 20 new frames after 1 in 9-frame windows reading 4 known ones: 4 windows of 5 new frames (bound: 3)
    code, err, out = sample(capsys, export, "expand", [good], tmp_path / "x.mp4", "--num-new", "20",
                            "--max-windows", "3")
    assert code == 2 and "the plan has 4 model calls" in err[0] and "smaller --num-new" in err[0], err
    assert out.startswith("plan: 4 windows of up to 9 frames for 21 frames"), out
    # 41 frames from 2 (factor 40): 6 keyframes, then 5 windows between them (bound: 5)
    code, err, out = sample(capsys, export, "slow_motion", [good, good], tmp_path / "x.mp4", "--factor", "40",
                            "--max-windows", "5")
    assert code == 2 and "the plan has 6 model calls" in err[0] and "smaller --factor" in err[0], err
    assert list(tmp_path.iterdir()) == []


# ================================================================ 8. skip counts, decoder noise captured
def test_decoder_stderr_is_captured_into_the_files_error(tmp_path, capfd):
    good = write_test_video(tmp_path / "good.mp4", num_frames=20, height=32, width=32)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    capfd.readouterr()
    with pytest.raises(VideoDecodeError) as error:
        read_clip(str(truncated), lambda n, fps: [0, 1])
    assert "moov atom not found" in str(error.value) and str(truncated) in str(error.value)
    assert capfd.readouterr().err == ""  # nothing reached the console outside the message
    frames, _, _ = read_clip(str(good), lambda n, fps: [0, 1])
    assert frames.shape == (2, 32, 32, 3)


def test_skip_counts_reach_the_log_at_the_end_without_trackers(tmp_path, caplog):
    root, val = tmp_path / "videos", tmp_path / "val"
    for i in range(3):
        write_test_video(root / f"clip{i}.mp4", num_frames=30, fps=24, height=32, width=32)
    write_test_video(val / "val.mp4", num_frames=30, fps=24, height=32, width=32)
    (root / "empty.mp4").write_bytes(b"")
    cfg = tiny_config(tmp_path / "run", max_steps=3, batch_size=2)
    cfg.data.source = "video"
    cfg.data.video.root, cfg.data.video.val_root = str(root), str(val)
    cfg.data.video.num_frames, cfg.data.video.height, cfg.data.video.width = 9, 32, 32
    cfg.data.video.fps, cfg.data.video.min_failures = 12.0, 100
    cfg.data.num_workers = 0
    with caplog.at_level(logging.INFO, logger="mardini.train"):
        Trainer(cfg).fit()
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: ")]
    assert len(summary) == 1 and "video loads failed" in summary[0] and "empty.mp4" in summary[0], summary
    failed, total = (int(x) for x in summary[0].split()[1:4:2])
    assert 1 <= failed < total


# ================================================================ 9. a failed rank ends the job
FAILING_RANK = """
import os, sys, threading, time
import mardini.training.sampling as sampling

if os.environ["RANK"] == "0":
    def full_disk(*args, **kwargs):
        # A thread that never ends blocks this process's normal exit, as an NCCL process group can: the job must
        # end anyway.
        threading.Thread(target=time.sleep, args=(3600,)).start()
        raise OSError(28, "No space left on device (simulated)")

    sampling.write_video = full_disk
"""
# What each failing-rank script ends with: mardini-train itself, with the script's arguments.
RUN_TRAIN = """
from mardini.cli import train_main

sys.argv = ["mardini-train", *sys.argv[1:]]
train_main()
"""


def launch_failing_rank(tmp_path, source: str, *overrides: str) -> tuple[int, str, float]:
    """`source` + RUN_TRAIN under torchrun on 2 CPU processes with the tiny run: (torchrun's exit status, the
    output, seconds until the job ended)."""
    script = tmp_path / "failing_rank.py"
    script.write_text(textwrap.dedent(source) + RUN_TRAIN)
    command = [*torchrun(), str(script), *TINY, "train.cpu=true", *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    start = time.monotonic()
    result = subprocess.run(command, cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True, text=True,
                            timeout=240)
    return result.returncode, result.stdout + result.stderr, time.monotonic() - start



@pytest.mark.slow
@pytest.mark.distributed
def test_a_rank_failing_in_end_of_run_work_ends_the_job(tmp_path):
    returncode, output, elapsed = launch_failing_rank(tmp_path, FAILING_RANK, "train.max_steps=2")
    assert returncode != 0, output[-4000:]
    assert "mardini-train: error (rank 0): [Errno 28] No space left on device (simulated)" in output, output[-4000:]
    assert "mardini-train: error (rank 1): sample failed on another process (rank 0: OSError" in output, \
        output[-4000:]
    assert checkpoint_names(tmp_path / "run") == ["step_000002"]  # the final checkpoint precedes the videos
    # the trainer's lines come once, from rank 0 (both ranks' errors above came through)
    assert output.count("model parameters:") == 1 and output.count("saved checkpoint") == 1, output[-4000:]
    print(f"job ended {elapsed:.0f} s after its start")


OUT_OF_MEMORY_RANK = """
import os, sys
import torch
from mardini.training.trainer import Trainer

real = Trainer.train_step

def train_step(self, batches):
    if os.environ["RANK"] == "1" and self.step == 3:  # one rank alone, mid-run: what a too-large batch does
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
    return real(self, batches)

Trainer.train_step = train_step
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_one_rank_out_of_memory_mid_run_ends_the_job_in_one_line_saying_what_to_change(tmp_path):
    """Out of memory in a training step is the run's shape, not a passing fault: the rank says what to change and
    where the run resumes in one line, exits 2 (a requeue would fail again), and the job ends at once (FSDP: the
    other rank is inside a collective)."""
    returncode, output, elapsed = launch_failing_rank(tmp_path, OUT_OF_MEMORY_RANK, "train.max_steps=6",
                                                      "train.parallel=fsdp", "train.checkpoint_every=2")
    assert returncode != 0 and elapsed < 120, output[-4000:]
    line = next((x for x in output.splitlines() if x.startswith("mardini-train: error (rank 1): out of cpu memory")),
                None)
    assert line is not None, output[-4000:]
    assert "in training step 4" in line and "lower train.batch_size=2 (raise train.grad_accum=1 to keep the global " \
        "batch of 4)" in line and "train.activation_checkpointing=true" in line, line
    assert "train.parallel=fsdp" not in line  # already sharded
    assert "the last checkpoint, step_000002, continues with train.resume=auto" in line, line
    assert "exitcode  : 2" in output  # rank 1's own status: a user error
    assert checkpoint_names(tmp_path / "run") == ["step_000002"]


@pytest.mark.slow
@pytest.mark.distributed
def test_accelerate_launch_with_the_two_gpu_fsdp_config_runs_to_a_clean_finish(tmp_path):
    """configs/accelerate/fsdp_2gpu.yaml launches two processes (gloo on CPU here: train.cpu=true, and no `--cpu`,
    which would make Accelerate start one process); with train.parallel=fsdp the run trains, writes a sharded
    checkpoint, videos and an export, and every rank exits 0."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / "fsdp_2gpu.yaml"), "--main_process_port", str(free_port()),
               "-m", "mardini.train", *TINY, "train.max_steps=2", "train.parallel=fsdp", "train.cpu=true",
               "run_name=two", f"hydra.run.dir={run}"]
    result = subprocess.run(command, cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True, text=True,
                            timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "FSDP2: 4 blocks sharded over 2 processes" in output and "2 processes on cpu" in output, output[-4000:]
    assert checkpoint_names(run) == ["step_000002"] and (run / "checkpoints" / "step_000002" / "sharded").is_dir()
    assert (run / "export" / "model.safetensors").exists() and any((run / "samples").iterdir())
    assert [m["step"] for m in read_metrics(run)] == [1, 2]


# ====================================================================== 10. optional media backends
LAZY = """
import sys
blocked = sys.argv[1].split(",")
for name in blocked:
    sys.modules[name] = None  # `import name` raises ImportError
import mardini.training, mardini.training.trainer, mardini.inference, mardini.inference.cli, mardini.evaluation.cli
import numpy as np
from mardini.data.backends import MissingBackendError
from mardini.data.decode import read_frames
from mardini.data.video_io import write_video

frames = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
write_video("clip.gif", frames)
try:
    write_video("clip.mp4", frames)
    print("mp4 written")
except MissingBackendError as e:
    print("mp4:", e)
try:
    print("read", read_frames(sys.argv[2], [0, 3]).shape)
except MissingBackendError as e:
    print("read:", e)
loaded = sorted(m for m in ("av", "decord", "imageio_ffmpeg") if sys.modules.get(m) is not None)
print("loaded:", loaded)
"""


@pytest.mark.parametrize("blocked, expected", [
    ("av,decord,imageio_ffmpeg", ["mp4: writing mp4 videos needs imageio-ffmpeg or PyAV", "read: reading videos "
                                  "needs decord or PyAV", "loaded: []"]),
    ("imageio_ffmpeg,decord", ["mp4 written", "read (2, 64, 64, 3)", "loaded: ['av']"]),
    ("av", ["mp4 written", "read (2, 64, 64, 3)", "loaded: ['decord', 'imageio_ffmpeg']"]),
])
def test_media_backends_are_optional_and_loaded_lazily(tmp_path, blocked, expected):
    if blocked == "av":
        pytest.importorskip("decord")
    video = write_test_video(tmp_path / "source.mp4", num_frames=8, height=64, width=64)  # decord: width % 32 == 0
    result = subprocess.run([sys.executable, "-c", LAZY, blocked, str(video)], cwd=tmp_path, capture_output=True,
                            text=True, env=subprocess_env(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith(e) for line, e in zip(lines, expected)), lines


def test_cuda_rng_state_is_this_devices_and_resumes_on_fewer_gpus(monkeypatch):
    """A checkpoint stored the CUDA RNG state of every device the rank could see, and restoring it on a host that
    shows fewer GPUs (resuming a 2-GPU run on 1) failed with IndexError (found on the 2-GPU H200). Now each rank
    stores its own device's state; a state list from an older checkpoint gives the current device its entry."""
    fake = lambda v: torch.tensor([v], dtype=torch.uint8)  # noqa: E731
    restored, device = [], {"index": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": fake(7))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state.tolist()))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: device["index"])
    for name in ("get_rng_state_all", "set_rng_state_all"):  # every visible device: what broke the resume
        monkeypatch.setattr(torch.cuda, name, lambda *a: pytest.fail(f"torch.cuda.{name} used"))

    state = ckpt._rng_state()
    assert state["cuda"].tolist() == [7]
    ckpt._set_rng_state(state)
    assert restored == [[7]]
    older = dict(state, cuda=[fake(1), fake(2)])  # written on a host that showed 2 GPUs
    device["index"] = 1
    ckpt._set_rng_state(older)
    assert restored[-1] == [2]
    device["index"] = 2  # more GPUs now than then: no state for this device, the rest is restored
    expected = torch.rand(3)  # drawn right after the state was saved
    torch.rand(5)
    ckpt._set_rng_state(older)
    assert len(restored) == 2
    assert torch.equal(torch.rand(3), expected)  # the CPU generator is back where the checkpoint left it
