"""The learning benchmark: a trained model against the trivial baselines, on clips it never trained on.

    python benchmarks/demo_quality.py outputs/tiny_synthetic/<run>/export
    python benchmarks/demo_quality.py EXPORT --data data/photo_motion/val.csv --device cuda --json out.json
    python benchmarks/demo_quality.py EXPORT --step-sweep 4 10 25 50
    python benchmarks/demo_quality.py EXPORT --guidance 1.5     # a model trained with model.plan_dropout > 0
    python benchmarks/demo_quality.py EXPORT --vae DIR         # an export copied from another machine: its VAE

Clips: by default the held-out part of the data the model was trained on (recorded in the export: synthetic clips
of the validation seed, or the held-out video files); --data synthetic | a manifest or folder of videos overrides it
(with a warning where it is the model's own training data: the figures are then not held-out).
--guidance G samples every figure below with classifier-free guidance on the plan (the one-step estimates stay
unguided). Reports (mardini/evaluation/learning.py):
  interpolation    first + last given: one sample per clip, PSNR / SSIM of the generated frames
  linear blend     the same frames as a blend of the two given ones (the baseline to beat)
  ceiling          (synthetic clips, both tasks) what the given frames leave open, drawn from the renderer's own
                   prior (interpolation: accelerations, turn rates; image-to-video: every rate; --ceiling-draws per
                   clip) and rendered: the draws' mean bounds any model's posterior mean from above, one draw is
                   what a perfect sampler's sample scores (image-to-video: also its best of as many as the model's)
  posterior mean   the one-step clean estimate from pure noise (the model's best guess), and its drop when the plan
                   is nulled or shuffled, or the given frames are replaced by noise (an unused input shows no drop)
  motion input     (models with model.motion.estimate) the motion-compensated estimate the generator is given, alone:
                   what the network adds is measured against it; with learned matching features
                   (model.motion.estimate=learned) also the same matcher without them
  plan probe       R^2 of the generated frames' low-resolution latents read linearly from their plan tokens (fitted
                   on half of the clips, scored on the other half) beside the low-resolution blend's and the motion
                   input's, and how much the plan tokens vary across a frame
  samples' error   the samples' squared error over the posterior mean's: 2 for samples drawn from the posterior
                   (their PSNR 3.01 dB below the mean's by design), 1 for samples collapsed onto the mean
  image-to-video   middle frame given: best-of-K PSNR vs repeating the frame, the posterior mean (a best guess below
                   the repeated frame means image-to-video is not learned; above it with samples below, the samples
                   pay for motion whose direction one frame leaves open), the samples' error ratio and how much
                   they differ from each other (1: as much as the posterior), and the motion energy of generated vs
                   real
  noise levels     (--noise-levels 0.04 0.3 0.7 0.999) the real clip noised to each t and denoised in one step,
                   PSNR where the scene moves / is still, beside the blend and the rescaled noisy input
  attention        (--attention) per generator block, for generated-frame queries at t = 0.5 and 0.999: the mass
                   on the given frames' keys and its share near the query's own place, each beside uniform attention
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mardini.cli import ArgumentParser, interrupts, user_errors
from mardini.evaluation.learning import (ceiling, generator_attention, held_out_clips, held_out_synthetic_config,
                                         learning_report, video_clips)
from mardini.masking import task_mask
from mardini.inference import MarDiniPipeline
from mardini.inference.cli import check_device


PROG = "demo_quality.py"


def load_clips(pipe: MarDiniPipeline, source: str | None, count: int) -> tuple[torch.Tensor, str, object]:
    """(clips [N, T, 3, H, W], a description of where they come from, their SyntheticVideoConfig or None)."""
    config, T, H, W = pipe.config, pipe.num_frames, pipe.height, pipe.width
    if source is None and "data" in config:
        data = config["data"]
        where = {"synthetic": f"synthetic clips of the validation seed {data.get('val_seed')}",
                 "video": "held-out video files of the training data"}.get(data.get("source"), "")
        if data.get("source") == "synthetic":
            return held_out_clips(data, count), where, held_out_synthetic_config(data, count)
        if data.get("source") == "video":
            return held_out_clips(data, count), where, None
    if source in (None, "synthetic"):
        from mardini.data.synthetic import SyntheticVideoConfig, SyntheticVideoDataset

        cfg = SyntheticVideoConfig(seed=1_000_003, num_videos=count, num_frames=T, height=H, width=W,
                                   max_shapes=3 if H <= 32 else 4)
        dataset = SyntheticVideoDataset(cfg)
        return torch.stack([dataset[i]["video"] for i in range(count)]), "synthetic clips of seed 1000003", cfg
    if not Path(source).exists():
        raise FileNotFoundError(f"--data {source}: no such manifest or folder")
    where = f"video files of {source}"
    trained = training_roots(config.get("data", {}))
    if Path(source).resolve() in trained:
        print(f"warning: --data {source} is the data this model was trained on ({trained[Path(source).resolve()]} in "
              f"its config.json): the figures below are not held-out", file=sys.stderr)
        where += " (the model's training data: not held out)"
    return video_clips(source, count, T, H, W, fps=pipe.fps), where, None


def training_roots(data: dict) -> dict[Path, str]:
    """{resolved path: where the export records it} of the folders or manifests a model was trained on (an export's
    `data`), so that --data naming one is not reported as held-out clips."""
    roots = {}
    if data.get("source") == "video" and data.get("video", {}).get("root"):
        roots[Path(data["video"]["root"]).resolve()] = "data.video.root"
    if data.get("source") == "cache" and data.get("cache_dir"):
        from mardini.data.latent_cache import read_cache_meta

        try:  # the videos the latents were cached from, where the cache is at hand
            root = read_cache_meta(data["cache_dir"])["dataset"].get("config", {}).get("root")
        except (OSError, ValueError, KeyError):
            root = None
        if root:
            roots[Path(root).resolve()] = "the videos of data.cache_dir"
    return roots


def print_ceiling(c: dict, label: str, open_: str, best: bool = False) -> None:
    """The synthetic clips' ceiling (learning.ceiling), or why it was not computed."""
    if "skipped" in c:
        print(f"{label} not computed: {c['skipped']}")
        return
    best_of = f", best of {c['best_of']} {c['best_psnr']:.2f}" if best else ""
    print(f"{label} PSNR {c['posterior_mean_psnr']:6.2f} dB best guess; a perfect sampler's sample "
          f"{c['sample_psnr']:.2f}{best_of}   ({open_}, {c['draws']} draws)")


def print_report(report: dict) -> None:
    i = report["interpolation"]
    guided = f", guidance {report['guidance_scale']:g}" if report.get("guidance_scale", 1.0) != 1.0 else ""
    guided += f", time shift {report['flow_shift']:g}" if report.get("flow_shift") not in (None, 1.0) else ""
    print(f"interpolation    PSNR {i['psnr']:6.2f} dB  SSIM {i['ssim']:.3f}   (one sample per clip, "
          f"{report['num_steps']} steps{guided})")
    print(f"linear blend     PSNR {i['blend_psnr']:6.2f} dB  SSIM {i['blend_ssim']:.3f}")
    if "ceiling" in i:
        print_ceiling(i["ceiling"], "ceiling         ", "what the first and last frames leave open")
    print(f"posterior mean   PSNR {i['posterior_mean_psnr']:6.2f} dB   (one-step estimate from pure noise)")
    print(f"  samples' error  x{i['sample_error_ratio']:.2f} the posterior mean's   (2: samples drawn from the "
          f"posterior, 1: the mean itself)")
    if "posterior_mean_avg_psnr" in i:
        print(f"  mean of {i['posterior_mean_seeds']:<2d}     PSNR {i['posterior_mean_avg_psnr']:6.2f} dB   (posterior "
              f"means from that many noise inputs; two of them agree to "
              f"{i['posterior_mean_seed_agreement_psnr']:.1f} dB)")
    if "motion_input_psnr" in i:
        print(f"motion input     PSNR {i['motion_input_psnr']:6.2f} dB   (the model's motion-compensated input, "
              f"before the generator; the posterior mean beats it on "
              f"{i['posterior_mean_beats_motion_input']:.0%} of clips)")
    if "fixed_matcher_psnr" in i:
        print(f"  without features PSNR {i['fixed_matcher_psnr']:6.2f} dB   (the same matcher without its learned "
              f"matching features)")
    for name in ("null_plan", "shuffled_plan", "noise_references"):
        key = f"posterior_mean_psnr_{name}"
        if key in i:
            drop = i["posterior_mean_psnr"] - i[key]
            print(f"  {name.replace('_', ' '):17s}PSNR {i[key]:6.2f} dB   (drop {drop:+.2f})")
    if "plan_probe" in report:
        q = report["plan_probe"]
        motion = f", motion input {q['motion_r2']:.2f}" if "motion_r2" in q else ""
        # Below 0 the read-out predicts held-out clips worse than their mean: its size says nothing more.
        r2 = f"{q['r2']:.2f}" if q["r2"] >= 0 else "< 0 (nothing that generalises)"
        print(f"plan probe       R^2 {r2} (low-res blend {q['blend_r2']:.2f}{motion}); plan tokens' spread "
              f"over a frame {q['spatial_share']:.3f} of their mean square")
    if "i2v" in report:
        v = report["i2v"]
        print(f"image-to-video   PSNR {v['best_psnr']:6.2f} dB   best of {v['best_of']} (mean {v['mean_psnr']:.2f})")
        print(f"  posterior mean PSNR {v['posterior_mean_psnr']:6.2f} dB   (one-step estimate from pure noise)")
        spread = f"; samples differ x{v['sample_spread']:.2f} (1: as the posterior)" if "sample_spread" in v else ""
        print(f"  samples' error  x{v['sample_error_ratio']:.2f} the posterior mean's{spread}")
        print(f"repeat frame     PSNR {v['repeat_psnr']:6.2f} dB")
        if "ceiling" in v:
            print_ceiling(v["ceiling"], "  ceiling       ", "what the middle frame leaves open", best=True)
        print(f"motion energy    {v['motion_energy']:.4f} generated vs {v['real_motion_energy']:.4f} real "
              f"(ratio {v['motion_ratio']:.2f})")
    for steps, value in report.get("step_sweep", {}).items():
        print(f"  {steps:3d} steps      PSNR {value:6.2f} dB")
    levels = report.get("noise_levels")
    if levels:
        b = levels["blend"]
        print(f"clean estimate by noise level (interpolation; {levels['moving_fraction']:.0%} of pixels move) "
              f"PSNR all / moving / still")
        print(f"  blend            {b['all']:6.2f} {b['moving']:6.2f} {b['still']:6.2f}")
        for t, r in levels["levels"].items():
            m, x = r["model"], r["rescaled_input"]
            print(f"  t={float(t):<5.3f} model    {m['all']:6.2f} {m['moving']:6.2f} {m['still']:6.2f}   "
                  f"(noisy input rescaled {x['all']:6.2f})")
    for t, rows in report.get("attention", {}).items():
        print(f"attention at t={t} (interpolation; generated-frame queries; uniform attention in brackets)")
        for r in rows:
            print(f"  block {r['block']}: on given frames {r['ref_mass']:.2f} ({r['uniform_ref_mass']:.2f}), "
                  f"near own place {r['local_share_of_ref_mass']:.2f} ({r['uniform_local_share']:.2f}), "
                  f"own frame {r['own_frame_mass']:.2f} ({r['uniform_own_frame_mass']:.2f})")


def main(argv=None) -> dict:
    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="export or checkpoint folder")
    p.add_argument("--data", default=None, help="synthetic | a manifest (.csv/.jsonl) or folder of videos "
                                                "(default: the held-out part of the model's training data)")
    p.add_argument("--clips", type=int, default=32, help="held-out clips to evaluate")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    p.add_argument("--flow-shift", type=float, default=None, help="rectified flow: the sampler's time shift "
                   "(> 1: more steps at high noise, < 1 at low noise; default: the model's diffusion.flow_shift, "
                   "1, or 0.5 for the small_* GPU presets)")
    p.add_argument("--i2v-seeds", type=int, default=4, help="samples per clip for image-to-video (0: skip it)")
    p.add_argument("--no-ablations", action="store_true", help="skip the conditioning ablations")
    p.add_argument("--pm-seeds", type=int, default=1,
                   help="also average the posterior mean over this many noise inputs (default 1; more show the "
                        "noise a best guess carries through)")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance on the plan for every sample (1: none; needs a model trained with "
                        "model.plan_dropout > 0)")
    p.add_argument("--step-sweep", type=int, nargs="*", default=[], help="also sample with these step counts")
    p.add_argument("--noise-levels", type=float, nargs="*", default=[],
                   help="also score one-step clean estimates of the real clips noised to these levels t in (0, 1)")
    p.add_argument("--attention", action="store_true", help="also report where the generator's queries look")
    p.add_argument("--ceiling-draws", type=int, default=64, help="synthetic clips: posterior draws per clip for "
                   "each task's ceiling (0: skip it; 64 put its best guess within ~0.1 dB of the exact mean)")
    p.add_argument("--weights", default="ema", choices=("ema", "raw"))
    p.add_argument("--vae", default=None, help="folder of the model's VAE where it is not at the path its export "
                   "recorded (an export copied from another machine)")
    p.add_argument("--fp8", action="store_true", help="the generator's MLP and self-attention GEMMs from FP8 inputs "
                                                      "(MarDiniPipeline.use_fp8_gemms): its quality against the "
                                                      "float32 model's")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (stderr) while sampling")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error, not one line")
    args = p.parse_args(argv)
    if args.clips < 1:
        p.error("--clips must be >= 1")
    if args.pm_seeds < 1:
        p.error("--pm-seeds must be >= 1")
    if args.ceiling_draws < 0:
        p.error("--ceiling-draws must be >= 0 (0: skip the ceiling)")
    if args.i2v_seeds < 0:
        p.error("--i2v-seeds must be >= 0 (0: skip image-to-video)")
    if args.steps is not None and args.steps < 1 or any(n < 1 for n in args.step_sweep):
        p.error("--steps and --step-sweep take sampler step counts >= 1")
    if args.json and Path(args.json).is_dir():
        p.error(f"--json {args.json} is a folder: give a file name for the report")
    if args.flow_shift is not None and not args.flow_shift > 0:
        p.error("--flow-shift must be > 0 (1: no shift)")
    if args.guidance < 0:
        p.error("--guidance must be >= 0 (1: no guidance, 0: the null plan alone)")
    if any(not 0 < t < 1 for t in args.noise_levels):
        p.error("--noise-levels must lie in (0, 1)")
    # A missing export, an unreadable clip or a bad option value is one line on stderr and exit status 2
    with interrupts(PROG, args.debug), user_errors(PROG, args.debug):
        check_device(args.device)
        return run(args)


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    pipe = MarDiniPipeline.from_pretrained(args.model, weights=args.weights, device=args.device, vae=args.vae,
                                           flow_shift=args.flow_shift)
    if args.fp8:
        pipe.use_fp8_gemms()
    videos, where, synthetic_cfg = load_clips(pipe, args.data, args.clips)
    print(f"{args.model}: {len(videos)} clips of {videos.shape[1]} frames {videos.shape[3]}x{videos.shape[4]} "
          f"({where})", file=sys.stderr)
    report = learning_report(pipe, videos, args.steps, args.seed, args.i2v_seeds, not args.no_ablations,
                             args.step_sweep, args.noise_levels, args.pm_seeds, progress=not args.no_progress,
                             guidance_scale=args.guidance)
    if synthetic_cfg is not None and args.ceiling_draws:
        for task in ("interpolation", "i2v"):
            if task in report:
                best_of = min(report[task].get("best_of", 4), args.ceiling_draws)
                report[task]["ceiling"] = ceiling(synthetic_cfg, videos, task, args.ceiling_draws, args.seed, best_of)
    if args.attention:
        mask = task_mask("interpolation", videos.shape[1])
        report["attention"] = {t: generator_attention(pipe, videos, mask, t, args.seed) for t in (0.5, 0.999)}
    flow = pipe.diffusion.cfg.formulation == "rectified_flow"
    report.update(model=str(args.model), weights=args.weights, fp8=args.fp8, clips_from=where,
                  flow_shift=pipe.diffusion.cfg.flow_shift if flow else None,
                  device=str(args.device), seconds=round(time.perf_counter() - start, 1), step=pipe.config.get("step"))
    print_report(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
