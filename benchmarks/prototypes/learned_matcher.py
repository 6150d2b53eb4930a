r"""The learned-feature matcher alone (model.motion.estimate=learned without the rest of the model), as first tried.

Why: on the 17-frame 64x64 synthetic clips the fixed matcher (mardini/models/motion.py) is the ceiling the `small`
models reach, and it fails on the shapes: a uniformly coloured shape crossing a smooth background pairs like with like
both along its path and on the still background, and the small-motion prior picks the background (BENCHMARKS.md,
"Learning"). Features with a wide receptive field (four dilated 3x3 convolutions, ~31 latent cells) can tell "flat
background with a shape to the left" from "... to the right", so the two hypotheses get different costs.

The matcher is the project's coarse-to-fine soft bilateral matcher (mardini/models/motion.py), with each candidate's
cost = the raw latents' squared difference (in units of the frames' variance) + the learned features' (MatchFeatures)
squared difference, and the estimate still the softmax-weighted blend of the raw latents. The features are trained, with
AdamW, to reconstruct the in-between frames of training clips (first + last given) through the soft matcher; held-out
clips (the validation seed) score the estimate's PSNR as benchmarks/motion_baseline.py does. A sharp softmax (the
fixed matcher's temperature 0.06) passes almost no gradient to the features (norms ~1e-8): train at a softer one.

    python benchmarks/prototypes/learned_matcher.py --steps 200 --temperature 0.3 --save features.pt
    python benchmarks/prototypes/learned_matcher.py --device cuda --batch 16 --steps 600 --width 64 --feature-dim 32 \
        --eval-temperatures 0.06,0.1,0.15,0.2,0.3 --json matcher.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from einops import rearrange

from mardini.data.synthetic import SyntheticVideoConfig, SyntheticVideoDataset
from mardini.models.motion import MatchFeatures, bilateral_estimate


def inner_frames(net, clips, args):
    """clips [B, T, 3, H, W] in [-1, 1] -> (estimates, truths) of the inner frames, [B, T-2, C, H/2, W/2] each
    (2x2-patched pixels: the identity autoencoder's latents)."""
    z = rearrange(clips, "b t c (h p) (w q) -> b t (c p q) h w", p=2, q=2)
    B, T = z.shape[:2]
    feats = rearrange(net(rearrange(z[:, [0, -1]], "b t c h w -> (b t) c h w")), "(b t) c h w -> b t c h w", t=2)
    repeat = lambda x: x[:, None].expand(-1, T - 2, -1, -1, -1).flatten(0, 1)  # noqa: E731  one per inner frame
    fraction = (torch.arange(1, T - 1).float() / (T - 1)).repeat(B)
    est = bilateral_estimate(repeat(z[:, 0]), repeat(z[:, -1]), fraction, args.radius, args.levels, args.window,
                             args.smoothness, args.temperature, features=(repeat(feats[:, 0]), repeat(feats[:, 1])),
                             coarse_radius=args.coarse_radius)
    return est.unflatten(0, (B, T - 2)), z[:, 1:-1]


def psnr_per_clip(est, real):
    return (10 * torch.log10(4.0 / (est - real).pow(2).flatten(1).mean(1))).mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=4, help="training clips per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--temperature", type=float, default=0.3)
    p.add_argument("--radius", type=int, default=2)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--coarse-radius", type=int, default=0, help="radius of the levels above the finest (0: --radius)")
    p.add_argument("--window", type=int, default=7)
    p.add_argument("--smoothness", type=float, default=3e-3)
    p.add_argument("--clips", type=int, default=32, help="held-out clips")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--width", type=int, default=32, help="feature network width (model.motion.feature_width)")
    p.add_argument("--feature-dim", type=int, default=16, help="feature channels (model.motion.feature_dim)")
    p.add_argument("--eval-temperatures", default="",
                   help="comma list: after training, score the held-out estimate at each of these softmax temperatures "
                        "(the features trained at --temperature; a sharper softmax at use gives a crisper blend)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default="", help="append one JSON line of results here")
    p.add_argument("--load", default="")
    p.add_argument("--save", default="")
    args = p.parse_args()
    torch.manual_seed(0)
    shape = dict(num_frames=17, height=64, width=64, max_shapes=4, hue_drift=0.0)
    train = SyntheticVideoDataset(SyntheticVideoConfig(num_videos=65536, seed=0, **shape))
    val = SyntheticVideoDataset(SyntheticVideoConfig(num_videos=args.clips, seed=1_000_003, **shape))
    device = torch.device(args.device)
    val_clips = torch.stack([val[i]["video"] for i in range(len(val))]).to(device)
    net = MatchFeatures(channels=12, width=args.width, dim=args.feature_dim).to(device)
    if args.load:
        net.load_state_dict(torch.load(args.load, map_location=device))
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)

    @torch.no_grad()
    def evaluate(temperature: float | None = None) -> float:
        settings = args if temperature is None else argparse.Namespace(**{**vars(args), "temperature": temperature})
        pairs = [inner_frames(net, val_clips[i:i + 8], settings) for i in range(0, len(val_clips), 8)]
        return psnr_per_clip(torch.cat([e for e, _ in pairs]), torch.cat([r for _, r in pairs]))

    print(f"step 0: held-out estimate {evaluate():.2f} dB", flush=True)
    start = time.time()
    for step in range(1, args.steps + 1):
        clips = torch.stack([train[(step - 1) * args.batch + i]["video"] for i in range(args.batch)]).to(device)
        est, real = inner_frames(net, clips, args)
        loss = (est - real).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            print(f"step {step}: loss {loss.item():.4f}, held-out estimate {evaluate():.2f} dB, "
                  f"{time.time() - start:.0f} s", flush=True)
    result = {k: v for k, v in vars(args).items() if k not in ("load", "save", "json")}
    result["held_out_db"] = evaluate()
    result["seconds"] = time.time() - start
    for t in filter(None, args.eval_temperatures.split(",")):
        result[f"held_out_db_at_{t}"] = evaluate(float(t))
        print(f"  at temperature {t}: held-out estimate {result[f'held_out_db_at_{t}']:.2f} dB", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    if args.save:
        torch.save(net.state_dict(), args.save)


if __name__ == "__main__":
    main()
