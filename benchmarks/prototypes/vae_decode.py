"""Prototype: the VAE decode of inference's 12 frames at 512 px, by frames per decoder call and cuDNN's autotuner.

The inference benchmark decodes 4 frames per call (`benchmarks/inference.py`, 0.10 s compiled on one H200, 30 TFLOP
of convolutions: ~300 TFLOP/s). Larger calls give the convolutions more work per launch; `cudnn.benchmark` lets
cuDNN time its algorithms per shape. Each variant: eager and (optionally) compiled, the outputs compared with the
eager 4-frame decode (bf16 tolerance). --subpixel 0,1 also times the decoder with its upsamplers computed on the
low-resolution grid (subpixel_upsample.py: 44 % of those convolutions' multiply-adds, the same function to
rounding). Writes one JSON row per variant as it goes (a lost machine keeps the rows).

    python benchmarks/prototypes/vae_decode.py --chunks 4,12 --benchmark 0,1 --compile 0,1 --json vae.json
    python benchmarks/prototypes/vae_decode.py --frames 11 --chunks 11 --benchmark 0 --subpixel 0,1 --json vae.json
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import timed  # noqa: E402
from inference import build_vae, decode_frames  # noqa: E402

from subpixel_upsample import use_subpixel_upsampling  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--latent", type=int, default=64, help="latent side (512 px / 8)")
    p.add_argument("--chunks", default="4,12", help="frames per decoder call, comma-separated")
    p.add_argument("--benchmark", default="0,1", help="torch.backends.cudnn.benchmark values, comma-separated")
    p.add_argument("--compile", default="0,1", help="0/1 list: torch.compile the decoder (mode default)")
    p.add_argument("--subpixel", default="0", help="0/1 list: the upsamplers computed on the low-resolution grid")
    p.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke run, fp32)")
    p.add_argument("--json", default="", help="write the rows here")
    args = p.parse_args()
    flags = lambda csv: [bool(int(c)) for c in csv.split(",")]  # noqa: E731
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    vae = build_vae(args.device, dtype)
    z = torch.randn(args.frames, 16, args.latent, args.latent, device=args.device, dtype=dtype)
    plain_decoder = vae.decoder
    with torch.inference_mode():
        reference = decode_frames(vae, z).float()
    rows = []
    for subpixel, compiled in itertools.product(flags(args.subpixel), flags(args.compile)):
        eager_decoder = plain_decoder
        if subpixel:
            eager_decoder = copy.deepcopy(plain_decoder)
            use_subpixel_upsampling(eager_decoder)
        vae.decoder = eager_decoder
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            decode_frames(vae, z[:1])
        tflop = counter.get_total_flops() * args.frames / 1e12
        vae.decoder = torch.compile(eager_decoder, dynamic=False) if compiled else eager_decoder
        for bench in flags(args.benchmark):
            torch.backends.cudnn.benchmark = bench
            for chunk in (int(c) for c in args.chunks.split(",")):
                seconds, peak = timed(lambda: decode_frames(vae, z, chunk=chunk), 2, 5, args.device)
                with torch.inference_mode():
                    diff = (decode_frames(vae, z, chunk=chunk).float() - reference).abs().max().item()
                row = {"subpixel": subpixel, "tflop": tflop, "tflops": tflop / seconds, "compiled": compiled,
                       "cudnn_benchmark": bench, "chunk": chunk, "seconds": seconds,
                       "peak_gib": peak, "max_abs_diff_vs_eager4": diff,
                       "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                       "torch": torch.__version__}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
