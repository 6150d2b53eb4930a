"""The generation model: a tiny DiT over high-resolution latents.

Every frame enters as tokens: masked frames carry the noisy latent x_t, reference frames their clean latent.
Each frame is conditioned on its own diffusion time (reference frames: t = 0) through adaLN-Zero, and reads the
planner's signals for that same frame through cross-attention, where queries and plan keys carry their spatial
positions (2D RoPE, plan tokens placed at their centres on the generator's grid): a token at (y, x) can find the
plan tokens that cover (y, x). Without it the plan is a bag of tokens and only its global content reaches a frame.
With ``model.motion.estimate`` set, every frame's tokens also receive its motion-compensated estimate (motion.py)
through a patch embedding of their own, so the generator refines motion it is given instead of discovering it.
Self-attention comes in three flavours:

- ``identity`` (MarDini's): queries of a reference frame attend only to their own frame, so clean tokens are never
  mixed with noisy ones; queries of a masked frame attend to all frames.
- ``full``: every token attends to every token.
- ``spatial``: every token attends to its own frame only (temporal coherence then comes from the plan alone).

``identity`` has three exact implementations: ``split`` runs a mask-free full attention and a mask-free per-frame
attention and picks per query (both hit the fast SDPA kernels); ``gather`` runs the generated frames' queries
against every key and the reference frames' queries against their own frame, each query once (also mask-free
calls; its shapes follow the batch's most generated and most reference frames, which the trainer reads from its
host copy of the mask); ``mask`` builds one dense boolean mask.

Generation reuses the reference frames across sampler steps (``cache_references``): under ``identity`` (and
``spatial``) attention a reference frame's tokens read only their own frame, their clean latent, t = 0 and their own
plan, none of which changes between steps, so every block's keys and values of them are computed once and each step
runs the generated frames' tokens alone, their queries reading the cached keys beside their own. Exact (the same
attention, its keys in another order), and each step skips the reference frames' share of the work. The plan does
not change between steps either: the cache also holds each block's cross-attention keys and values of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from .config import MarDiniConfig, motion_input_blocks
from .layers import (MLP, CrossAttention, RotaryEmbedding3D, SelfAttention, TimestepEmbedder, cat_tokens, grid_coords,
                     modulate, patchify, unpatchify)


def per_frame(x: torch.Tensor, frames: int) -> torch.Tensor:
    """[B, H, T*n, d] -> [B*T, H, n, d]: each frame becomes its own attention problem."""
    return rearrange(x, "b h (t n) d -> (b t) h n d", t=frames)


def identity_attention_mask(mask: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """Dense form of identity attention. mask: [B, T] (True = generated frame).
    Returns bool [B, 1, T*n, T*n]: query i may attend key j iff i is in a generated frame or both share a frame."""
    B, T = mask.shape
    frame_id = torch.arange(T, device=mask.device).repeat_interleave(tokens_per_frame)  # [N]
    same_frame = frame_id[:, None] == frame_id[None, :]                                   # [N, N]
    noisy_query = mask.repeat_interleave(tokens_per_frame, dim=1)                          # [B, N]
    return (noisy_query[:, :, None] | same_frame[None]).unsqueeze(1)


def frame_counts(mask: torch.Tensor) -> tuple[int, int]:
    """(the most generated frames, the most reference frames) of any sample of mask [B, T]: the shapes `gather`
    identity attention computes with. Reads the mask's values: call it on a host copy (the trainer does, so that
    no training step waits for the GPU)."""
    return int(mask.sum(1).max()), int((~mask).sum(1).max())


def identity_gathered(attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      counts: tuple[int, int] | None = None) -> torch.Tensor:
    """Identity attention that computes each query once: the generated frames' queries against every key, the
    reference frames' queries against their own frame only (`split` computes both for every query and keeps one).
    q, k, v: [B, H, T*n, d]; mask: [B, T]; counts: frame_counts(mask), given by the caller from a host copy of
    the mask (None: read here, which waits for the mask's device). Each sample's frames are ordered generated
    first; its first G (the most generated frames of any sample) cover all its generated frames and its last R
    all its reference frames; where a sample has fewer, the extra frames are computed both ways and each frame
    then reads its result from the right part. Fixed shapes for given counts: no host sync; compiled, the counts
    turn symbolic at their first change, so a few graphs serve every (G, R) (training: one, see
    mardini.training.parallel.compile_frame_counts_dynamic and data.training_frame_counts). Only gathers (whose
    backward adds into zeros): index_copy's backward could not be compiled for cuDNN's output layout on the GPU."""
    B, T = mask.shape
    G, R = frame_counts(mask) if counts is None else counts
    q_frames, k_frames, v_frames = (rearrange(x, "b h (t n) d -> (b t) h n d", t=T) for x in (q, k, v))
    order = torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True).indices   # [B, T] generated first
    rank = torch.argsort(order, dim=1)                  # [B, T]: where each frame stands in its sample's order
    sample = torch.arange(B, device=mask.device)[:, None]
    rows = order + sample * T                                                               # [B, T] rows of q_frames
    parts = []
    if G:
        generated = rows[:, :G].flatten()                                                    # [B*G]
        attended = attend(rearrange(q_frames[generated], "(b g) h n d -> b h (g n) d", b=B), k, v)
        parts.append(rearrange(attended, "b h (g n) d -> (b g) h n d", g=G))
    if R:
        references = rows[:, T - R:].flatten()                                               # [B*R]
        parts.append(attend(q_frames[references], k_frames[references], v_frames[references]))
    # Frame t of sample b reads row b*G + rank of the generated part, or B*G + b*R + rank - (T-R) of the own part.
    source = torch.where(mask, sample * G + rank, B * G + sample * R + rank - (T - R)).flatten()  # [B*T]
    out = torch.cat(parts)[source]                                                           # [(B T), H, n, d]
    return rearrange(out, "(b t) h n d -> b h (t n) d", b=B)


@dataclass
class ReferenceCache:
    """What the sampler's steps share (Generator.cache_references). generated: [G] indices of the generated frames
    (the same in every sample); kv: per block, the (keys, values) [B, heads, R*n, head_dim] of the R reference frames'
    tokens, or None where no generated query reads them (spatial attention); plan_kv: per block, the cross-attention's
    keys and values [B*G, heads, m, head_dim] of the generated frames' plan tokens (the plan does not change between
    steps); rope, plan_rope: the generated tokens' RoPE (cos, sin) [G*n, head_dim/2] and the cross-attention's
    (forward's plan_rope), computed once."""

    generated: torch.Tensor
    kv: list
    plan_kv: list
    rope: tuple
    plan_rope: tuple


class GeneratorBlock(nn.Module):
    """adaLN-Zero DiT block with per-frame cross-attention to the planning signals."""

    def __init__(self, cfg: MarDiniConfig):
        super().__init__()
        g = cfg.generator
        self.mode, self.identity_impl = g.attention, g.identity_impl
        self.norm1 = nn.LayerNorm(g.dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(g.dim, g.num_heads, cfg.qk_norm, cfg.attn_backend, cfg.sdpa_kernel)
        self.norm_cross = nn.LayerNorm(g.dim, eps=1e-6)
        self.cross = CrossAttention(g.dim, cfg.signal_dim, g.num_heads, cfg.qk_norm, cfg.attn_backend, cfg.sdpa_kernel)
        self.norm2 = nn.LayerNorm(g.dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(g.dim, g.mlp_ratio, cfg.mlp_type)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(g.dim, 6 * g.dim))

    def self_attention(self, x: torch.Tensor, mask: torch.Tensor, rope, keep_kv: list | None = None,
                       reference_kv: tuple | None = None, counts: tuple[int, int] | None = None) -> torch.Tensor:
        """x: [B, T*n, D]; mask: [B, T]. Generation with cached reference frames (Generator.cache_references): with
        keep_kv, x holds reference frames only, which attend to their own frame, and their keys and values are
        appended to keep_kv; with reference_kv, x holds generated frames only, whose queries also read those.
        counts: frame_counts(mask) from a host copy, for identity_impl=gather (see identity_gathered)."""
        T = mask.shape[1]
        q, k, v = self.attn.qkv_heads(x, rope)
        if keep_kv is not None:
            keep_kv.append((k, v) if self.mode == "identity" else None)
        if reference_kv is not None:  # generated frames only: every key is theirs or a reference frame's
            k, v = cat_tokens(k, reference_kv[0]), cat_tokens(v, reference_kv[1])
            out = self.attn.attend(q, k, v)
        elif self.mode == "full":
            out = self.attn.attend(q, k, v)
        elif self.mode == "spatial" or keep_kv is not None:
            out = rearrange(self.attn.attend(per_frame(q, T), per_frame(k, T), per_frame(v, T)),
                            "(b t) h n d -> b h (t n) d", t=T)
        elif self.identity_impl == "mask":
            out = self.attn.attend(q, k, v, identity_attention_mask(mask, x.shape[1] // T))
        elif self.identity_impl == "gather":
            out = identity_gathered(self.attn.attend, q, k, v, mask, counts)
        else:  # identity, split: full attention for generated frames, own-frame attention for reference frames
            full = self.attn.attend(q, k, v)
            own = rearrange(self.attn.attend(per_frame(q, T), per_frame(k, T), per_frame(v, T)),
                            "(b t) h n d -> b h (t n) d", t=T)
            is_ref = (~mask).repeat_interleave(x.shape[1] // T, dim=1)[:, None, :, None]  # [B, 1, N, 1]
            out = torch.where(is_ref, own, full)
        return self.attn.output(out)

    def forward(self, x: torch.Tensor, c: torch.Tensor, plan: torch.Tensor, mask: torch.Tensor, rope,
                plan_rope=(None, None), keep_kv: list | None = None, reference_kv: tuple | None = None,
                counts: tuple[int, int] | None = None, plan_kv: tuple | None = None) -> torch.Tensor:
        """x: [B, T, n, D]; c: [B, T, D] per-frame conditioning; plan: [B, T, m, Dc]; mask: [B, T];
        rope: (cos, sin) of every token; plan_rope: (rope of a frame's n tokens, rope of its m plan tokens);
        keep_kv / reference_kv / counts: see self_attention; plan_kv: the cross-attention's keys and values of
        these frames' plan (plan_keys_values), computed once per generation (plan is then not read)."""
        B, T, n, D = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c)[:, :, None].chunk(6, dim=-1)  # [B, T, 1, D]
        h = modulate(self.norm1(x), shift1, scale1).reshape(B, T * n, D)
        x = x + gate1 * self.self_attention(h, mask, rope, keep_kv, reference_kv, counts).reshape(B, T, n, D)
        # Per-frame cross-attention: frame i's tokens read plan[i] only.
        if plan_kv is None:
            plan_kv = self.plan_keys_values(plan, plan_rope)
        h = self.cross(rearrange(self.norm_cross(x), "b t n d -> (b t) n d"), plan_kv, plan_rope[0])
        x = x + h.reshape(B, T, n, D)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))

    def plan_keys_values(self, plan: torch.Tensor, plan_rope) -> tuple[torch.Tensor, torch.Tensor]:
        """plan [B, T, m, Dc] -> the cross-attention's keys and values [B*T, heads, m, head_dim] (forward's plan_kv)."""
        return self.cross.context_kv(rearrange(plan, "b t m d -> (b t) m d"), plan_rope[1])


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN(c)[:, :, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class Generator(nn.Module):
    def __init__(self, cfg: MarDiniConfig):
        super().__init__()
        g = cfg.generator
        self.cfg, self.patch_size = cfg, g.patch_size
        patch_dim = cfg.latent_channels * g.patch_size**2
        self.patch_embed = nn.Linear(patch_dim, g.dim)
        # The motion-compensated estimate of each frame (models/motion.py), when the config asks for one; with
        # motion.pair also the two matched frames it blends, with motion.plan_layout the plan's read-out.
        motion_dim = patch_dim * motion_input_blocks(cfg.motion)
        self.motion_embed = nn.Linear(motion_dim, g.dim) if cfg.motion.estimate != "none" else None
        self.time_embed = TimestepEmbedder(g.dim)
        self.frame_type = nn.Embedding(2, g.dim)  # 0 = reference, 1 = generated
        self.rope = RotaryEmbedding3D(g.dim // g.num_heads, cfg.rope_theta)
        self.blocks = nn.ModuleList(GeneratorBlock(cfg) for _ in range(g.depth))
        self.final = FinalLayer(g.dim, patch_dim)
        self._compiled_reference_pass = None  # compile_reference_pass() puts a compiled _reference_pass here
        self.reset_parameters()

    def reset_parameters(self):
        """Xavier for linears; adaLN modulations and the output layer start at zero so every block begins as the
        identity and the initial prediction is 0 (DiT's adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.frame_type.weight, std=0.02)
        for mlp_layer in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            nn.init.normal_(mlp_layer.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN[-1].weight)
            nn.init.zeros_(block.adaLN[-1].bias)
        for layer in (self.final.adaLN[-1], self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def plan_rope(self, H: int, W: int, num_plan_tokens: int, device):
        """Spatial RoPE for the cross-attention: a frame's tokens at their (y, x) on the generator's token grid,
        plan tokens at their centres mapped onto the same grid, so that attention scores depend on the offset
        between a token and a plan token. Time is 0 for both (the cross-attention is per frame).
        Returns ((cos, sin) [n, d/2], (cos, sin) [m, d/2])."""
        p, cfg = self.patch_size, self.cfg
        lo = cfg.lowres_factor * cfg.planner.patch_size  # high-res latent cells per plan token side
        if H % lo or W % lo or (H // lo) * (W // lo) != num_plan_tokens:
            raise ValueError(f"plan has {num_plan_tokens} tokens per frame; latents of {H}x{W} with "
                             f"lowres_factor * planner.patch_size = {lo} give {(H // lo) * (W // lo)}")
        spacing = lo / p  # generator tokens per plan token
        queries = grid_coords(1, H // p, W // p, device=device)
        keys = grid_coords(1, H // lo, W // lo, device=device, spacing=spacing, offset=(spacing - 1) / 2)
        return self.rope.angles(queries), self.rope.angles(keys)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, model_time: torch.Tensor, plan: torch.Tensor,
                return_hidden: bool = False, motion: torch.Tensor | None = None, cache: ReferenceCache | None = None,
                frame_counts: tuple[int, int] | None = None):
        """x: [B, T, C, H, W] (noisy latents on generated frames, clean latents on reference frames);
        mask: [B, T] bool; model_time: [B, T] (0 on reference frames); plan: [B, T, m, Dc];
        motion: [B, T, C, H, W] the motion-compensated estimate (required iff model.motion.estimate is set; with
        model.motion.pair [B, T, 3C, H, W], the estimate and the two matched frames; with plan_layout C more
        channels, MarDini.plan_layout);
        cache: the reference frames of this x, mask, plan and motion (cache_references): only the generated frames
        run, and the reference frames' outputs are 0;
        frame_counts: frame_counts(mask) computed on a host copy of the mask, so that identity_impl=gather does not
        read the mask on the device (a wait for the GPU); ignored by the other implementations.
        Returns the prediction [B, T, C, H, W] (and, if asked, each block's output [B, T', n, D])."""
        B, T, _, H, W = x.shape
        cached = {} if cache is None else dict(frames=cache.generated, rope=cache.rope, plan_rope=cache.plan_rope)
        tokens, c, plan, mask, rope, plan_rope = self._inputs(x, mask, model_time, plan, motion, **cached)
        hidden = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, c, plan, mask, rope, plan_rope, counts=frame_counts,
                           reference_kv=None if cache is None else cache.kv[i],
                           plan_kv=None if cache is None else cache.plan_kv[i])
            hidden.append(tokens)
        out = unpatchify(self.final(tokens, c), self.patch_size, H, W)
        if cache is not None:  # [B, G, C, H, W] -> [B, T, C, H, W], zeros on the reference frames
            out = out.new_zeros(B, T, *out.shape[2:]).index_copy(1, cache.generated, out)
        return (out, hidden) if return_hidden else out

    def caches_references(self, mask: torch.Tensor) -> bool:
        """Whether cache_references applies to this mask (reads it on the host)."""
        return self._cache_refusal(mask) is None

    def _cache_refusal(self, mask: torch.Tensor) -> str | None:
        """Why the reference frames of this mask cannot be cached, or None: the attention must keep them to
        themselves, and every sample must generate the same frames (some, not all)."""
        if self.cfg.generator.attention == "full":
            return ("generator.attention='full' lets reference frames attend to generated ones: their keys and "
                    "values change every step and cannot be cached")
        if not bool((mask == mask[:1]).all()):
            return "cache_references needs the same generated frames in every sample"
        if mask[0].all() or not mask[0].any():
            return "cache_references needs at least one reference and one generated frame"
        return None

    @torch.no_grad()
    def cache_references(self, x: torch.Tensor, mask: torch.Tensor, plan: torch.Tensor,
                         motion: torch.Tensor | None = None) -> ReferenceCache:
        """Run the reference frames of x (clean latents; generated frames' values are ignored) through every block
        once and keep their keys and values, for sampler steps that run the generated frames only (forward with
        cache=). Arguments as in forward; mask must be the same in every sample (caches_references)."""
        refusal = self._cache_refusal(mask)
        if refusal:
            raise ValueError(refusal)
        generated, references = mask[0].nonzero().squeeze(1), (~mask[0]).nonzero().squeeze(1)
        run = self._compiled_reference_pass or Generator._reference_pass
        return ReferenceCache(generated, *run(self, x, mask, plan, motion, generated, references))

    def _reference_pass(self, x, mask, plan, motion, generated: torch.Tensor, references: torch.Tensor):
        """cache_references past its host-side checks: the reference frames through every block, keeping each block's
        keys and values; the generated frames' plan keys and values of every block and their tokens' RoPE.
        Returns (kv, plan_kv, rope, plan_rope)."""
        time = torch.zeros(mask.shape, device=x.device)  # reference frames are clean
        tokens, c, ref_plan, ref_mask, rope, plan_rope = self._inputs(x, mask, time, plan, motion, frames=references)
        kv = []
        for block in self.blocks:
            tokens = block(tokens, c, ref_plan, ref_mask, rope, plan_rope, keep_kv=kv)
        plan_kv = [block.plan_keys_values(plan[:, generated], plan_rope) for block in self.blocks]
        _, H, W = x.shape[-3:]
        rope = self.rope.angles(self._frame_coords(x.shape[1], H, W, generated, x.device))
        return kv, plan_kv, rope, plan_rope

    def compile_reference_pass(self, enabled: bool = True, **compile_kwargs) -> None:
        """torch.compile the reference frames' one pass of cache_references, in place (enabled=False: eager again).
        Why: Module.compile compiles forward only, and this pass, once per generation, is hundreds of small ops
        launched one by one when eager (33 ms of a 0.70 s image-to-video call of the paper model on one H200;
        BENCHMARKS.md, "Inference, fifth step"). MarDiniPipeline.compile calls it. The function is compiled unbound
        and given self at each call, so that a copy of the module runs its own weights."""
        self._compiled_reference_pass = torch.compile(Generator._reference_pass, **compile_kwargs) if enabled else None

    def _frame_coords(self, T: int, H: int, W: int, frames: torch.Tensor | None, device) -> torch.Tensor:
        """(t, y, x) of the tokens of the listed frames [T'] of a T-frame window (None: all): [T'*n, 3]."""
        p = self.patch_size
        coords = grid_coords(T, H // p, W // p, device=device)
        return coords if frames is None else coords.unflatten(0, (T, -1))[frames].flatten(0, 1)

    def _inputs(self, x, mask, model_time, plan, motion, frames: torch.Tensor | None = None, rope=None,
                plan_rope=None):
        """Check the inputs and embed the frames listed in `frames` [T'] (None: all T), with their RoPE tables if
        given (else computed). Returns tokens [B, T', n, D], conditioning c [B, T', D], plan and mask of those
        frames, the RoPE of their tokens and the plan RoPE."""
        B, T, _, H, W = x.shape
        p = self.patch_size
        if T > self.cfg.max_frames:
            raise ValueError(f"{T} frames exceed model.max_frames={self.cfg.max_frames}")
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} not divisible by generator.patch_size={p}")
        if (motion is None) != (self.motion_embed is None):
            raise ValueError(f"model.motion.estimate={self.cfg.motion.estimate!r}: the generator needs a motion "
                             f"estimate exactly when one is configured (got {'none' if motion is None else 'one'})")
        if motion is not None and motion.shape[2] * p * p != self.motion_embed.in_features:
            m = self.cfg.motion
            raise ValueError(f"motion input has {motion.shape[2]} channels; model.motion.pair={m.pair}, "
                             f"plan_layout={m.plan_layout} need {self.motion_embed.in_features // (p * p)}")
        if rope is None:
            rope = self.rope.angles(self._frame_coords(T, H, W, frames, x.device))  # (cos, sin) [T'*n, d/2]
        if plan_rope is None:
            plan_rope = self.plan_rope(H, W, plan.shape[2], x.device)
        if frames is not None:
            x, mask, model_time, plan = x[:, frames], mask[:, frames], model_time[:, frames], plan[:, frames]
            motion = None if motion is None else motion[:, frames]
        tokens = self.patch_embed(patchify(x, p))                                  # [B, T', n, D]
        if motion is not None:
            tokens = tokens + self.motion_embed(patchify(motion.to(x.dtype), p))
        c = self.time_embed(model_time) + self.frame_type(mask.long())             # [B, T', D]
        return tokens, c, plan, mask, rope, plan_rope
