"""Diagnostic (issue 11, BENCHMARKS.md "Learning"): how fast the tiny generator learns to reproduce its input latents
(identity, the simplest precise map), at two learning rates, on 2 CPU threads.

    python benchmarks/prototypes/identity_speed.py
"""
import time, torch, math
from mardini.models import MarDini, model_config
from mardini.data.synthetic import SyntheticVideoConfig, SyntheticVideoDataset
from einops import rearrange
torch.manual_seed(0)
torch.set_num_threads(2)
cfg = model_config("tiny", latent_channels=12)
ds = SyntheticVideoDataset(SyntheticVideoConfig(num_videos=2048))
val = torch.stack([SyntheticVideoDataset(SyntheticVideoConfig(num_videos=16, seed=1000003))[i]["video"] for i in range(16)])
lat = lambda v: rearrange(v, "b t c (h p) (w q) -> b t (c p q) h w", p=2, q=2)
for lr in (3e-3, 1e-3):
    model = MarDini(cfg)
    g = model.generator
    opt = torch.optim.AdamW(g.parameters(), lr=lr, weight_decay=0.0)
    mask = torch.zeros(8, 9, dtype=torch.bool); mask[:, 1:-1] = True
    plan = torch.zeros(8, 9, 64, cfg.signal_dim)
    t0 = time.time()
    for step in range(1, 801):
        x = lat(torch.stack([ds[(step * 8 + i) % 2048]["video"] for i in range(8)]))
        out = g(x, mask, torch.where(mask, 500.0, 0.0), plan)
        loss = (out - x)[mask].pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        if step in (50, 100, 200, 400, 800):
            with torch.no_grad():
                xv = lat(val); m = torch.zeros(16, 9, dtype=torch.bool); m[:, 1:-1] = True
                o = g(xv, m, torch.where(m, 500.0, 0.0), torch.zeros(16, 9, 64, cfg.signal_dim))
                mse = (o - xv)[m].pow(2).mean().item()
            print(f"lr {lr} step {step}: identity PSNR {10*math.log10(4/mse):.1f} dB ({time.time()-t0:.0f} s)", flush=True)
