r"""Generation latency and peak memory at the paper's setting: 12 frames at 512x512 (and 17), image-to-video.

Paper (MarDini, arXiv 2410.20280): 12 frames at 512 px in 6.05 s using 42.57 GB. --given 2 times interpolation
(first and last frames given) instead, k > 2 given frames spread evenly over the window. We time the whole call
the user makes, as MarDiniPipeline makes it: VAE encode of the k given frames + planner once + K generator steps +
VAE decode of the T - k generated frames (a randomly initialised diffusers AutoencoderKL of the FLUX/SD3 shape, 16
latent channels, 8x compression: real VAE cost without downloading weights), in bf16. `--decode all` times the
accounting of the figures before 2026-12-03 instead: no encode, all T frames decoded.
Also "planner every step", the design MarDini avoids, to show what running the planner once saves.

Variants, each timed on every (frames, steps): each SDPA --kernel (or xformers), torch.compile off or on in each
--compile-mode (planner and generator, static shapes; the reference frames' one pass compiled in mode "default",
as MarDiniPipeline.compile does), reference frames recomputed at every step or cached once
(--reuse-references), times the VAE decoder eager or compiled (mode "default"), in contiguous or channels_last
memory format, with its upsamplers as diffusers computes them or on the low-resolution grid (--vae-subpixel,
prototypes/subpixel_upsample.py), --vae-chunk frames per decoder call (0: all; 4 in the figures before 2026-12-02),
the generator's MLP and/or self-attention GEMMs in FP8 (--fp8, mardini/models/fp8.py: e4m3 inputs, rowwise
scales), the decoded pixels compared with the eager decoder's (`vae_max_abs_diff_vs_eager`). Each result
splits the call into VAE encode, planner, generator steps (of which the reference frames' one pass,
`cache_references`, is also timed apart) and VAE decode, gives the generator's achieved TFLOP/s (the work the
variant computes, mardini.models.flops) against its floor at --peak-tflops, and compares the generated latents
(same input and noise) with the eager model's (first kernel, no cache). On the CPU each part runs once (a smoke
test, not a timing).

    python benchmarks/inference.py --frames 12,17 --steps 25,10,4 --out inference.json
    python benchmarks/inference.py --frames 12 --steps 25,4 --compile 0,1 \
        --compile-mode default,reduce-overhead --vae-compile 0,1 --out inference_modes.json
    python benchmarks/inference.py --frames 12 --steps 25,4 --compile 1 --vae-compile 1 --reuse-references 0,1 \
        --kernel flash,cudnn,auto --given 1,2
    python benchmarks/inference.py --device cpu --size tiny --resolution 64 --lowres 2 --frames 5 --steps 2 \
        --compile 0 --out /tmp/inference.json   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform

import torch
from torch import nn

from common import timed  # benchmarks/common.py (the script's folder is on sys.path)
from prototypes.subpixel_upsample import use_subpixel_upsampling
from mardini.diffusion import Diffusion, DiffusionConfig
from mardini.models import MarDini, flash4, model_config
from mardini.models.flash4 import FA4_MIN_FLOP
from mardini.models.flops import generator_flops
from mardini.models.fp8 import FP8_LAYERS, use_fp8_gemms
from mardini.models.layers import SDPA_KERNELS, CrossAttention, SelfAttention
from mardini.models.mardini import lowres_from_hires

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")


# A diffusers AutoencoderKL of the FLUX/SD3 shape (16 latent channels, 8x): real VAE cost without its weights.
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(128, 256, 512, 512))


def build_vae(device, dtype):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG).to(device, dtype).eval()


@torch.inference_mode()
def decode_frames(vae, latents: torch.Tensor, memory_format=torch.contiguous_format, chunk: int = 4) -> torch.Tensor:
    """[T, C, h, w] -> [T, 3, 8h, 8w], `chunk` frames per decoder call to bound its activation memory (0: all)."""
    chunks = latents.split(chunk) if chunk else [latents]
    return torch.cat([vae.decode(c.contiguous(memory_format=memory_format)).sample for c in chunks])


@torch.inference_mode()
def encode_frames(vae, pixels: torch.Tensor, memory_format=torch.contiguous_format) -> torch.Tensor:
    """[k, 3, H, W] -> [k, C, H/8, W/8], the posterior mean (what mardini's KLAutoencoder encodes)."""
    return vae.encode(pixels.contiguous(memory_format=memory_format)).latent_dist.mean


def give_outputs(generator: nn.Module) -> None:
    """adaLN-Zero starts every generator block as the identity and the output layer at 0, so an untrained model's
    samples (all zero with the default x0 prediction) do not depend on what the kernels compute: give those zero
    weights the init of the other linears, so that comparing variants' outputs means something (the speed does not
    depend on the values)."""
    for m in generator.modules():
        if isinstance(m, nn.Linear) and not m.weight.any():
            nn.init.xavier_uniform_(m.weight)


class CudaGraphStep(nn.Module):
    """A module compiled with mode="reduce-overhead" (CUDA graphs), called by the sampler. Graph outputs live in a
    pool that the next replay overwrites, and the sampler keeps the plan across every step (and a step's output
    until the next call), so each call starts a new cudagraph-trees step, letting every denoising step replay the
    same graph rather than record one per step, and hands back a copy."""

    def __init__(self, compiled: nn.Module):
        super().__init__()
        self.compiled = compiled

    def forward(self, *args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(*args, **kwargs).clone()

    def __getattr__(self, name):  # the wrapped module's methods (Generator.cache_references, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.compiled, name)


def compile_module(module: nn.Module, mode: str) -> nn.Module:
    """Static shapes: deployment runs fixed sizes, and a recompile per frame count beats dynamic-shape kernels."""
    compiled = torch.compile(module, mode=mode, dynamic=False)
    return CudaGraphStep(compiled) if mode == "reduce-overhead" else compiled


def ints(csv: str) -> list[int]:
    return [int(x) for x in csv.split(",")]


def attention_choice(kernel: str) -> dict:
    """The model's attention settings for a --kernel name: an SDPA kernel, or "xformers" / "fa4" (those backends;
    "fa4-every-call": fa4 also for the calls the library hands to SDPA as too small, flash4.FA4_MIN_FLOP)."""
    if kernel in ("xformers", "fa4", "fa4-every-call"):
        return {"attn_backend": kernel.removesuffix("-every-call"), "sdpa_kernel": "auto"}
    return {"attn_backend": "sdpa", "sdpa_kernel": kernel}


def fp8_choice(variant: str) -> tuple[tuple[str, ...], bool]:
    """An --fp8 entry -> (the layers use_fp8_gemms swaps, fast accumulation): "none" (or "bf16"), or a '+'-joined list
    of layers among FP8_LAYERS with "fast" for fast accumulation; ValueError for anything else."""
    parts = set() if variant in ("none", "bf16") else set(variant.split("+"))
    if parts and (not parts <= {*FP8_LAYERS, "fast"} or parts <= {"fast"}):
        raise ValueError(f"{variant!r} is not none or a '+'-joined list of layers among {', '.join(FP8_LAYERS)} "
                         f"(and fast: fast accumulation)")
    return tuple(sorted(parts - {"fast"})), "fast" in parts


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="paper")
    p.add_argument("--frames", default="12,17")
    p.add_argument("--steps", default="25,10,4")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--lowres", type=int, default=4)
    p.add_argument("--compile", default="0,1")
    p.add_argument("--compile-mode", default="default", help=f"comma list among {', '.join(COMPILE_MODES)}")
    p.add_argument("--vae-compile", default="0", help="0/1 list: compile the VAE encoder and decoder (mode default)")
    p.add_argument("--vae-channels-last", default="0", help="0/1 list: the VAE in channels_last memory format")
    p.add_argument("--vae-subpixel", default="0", help="0/1 list: the decoder's nearest-2x + 3x3-conv upsamplers on "
                                                      "the low-resolution grid (prototypes/subpixel_upsample.py)")
    p.add_argument("--vae-chunk", default="4", help="list of frames per VAE decoder call (0: all frames in one call; "
                                                    "benchmarks/prototypes/vae_decode.py times it alone)")
    p.add_argument("--decode", default="generated", help="list of: generated (encode the given frames, decode the "
                                                        "generated ones: the pipeline's call), all (no encode, all "
                                                        "frames decoded: the accounting before 2026-12-03)")
    p.add_argument("--reuse-references", default="1",
                   help="0/1 list: cache the reference frames' keys and values once per call (MarDini.generate)")
    p.add_argument("--given", default="1", help="list of given-frame counts: 1 = the middle frame (image-to-video), "
                                                  "k > 1 = k frames spread evenly from the first to the last")
    p.add_argument("--kernel", default="auto", help="list of SDPA kernels (model.sdpa_kernel values) and/or xformers, "
                                                   "fa4 (those backends), fa4-every-call (fa4 for the small calls "
                                                   "too); the first also computes the eager reference")
    p.add_argument("--fp8", default="none", help="list of: none, or the generator's GEMMs computed from e4m3 inputs "
                                                 "as a '+'-joined list of mlp (fc_in, fc_out), qkv, proj (the "
                                                 "self-attention's), and fast (fast accumulation) "
                                                 "(mardini/models/fp8.py; a GPU of compute capability >= 8.9)")
    p.add_argument("--generator-heads", type=int, default=0, help="the generator's head count (0 = the size's)")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="the accelerator's dense bf16 TFLOP/s")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="inference.json")
    args = p.parse_args()
    modes = args.compile_mode.split(",")
    if not set(modes) <= set(COMPILE_MODES):
        p.error(f"--compile-mode: choose among {', '.join(COMPILE_MODES)}")
    kernels = args.kernel.split(",")
    if not set(kernels) <= {*SDPA_KERNELS, "xformers", "fa4", "fa4-every-call"}:
        p.error(f"--kernel: choose among {', '.join(SDPA_KERNELS)}, xformers, fa4, fa4-every-call")
    fp8_variants = args.fp8.split(",")
    try:
        fp8_choices = {v: fp8_choice(v) for v in fp8_variants}
    except ValueError as e:
        p.error(f"--fp8: {e}")
    variants = [(kernel, bool(c), mode, bool(reuse), fp8) for kernel in kernels for c in ints(args.compile)
                for mode in (modes if c else [None]) for reuse in ints(args.reuse_references) for fp8 in fp8_variants]
    decodes = args.decode.split(",")
    if not set(decodes) <= {"generated", "all"}:
        p.error("--decode: choose among generated, all")
    vae_variants = list(itertools.product(map(bool, ints(args.vae_compile)), map(bool, ints(args.vae_subpixel)),
                                          map(bool, ints(args.vae_channels_last)), ints(args.vae_chunk), decodes))

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 convolutions are slow on the CPU
    warmup, iters = (1, 3) if device.type == "cuda" else (0, 1)  # the CPU runs are smoke tests, not timings
    latent = args.resolution // 8
    vae = build_vae(device, dtype)
    plain_decoders = {False: vae.decoder}
    if "1" in args.vae_subpixel.split(","):
        plain_decoders[True] = copy.deepcopy(vae.decoder)
        use_subpixel_upsampling(plain_decoders[True])
    vae_decoders = {(compiled, subpixel): torch.compile(decoder, dynamic=False) if compiled else decoder
                    for subpixel, decoder in plain_decoders.items() for compiled in (0, 1)}
    vae_encoders = {False: vae.encoder, True: torch.compile(vae.encoder, dynamic=False)}
    cfg = model_config(args.size, latent_channels=16, lowres_factor=args.lowres, max_frames=17,
                       **attention_choice(kernels[0]),
                       generator={"num_heads": args.generator_heads} if args.generator_heads else {})
    torch.manual_seed(0)
    model = MarDini(cfg)
    give_outputs(model.generator)
    model = model.to(device, dtype).eval()
    params_m = {k: v / 1e6 for k, v in model.num_parameters().items()}
    eager = {"planner": model.planner, "generator": model.generator}
    generators = {"none": model.generator}  # --fp8 entry -> the eager generator with those GEMMs in FP8
    for fp8, (layers, fast_accum) in fp8_choices.items():
        if layers:
            generators[fp8] = copy.deepcopy(model.generator)
            use_fp8_gemms(generators[fp8], layers, fast_accum)
    diffusion = Diffusion(DiffusionConfig())

    clips = {}  # (frames, given frames) -> latents, mask
    for T, k in itertools.product(ints(args.frames), ints(args.given)):
        z = torch.randn(1, T, 16, latent, latent, generator=torch.Generator(device).manual_seed(T), device=device)
        mask = torch.ones(1, T, dtype=torch.bool, device=device)
        given = [T // 2] if k == 1 else torch.linspace(0, T - 1, k).round().long().tolist()
        mask[:, given] = False  # k = 1: image-to-video from the middle (the paper's main setting)
        clips[T, k] = z.to(dtype), mask
    pixels = {k: torch.rand(k, 3, args.resolution, args.resolution, device=device, dtype=dtype) * 2 - 1
              for k in ints(args.given)}  # the given frames, for the encoder
    @torch.inference_mode()
    def sample(clip: tuple[int, int], steps: int, reuse: bool) -> torch.Tensor:
        """Latents [1, T, C, h, w] from the model as it now stands; the same noise on every call."""
        z, mask = clips[clip]
        return model.generate(z, mask, diffusion, num_steps=steps, generator=torch.Generator(device).manual_seed(0),
                              reuse_references=reuse)

    reference = {(c, s): sample(c, s, False).float() for c in clips for s in ints(args.steps)}  # the eager model's
    results = []
    for kernel, compile_, mode, reuse, fp8 in variants:
        torch._dynamo.reset()  # each variant compiles afresh (and frees the previous one's CUDA graphs)
        choice = attention_choice(kernel)
        flash4.FA4_MIN_FLOP = 0 if kernel == "fa4-every-call" else FA4_MIN_FLOP
        eager["generator"] = generators[fp8]
        for m in itertools.chain(eager["planner"].modules(), *(g.modules() for g in generators.values())):
            if isinstance(m, (SelfAttention, CrossAttention)):
                m.backend, m.sdpa_kernel = choice["attn_backend"], choice["sdpa_kernel"]
        for name, module in eager.items():
            setattr(model, name, compile_module(module, mode) if compile_ else module)
        eager["generator"].compile_reference_pass(enabled=compile_, dynamic=False)  # as MarDiniPipeline.compile
        for (T, k), (z, mask) in clips.items():
            with torch.inference_mode():
                plan = lambda: model.planner(lowres_from_hires(z, args.lowres), mask)  # noqa: E731
                planner_s, _ = timed(plan, warmup, iters + 2, device)
                # The reference frames' one pass, a part of the generator's time (0 where nothing is cached)
                signals, motion = plan(), model.motion(z, mask)
                references = lambda: model.generator.cache_references(z, mask, signals, motion)  # noqa: E731
                cached = reuse and model.generator.caches_references(mask)
                reference_s = timed(references, warmup, iters + 2, device)[0] if cached else 0.0
            work_per_step = generator_flops(cfg, T, (latent, latent), (latent // args.lowres,) * 2, num_masked=T - k,
                                            cached_references=reuse)
            for steps in ints(args.steps):
                out, ref = sample((T, k), steps, reuse).float(), reference[((T, k), steps)]
                diff = {"max_abs_diff_vs_eager": (out - ref).abs().max().item(),
                        "rel_l2_vs_eager": ((out - ref).norm() / ref.norm()).item()}
                for vae_compile, subpixel, channels_last, vae_chunk, decoded in vae_variants:
                    memory_format = torch.channels_last if channels_last else torch.contiguous_format
                    vae.to(memory_format=memory_format)
                    frames = (mask[0] if decoded == "generated" else torch.ones_like(mask[0])).nonzero()[:, 0]
                    decode = lambda x: decode_frames(vae, x[frames], memory_format, vae_chunk)  # noqa: E731
                    encode = lambda: (encode_frames(vae, pixels[k], memory_format)  # noqa: E731
                                      if decoded == "generated" else None)
                    call = lambda: (encode(), decode(sample((T, k), steps, reuse)[0]))  # noqa: E731
                    vae.decoder, vae.encoder = vae_decoders[vae_compile, subpixel], vae_encoders[vae_compile]
                    seconds, peak = timed(call, warmup, iters, device)
                    decode_s, _ = timed(lambda: decode(z[0]), warmup, iters, device)
                    pixels_out = decode(z[0]).float()
                    vae.decoder = vae_decoders[False, False]  # the eager decoder's pixels, after the timings
                    vae_diff = (pixels_out - decode(z[0]).float()).abs().max().item()
                    vae.decoder = vae_decoders[vae_compile, subpixel]
                    encode_s = timed(encode, warmup, iters, device)[0] if decoded == "generated" else 0.0
                    generator_s = seconds - planner_s - decode_s - encode_s
                    work = work_per_step * steps
                    r = {"frames": T, "given": k, "steps": steps, "sdpa_kernel": kernel, "fp8": fp8,
                         "compile": compile_, "compile_mode": mode,
                         "reuse_references": reuse, "generator_tflop_per_step": work_per_step / 1e12,
                         "vae_compile": vae_compile, "vae_subpixel": subpixel, "vae_channels_last": channels_last,
                         "vae_chunk": vae_chunk,
                         "decoded": decoded, "frames_decoded": len(frames),
                         "seconds": seconds, "peak_mem_gib": peak, "vae_encode_s": encode_s,
                         "planner_once_s": planner_s, "vae_decode_s": decode_s, "generator_steps_s": generator_s,
                         "reference_pass_s": reference_s,
                         "generator_tflops": work / generator_s / 1e12 if generator_s > 0 else None,
                         "generator_floor_s_at_peak": work / (args.peak_tflops * 1e12),
                         **diff, "vae_max_abs_diff_vs_eager": vae_diff,
                         "extra_if_planner_every_step_s": planner_s * (steps - 1),
                         "vs_paper_time": seconds / 6.05 if (T, k) == (12, 1) else None,
                         "vs_paper_memory": peak * 2**30 / 1e9 / 42.57 if (T, k) == (12, 1) else None,
                         "params_m": params_m, "generator_heads": cfg.generator.num_heads}
                    results.append(r)
                    print(json.dumps(r), flush=True)
                    with open(args.out, "w") as f:
                        device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
                        json.dump({"device": device_name, "torch": torch.__version__, "args": vars(args),
                                   "results": results}, f, indent=1)
    print(f"\n{'frames':>6s} {'given':>5s} {'steps':>5s} {'kernel':>9s} {'fp8':>7s} {'compile':>26s} {'refs':>6s} "
          f"{'VAE':>14s} "
          f"{'total s':>8s} {'GiB':>6s} {'enc s':>6s} {'planner s':>9s} {'VAE s':>6s} {'gen s':>6s} {'refs s':>6s} "
          f"{'TFLOP/s':>7s} {'floor s':>7s} {'max|diff|':>9s} {'rel L2':>8s} {'+planner/step s':>15s}")
    for r in results:
        compiled = r["compile_mode"] if r["compile"] else "eager"
        vae_variant = (("comp" if r["vae_compile"] else "eager") + (",sub" if r.get("vae_subpixel") else "")
                       + (",cl" if r["vae_channels_last"] else "")
                       + f",{r['vae_chunk'] or 'all'},{r['frames_decoded']}")
        tflops = f"{r['generator_tflops']:7.0f}" if r["generator_tflops"] is not None else f"{'-':>7s}"
        refs = "cached" if r["reuse_references"] else "every"
        print(f"{r['frames']:6d} {r['given']:5d} {r['steps']:5d} {r['sdpa_kernel']:>9s} {r['fp8']:>7s} {compiled:>26s} "
              f"{refs:>6s} "
              f"{vae_variant:>14s} {r['seconds']:8.3f} {r['peak_mem_gib']:6.1f} {r['vae_encode_s']:6.3f} "
              f"{r['planner_once_s']:9.3f} "
              f"{r['vae_decode_s']:6.3f} "
              f"{r['generator_steps_s']:6.2f} {r['reference_pass_s']:6.3f} {tflops} "
              f"{r['generator_floor_s_at_peak']:7.2f} "
              f"{r['max_abs_diff_vs_eager']:9.2e} {r['rel_l2_vs_eager']:8.1e} "
              f"{r['extra_if_planner_every_step_s']:15.2f}")


if __name__ == "__main__":
    main()
