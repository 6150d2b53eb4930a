"""The Accelerate trainer: joint planner + generator training with the mask-ratio curriculum.

One call, ``train(cfg)``, runs a whole experiment: build data, autoencoder, model, EMA and optimizer; resume or
fine-tune if asked; loop over optimizer steps (gradient accumulation, clipping, non-finite-loss skipping); log to
the trackers, to ``metrics.jsonl`` and to a tqdm bar; write checkpoints, validation videos and finally an export of
the EMA weights. Data order and every sample's randomness depend only on (seed, step, position): see data.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..autoencoders import build_autoencoder
from ..autoencoders.kl import kl_kwargs_from_config
from ..data.latent_cache import CachedLatentDataset, encode_hi_lo
from ..data.synthetic import SyntheticVideoConfig, SyntheticVideoDataset
from ..data.video import SkipStats, VideoDataConfig, VideoDataset
from ..diffusion import Diffusion
from ..masking import MaskSampler
from ..models import MarDini, as_model_config, lowres_from_hires
from .. import export as export_format
from . import checkpoint as ckpt
from .config import Config, validate_config
from .data import EpochPermutation, StreamBatchSampler, StreamLayout, draw_randomness
from .ema import EMA
from .optim import build_optimizer, build_scheduler
from .parallel import clip_grad_norm, full_tensor, is_sharded, parallelize, set_gradient_sync
from .sampling import validation_videos

log = logging.getLogger("mardini.train")


class NonFiniteLossError(RuntimeError):
    pass


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
        return Path(cfg.train.output_dir)
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return Path("outputs") / cfg.experiment / cfg.run_name


class Trainer:
    def __init__(self, cfg):
        from accelerate import Accelerator
        from accelerate.utils import broadcast_object_list

        cfg = _as_dictconfig(cfg)
        validate_config(cfg)
        self.cfg = cfg
        t = cfg.train

        mixed = t.mixed_precision
        if mixed == "auto":
            mixed = "bf16" if torch.cuda.is_available() and not t.cpu else "no"
        trackers = list(t.trackers) if t.wandb_mode != "disabled" else [x for x in t.trackers if x != "wandb"]
        run_dir = _run_dir(cfg).resolve()
        # cpu=True also tells Accelerate to use gloo when torchrun starts several CPU processes.
        use_cpu = t.cpu or not torch.cuda.is_available()
        self.fsdp = t.parallel == "fsdp"
        # Under FSDP the precision is FSDP's MixedPrecisionPolicy (bf16 params, fp32 reduction), not autocast.
        self.accelerator = acc = Accelerator(cpu=use_cpu, mixed_precision="no" if self.fsdp else mixed,
                                             log_with=trackers or None, project_dir=str(run_dir))
        # Every rank must write to rank 0's folder (Hydra's timestamp may differ by a second between ranks).
        self.run_dir = Path(broadcast_object_list([str(run_dir)])[0])
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.device = acc.device
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

        # ---- data, latent space, objective, curriculum
        self.dataset, clip = self._build_dataset()
        self.num_frames, self.height, self.width = clip["num_frames"], clip["height"], clip["width"]
        self.autoencoder = self._build_autoencoder()
        if cfg.data.source == "cache":
            self.dataset.check_compatible(self.autoencoder, cfg.model.lowres_factor)
        self.latent_frames, c, h, w = self.autoencoder.latent_shape(self.num_frames, self.height, self.width)
        self.latent_shape = (c, h, w)
        self.skip_stats = SkipStats(cfg.data.video.max_failure_fraction, cfg.data.video.min_failures)
        self.diffusion = Diffusion(OmegaConf.to_object(cfg.diffusion))
        self.mask_sampler = MaskSampler(cfg.curriculum)
        self.model_cfg = as_model_config(cfg.model)

        # ---- model (same init on every rank), fine-tuning, EMA, optimizer
        torch.manual_seed(cfg.seed)
        model = MarDini(self.model_cfg)
        if t.init_from:
            if not Path(t.init_from).is_dir():
                raise FileNotFoundError(f"train.init_from={t.init_from} does not exist (expected an export or "
                                        f"checkpoint folder)")
            export_format.load_weights(model, export_format.read_weights(t.init_from, "ema"), source=t.init_from)
            log.info("initialised weights from %s (EMA weights)", t.init_from)
        if t.freeze_planner:
            model.planner.requires_grad_(False)
        if t.freeze_generator:
            model.generator.requires_grad_(False)
        model.to(self.device)
        param_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed) if self.fsdp else None
        parallelize(model, t.parallel, t.activation_checkpointing, t.compile, param_dtype)
        self.ema = EMA(model, t.ema_decay)
        optimizer = build_optimizer(model, t, fused=False if is_sharded(model) else None)
        self.scheduler = build_scheduler(optimizer, t)
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

        # ---- state
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self.stop_requested = False
        self._resume()
        if acc.is_main_process:  # after _resume: a refused run must not overwrite the existing run's record
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self.config_yaml)

        if trackers:
            run_config = OmegaConf.to_container(cfg, resolve=True)
            init_kwargs = {"wandb": {"mode": _wandb_mode(t.wandb_mode), "dir": str(self.run_dir),
                                     "name": f"{cfg.experiment}/{cfg.run_name}"}}
            acc.init_trackers(t.wandb_project, config=_flatten(run_config), init_kwargs=init_kwargs)

    # ------------------------------------------------------------------------------------------------- state
    def _build_dataset(self):
        """(dataset, clip size) for data.source: synthetic | video (decoded files) | cache (latents)."""
        d = self.cfg.data
        if d.source == "synthetic":
            clip = d.synthetic
            return SyntheticVideoDataset(clip), dict(num_frames=clip.num_frames, height=clip.height, width=clip.width)
        if d.source == "video":
            clip = d.video
            return VideoDataset(clip), dict(num_frames=clip.num_frames, height=clip.height, width=clip.width)
        dataset = CachedLatentDataset(d.cache_dir)
        clip = dataset.data_config
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

    def _resume(self) -> None:
        resume = self.cfg.train.resume
        if not resume:
            if ckpt.list_checkpoints(self.checkpoint_dir):  # every rank checks, so none is left waiting
                raise FileExistsError(
                    f"{self.checkpoint_dir} already holds checkpoints: pass train.resume=auto to continue that run, "
                    f"or choose another run_name / train.output_dir")
            return
        path = ckpt.latest_checkpoint(self.checkpoint_dir) if resume == "auto" else Path(resume)
        if path is None:
            log.info("train.resume=auto: no complete checkpoint in %s, starting fresh", self.checkpoint_dir)
            return
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
        if self.accelerator.is_main_process:
            _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        log.info("resumed from %s at step %d", path, self.step)

    def save_checkpoint(self) -> Path:
        state = {"step": self.step, "ema_updates": self.ema.num_updates, "nonfinite_total": self.nonfinite_total,
                 "nonfinite_in_row": self.nonfinite_in_row, "samples_seen": self.step * self.layout.samples_per_step,
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

    def export(self) -> Path:
        """EMA (and raw) weights as a diffusers-style folder that MarDiniPipeline.from_pretrained loads."""
        path = self.run_dir / "export"
        ema, raw = self.full_ema_state(), self.full_model_state()  # collective under FSDP
        if self.accelerator.is_main_process:
            config = {"model": self.model_cfg.to_dict(),
                      "diffusion": OmegaConf.to_container(self.cfg.diffusion, resolve=True),
                      "autoencoder": OmegaConf.to_container(self.cfg.autoencoder, resolve=True),
                      "num_frames": self.num_frames, "height": self.height, "width": self.width,
                      "fps": self.cfg.data.fps, "step": self.step}
            export_format.save_export(path, ema, config, raw_state=raw,
                                      scheduler_config=dict(self.diffusion.make_scheduler().config))
            log.info("exported EMA weights to %s", path)
        self.accelerator.wait_for_everyone()
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
        workers = d.num_workers
        return DataLoader(EpochPermutation(self.dataset, self.cfg.seed),
                          batch_sampler=StreamBatchSampler(self.layout, start_step=self.step),
                          num_workers=workers, pin_memory=d.pin_memory and self.device.type == "cuda",
                          persistent_workers=workers > 0, prefetch_factor=d.prefetch_factor if workers else None)

    def _micro_step(self, batch: dict, step: int) -> torch.Tensor:
        """Forward one micro-batch; returns the (unscaled) loss."""
        z_hi, z_lo = self._latents(batch)
        rnd = draw_randomness(batch["position"].tolist(), step, self.cfg.seed, self.mask_sampler, self.diffusion,
                              self.latent_frames, self.latent_shape, self.model_cfg.plan_dropout, self.device)
        drop = rnd.drop_plan if self.model_cfg.plan_dropout > 0 else None
        with self.accelerator.autocast():
            out = self.model(z_hi, z_lo, rnd.mask, self.diffusion, noise=rnd.noise, t=rnd.t, drop_plan=drop)
        return out["loss"]

    def train_step(self, batches) -> dict:
        """One optimizer step over grad_accum micro-batches. Skips the update if any loss or the gradient norm is
        non-finite on any rank."""
        acc, t = self.accelerator, self.cfg.train
        losses, finite = [], True
        for micro in range(t.grad_accum):
            batch = next(batches)
            last = micro == t.grad_accum - 1
            if self.fsdp:
                set_gradient_sync(self.model, last)
            sync = contextlib.nullcontext() if last or self.fsdp else acc.no_sync(self.model)
            with sync:
                loss = self._micro_step(batch, self.step)
                finite_here = torch.isfinite(loss.detach()).float()
                if acc.num_processes > 1:
                    finite_here = acc.reduce(finite_here, reduction="min")
                finite = finite and bool(finite_here.item())
                if finite:
                    acc.backward(loss / t.grad_accum)
            losses.append(loss.detach())
        grad_norm = float("nan")
        if finite:
            params = [p for p in self.model.parameters() if p.requires_grad]
            grad_norm = clip_grad_norm(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
            finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.ema.update(acc.unwrap_model(self.model))
            self.nonfinite_in_row = 0
        else:
            self.nonfinite_total += 1
            self.nonfinite_in_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        loss = torch.stack(losses).mean()
        if acc.num_processes > 1:
            loss = acc.reduce(loss, reduction="mean")
        return {"loss": loss.item(), "grad_norm": grad_norm, "skipped": not finite}

    # -------------------------------------------------------------------------------------------------- loop
    def fit(self) -> Path:
        acc, t = self.accelerator, self.cfg.train
        if self.step >= t.max_steps:
            log.info("already at step %d >= train.max_steps=%d; nothing to train", self.step, t.max_steps)
            return self.export()
        batches = iter(self._dataloader())
        previous_handler = self._install_sigterm()
        bar = tqdm(total=t.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (t.progress and acc.is_main_process))
        window, window_start, window_steps = [], time.perf_counter(), 0
        try:
            while self.step < t.max_steps:
                lr = self.scheduler.get_last_lr()[0]
                result = self.train_step(batches)
                self.step += 1
                window.append(result["loss"])
                window_steps += 1
                self._append_metrics({"step": self.step, "lr": lr, **result})
                bar.update(1)
                bar.set_postfix(loss=f"{result['loss']:.4f}", lr=f"{lr:.2e}")
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
                    finite_losses = [x for x in window if math.isfinite(x)]
                    samples_per_s = window_steps * self.layout.samples_per_step / max(elapsed, 1e-9)
                    acc.log({"train/loss": sum(finite_losses) / max(len(finite_losses), 1), "train/lr": lr,
                             "train/grad_norm": result["grad_norm"], "train/samples_per_s": samples_per_s,
                             "train/tokens_per_s": samples_per_s * self.tokens_per_sample,
                             "train/steps_per_s": window_steps / max(elapsed, 1e-9),
                             "train/nonfinite_total": self.nonfinite_total,
                             "train/curriculum_stage": self.mask_sampler.stage_index(self.step - 1),
                             **self.skip_stats.log_dict()}, step=self.step)
                    window, window_start, window_steps = [], time.perf_counter(), 0
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
                    log.warning("SIGTERM received: checkpoint saved at step %d, stopping", self.step)
                    return self.checkpoint_dir
            if self.step % t.checkpoint_every:
                self.save_checkpoint()
            self.sample()
            return self.export()
        except KeyboardInterrupt:
            log.warning("interrupted: saving a checkpoint at step %d", self.step)
            self.save_checkpoint()
            raise
        finally:
            bar.close()
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
            acc.end_training()

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
            metrics, paths = validation_videos(
                model, self.autoencoder, self.diffusion, videos,
                lambda z: lowres_from_hires(z, self.model_cfg.lowres_factor),
                self.run_dir / "samples", self.step, steps, seed=self.cfg.seed, fps=self.cfg.data.fps)
            acc.log(metrics, step=self.step)
            self._log_videos(paths)
            log.info("step %d validation: %s (videos in %s)", self.step,
                     ", ".join(f"{k}={v:.2f}" for k, v in metrics.items()), self.run_dir / "samples")
        del model
        acc.wait_for_everyone()
        return metrics

    def ema_model(self) -> MarDini | None:
        """A plain copy of the model holding the EMA weights on the main process, None elsewhere (every rank
        must call: under FSDP the shards are gathered)."""
        ema = self.full_ema_state()
        if not self.accelerator.is_main_process:
            return None
        model = MarDini(self.model_cfg).to(self.device).eval()
        model.load_state_dict(ema)
        return model

    def validation_clips(self, count: int) -> torch.Tensor:
        """[count, T, 3, H, W] fixed pixel clips: synthetic clips from the validation seed's stream (disjoint from
        training); for video data, clips sampled with the validation seed; for a cache, its first clips decoded."""
        d = self.cfg.data
        if d.source == "cache":
            z = torch.stack([self.dataset[i]["z_hi"] for i in range(min(count, len(self.dataset)))])
            with torch.no_grad():
                return self.autoencoder.decode(z.to(self.device).float()).cpu()
        node = d.synthetic if d.source == "synthetic" else d.video
        values = dict(OmegaConf.to_container(node, resolve=True), seed=d.val_seed)
        if d.source == "synthetic":
            data = SyntheticVideoDataset(SyntheticVideoConfig(**dict(values, num_videos=count)))
        else:
            data = VideoDataset(VideoDataConfig(**values))
        return torch.stack([data[i]["video"] for i in range(min(count, len(data)))])

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
            generate = model_generate_fn(model, self.autoencoder, self.diffusion,
                                         lambda z: lowres_from_hires(z, self.model_cfg.lowres_factor),
                                         num_steps=t.sample_steps or None, seed=self.cfg.seed)
            metrics = periodic_fvd(generate, self.validation_clips(t.eval_num_videos), self._fvd_extractor,
                                   cache=self._fvd_cache)
            acc.log(metrics, step=self.step)
            log.info("step %d evaluation: %s", self.step, ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
        del model
        acc.wait_for_everyone()
        return metrics

    # ----------------------------------------------------------------------------------------------- helpers
    def _log_videos(self, paths: dict) -> None:
        for tracker in self.accelerator.trackers:
            if tracker.name == "wandb":
                import wandb

                tracker.log({f"samples/{k}": wandb.Video(str(p), format="mp4") for k, p in paths.items()},
                            step=self.step)
            elif tracker.name == "tensorboard":
                import imageio.v3 as iio

                for k, p in paths.items():
                    frames = iio.imread(p, plugin="pyav")  # [T, H, W, 3] uint8
                    tracker.writer.add_images(f"samples/{k}", frames, self.step, dataformats="NHWC")

    def _append_metrics(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _install_sigterm(self):
        """SIGTERM (cluster pre-emption) finishes the current step, saves a checkpoint and stops."""
        if not _in_main_thread():
            return None

        def handler(signum, frame):
            self.stop_requested = True

        return signal.signal(signal.SIGTERM, handler)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past the resumed step (written after the checkpoint by the run that stopped)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


def train(cfg) -> Path:
    """Run an experiment from a composed config; returns the export folder."""
    return Trainer(cfg).fit()
