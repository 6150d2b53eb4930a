"""The optimizers: Muon's orthogonalised step, which parameters take it, and AdamW for the rest."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers_training import tiny_config
from mardini.diffusion import Diffusion, DiffusionConfig
from mardini.models import MarDini, model_config
from mardini.training.optim import MuonAdamW, build_optimizer, orthogonalize


def random_matrix(rows: int, cols: int, seed: int, spread: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix with singular values spread over [1, spread] and its orthogonal factor U V^T."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, min(rows, cols), generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, min(rows, cols), generator=g))
    s = torch.logspace(0, torch.log10(torch.tensor(spread)).item(), min(rows, cols))
    return u @ torch.diag(s) @ v.T, u @ v.T


@pytest.mark.parametrize("rows, cols", [(48, 96), (96, 48), (64, 64)])
def test_orthogonalize_flattens_singular_values_and_keeps_directions(rows, cols):
    m, polar = random_matrix(rows, cols, seed=rows + cols)
    out = orthogonalize(m)
    s = torch.linalg.svdvals(out)
    assert s.min() > 0.5 and s.max() < 1.3, f"singular values {s.min():.3f}..{s.max():.3f}, want about 1"
    assert torch.linalg.svdvals(m).max() / torch.linalg.svdvals(m).min() > 9  # the input was far from orthogonal
    rel = (out - polar).norm() / polar.norm()
    assert rel < 0.3, f"not close to U V^T (relative error {rel:.3f})"
    assert torch.allclose(orthogonalize(7.0 * m), out, atol=1e-5), "the step must not depend on the gradient's scale"


def tiny_model() -> MarDini:
    torch.manual_seed(0)
    return MarDini(model_config("tiny", latent_channels=12))


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = tiny_model()
    model.planner.requires_grad_(False)  # frozen parameters are in no group
    opt = build_optimizer(model, tiny_config("unused", optimizer="muon").train)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]]
    other = [names[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(muon + other) == sorted(trainable), "every trainable parameter in exactly one group"
    assert "generator.blocks.0.attn.qkv.weight" in muon and "generator.blocks.1.mlp.fc_out.weight" in muon
    assert "generator.blocks.0.adaLN.1.weight" in muon and "generator.blocks.0.cross.kv.weight" in muon
    for n in ("generator.patch_embed.weight", "generator.final.linear.weight", "generator.frame_type.weight",
              "generator.blocks.0.attn.qkv.bias", "generator.time_embed.mlp.0.weight"):
        assert n in other, f"{n} must stay on AdamW"
    assert not any(n.startswith("planner.") for n in muon + other)
    decay = {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay["generator.final.linear.weight"] > 0 and decay["generator.final.linear.bias"] == 0


def test_adamw_groups_of_muon_adamw_step_exactly_as_torch_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))  # no ".blocks.": everything stays on AdamW
    twin = copy.deepcopy(model)
    cfg = tiny_config("unused", optimizer="muon", lr=1e-2, weight_decay=0.1).train
    ours = build_optimizer(model, cfg)
    assert not any(g["muon"] for g in ours.param_groups)
    groups = [{"params": [p for p in twin.parameters() if p.ndim == 2], "weight_decay": 0.1},
              {"params": [p for p in twin.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    reference = torch.optim.AdamW(groups, lr=1e-2, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    x = torch.randn(16, 6)
    for _ in range(5):
        for m, opt in ((model, ours), (twin, reference)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_muon_step_has_adamw_sized_rms_and_decoupled_decay():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(64, 256) * 0.02)
    before = w.detach().clone()
    opt = MuonAdamW([{"params": [w], "muon": True, "weight_decay": 0.0}], lr=1e-2)
    w.grad = torch.randn(64, 256) * 1e-4  # tiny gradient: the step size must not follow its scale
    opt.step()
    rms = ((w.detach() - before).square().mean().sqrt() / 1e-2).item()
    assert 0.14 < rms < 0.26, f"update RMS / lr = {rms:.3f}, want about 0.2 (AdamW-sized)"
    # decoupled decay: with a zero gradient and no momentum, a step only shrinks the weights by lr * wd
    v = nn.Parameter(torch.ones(8, 8))
    decayed = MuonAdamW([{"params": [v], "muon": True, "weight_decay": 0.5}], lr=0.1, momentum=0.0)
    v.grad = torch.zeros(8, 8)
    decayed.step()
    assert torch.allclose(v.detach(), torch.full((8, 8), 0.95), atol=1e-6)


def test_muon_adamw_resumes_from_its_state_dict():
    model = tiny_model()
    twin = copy.deepcopy(model)
    cfg = tiny_config("unused", optimizer="muon", lr=3e-3).train
    opt = build_optimizer(model, cfg)
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(2, 5, 12, 16, 16, generator=g), torch.randn(2, 5, 12, 16, 16, generator=g)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, 1:-1] = True
    t = torch.full((2,), 0.5)
    diffusion = Diffusion(DiffusionConfig())

    def step(m, o):
        o.zero_grad()
        m(x, None, mask, diffusion, noise=noise, t=t)["loss"].backward()
        o.step()

    for _ in range(3):
        step(model, opt)
    twin.load_state_dict(model.state_dict())
    restored = build_optimizer(twin, cfg)
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(2):
        step(model, opt)
        step(twin, restored)
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), f"{n} differs after resuming the optimizer"
