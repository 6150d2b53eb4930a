"""The Accelerate trainer: joint planner + generator training with the mask-ratio curriculum.

One call, ``train(cfg)``, runs a whole experiment: build data, autoencoder, model, EMA and optimizer; resume or
fine-tune if asked; loop over optimizer steps (gradient accumulation, clipping, non-finite-loss skipping); log to
the trackers, to ``metrics.jsonl`` and to a tqdm bar; write checkpoints, validation videos and finally an export of
the EMA weights. Data order and every sample's randomness depend only on (seed, step, position): see data.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import signal
import time
import traceback
import weakref
from functools import wraps
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..autoencoders import build_autoencoder
from ..autoencoders.kl import absolute_folder, kl_kwargs_from_config
from ..data import backends, video_io
from ..data.latent_cache import encode_hi_lo, split_cache
from ..data.synthetic import SyntheticVideoDataset
from ..data.video import SkipStats, TooManyFailuresError, VideoDataConfig, VideoDataset
from ..data.workers import items_in_words, timed_out, usable_workers
from ..dicts import dotted_plain
from ..diffusion import Diffusion
from ..evaluation.learning import baseline, ceiling, held_out_clips, held_out_synthetic_config, posterior_mean
from ..evaluation.metrics import clip_psnr
from ..masking import MaskSampler, task_mask, unreachable_ratios
from ..models import MarDini, as_model_config
from ..models.layers import check_backend
from .. import export as export_format
from . import checkpoint as ckpt
from . import runlock
from .compatibility import (FINE_TUNING_OPTIONAL_WEIGHTS, SAME_SHAPE_KEYS, check_same_network, check_same_objective,
                            not_loadable, trained_config, warn_other_latent_space)
from .config import Config, check_clip_shape, clip_config, latent_space, validate_config
from .data import EpochPermutation, StreamBatchSampler, StreamLayout, draw_randomness
from .determinism import enable_determinism
from .ema import EMA
from .optim import build_optimizer, build_scheduler, lr_factor
from .parallel import clip_grad_norm, full_tensor, is_sharded, parallelize, set_gradient_sync
from .progress import ProgressLog, finite_mean
from .sampling import VALIDATION_TASKS, validation_videos

log = logging.getLogger("mardini.train")

# Exit status of a run stopped by SIGTERM after saving its checkpoint (EX_TEMPFAIL, "try again later"): not 0, so a
# scheduler or `torchrun --max-restarts` can tell a pre-empted run from a finished one, and not 1 or 143, which
# mean an error and a kill without checkpoint. Written by mardini-train (cli.py); documented in the README.
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A CPU step beyond CPU_HEAVY_STEP_FLOP (~10 s) is warned about at start, with its time at CPU_FLOP_PER_S and its
# activations at CPU_ACTIVATION_BYTES per token, block and unit of width (fp32). Measured on 2 cores with the tiny
# model on 17-frame clips of 64 and 128 px: 4.1 and 61 s per step, 0.15-0.16 TFLOP/s of the curriculum's mean
# FLOPs (0.1 of the upper bound the warning states), and 128 bytes (peak memory 2.4 and 6.6 GB). Under bf16
# autocast half of it: `experiment=small_synthetic` on the CPU peaked at 15.1 GiB where 128 bytes said 35.
CPU_HEAVY_STEP_FLOP = 1e12
CPU_FLOP_PER_S = 1e11
CPU_ACTIVATION_BYTES = 128


class NonFiniteLossError(RuntimeError):
    pass


class RankFailedError(RuntimeError):
    """Another process of the job failed; this one stops too instead of waiting for it at a collective."""


class TrainingOutOfMemoryError(RuntimeError):
    """A training step ran out of device memory: the run's shape is too large for the device, which a restart
    does not change (a user error, exit status 2, with what to change)."""


class DataLoaderError(RuntimeError):
    """The DataLoader's workers gave no batch within data.timeout, or one of them died (a decoder or file system
    stuck on a file, the host's out-of-memory killer): one line naming the batch's files and where the run
    resumes, instead of a run that waits forever (a user error, exit status 2)."""


class _StopWhileWaitingForData(BaseException):
    """Raised by the stop-signal handler while the one process of a run waits for a batch from its workers, so
    that a stuck worker cannot hold a SIGTERM until data.timeout. A BaseException: the DataLoader's own `except
    Exception` must not take it for a worker's failure."""


def _available_memory() -> int | None:
    """Bytes of host memory available to a new allocation (Linux: MemAvailable), None where unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return None


def _as_dictconfig(cfg) -> DictConfig:
    if isinstance(cfg, DictConfig):
        return cfg
    if isinstance(cfg, Config):
        return OmegaConf.structured(cfg)
    return OmegaConf.merge(OmegaConf.structured(Config), cfg)


def _wandb_mode(requested: str) -> str:
    """auto: online only when credentials exist (env or ~/.netrc); machines without them log offline."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.exists() and "api.wandb.ai" in netrc.read_text())
    return "online" if has_key else "offline"


def _run_dir(cfg: DictConfig) -> Path:
    if cfg.train.output_dir:
        if Path(cfg.train.output_dir).is_file():
            raise NotADirectoryError(f"train.output_dir={cfg.train.output_dir} is a file; the run folder must be a "
                                     f"folder (a new or an existing one)")
        return Path(cfg.train.output_dir)
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return Path("outputs") / cfg.experiment / cfg.run_name


def _exchange_through_store(key: str, value: str) -> list[str]:
    """Every rank's `value` under `key`, through the process group's key-value store rather than a collective.

    A gather of Python objects would leave gloo's worker thread holding the last reference to Python tensors; if
    that is the last collective of the run, the thread needs the GIL while the interpreter tears down the process
    group under it, and the job hangs at exit (seen on CPU with 2 processes). The store involves no worker thread
    and no device."""
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    rank, world = dist.get_rank(), dist.get_world_size()
    store.set(f"mardini/{key}/{rank}", value)
    keys = [f"mardini/{key}/{r}" for r in range(world)]
    store.wait(keys)
    return [store.get(k).decode() for k in keys]


def _outcome_shared(method):
    """For sample / evaluate / export, whose work runs on the main process while the others wait: the wait is an
    exchange of every rank's outcome, so a failure on one rank (say, writing the final video) raises on all of them
    at once instead of leaving the others blocked at a barrier until the job is killed."""

    @wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            result, error = method(self, *args, **kwargs), None
        except Exception as e:
            result, error = None, e
        acc = self.accelerator
        if acc.num_processes > 1:
            said = "" if error is None else f"rank {acc.process_index}: {type(error).__name__}: {error}"
            self._shared_outcomes += 1
            failed = [x for x in _exchange_through_store(f"{method.__name__}/{self._shared_outcomes}", said) if x]
            if failed and error is None:
                raise RankFailedError(f"{method.__name__} failed on another process ({'; '.join(failed)})")
        if error is not None:
            raise error
        return result

    return wrapper


@contextlib.contextmanager
def _stop_signals_blocked():
    """Block SIGTERM / SIGINT while DataLoader workers are forked, so that they start with the signals blocked
    until they ignore them (_worker_ignores_stop_signals). A signal that arrives meanwhile is delivered to the main
    process when the block ends."""
    if not _in_main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _worker_ignores_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: SIGTERM / SIGINT are for the main process, which finishes the step, checkpoints
    and stops; a worker killed by one ends the run without a checkpoint ("DataLoader worker ... is killed by
    signal: Terminated"). They reach the workers through the process group (timeout, Kubernetes, Ctrl-C) and by pid
    (SLURM signals every process of the job step; pkill, systemd), so the workers ignore them. This replaces the
    SIGTERM handler torch installs before calling worker_init_fn (and never again). The workers still end when the
    main process shuts the loader down (_stop_workers) or dies: they watch their parent. Ignoring also discards a
    signal pending since the fork."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _worker_died(err: BaseException) -> str:
    """What to say of a DataLoader worker's death (torch's RuntimeError "DataLoader worker (pid ...) ..."), else ""."""
    text = str(err)
    if not text.startswith("DataLoader worker (pid"):
        return ""
    return f"{text.rstrip('. ')}: if the host ran out of memory, lower data.num_workers or data.prefetch_factor"


def _stop_workers(batches) -> None:
    """Stop the DataLoader workers now, not when a traceback that holds the iterator lets go of it. torch's last
    resort for a worker that does not finish, terminate(), is a SIGTERM the workers ignore: kill it instead, so
    that the process never waits for it at exit."""
    getattr(batches, "_shutdown_workers", lambda: None)()
    for worker in getattr(batches, "_workers", ()):
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)


def _releases_lock_on_failure(init):
    """A Trainer that fails to start releases the run folder at once, not when the exception (which holds the
    half-built Trainer) is collected: the lock file is gone before mardini-train removes the run's empty folder."""
    @wraps(init)
    def wrapper(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except BaseException:
            if getattr(self, "_unlock", None) is not None:
                self._unlock()
            raise

    return wrapper


# The run's local paths. config.yaml and the export record them, and what reads them later (a resume, mardini-sample,
# the learning benchmark's held-out clips) may run in another working directory: they are recorded absolute.
PATH_KEYS = ("autoencoder.pretrained", "data.video.root", "data.video.val_root", "data.cache_dir",
             "data.val_cache_dir", "train.init_from", "train.eval_weights_dir")


def _record_paths_absolute(cfg) -> None:
    """Every non-empty PATH_KEYS value of cfg made absolute in place (`~` expanded), and train.resume unless auto."""
    for key in PATH_KEYS + (("train.resume",) if cfg.train.resume != "auto" else ()):
        value = OmegaConf.select(cfg, key)
        if value:
            OmegaConf.update(cfg, key, absolute_folder(value))


def _resume_hint(path: Path) -> str:
    """What the user likely meant by train.resume=<a folder that is no checkpoint>: a run's checkpoints folder or
    an export (weights without training state)."""
    inside = [p for _, p in reversed(ckpt.list_checkpoints(path))]
    if inside:
        newest = next((p for p in inside if ckpt.checkpoint_problem(p) is None), inside[0])
        return (f"; it is a folder of checkpoints: pass one of them (the newest readable: train.resume={newest}), "
                f"or train.resume=auto with the run's run_name")
    if (path / export_format.EMA_WEIGHTS).is_file() and not (path / ckpt.TRAINER_STATE).exists():
        return f"; it is an export (weights, no training state): fine-tune from it with train.init_from={path}"
    return ""


# data.video settings that cut the clips a latent cache holds: with data=cache the cache's values rule.
CACHED_CLIP_KEYS = ("num_frames", "height", "width", "fps", "frame_stride", "clip_start", "crop", "seed", "num_videos")


def _warn_clip_settings_not_read(data_cfg, cached: dict) -> None:
    """Warn when data=cache is given data.video clip settings (CACHED_CLIP_KEYS) other than their defaults and the
    cache's: the latents were cut and encoded when the cache was made, so those settings have no effect, and a run
    told data.video.num_frames=9 trained on the cache's 17 frames without a word. A warning, as for other latents
    (warn_other_latent_space): the values the cache has are what the run trains on, and the log says which."""
    defaults = VideoDataConfig()
    differ = [k for k in CACHED_CLIP_KEYS if k in cached and data_cfg.video[k] != getattr(defaults, k)
              and data_cfg.video[k] != cached[k]]
    if differ:
        given = " ".join(f"data.video.{k}={data_cfg.video[k]}" for k in differ)
        log.warning("data.source=cache: %s %s not read: the cache decides its clips, and data.cache_dir=%s holds "
                    "clips of %s (cache the videos with those settings, scripts/cache_latents.py, to train on them)",
                    given, "is" if len(differ) == 1 else "are", data_cfg.cache_dir,
                    " ".join(f"{k}={cached[k]}" for k in differ))


# Settings that shape the learning-rate schedule: a resume may change them (e.g. to extend a run), and is told so.
SCHEDULE_KEYS = ("max_steps", "warmup_steps", "lr_schedule", "min_lr_ratio")

# The terms of a loss with auxiliary parts (a learned motion estimate, the planner's read-out), logged beside the total.
LOSS_PARTS = ("diffusion_loss", "motion_loss", "plan_loss")


class Trainer:
    @_releases_lock_on_failure
    def __init__(self, cfg):
        from accelerate import Accelerator
        from accelerate.utils import broadcast_object_list

        cfg = _as_dictconfig(cfg)
        validate_config(cfg)
        _record_paths_absolute(cfg)
        self.cfg = cfg
        t = cfg.train
        if t.deterministic:  # before any CUDA work and any compilation (process-wide; see determinism.py)
            enable_determinism()

        mixed = t.mixed_precision
        if mixed == "auto":
            mixed = "bf16" if torch.cuda.is_available() and not t.cpu else "no"
        trackers = list(t.trackers) if t.wandb_mode != "disabled" else [x for x in t.trackers if x != "wandb"]
        run_dir = _run_dir(cfg).resolve()
        # cpu=True also tells Accelerate to use gloo when torchrun starts several CPU processes.
        use_cpu = t.cpu or not torch.cuda.is_available()
        self.fsdp = t.parallel == "fsdp"
        # One objective under every parallelism: _micro_step's autocast runs the networks' ops in bf16 for DDP and
        # FSDP alike, while the inputs (latents, noise, timesteps) and the targets stay fp32. FSDP adds bf16
        # parameter all-gathers and fp32 gradient reduction (parallel.apply_fsdp), never casting the forward
        # inputs. Accelerate is left at "no": its precision is process-global state, fixed by the first Trainer.
        self.autocast_dtype = torch.bfloat16 if mixed == "bf16" else None
        _accelerate_state_for(use_cpu)
        self.accelerator = acc = Accelerator(cpu=use_cpu, mixed_precision="no",
                                             log_with=trackers or None, project_dir=str(run_dir))
        # Every rank must write to rank 0's folder (Hydra's timestamp may differ by a second between ranks), and
        # one run at a time: rank 0 locks the folder and every rank learns the outcome, so all stop together.
        locked = None
        if acc.is_main_process:
            try:
                runlock.acquire(run_dir)
            except (runlock.RunLockedError, OSError) as e:
                locked = e
        run_dir, locked = broadcast_object_list([str(run_dir), locked])
        if locked is not None:
            raise locked
        self.run_dir = Path(run_dir)
        # Released at the end of fit(), or when this Trainer is collected or the process exits.
        self._unlock = weakref.finalize(self, runlock.release, self.run_dir) if acc.is_main_process else None
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.device = acc.device
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if not acc.is_main_process:  # each line once, not once per rank: what the trainer logs is the same on every
            logging.getLogger("mardini").setLevel(logging.ERROR)  # rank (decided together or gathered first); the
            logging.getLogger("mardini.data").setLevel(logging.WARNING)  # files this rank's loaders skip stay its own
        self._preflight()

        # ---- data, latent space, objective, curriculum
        self.dataset, clip = self._build_dataset()
        self.num_frames, self.height, self.width = clip["num_frames"], clip["height"], clip["width"]
        self.autoencoder = self._build_autoencoder()
        if cfg.data.source == "cache":
            self.dataset.check_compatible(self.autoencoder, cfg.model.lowres_factor, cfg.data.lowres_mode)
            check_clip_shape(lambda field: f"the clips of data.cache_dir={cfg.data.cache_dir} ({field})", clip,
                             cfg.model, latent_space(cfg.autoencoder))
        self.latent_frames, c, h, w = self.autoencoder.latent_shape(self.num_frames, self.height, self.width)
        self.latent_shape = (c, h, w)
        self._check_validation_frames()
        self.skip_stats = SkipStats(cfg.data.video.max_failure_fraction, cfg.data.video.min_failures)
        self._ahead = None  # the next micro-batch's inputs, prepared during a backward (train_step)
        self._updating = False  # inside train_step's update (optimizer, EMA, schedule): the state is mid-step
        self._waiting_for_data = False  # inside _next_batch: a stop signal may interrupt the wait (fit)
        self._data_wait_interruptible = False  # one process reading from workers (set by _dataloader)
        self._loss_parts: list[torch.Tensor] = []  # this step's loss parts (those of LOSS_PARTS the model returns)
        self._loss_part_keys: list[str] = []
        self.diffusion = Diffusion(OmegaConf.to_object(cfg.diffusion))
        self.mask_sampler = MaskSampler(cfg.curriculum, t.max_steps)
        self.model_cfg = as_model_config(cfg.model)

        # ---- model (same init on every rank), fine-tuning, EMA, optimizer
        torch.manual_seed(cfg.seed)
        model = MarDini(self.model_cfg)
        own_checkpoint = ckpt.latest_checkpoint(self.checkpoint_dir) if t.resume == "auto" else None
        if t.init_from and own_checkpoint is not None:  # a requeued fine-tuning run: its own checkpoint wins
            log.info("train.resume=auto: continuing from %s (train.init_from=%s started this run)", own_checkpoint,
                     t.init_from)
        elif t.init_from:
            if Path(t.init_from).is_file():
                raise NotADirectoryError(f"train.init_from={t.init_from} is a file, not an export or checkpoint folder "
                                         f"(pass the folder that holds model.safetensors and config.json)")
            if not Path(t.init_from).is_dir():
                raise FileNotFoundError(f"train.init_from={t.init_from} does not exist (expected an export or "
                                        f"checkpoint folder)")
            check_same_objective(t.init_from, cfg.diffusion)  # before reading weights: refuse early
            try:
                export_format.load_weights(model, export_format.read_weights(t.init_from, "ema"),
                                           source=t.init_from, optional=FINE_TUNING_OPTIONAL_WEIGHTS)
            except ValueError as err:  # the settings that made the shapes differ first (all of them, where the
                raise not_loadable(t.init_from, cfg.model, err) from None  # configs tell), then a few tensors
            # Shapes fit; these keys would still load the weights into a network that computes something else.
            check_same_network(t.init_from, cfg.model, SAME_SHAPE_KEYS, "train.init_from")
            warn_other_latent_space(t.init_from, cfg.autoencoder, "train.init_from")
            log.info("initialised weights from %s (EMA weights)", t.init_from)
        frozen = "train.freeze_planner" if t.freeze_planner else "train.freeze_generator" if t.freeze_generator else ""
        if frozen and not t.init_from and own_checkpoint is None and t.resume in ("", "auto"):  # nothing trained loads
            log.warning("%s=true without train.init_from: the frozen network keeps its random initial weights (pass "
                        "train.init_from=<export or checkpoint> to fine-tune from trained ones)", frozen)
        if t.freeze_planner:
            model.planner.requires_grad_(False)
        if t.freeze_generator:
            model.generator.requires_grad_(False)
        model.to(self.device)
        param_dtype = torch.bfloat16 if self.fsdp and mixed == "bf16" else None
        parallelize(model, t.parallel, t.activation_checkpointing, t.compile, param_dtype, t.compile_motion,
                    t.compile_scope)
        self.ema = EMA(model, t.ema_decay, t.ema_warmup)
        optimizer = build_optimizer(model, t, fused=False if is_sharded(model) else None)
        self.scheduler = build_scheduler(optimizer, t)
        if t.warmup_steps >= t.max_steps:
            log.warning("train.warmup_steps=%d >= train.max_steps=%d: the learning rate rises through the whole run "
                        "and never reaches train.lr=%g", t.warmup_steps, t.max_steps, t.lr)
        if t.eval_every > t.max_steps:
            log.warning("train.eval_every=%d > train.max_steps=%d: this run makes no periodic evaluation "
                        "(eval.jsonl stays empty; train.eval_every=0 says so without this warning)", t.eval_every,
                        t.max_steps)
        if self.fsdp:  # already sharded; Accelerate launches, logs and tracks but does not wrap
            self.model, self.optimizer = model, optimizer
        else:
            # The scheduler is stepped by hand (once per optimizer step, whatever the world size) and only
            # registered so that Accelerate checkpoints it.
            self.model, self.optimizer = acc.prepare(model, optimizer)
            acc.register_for_checkpointing(self.scheduler)
        self.layout = StreamLayout(t.batch_size, t.grad_accum, acc.num_processes, acc.process_index)

        counts = acc.unwrap_model(self.model).num_parameters()
        n_lo = (h // self.model_cfg.lowres_factor // self.model_cfg.planner.patch_size) * \
               (w // self.model_cfg.lowres_factor // self.model_cfg.planner.patch_size)
        n_hi = (h // self.model_cfg.generator.patch_size) * (w // self.model_cfg.generator.patch_size)
        self.tokens_per_sample = self.latent_frames * (n_hi + n_lo)
        log.info("model parameters: planner %.2fM, generator %.2fM; %d processes on %s; mixed precision %s; "
                 "global batch %d; run dir %s", counts["planner"] / 1e6, counts["generator"] / 1e6,
                 acc.num_processes, self.device, mixed, self.layout.samples_per_step, self.run_dir)
        if t.deterministic:
            log.info("train.deterministic: deterministic kernels only (PyTorch, Inductor, cuDNN, cuBLAS): the same "
                     "seed trains the same weights on this machine and software, more slowly")
            if cfg.model.attn_backend != "sdpa":
                log.warning("train.deterministic=true with model.attn_backend=%s: that library's attention kernels are "
                            "outside PyTorch's deterministic switches, so reruns may still differ (sdpa is covered)",
                            cfg.model.attn_backend)
        log.info("curriculum: %d stage(s) starting at steps %s of %d", len(self.mask_sampler.stages),
                 self.mask_sampler.stage_starts, t.max_steps)
        clips = clip_config(cfg)  # the key that sets the frame count (there is no data.num_frames)
        frames = f"{clips[0]}.num_frames" if clips else "the cache's frames (scripts/cache_latents.py --num-frames)"
        for problem in unreachable_ratios(self.mask_sampler.curriculum, self.latent_frames):
            log.warning("%s (set that stage's mask_ratio within reach, or change %s)", problem, frames)
        self._log_step_cost(acc.unwrap_model(self.model), h, w, n_hi, n_lo)

        # ---- state
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self.stop_requested = False
        self._shared_outcomes = 0  # calls of the _outcome_shared methods (the same count on every rank)
        self.preempted = False  # fit() stopped on a signal after a checkpoint (the CLI exits 75, or 130 for SIGINT)
        self.stop_signal = None  # the first SIGTERM / SIGINT this process received in fit()
        self._resume()
        if acc.is_main_process:  # after _resume: a refused run must not overwrite the existing run's record
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self.config_yaml)
            # Lines past the starting step are a stopped run's, written after its checkpoint (or, on a fresh
            # start, all of them): drop them so that metrics.jsonl holds each step once.
            _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
            _truncate_metrics(self.run_dir / "eval.jsonl", self.step)

        if trackers:
            run_config = OmegaConf.to_container(cfg, resolve=True)
            init_kwargs = {"wandb": {"mode": _wandb_mode(t.wandb_mode), "dir": str(self.run_dir),
                                     "name": f"{cfg.experiment}/{cfg.run_name}"}}
            acc.init_trackers(t.wandb_project, config=dotted_plain(run_config), init_kwargs=init_kwargs)

    # ------------------------------------------------------------------------------------------------- state
    def _log_step_cost(self, model: MarDini, h: int, w: int, n_hi: int, n_lo: int) -> None:
        """Log what a training step costs; on the CPU, warn when it is far beyond the machine. Why: data=video's 17
        frames at 256 px with the tiny model (up to 151 TFLOP a step, ~21 GiB of activations) ran on 2 cores for
        minutes without a word until the kernel's out-of-memory killer ended it."""
        t, frames = self.cfg.train, self.latent_frames
        clips = t.batch_size * t.grad_accum  # per process and step
        flop = 3 * model.estimate_flops(frames, (h, w), frames - 1, clips,  # the most generated frames
                                        noise_draws=t.noise_draws)["total"]
        log.info("a training step: %d tokens per clip (planner %d, generator %d per frame), up to %.3g TFLOP per "
                 "process", self.tokens_per_sample, n_lo, n_hi, flop / 1e12)
        if self.device.type != "cpu" or flop < CPU_HEAVY_STEP_FLOP:
            return
        c = self.model_cfg
        widths = frames * (n_lo * c.planner.depth * c.planner.dim
                           + t.noise_draws * n_hi * c.generator.depth * c.generator.dim)  # a generator pass per draw
        stored = 0.5 if self.autocast_dtype == torch.bfloat16 else 1.0  # autocast keeps bf16 activations
        activations = clips * widths * CPU_ACTIVATION_BYTES * stored
        available = _available_memory()
        log.warning("this step is heavy for a CPU: %.3g TFLOP (the default job's: 0.02) is about %.0f s at the %g "
                    "TFLOP/s of 2 cores, %.1f h for train.max_steps=%d; its activations need about %.0f GiB "
                    "(%s available). Lower the clips' height / width / num_frames or train.batch_size, raise "
                    "model.lowres_factor, or train on a GPU", flop / 1e12, flop / CPU_FLOP_PER_S, CPU_FLOP_PER_S / 1e12,
                    flop / CPU_FLOP_PER_S * t.max_steps / 3600, t.max_steps, activations / 2**30,
                    "unknown" if available is None else f"{available / 2**30:.0f} GiB")

    def _preflight(self) -> None:
        """Fail now, naming the key, on what would otherwise fail after the model is built or after training: a
        folder holding another run's checkpoints, a train.resume path that does not exist, no package to write
        the sample videos, none to read data.source=video, or an attention backend with no kernels here."""
        t = self.cfg.train
        check_backend(self.cfg.model.attn_backend, self.device, self.autocast_dtype or torch.float32)
        if not t.resume and ckpt.list_checkpoints(self.checkpoint_dir):  # every rank checks, so none is left waiting
            raise FileExistsError(
                f"{self.checkpoint_dir} already holds checkpoints: pass train.resume=auto to continue that run, "
                f"or choose another run_name / train.output_dir")
        if t.resume and t.resume != "auto" and not Path(t.resume).is_dir():
            raise FileNotFoundError(f"train.resume={t.resume} does not exist: give a checkpoint folder (such as "
                                    f"<run dir>/checkpoints/step_000500) or train.resume=auto")
        video_io.check_output(self.run_dir / "samples" / "step_000000.mp4")
        if self.cfg.data.source == "video":
            backends.require("data.source=video", "decord", "av")

    def _check_validation_frames(self) -> None:
        """The validation videos (at the end and every train.sample_every / eval_every steps) generate frames in
        every task: a clip too short for one fails here, not after training."""
        if self.latent_frames != self.num_frames:
            return  # validation is skipped for temporally compressing autoencoders
        d, n = self.cfg.data, self.num_frames
        where = f"the clips in data.cache_dir={d.cache_dir} ({n} frames)" if d.source == "cache" else \
            f"data.{d.source}.num_frames={n}"
        for name, spec in VALIDATION_TASKS.items():
            try:
                task_mask(spec["task"], n, **{k: v for k, v in spec.items() if k != "task"})
            except ValueError as e:
                raise ValueError(f"{where} is too short for the {name} validation videos ({e}): use at least 3 "
                                 f"frames") from None
        if d.source == "video":  # decode the clips validation will read now: a bad held-out file fails here
            t = self.cfg.train
            self.validation_clips(max(t.num_sample_videos, t.eval_num_videos if t.eval_every else 0))

    def _build_dataset(self):
        """(training dataset, clip size) for data.source: synthetic | video (decoded files) | cache (latents).
        Also sets self.val_dataset: validation files (video) or items (cache) that training never reads; None for
        synthetic clips, whose validation stream is another seed (data.val_seed)."""
        d = self.cfg.data
        self.val_dataset = None
        if d.source == "synthetic":
            clip = d.synthetic
            log.info("validation: synthetic clips of data.val_seed=%d (training uses data.synthetic.seed=%d)",
                     d.val_seed, clip.seed)
            return SyntheticVideoDataset(clip), dict(num_frames=clip.num_frames, height=clip.height, width=clip.width)
        if d.source == "video":
            clip = d.video
            dataset = VideoDataset(clip, split="train")
            self.val_dataset = VideoDataset(dict(OmegaConf.to_container(clip, resolve=True), seed=d.val_seed),
                                            split="val")
            log.info(dataset.split_note)
            return dataset, dict(num_frames=clip.num_frames, height=clip.height, width=clip.width)
        dataset, self.val_dataset, note = split_cache(d.cache_dir, d.video.val_fraction, d.val_cache_dir)
        log.info(note)
        clip = dataset.data_config
        _warn_clip_settings_not_read(d, clip)
        return dataset, dict(num_frames=clip["num_frames"], height=clip["height"], width=clip["width"])

    def _build_autoencoder(self):
        ae = self.cfg.autoencoder
        if ae.name == "identity":
            kwargs = dict(patch_size=ae.patch_size, scale=ae.scale, shift=ae.shift)
        else:
            kwargs = kl_kwargs_from_config(ae)
        return build_autoencoder(ae.name, **kwargs).to(self.device).eval()

    def _latents(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_hi, z_lo) of a batch: read from the cache, or encoded from pixels (counting skipped files)."""
        if "z_hi" in batch:
            return (batch["z_hi"].to(self.device, non_blocking=True).float(),
                    batch["z_lo"].to(self.device, non_blocking=True).float())
        if "skipped" in batch:
            self.skip_stats.update(batch)
            self.skip_stats.check()
        video = batch["video"].to(self.device, non_blocking=True)
        with torch.no_grad():
            return encode_hi_lo(self.autoencoder, video, self.model_cfg.lowres_factor, self.cfg.data.lowres_mode)

    @property
    def config_yaml(self) -> str:
        return OmegaConf.to_yaml(self.cfg, resolve=True)

    def _name_the_run_to_resume(self) -> None:
        """train.resume=auto under the default run_name (a fresh timestamp) can never continue anything: warn, naming
        the newest run of the experiment that has a checkpoint, whose run_name would continue it."""
        if not re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", self.run_dir.name):
            return
        runs = [(ckpt.latest_checkpoint(d / "checkpoints"), d) for d in self.run_dir.parent.iterdir()
                if d != self.run_dir and (d / "checkpoints").is_dir()]
        runs = [(path, d) for path, d in runs if path is not None]
        if not runs:
            return
        path, run = max(runs, key=lambda r: r[0].stat().st_mtime)
        log.warning("train.resume=auto continues the run in this run_name's folder, and run_name is a new timestamp "
                    "(the default): nothing to continue. The newest run with a checkpoint here is %s (%s): pass "
                    "run_name=%s to continue it", run, path.name, run.name)

    def _resume(self) -> None:
        resume = self.cfg.train.resume
        if not resume:  # _preflight refused a folder that holds checkpoints
            return
        path = ckpt.resumable_checkpoint(self.checkpoint_dir) if resume == "auto" else Path(resume)
        if path is None:
            log.info("train.resume=auto: no complete checkpoint in %s, starting fresh", self.checkpoint_dir)
            self._name_the_run_to_resume()
            return
        problem = ckpt.checkpoint_problem(path)
        if problem:  # before comparing its config with this run's: an empty folder has none to compare
            raise ValueError(f"train.resume={path} cannot be resumed: {problem}{_resume_hint(Path(path))}")
        self._check_same_optimizer(Path(path))
        check_same_network(path, self.cfg.model, None, "train.resume")
        warn_other_latent_space(path, self.cfg.autoencoder, "train.resume")
        check_same_objective(str(path), self.cfg.diffusion, "train.resume")
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        if self.fsdp:
            state = ckpt.load_sharded_checkpoint(self.accelerator, path, self.model, self.optimizer, self.scheduler,
                                                 self.ema.shadow)
            self.ema.num_updates = state["ema_updates"]
        else:
            state, ema_state = ckpt.load_checkpoint(self.accelerator, path)
            self.ema.load_state_dict({k: v.to(self.device) for k, v in ema_state.items()}, state["ema_updates"])
        self.step = state["step"]
        self.nonfinite_total = state["nonfinite_total"]
        self.nonfinite_in_row = state["nonfinite_in_row"]
        self._keep_this_runs_optimizer_settings(settings)
        log.info("resumed from %s at step %d", path, self.step)
        self._name_schedule_changes(path)
        seen = state.get("samples_seen", self.layout.samples_before(self.step))
        if seen != self.layout.samples_before(self.step):  # another global batch: go on from the samples seen
            self.layout = dataclasses.replace(self.layout, offset=seen - self.step * self.layout.samples_per_step)
            log.info("the global batch is now %d and the run saw %d samples in %d steps: the data stream goes on "
                     "from sample %d, so none is repeated or skipped", self.layout.samples_per_step, seen, self.step,
                     seen)

    def _name_schedule_changes(self, path: Path) -> None:
        """A resume under another schedule (a run extended with train.max_steps=..., another warm-up or curriculum)
        is allowed, and changes the learning rate and the curriculum's stage boundaries (fractions of max_steps)
        from here on: say which settings changed and what the rate becomes, so that a jump in the loss is explained."""
        trained = trained_config(path)
        theirs, ours = trained.get("train", {}), self.cfg.train
        changed = [f"train.{k}={ours[k]} (the checkpoint's run: {theirs[k]})" for k in SCHEDULE_KEYS
                   if k in theirs and theirs[k] != ours[k]]
        if "curriculum" in trained and trained["curriculum"] != OmegaConf.to_container(self.cfg.curriculum):
            changed.append("another curriculum")
        if changed:
            factor = lr_factor(self.step, ours.warmup_steps, ours.max_steps, ours.lr_schedule, ours.min_lr_ratio)
            log.warning("resumed at step %d with %s: the learning-rate schedule and the curriculum's stages follow "
                        "this run's settings from here on (learning rate now %.3g)", self.step, ", ".join(changed),
                        ours.lr * factor)

    def _keep_this_runs_optimizer_settings(self, settings: list[dict]) -> None:
        """Loading an optimizer and a schedule restores the saved run's hyperparameters with the moments (learning
        rate, weight decay, betas, eps): put back this run's, as config.yaml records them, so that a resume with
        train.lr=... continues at the new rate on the same schedule. Unchanged settings leave every value as loaded
        (bit-exact resume). settings: the param groups' hyperparameters as this run built them, before loading."""
        schedule = getattr(self.scheduler, "scheduler", self.scheduler)  # Accelerate wraps it outside FSDP
        changed = set()
        for group, ours in zip(self.optimizer.param_groups, settings):
            for key, value in ours.items():
                if key != "lr" and group.get(key) != value:
                    changed.add(key)
                    group[key] = value
        if not changed:
            return
        schedule.base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]
        for group, base, factor in zip(self.optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas):
            group["lr"] = base * factor(schedule.last_epoch)
        schedule._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        log.info("resumed with this run's optimizer settings (%s), not the checkpoint's",
                 ", ".join(sorted("lr" if key == "initial_lr" else key for key in changed)))

    def _check_same_optimizer(self, path: Path) -> None:
        """An optimizer's state cannot be loaded into another kind, nor into one over other parameters (another
        train.freeze_planner / freeze_generator: torch's own error names neither): say so before loading."""
        train = trained_config(path).get("train", {})
        trained = train.get("optimizer", "adamw")  # older checkpoints: AdamW
        if trained != self.cfg.train.optimizer:
            raise ValueError(f"train.optimizer={self.cfg.train.optimizer} but checkpoint {path} was trained with "
                             f"train.optimizer={trained}: resume with that optimizer, or start from its weights with "
                             f"train.init_from={path} (a fresh optimizer)")
        keys = [k for k in ("freeze_planner", "freeze_generator") if train.get(k, False) != self.cfg.train[k]]
        if keys:
            theirs = " ".join(f"train.{k}={train.get(k, False)}" for k in keys)
            ours = " ".join(f"train.{k}={self.cfg.train[k]}" for k in keys)
            raise ValueError(f"checkpoint {path} was trained with {theirs}; this run has {ours}: its optimizer holds "
                             f"the parameters that trained then, so resume with {theirs}, or freeze otherwise in a new "
                             f"run (another run_name) started from its weights with train.init_from={path}")

    def save_checkpoint(self) -> Path:
        state = {"step": self.step, "ema_updates": self.ema.num_updates, "nonfinite_total": self.nonfinite_total,
                 "nonfinite_in_row": self.nonfinite_in_row, "samples_seen": self.layout.samples_before(self.step),
                 "world_size": self.accelerator.num_processes}
        if self.fsdp:
            write = ckpt.write_sharded_state(self.accelerator, self.model, self.optimizer, self.scheduler,
                                             self.ema.state_dict())
        else:
            write = ckpt.write_accelerate_state(self.accelerator, self.ema.state_dict())
        path = ckpt.save_checkpoint(self.accelerator, self.checkpoint_dir, self.step, write, state,
                                    self.config_yaml, self.cfg.train.keep_last)
        if self.accelerator.is_main_process:
            log.info("saved checkpoint %s", path)
        return path

    @_outcome_shared
    def export(self) -> Path:
        """EMA (and raw) weights as a diffusers-style folder that MarDiniPipeline.from_pretrained loads."""
        path = self.run_dir / "export"
        ema, raw = self.full_ema_state(), self.full_model_state()  # collective under FSDP
        broken = [k for k, v in ema.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if broken:  # every rank holds the full tensors: all raise together
            raise NonFiniteLossError(
                f"the EMA weights hold non-finite values at step {self.step} ({len(broken)} tensors, e.g. "
                f"{broken[0]}): nothing exported. Resume from an earlier checkpoint in {self.checkpoint_dir} with a "
                f"lower train.lr or train.grad_clip enabled, or check the data.")
        if self.accelerator.is_main_process:
            config = {"model": self.model_cfg.to_dict(),
                      "diffusion": OmegaConf.to_container(self.cfg.diffusion, resolve=True),
                      "autoencoder": OmegaConf.to_container(self.cfg.autoencoder, resolve=True),
                      "num_frames": self.num_frames, "height": self.height, "width": self.width,
                      "fps": self.cfg.data.fps, "lowres_mode": self.cfg.data.lowres_mode, "step": self.step,
                      "data": OmegaConf.to_container(self.cfg.data, resolve=True)}
            export_format.save_export(path, ema, config, raw_state=raw,
                                      scheduler_config=dict(self.diffusion.make_scheduler().config))
            log.info("exported EMA weights to %s", path)
        return path

    def full_ema_state(self) -> dict[str, torch.Tensor]:
        """EMA weights as plain tensors (gathers shards under FSDP: every rank must call)."""
        return {k: full_tensor(v) for k, v in self.ema.state_dict().items()}

    def full_model_state(self) -> dict[str, torch.Tensor]:
        if not self.fsdp:
            return dict(self.accelerator.unwrap_model(self.model).state_dict())
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    # ------------------------------------------------------------------------------------------------- steps
    def _dataloader(self) -> DataLoader:
        d = self.cfg.data
        workers = usable_workers(d.num_workers)
        if workers < d.num_workers:
            log.info("data.num_workers=%d, but this process may use %d CPU(s): loading with %d worker(s)",
                     d.num_workers, workers, workers)
        # Only a main process that waits on workers can be woken by a signal without losing a sample half-read;
        # several processes stop together after a step instead (fit), within data.timeout of a stuck worker.
        self._data_wait_interruptible = workers > 0 and self.accelerator.num_processes == 1 and not self.fsdp
        return DataLoader(EpochPermutation(self.dataset, self.cfg.seed),
                          batch_sampler=StreamBatchSampler(self.layout, start_step=self.step),
                          num_workers=workers, pin_memory=d.pin_memory and self.device.type == "cuda",
                          persistent_workers=workers > 0, prefetch_factor=d.prefetch_factor if workers else None,
                          worker_init_fn=_worker_ignores_stop_signals if workers else None,
                          timeout=d.timeout if workers else 0)

    def _next_batch(self, batches, step: int, micro: int) -> dict:
        """The next micro-batch from the loader, which holds micro-batch `micro` of step `step` (0-based): a worker
        stuck past data.timeout, or one that died, becomes a DataLoaderError naming that micro-batch's samples."""
        self._waiting_for_data = True  # from here a stop signal raises _StopWhileWaitingForData (the handler)
        try:
            if self.stop_requested and self._data_wait_interruptible:  # one that came before: the batch may never
                raise _StopWhileWaitingForData                          # come, so do not wait for it
            return next(batches)
        except RuntimeError as err:
            if timed_out(err):
                raise DataLoaderError(
                    f"no batch from the DataLoader workers in data.timeout={self.cfg.data.timeout:g} s for training "
                    f"step {step + 1} ({self._samples_of(step, micro)}): check or remove these files (a decoder or "
                    f"the file system is stuck on one), or raise data.timeout if loading is this slow (0 waits "
                    f"forever)") from None
            died = _worker_died(err)
            if died:
                raise DataLoaderError(died) from None
            raise  # an error of the dataset itself, re-raised from its worker
        finally:
            self._waiting_for_data = False

    def _samples_of(self, step: int, micro: int) -> str:
        """This rank's micro-batch `micro` of step `step` in words: its files (video data) or its item numbers."""
        permutation = EpochPermutation(self.dataset, self.cfg.seed)  # what the loader's copy maps, recomputed
        items = list(dict.fromkeys(permutation.index_of(p) for p in self.layout.positions(step, micro)))
        return items_in_words(self.dataset, items)

    def _prepare(self, batch: dict, step: int) -> tuple:
        """A micro-batch's model inputs on the device: (z_hi, z_lo, randomness)."""
        z_hi, z_lo = self._latents(batch)
        rnd = draw_randomness(batch["position"].tolist(), step, self.cfg.seed, self.mask_sampler, self.diffusion,
                              self.latent_frames, self.latent_shape, self.model_cfg.plan_dropout, self.device,
                              draws=self.cfg.train.noise_draws)
        return z_hi, z_lo, rnd

    def _micro_step(self, inputs: tuple, step: int) -> torch.Tensor:
        """Forward one prepared micro-batch (`_prepare`); returns the (unscaled) loss."""
        z_hi, z_lo, rnd = inputs
        drop = rnd.drop_plan if self.model_cfg.plan_dropout > 0 else None
        with self._autocast():
            out = self.model(z_hi, z_lo, rnd.mask, self.diffusion, noise=rnd.noise, t=rnd.t, drop_plan=drop,
                             frame_counts=rnd.frame_counts)
        self._loss_part_keys = [key for key in LOSS_PARTS if key in out]  # the same at every step of a run
        if self._loss_part_keys:  # auxiliary losses: each part logged apart
            self._loss_parts.append(torch.stack([out[key] for key in self._loss_part_keys]).detach().float())
        return out["loss"]

    def _next_inputs(self, batches, step: int) -> tuple:
        """The next micro-batch's inputs: the one prepared ahead during the last backward, else one read now."""
        ahead, self._ahead = self._ahead, None
        return ahead if ahead is not None else self._prepare(self._next_batch(batches, step, 0), step)

    def train_step(self, batches) -> dict:
        """One optimizer step over grad_accum micro-batches. Skips the update if any loss or the gradient norm is
        non-finite on any rank.

        The step waits for the GPU once, on the global gradient norm: a non-finite loss on any rank makes the
        all-reduced gradients, hence the norm, non-finite on every rank, so all ranks skip together without a
        check (and a host sync) between forward and backward. Nothing in the forward waits for the GPU either
        (fixed shapes, masks checked on the host), and while the GPU runs each backward the host already reads and
        prepares the next micro-batch (this step's next, or the next step's first), so the GPU does not idle
        while the host loads data between steps. The inputs depend only on (seed, step, position), so preparing
        them early changes nothing; a stop or a resume discards them (the loader restarts at the step)."""
        acc, t = self.accelerator, self.cfg.train
        losses, self._loss_parts = [], []
        for micro in range(t.grad_accum):
            inputs = self._next_inputs(batches, self.step)
            last = micro == t.grad_accum - 1
            if self.fsdp:
                set_gradient_sync(self.model, last)
            sync = contextlib.nullcontext() if last or self.fsdp else acc.no_sync(self.model)
            with sync:
                loss = self._micro_step(inputs, self.step)
                acc.backward(loss / t.grad_accum)
            losses.append(loss.detach())
            if not last:
                self._ahead = self._prepare(self._next_batch(batches, self.step, micro + 1), self.step)
            elif self.step + 1 < t.max_steps:
                self._ahead = self._prepare(self._next_batch(batches, self.step + 1, 0), self.step + 1)
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = clip_grad_norm(params, t.grad_clip if t.grad_clip > 0 else float("inf"))  # the one wait
        finite = math.isfinite(grad_norm)
        loss = torch.stack(losses).float().mean()[None]
        if self._loss_parts:  # [loss, diffusion loss, auxiliary losses...]
            loss = torch.cat([loss, torch.stack(self._loss_parts).mean(0)])
        if acc.num_processes > 1:
            loss = acc.reduce(loss, reduction="mean")
        # computed before the backward that the norm waited for: no second wait
        loss, *parts = loss.tolist()
        parts = dict(zip(self._loss_part_keys, parts))
        self._updating = True
        if finite:
            self.optimizer.step()
            self.ema.update(acc.unwrap_model(self.model))
            self.nonfinite_in_row = 0
        else:
            self.nonfinite_total += 1
            self.nonfinite_in_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self._updating = False
        return {"loss": loss, "grad_norm": grad_norm, "skipped": not finite, **parts}

    # -------------------------------------------------------------------------------------------------- loop
    def fit(self) -> Path:
        acc, t = self.accelerator, self.cfg.train
        if self.step >= t.max_steps:
            log.info("already at step %d >= train.max_steps=%d; nothing to train: the end-of-run videos and the "
                     "export", self.step, t.max_steps)
            try:
                self.sample()
                return self.export()
            finally:
                self._release_lock()
        start_step = self.step
        previous_handlers = self._install_stop_handlers()  # a signal from here on stops after the next step
        bar = tqdm(total=t.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (t.progress and acc.is_main_process))
        window, window_start, window_steps = [], time.perf_counter(), 0
        progress = ProgressLog(start_step=self.step, max_steps=t.max_steps, every_s=t.progress_log_s,
                               samples_per_step=self.layout.samples_per_step, lines=not t.progress)
        parts_window: dict[str, list[float]] = {}  # the loss parts since the last log
        batches, self._ahead = None, None
        try:
            with _stop_signals_blocked():  # the workers start here and must never see SIGTERM / SIGINT
                batches = iter(self._dataloader())
            while self.step < t.max_steps:
                lr = self.scheduler.get_last_lr()[0]
                try:
                    result = self.train_step(batches)
                except torch.OutOfMemoryError as err:
                    raise self._out_of_memory(err) from err
                except DataLoaderError as err:  # raised while waiting for a batch: the last completed step is whole
                    saved = self._checkpoint_last_completed_step(err)
                    raise DataLoaderError(f"{err}; {self._where_it_resumes(saved)}") from None
                except RuntimeError as err:  # a worker's death, reported by torch's SIGCHLD handler wherever the
                    died = _worker_died(err)  # step was: nothing saved (it may have been mid-update)
                    if not died:
                        raise
                    raise DataLoaderError(f"{died}; {self._where_it_resumes(False)}") from None
                except _StopWhileWaitingForData as err:  # a signal while a worker is late: stop without it
                    self._checkpoint_last_completed_step(err)
                    return self._stop_on_signal(start_step)
                self.step += 1
                window.append(result["loss"])
                for key in LOSS_PARTS:
                    if key in result:
                        parts_window.setdefault(key, []).append(result[key])
                window_steps += 1
                record = {"step": self.step, "lr": lr, **result, "time": round(time.time(), 3)}
                if self.device.type == "cuda":  # this rank's high-water mark (host-side counter: no sync)
                    record["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
                self._append_metrics(record)
                bar.update(1)
                bar.set_postfix(loss=f"{result['loss']:.4f}", lr=f"{lr:.2e}")
                progress.update(self.step, result["loss"])
                if result["skipped"]:
                    log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, %d total)",
                                self.step, self.nonfinite_in_row, self.nonfinite_total)
                    if self.nonfinite_in_row >= t.max_nonfinite:
                        self.save_checkpoint()
                        raise NonFiniteLossError(
                            f"{self.nonfinite_in_row} non-finite losses in a row (train.max_nonfinite="
                            f"{t.max_nonfinite}) at step {self.step}; checkpoint saved in {self.checkpoint_dir}. "
                            f"Lower train.lr, enable train.grad_clip, or check the data.")
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    elapsed = time.perf_counter() - window_start
                    samples_per_s = window_steps * self.layout.samples_per_step / max(elapsed, 1e-9)
                    acc.log({"train/loss": finite_mean(window), "train/lr": lr,
                             "train/grad_norm": result["grad_norm"], "train/samples_per_s": samples_per_s,
                             "train/tokens_per_s": samples_per_s * self.tokens_per_sample,
                             "train/steps_per_s": window_steps / max(elapsed, 1e-9),
                             "train/nonfinite_total": self.nonfinite_total,
                             "train/curriculum_stage": self.mask_sampler.stage_index(self.step - 1),
                             **{f"train/{k}": finite_mean(v) for k, v in parts_window.items()},
                             **({"train/peak_mem_gib": record["peak_mem_gib"]} if "peak_mem_gib" in record else {}),
                             **self.skip_stats.log_dict()}, step=self.step)
                    window, window_start, window_steps, parts_window = [], time.perf_counter(), 0, {}
                if t.sample_every and self.step % t.sample_every == 0 and self.step < t.max_steps:
                    self.sample()
                if t.eval_every and self.step % t.eval_every == 0:
                    self.evaluate()
                if acc.num_processes > 1:  # a signal may reach some ranks only: stop together
                    flag = torch.tensor(float(self.stop_requested), device=self.device)
                    self.stop_requested = bool(acc.reduce(flag, reduction="sum").item() > 0)
                if self.step % t.checkpoint_every == 0 or self.stop_requested:
                    self.save_checkpoint()
                if self.stop_requested:
                    return self._stop_on_signal(start_step)
            if self.step % t.checkpoint_every:
                self.save_checkpoint()
            self._log_data_summary(start_step)
            # The final checkpoint is saved: from here SIGTERM ends the process at once and SIGINT raises
            # KeyboardInterrupt (resume=auto redoes only the videos and the export), so a rank waiting on a failed
            # one dies when the launcher signals it.
            _restore_handlers(previous_handlers)
            self.sample()
            return self.export()
        finally:
            bar.close()
            _restore_handlers(previous_handlers)
            acc.end_training()
            self._release_lock()
            _stop_workers(batches)

    def _stop_on_signal(self, start_step: int) -> Path:
        """The end of a run stopped by SIGTERM / SIGINT, its checkpoint saved."""
        self._log_data_summary(start_step)
        self.preempted = True
        why = signal.Signals(self.stop_signal).name if self.stop_signal else "another rank's signal"
        last = ckpt.latest_checkpoint(self.checkpoint_dir)
        if last is not None and last.name == ckpt.checkpoint_name(self.step):
            log.warning("%s received: checkpoint saved at step %d, stopping (continue with train.resume=auto)", why,
                        self.step)
        else:  # stopped while waiting for the first batch of a fresh run: nothing to keep
            log.warning("%s received at step %d, before a step to keep: stopping without a checkpoint", why,
                        self.step)
        return self.checkpoint_dir

    def _where_it_resumes(self, saved: bool) -> str:
        last = ckpt.latest_checkpoint(self.checkpoint_dir)
        now = " (the last completed step, saved now)" if saved else ""
        return f"the last checkpoint, {last.name}{now}, continues with train.resume=auto" if last else \
            "no checkpoint was saved yet"

    def _out_of_memory(self, err: torch.OutOfMemoryError) -> TrainingOutOfMemoryError:
        """What to change, in one line: the batch, activation checkpointing, sharding; and where the run resumes."""
        saved = self._checkpoint_last_completed_step(err)
        t, device = self.cfg.train, self.device
        where = ""
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory / 2**30
            where = f" ({torch.cuda.max_memory_allocated(device) / 2**30:.1f} of {total:.1f} GiB at the peak)"
        changes = [f"lower train.batch_size={t.batch_size} (raise train.grad_accum={t.grad_accum} to keep the global "
                   f"batch of {self.layout.samples_per_step})"]
        if not t.activation_checkpointing:
            changes.append("set train.activation_checkpointing=true")
        if t.parallel != "fsdp":
            changes.append("set train.parallel=fsdp (sharded weights and optimizer state)")
        return TrainingOutOfMemoryError(f"out of {device.type} memory in training step {self.step + 1}{where}: "
                                        f"{', or '.join(changes)}; {self._where_it_resumes(saved)}")

    def _checkpoint_last_completed_step(self, err: BaseException) -> bool:
        """After a step cut short (out of memory, a stuck or dead data worker, a stop signal while waiting for data):
        keep the steps since the last periodic checkpoint (up to train.checkpoint_every of them), which a resumed
        run repeats exactly (the same global batch in any micro-batch size: same samples, masks and noise). Only
        where that state is whole: the error came before the update (the weights, optimizer, EMA and schedule are
        those of the last completed step), in one process (other ranks may wait inside a collective of the failed
        step) and without FSDP (a forward cut short can leave its parameters unsharded)."""
        if self._updating or self.step == 0 or self.fsdp or self.accelerator.num_processes > 1:
            return False
        last = ckpt.latest_checkpoint(self.checkpoint_dir)
        if last is not None and last.name == ckpt.checkpoint_name(self.step):
            return False
        traceback.clear_frames(err.__traceback__)  # the failed step's activations, held by its frames' locals
        self._ahead = None
        self.optimizer.zero_grad(set_to_none=True)  # the failed step's partial gradients
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            self.save_checkpoint()
        except Exception as save_err:  # out of memory again, a full disk: the last periodic checkpoint stands
            log.warning("could not checkpoint step %d after %s: %s", self.step, type(err).__name__, save_err)
            return False
        return True

    @_outcome_shared
    def sample(self) -> dict:
        """Validation videos with the EMA weights (main process only)."""
        acc, t = self.accelerator, self.cfg.train
        metrics = {}
        if self.latent_frames != self.num_frames:
            log.warning("validation videos need a per-frame autoencoder; skipped (temporal compression)")
            return metrics
        model = self.ema_model()  # collective under FSDP
        if acc.is_main_process:
            videos = self.validation_clips(t.num_sample_videos)
            steps = t.sample_steps or self.diffusion.cfg.num_inference_steps
            with self._autocast():
                metrics, paths, grids = validation_videos(
                    model, self.autoencoder, self.diffusion, videos, self.cfg.data.lowres_mode,
                    self.run_dir / "samples", self.step, steps, seed=self.cfg.seed, fps=self.cfg.data.fps)
            acc.log(metrics, step=self.step)
            self._log_videos(paths, grids)
            log.info("step %d validation: %s (videos in %s)", self.step,
                     ", ".join(f"{k}={v:.2f}" for k, v in metrics.items()), self.run_dir / "samples")
        del model
        return metrics

    def _autocast(self):
        """The training precision (train.mixed_precision) for the networks' ops: bf16 autocast, or nothing. Training
        steps use it, and so does validation sampling, where the EMA copy keeps fp32 weights (fp32 sampling of a
        paper-size model took 55-110 s per evaluation of 4 clips on an H200); FVD features stay outside (fp32)."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def ema_model(self) -> MarDini | None:
        """A plain copy of the model holding the EMA weights on the main process, None elsewhere (every rank
        must call: under FSDP the shards are gathered)."""
        ema = self.full_ema_state()
        if not self.accelerator.is_main_process:
            return None
        with torch.device(self.device):  # built where it runs: a CPU init of the paper model takes 10-20 s
            model = MarDini(self.model_cfg).eval()
        model.load_state_dict(ema)
        return model

    def validation_clips(self, count: int) -> torch.Tensor:
        """[count, T, 3, H, W] fixed pixel clips that training never sees: synthetic clips from the validation
        seed's stream; for video data, clips of the held-out files (data.video.val_root or val_fraction; more
        clips than files take other starts in the same files); for a cache, its held-out items decoded."""
        d = self.cfg.data
        if d.source == "cache":
            val = self.val_dataset
            z = torch.stack([val[i]["z_hi"] for i in range(min(count, len(val)))])
            with torch.no_grad():
                return self.autoencoder.decode(z.to(self.device).float()).cpu()
        if d.source == "video":
            try:
                return self.val_dataset.clips(count)
            except TooManyFailuresError as e:
                held = f"data.video.val_root={d.video.val_root}" if d.video.val_root else \
                    f"the files data.video.val_fraction={d.video.val_fraction} holds out of data.video.root"
                raise TooManyFailuresError(f"validation clips ({held}): {e}; remove or replace the file(s), or "
                                           f"name other validation videos with data.video.val_root") from None
        return held_out_clips(OmegaConf.to_container(d, resolve=True), count)  # the learning benchmark's clips

    @_outcome_shared
    def evaluate(self) -> dict:
        """PSNR / SSIM (and FVD when I3D weights are found) of interpolation and i2v on the fixed validation set,
        with the EMA weights; logged under val/."""
        from ..evaluation.fvd import load_default_extractor, model_generate_fn, periodic_fvd

        acc, t = self.accelerator, self.cfg.train
        if self.latent_frames != self.num_frames:
            log.warning("evaluation needs a per-frame autoencoder; skipped (temporal compression)")
            return {}
        model = self.ema_model()
        metrics = {}
        if acc.is_main_process:
            if not hasattr(self, "_fvd_cache"):
                self._fvd_cache = {}
                self._fvd_extractor = load_default_extractor(weights_dir=t.eval_weights_dir or None,
                                                             device=self.device)
                if self._fvd_extractor is None:
                    log.warning("no I3D weights found (train.eval_weights_dir): evaluating PSNR/SSIM only")
            generate_fn = model_generate_fn(model, self.autoencoder, self.diffusion, self.cfg.data.lowres_mode,
                                            num_steps=t.sample_steps or None, seed=self.cfg.seed)

            def generate(given: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                with self._autocast():
                    return generate_fn(given, mask)  # decoded pixels, float32

            clips = self.validation_clips(t.eval_num_videos)
            metrics = periodic_fvd(generate, clips, self._fvd_extractor, cache=self._fvd_cache)
            metrics.update(self._learning_metrics(model, clips))
            acc.log(metrics, step=self.step)
            self._append_metrics({"step": self.step, **metrics}, "eval.jsonl")
            log.info("step %d evaluation: %s", self.step, ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
        del model
        return metrics

    def _learning_metrics(self, model: MarDini, clips: torch.Tensor) -> dict:
        """Posterior-mean PSNR of interpolation beside its baseline, the linear blend (mardini.evaluation.learning):
        a posterior mean below the blend means the network has not learned; above it with poor samples, that the
        sampler is at fault."""
        from ..inference import MarDiniPipeline

        pipe = MarDiniPipeline(model, self.diffusion, self.autoencoder,
                               {"num_frames": self.num_frames, "height": self.height, "width": self.width,
                                "fps": self.cfg.data.fps, "lowres_mode": self.cfg.data.lowres_mode})
        mask = task_mask("interpolation", clips.shape[1])
        with self._autocast():
            estimate = posterior_mean(pipe, clips, mask, seed=self.cfg.seed).float()
        blend = baseline(clips, mask, "linear_blend")
        metrics = {"val/interpolation_posterior_mean_psnr": clip_psnr(estimate, clips, mask).mean().item(),
                   "val/interpolation_blend_psnr": clip_psnr(blend, clips, mask).mean().item()}
        if self.cfg.data.source == "synthetic":  # the curve's headroom: the best guess any model could make
            if not hasattr(self, "_ceiling"):  # data only: computed once per run
                synthetic = held_out_synthetic_config(OmegaConf.to_container(self.cfg.data, resolve=True), len(clips))
                self._ceiling = ceiling(synthetic, clips, "interpolation", draws=32,
                                        seed=self.cfg.seed).get("posterior_mean_psnr")  # None where skipped
            if self._ceiling is not None:
                metrics["val/interpolation_ceiling_psnr"] = self._ceiling
        return metrics

    # ----------------------------------------------------------------------------------------------- helpers
    def _log_videos(self, paths: dict, grids: dict) -> None:
        """wandb gets the mp4 files (from a raw array it would need moviepy); tensorboard the frames in memory."""
        for tracker in self.accelerator.trackers:
            if tracker.name == "wandb":
                import wandb

                tracker.log({f"samples/{k}": wandb.Video(str(p), format="mp4") for k, p in paths.items()},
                            step=self.step)
            elif tracker.name == "tensorboard":
                for k, frames in grids.items():  # [T, H, W, 3] uint8
                    tracker.writer.add_images(f"samples/{k}", frames, self.step, dataformats="NHWC")

    def _release_lock(self) -> None:
        if self._unlock is not None:
            self._unlock()  # a weakref.finalize: runs once

    def _log_data_summary(self, start_step: int) -> None:
        """Bad video files of the whole job (all ranks) to the console and the log when the run ends or stops,
        whatever the trackers."""
        if self.cfg.data.source != "video":
            return
        acc, stats = self.accelerator, self.skip_stats
        counts = torch.tensor([stats.loaded, stats.failed], dtype=torch.int64, device=self.device)
        if acc.num_processes > 1:
            counts = acc.reduce(counts, reduction="sum")
        loaded, failed = counts.tolist()
        if not acc.is_main_process:
            return
        if failed == 0:
            log.info("data: all %d video loads of steps %d-%d succeeded", loaded, start_step + 1, self.step)
            return
        names = ", ".join(p for p, _ in stats.paths.most_common(5))
        log.warning("data: %d of %d video loads failed (%.1f%%) in steps %d-%d and were replaced by other clips; "
                    "e.g. %s. List the bad files with scripts/make_manifest.py", failed, loaded + failed,
                    100 * failed / (loaded + failed), start_step + 1, self.step, names)

    def _append_metrics(self, record: dict, name: str = "metrics.jsonl") -> None:
        if self.accelerator.is_main_process:
            with open(self.run_dir / name, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _install_stop_handlers(self) -> dict:
        """SIGTERM (cluster pre-emption) and SIGINT (Ctrl-C) finish the current step, save a checkpoint and stop;
        a run of one process reading from data workers stops at its next wait for a batch instead, keeping its last
        completed step (a stuck worker cannot hold the stop). A second SIGINT raises KeyboardInterrupt at once: the
        way out of a long step, without a checkpoint.
        Returns the previous handlers (none outside the main thread, where Python cannot set handlers)."""
        if not _in_main_thread():
            return {}

        def handler(signum, frame):
            if signum == signal.SIGINT and self.stop_signal == signal.SIGINT:
                raise KeyboardInterrupt("Ctrl-C twice: stopped without saving a checkpoint")
            self.stop_signal = self.stop_signal or signum
            self.stop_requested = True
            if self._waiting_for_data and self._data_wait_interruptible:
                raise _StopWhileWaitingForData  # a late worker would hold the stop until data.timeout

        return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}


def _accelerate_state_for(use_cpu: bool) -> None:
    """Accelerate keeps the device in process-global state, fixed by the first Accelerator: a later Trainer of the
    same process (a notebook, a test session on a GPU machine) that asks for the CPU after one on the GPU, or the
    reverse, was refused with Accelerate's "cannot be changed" error. A single process shares that state with no
    one: start it afresh for the other device. (Under a launcher every rank keeps the state it was started with.)"""
    from accelerate.state import AcceleratorState, PartialState

    device = PartialState._shared_state.get("device")
    if device is None or int(os.environ.get("WORLD_SIZE", "1")) > 1 or (device.type == "cpu") == use_cpu:
        return
    AcceleratorState._reset_state(reset_partial_state=True)


def _restore_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past the resumed step (written after the checkpoint by the run that stopped)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def train(cfg) -> Path:
    """Run an experiment from a composed config; returns the export folder."""
    return Trainer(cfg).fit()
