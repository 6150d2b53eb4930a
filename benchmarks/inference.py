"""Generation latency and peak memory at the paper's setting: 12 frames at 512x512 (and 17), image-to-video.

Paper (MarDini, arXiv 2410.20280): 12 frames at 512 px in 6.05 s using 42.57 GB. We time the whole call the user
makes: planner once + K generator steps + VAE decode of the frames (a randomly initialised diffusers AutoencoderKL
of the FLUX/SD3 shape, 16 latent channels, 8x compression: real VAE cost without downloading weights), in bf16.
Also "planner every step", the design MarDini avoids, to show what running the planner once saves.

    python benchmarks/inference.py --frames 12,17 --steps 25,10,4 --out inference.json
"""

from __future__ import annotations

import argparse
import json

import torch

from common import timed  # benchmarks/common.py (the script's folder is on sys.path)
from mardini.diffusion import Diffusion, DiffusionConfig
from mardini.models import MarDini, model_config
from mardini.models.mardini import lowres_from_hires


def build_vae(device, dtype):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2)
    return vae.to(device, dtype).eval()


def decode_frames(vae, latents: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """[T, C, h, w] -> [T, 3, 8h, 8w], a few frames at a time to bound the decoder's activation memory."""
    return torch.cat([vae.decode(c).sample for c in latents.split(chunk)])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="paper")
    p.add_argument("--frames", default="12,17")
    p.add_argument("--steps", default="25,10,4")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--lowres", type=int, default=4)
    p.add_argument("--compile", default="0,1")
    p.add_argument("--kernel", default="auto")
    p.add_argument("--out", default="inference.json")
    args = p.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    latent = args.resolution // 8
    vae = build_vae(device, dtype)
    decode = lambda z: decode_frames(vae, z)  # noqa: E731
    results = []
    for compile_ in [bool(int(c)) for c in args.compile.split(",")]:
        cfg = model_config(args.size, latent_channels=16, lowres_factor=args.lowres, max_frames=17,
                           sdpa_kernel=args.kernel)
        torch.manual_seed(0)
        model = MarDini(cfg).to(device, dtype).eval()
        if compile_:
            model.generator.compile()
            model.planner.compile()
        diffusion = Diffusion(DiffusionConfig())
        for T in [int(x) for x in args.frames.split(",")]:
            z = torch.randn(1, T, 16, latent, latent, device=device, dtype=dtype)
            mask = torch.ones(1, T, dtype=torch.bool, device=device)
            mask[:, T // 2] = False  # image-to-video, reference in the middle (the paper's main setting)
            for steps in [int(s) for s in args.steps.split(",")]:
                def generate():
                    with torch.inference_mode():
                        out = model.generate(z, mask, diffusion, num_steps=steps)
                        return decode(out[0])  # [T, 3, 512, 512]

                seconds, peak = timed(generate, 1, 3)
                with torch.inference_mode():
                    planner_s, _ = timed(lambda: model.planner(lowres_from_hires(z, args.lowres), mask), 1, 5)
                    decode_s, _ = timed(lambda: decode(z[0]), 1, 3)
                r = {"frames": T, "steps": steps, "compile": compile_, "seconds": seconds, "peak_mem_gib": peak,
                     "planner_once_s": planner_s, "vae_decode_s": decode_s,
                     "extra_if_planner_every_step_s": planner_s * (steps - 1),
                     "vs_paper_time": seconds / 6.05 if T == 12 else None,
                     "vs_paper_memory": peak * 2**30 / 1e9 / 42.57 if T == 12 else None,
                     "params_m": {k: v / 1e6 for k, v in model.num_parameters().items()}}
                results.append(r)
                print(json.dumps(r), flush=True)
                with open(args.out, "w") as f:
                    json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "args": vars(args), "results": results}, f, indent=1)
        del model
        torch.cuda.empty_cache()
    print(f"\n{'frames':>6s} {'steps':>5s} {'compile':>7s} {'total s':>8s} {'GiB':>6s} {'planner s':>9s} "
          f"{'VAE s':>6s} {'+planner/step s':>15s}")
    for r in results:
        print(f"{r['frames']:6d} {r['steps']:5d} {str(r['compile']):>7s} {r['seconds']:8.2f} {r['peak_mem_gib']:6.1f} "
              f"{r['planner_once_s']:9.3f} {r['vae_decode_s']:6.2f} {r['extra_if_planner_every_step_s']:15.2f}")


if __name__ == "__main__":
    main()
