#!/usr/bin/env python
r"""Encode a video folder or manifest into a latent cache (sharded safetensors), on one or many GPUs.

Each process encodes its share of the shards (shard k goes to process k mod W); a rerun with the same arguments
skips complete shards, so an interrupted or pre-empted job just starts again. Train from the result with
``CachedLatentDataset`` (data.source=cache).

    # one GPU / CPU
    python scripts/cache_latents.py /data/manifest.csv /data/cache --autoencoder kl \
        --pretrained /models/sdxl --subfolder vae --num-frames 17 --height 256 --width 256 --fps 8
    # 8 GPUs (or: torchrun --standalone --nproc_per_node 8 scripts/cache_latents.py ...)
    accelerate launch --num_processes 8 scripts/cache_latents.py /data/manifest.csv /data/cache ...

Clips are those VideoDataset(index) gives: deterministic per index (a seeded random start with the default
--clip-start random, recorded with each item), so training from the cache equals encoding on the fly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mardini.autoencoders import build_autoencoder  # noqa: E402
from mardini.cli import CONFIG_DIR, user_errors  # noqa: E402
from mardini.data.latent_cache import LOWRES_MODES, STORAGE_DTYPES, LatentCacheWriter  # noqa: E402
from mardini.data.video import BACKENDS, CLIP_STARTS, VideoDataConfig, VideoDataset  # noqa: E402
from mardini.data.transforms import CROPS  # noqa: E402
from mardini.data.workers import usable_workers  # noqa: E402


def identity_defaults() -> dict:
    """The identity autoencoder of a run's config (configs/autoencoder/identity.yaml): patch size, scale and shift.
    Why: the cache records them and a run refuses a cache made with others, so the defaults here are a run's."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "autoencoder" / "identity.yaml"))


def parse_args(argv=None) -> argparse.Namespace:
    d, identity = VideoDataConfig(), identity_defaults()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a folder of videos or a .csv / .jsonl manifest")
    p.add_argument("output", help="the cache folder (created; an existing one is completed if settings match)")
    g = p.add_argument_group("clips (VideoDataConfig)")
    g.add_argument("--num-frames", type=int, default=d.num_frames)
    g.add_argument("--height", type=int, default=d.height)
    g.add_argument("--width", type=int, default=d.width)
    g.add_argument("--fps", type=float, default=d.fps, help="0 = use --frame-stride")
    g.add_argument("--frame-stride", type=int, default=d.frame_stride)
    g.add_argument("--clip-start", default=d.clip_start, choices=CLIP_STARTS)
    g.add_argument("--crop", default=d.crop, choices=CROPS)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--num-videos", type=int, default=0, help="only the first N entries (0 = all)")
    g.add_argument("--backend", default=d.backend, choices=BACKENDS)
    g.add_argument("--max-failure-fraction", type=float, default=d.max_failure_fraction)
    a = p.add_argument_group("autoencoder")
    a.add_argument("--autoencoder", default="kl", help="kl | kl_video | identity")
    a.add_argument("--pretrained", default="", help="kl / kl_video: local folder of the VAE (or of a pipeline)")
    a.add_argument("--subfolder", default="", help="e.g. vae")
    a.add_argument("--vae-class", default="", help="diffusers class (default AutoencoderKL / AutoencoderKLCogVideoX)")
    a.add_argument("--vae-config", default="", help="kl / kl_video: JSON config for random weights (testing)")
    a.add_argument("--scaling-factor", type=float, default=None,
                   help=f"override the VAE config's; identity: its scale, the run's autoencoder.scale (default "
                        f"{identity['scale']}, as autoencoder=identity)")
    a.add_argument("--shift-factor", type=float, default=None,
                   help=f"override the VAE config's; identity: its shift, the run's autoencoder.shift (default "
                        f"{identity['shift']}, as autoencoder=identity)")
    a.add_argument("--vae-dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    a.add_argument("--frames-per-chunk", type=int, default=16, help="frames (kl) or videos (kl_video) per VAE call")
    a.add_argument("--patch-size", type=int, default=identity["patch_size"],
                   help="identity: pixels per latent cell side, the run's autoencoder.patch_size")
    c = p.add_argument_group("cache")
    c.add_argument("--lowres-factor", type=int, default=2, help="r: z_lo is h/r x w/r")
    c.add_argument("--lowres-mode", default="latents", choices=LOWRES_MODES)
    c.add_argument("--shard-size", type=int, default=256, help="items per shard file")
    c.add_argument("--dtype", default="float16", choices=sorted(STORAGE_DTYPES), help="storage dtype")
    c.add_argument("--batch-size", type=int, default=8, help="clips per encoder call")
    c.add_argument("--num-workers", type=int, default=4, help="decoding workers per process")
    c.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait for one batch from the workers before stopping with its files named "
                        "(a decoder or file system stuck on one); 0 = wait forever")
    c.add_argument("--max-shards", type=int, default=None, help="stop after this many shards per process")
    c.add_argument("--cpu", action="store_true", help="encode on CPU even with a GPU")
    c.add_argument("--quiet", action="store_true")
    c.add_argument("--debug", action="store_true", help="an error shows its traceback (else one line, status 2)")
    return p.parse_args(argv)


def build(args):
    # The source as given: the cache's writer records it, and each clip's file, absolute (a validation cache is
    # compared with the training cache by those paths, from whatever working directory).
    cfg = VideoDataConfig(root=args.source, num_videos=args.num_videos, num_frames=args.num_frames,
                          height=args.height, width=args.width, fps=args.fps, frame_stride=args.frame_stride,
                          clip_start=args.clip_start, crop=args.crop, backend=args.backend, seed=args.seed,
                          max_failure_fraction=args.max_failure_fraction)
    dataset = VideoDataset(cfg)
    if args.autoencoder == "identity":  # defaults: a run's (its scale 1, shift 0 matched no run's autoencoder=identity)
        identity = identity_defaults()
        scale = identity["scale"] if args.scaling_factor is None else args.scaling_factor
        shift = identity["shift"] if args.shift_factor is None else args.shift_factor
        ae = build_autoencoder("identity", patch_size=args.patch_size, scale=scale, shift=shift)
    else:
        kwargs = dict(subfolder=args.subfolder, scaling_factor=args.scaling_factor, shift_factor=args.shift_factor,
                      dtype=args.vae_dtype, frames_per_chunk=args.frames_per_chunk)
        if args.vae_class:
            kwargs["vae_class"] = args.vae_class
        if args.vae_config:
            kwargs["config"] = json.loads(Path(args.vae_config).read_text())
        else:
            kwargs["pretrained"] = args.pretrained
        ae = build_autoencoder(args.autoencoder, **kwargs)
    return dataset, ae.eval()


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    from accelerate import PartialState

    state = PartialState(cpu=args.cpu)
    dataset, ae = build(args)
    writer = LatentCacheWriter(args.output, dataset, ae, lowres_factor=args.lowres_factor,
                               lowres_mode=args.lowres_mode, shard_size=args.shard_size, dtype=args.dtype,
                               extra={"source": args.source})
    if state.is_main_process:
        writer.write_meta()
    state.wait_for_everyone()
    workers = usable_workers(args.num_workers)
    if workers < args.num_workers and state.is_main_process:
        print(f"--num-workers {args.num_workers}, but a process may use {workers} CPU(s): decoding with {workers}")
    start = time.perf_counter()
    written = writer.run(rank=state.process_index, world_size=state.num_processes, batch_size=args.batch_size,
                         num_workers=workers, device=state.device, max_shards=args.max_shards,
                         progress=not args.quiet, timeout=args.timeout)
    elapsed = time.perf_counter() - start
    print(f"[process {state.process_index}] wrote {len(written)} shards in {elapsed:.1f} s", flush=True)
    state.wait_for_everyone()
    meta = None
    if state.is_main_process:
        try:
            meta = writer.finalize()
            print(f"latent cache complete: {meta['num_items']} items in {meta['num_shards']} shards at "
                  f"{args.output}; z_hi {meta['shapes']['z_hi']}, z_lo {meta['shapes']['z_lo']}")
        except RuntimeError as e:
            if args.max_shards is None:
                raise
            print(f"not complete yet ({e}); run again to continue")
    return meta


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    # like mardini-train: a user error (a bad argument, file or setting) is one line and status 2
    with user_errors("cache_latents.py", "--debug" in sys.argv[1:]):
        main()
