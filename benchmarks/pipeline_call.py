"""The user's call, timed as a user makes it: `MarDiniPipeline.interpolate` / `.image_to_video` on images in host
memory, returning the video in host memory, after `pipe.compile()`.

benchmarks/inference.py times the model's work on the device (VAE encode of the given frames, planner, sampler
steps, VAE decode of the generated frames); this adds what the pipeline does around it: preprocessing the images,
drawing the noise, moving the frames to the device and the video back. The paper model (random weights: speed does
not depend on them) over a random-weight diffusers AutoencoderKL of the FLUX/SD3 shape (16 latent channels, 8x),
bf16, 12 frames at 512 px, 25 steps, every VAE call over all of a window's frames (`frames_per_chunk=None`);
`--attn-backend fa4 --fp8` as `mardini-sample --attn-backend fa4 --fp8` (the fastest options measured).

    python benchmarks/pipeline_call.py --out pipeline_call.json [--dynamic none] [--attn-backend fa4] [--fp8]
    python benchmarks/pipeline_call.py --device cpu --size tiny --resolution 32 --steps 1 --compile 0  # smoke test
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mardini.autoencoders import KLAutoencoder
from mardini.diffusion import Diffusion
from mardini.inference import MarDiniPipeline
from mardini.models import MarDini, model_config
from mardini.models.fp8 import FP8Linear
from mardini.models.layers import ATTENTION_BACKENDS
from inference import VAE_CONFIG, give_outputs  # benchmarks/inference.py (the script's folder is on sys.path)


def wall(fn, warmup: int, iters: int, device: torch.device) -> tuple[float, float]:
    """Median wall-clock seconds of a host-to-host call, and peak device memory in GiB (0 on the CPU)."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()  # returns a CPU tensor: the call has finished on the device
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="paper")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--lowres", type=int, default=4)
    p.add_argument("--compile", type=int, default=1, help="1: pipe.compile() (mode default)")
    p.add_argument("--dynamic", default="false", choices=("none", "false"),
                   help="pipe.compile(dynamic=...): false (the pipeline's default: every shape static) or none "
                        "(torch's default: static, then dynamic at a second shape)")
    p.add_argument("--attn-backend", default="sdpa", choices=ATTENTION_BACKENDS, help="model.attn_backend")
    p.add_argument("--fp8", action="store_true", help="pipe.use_fp8_gemms() before pipe.compile() (mardini-sample "
                                                      "--fp8): the generator's MLP and self-attention GEMMs in FP8")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="pipeline_call.json")
    args = p.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = MarDini(model_config(args.size, latent_channels=16, lowres_factor=args.lowres, max_frames=17,
                                 attn_backend=args.attn_backend))
    give_outputs(model.generator)
    autoencoder = KLAutoencoder(config=VAE_CONFIG, dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
    autoencoder.frames_per_chunk = None  # a window's frames in one VAE call (`mardini-sample --vae-chunk 0`)
    pipe = MarDiniPipeline(model, Diffusion(dict(num_inference_steps=args.steps)), autoencoder,
                           {"num_frames": args.frames, "height": args.resolution, "width": args.resolution})
    pipe.to(device, dtype)
    if args.fp8:
        pipe.use_fp8_gemms()
    if args.compile:
        pipe.compile(dynamic=None if args.dynamic == "none" else False)
    g = torch.Generator().manual_seed(1)
    first, middle, last = (torch.rand(3, args.resolution, args.resolution, generator=g) * 2 - 1 for _ in range(3))
    calls = {"image_to_video": lambda: pipe.image_to_video(middle, position="middle"),
             "interpolation": lambda: pipe.interpolate(first, last)}
    warmup, iters = (2, args.iters) if device.type == "cuda" else (0, 1)
    results = []
    for task, call in calls.items():
        seconds, peak = wall(call, warmup, iters, device)
        video = call()
        r = {"task": task, "frames": args.frames, "steps": args.steps, "resolution": args.resolution,
             "compile": bool(args.compile), "dynamic": args.dynamic, "attn_backend": args.attn_backend,
             "fp8_layers": sum(isinstance(m, FP8Linear) for m in model.modules()), "seconds": seconds,
             "peak_mem_gib": peak,
             "output_shape": list(video.shape), "output_device": str(video.device),
             "vs_paper_time": seconds / 6.05}
        results.append(r)
        print(json.dumps(r), flush=True)
    with open(args.out, "w") as f:
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        json.dump({"device": name, "torch": torch.__version__, "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
