"""Prototype: some of the generator's GEMMs in FP8 during generation, timed and checked against the bf16 path.

`fp8_error.py` found, in float32 on the CPU (BENCHMARKS.md, "Inference, eleventh step"), that computing the paper
generator's MLP GEMMs (fc_in, fc_out) and its self-attention's qkv projection from e4m3 inputs with per-token and
per-output-channel scales leaves image-to-video samples as far from float32 as bf16 leaves them (relative L2 1.33e-2
against bf16's 1.31e-2), where the cross-attention's output projection in FP8 triples the error. Those three GEMMs
are 4.3 ms of the 21.6 ms cached sampler step on one H200; FP8 runs at up to twice bf16's rate on Hopper. This
script computes them with torch._scaled_mm in its rowwise mode (weights quantised once, activations per call, in a
form inductor can fuse with the SwiGLU and the norms before them) and times image-to-video (12 frames at 512 px, 25
steps, the generator compiled, reference frames cached, the planner once; the VAE is left out:
`benchmarks/inference.py` times it at 0.070 s) for each --variants entry on the same machine, with the samples'
relative L2 distance from the eager bf16 model's (compiled bf16 itself: 1.2e-2).

    python benchmarks/prototypes/fp8_generator.py --variants bf16,mlp,mlp+qkv --json fp8_generator.json
    python benchmarks/prototypes/fp8_generator.py --device cpu --size tiny --latent 8 --frames 5 --steps 2 --compile 0
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import timed  # noqa: E402
from inference import fp8_choice, give_outputs  # noqa: E402
from mardini.diffusion import Diffusion, DiffusionConfig  # noqa: E402
from mardini.models import MarDini, model_config  # noqa: E402
from mardini.models.fp8 import use_fp8_gemms  # noqa: E402


def add_clip_arguments(p: argparse.ArgumentParser, latent: int) -> None:
    """The model size and the image-to-video clip both FP8 prototypes sample (i2v_setup)."""
    p.add_argument("--size", default="paper")
    p.add_argument("--latent", type=int, default=latent, help="latent side (512 px is 64; the widths are the size's)")
    p.add_argument("--lowres", type=int, default=4)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--steps", type=int, default=25)


def i2v_setup(args: argparse.Namespace) -> tuple:
    """(model in float32 with the zero-initialised weights given values, its config, latents [1, T, 16, s, s], the
    image-to-video mask [1, T] with the middle frame given, the diffusion), seeded: the same in both prototypes."""
    torch.manual_seed(0)
    cfg = model_config(args.size, latent_channels=16, lowres_factor=args.lowres, max_frames=max(17, args.frames))
    model = MarDini(cfg).eval()
    give_outputs(model.generator)
    T, s = args.frames, args.latent
    z = torch.randn(1, T, 16, s, s, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, T, dtype=torch.bool)
    mask[:, T // 2] = False
    return model, cfg, z, mask, Diffusion(DiffusionConfig())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_clip_arguments(p, latent=64)
    p.add_argument("--compile", type=int, default=1)
    p.add_argument("--variants", default="bf16,mlp,mlp+qkv", help="comma list: bf16 (as shipped) or '+'-joined parts "
                                                                 "in FP8 among mlp, qkv, proj (+fast: fast "
                                                                 "accumulation)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", default="")
    args = p.parse_args()
    device = torch.device(args.device)
    model, cfg, z, mask, diffusion = i2v_setup(args)
    model, z, mask = model.to(device, torch.bfloat16), z.to(device, torch.bfloat16), mask.to(device)

    @torch.inference_mode()
    def sample() -> torch.Tensor:
        return model.generate(z, mask, diffusion, num_steps=args.steps,
                              generator=torch.Generator(device).manual_seed(0)).float()

    reference = sample()[:, mask[0]]  # eager bf16
    eager = model.generator
    rows = []
    for variant in args.variants.split(","):
        try:
            layers, fast_accum = fp8_choice(variant)
        except ValueError as e:
            p.error(f"--variants: {e}")
        generator = copy.deepcopy(eager)
        swapped = use_fp8_gemms(generator, layers, fast_accum)
        torch._dynamo.reset()
        model.generator = torch.compile(generator, dynamic=False) if args.compile else generator
        generator.compile_reference_pass(enabled=bool(args.compile), dynamic=False)
        seconds, peak = timed(sample, 2, 5, device)
        out = sample()[:, mask[0]]
        row = {"variant": variant, "fp8_linears": swapped, "seconds": seconds, "peak_gib": peak,
               "rel_l2_vs_eager_bf16": ((out - reference).norm() / reference.norm()).item(),
               "max_abs_diff_vs_eager_bf16": (out - reference).abs().max().item(),
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
