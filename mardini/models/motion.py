"""A motion-compensated estimate of every generated frame, from the given frames around it.

Why: a small generator trained for minutes learns *what* the masked frames contain from the plan, but does not
learn to carry the given frames' pixels along their motion; its samples then lose to a blend of the two given frames
(BENCHMARKS.md, "Learning"). Handing it the classic frame-rate up-conversion estimate, soft bilateral matching
between the nearest given frames, gives it the motion as an input to refine.

For a frame at fraction a of the way from the nearest given frame before it (``first``) to the nearest after it
(``last``), each candidate displacement d (whole latent cells, |dx|, |dy| <= radius) pairs ``first`` at p - a d with
``last`` at p + (1 - a) d (bilinear). The cost of d at p is the squared difference of the pair averaged over channels
and a window x window neighbourhood, in units of the two frames' variance (so one temperature serves any latent
scale), plus smoothness |d|^2 (small motion is likelier); the estimate is the softmax(-cost / temperature)-weighted
average of the pairs' blends. The search runs coarse to fine over a pyramid of box-averaged frames, so large motion
costs few candidates. A frame with a given frame on one side only (image-to-video, expansion) gets the nearest given
frame; a given frame is its own estimate.

With learned matching features (``model.motion.estimate=learned``, ``MatchFeatures``), the cost also compares
features of the two frames from a small convolutional network with a wide receptive field, trained by the model's
motion loss: raw latents pair a uniform object with itself along its path *and* the still background with itself,
and the small-motion prior picks the background; features that see the object nearby tell the two apart. The
estimate is still a blend of the frames' own values.

With ``pair`` the two matched frames are returned beside the estimate: ``first`` carried forward and ``last``
carried back along the matched motion (the estimate is their (1 - a, a) blend). Where they disagree, one side is
occluded or mismatched; a generator that sees both can pick the right one where the blend shows a ghost of each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import box_downsample

MOTION_ESTIMATES = ("none", "bilateral", "learned")


def nearest_given(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mask [B, T] (True = generated) -> (before, after) [B, T] long: the nearest given frame at or before each frame
    and at or after it; where one side has none, the other side's (every clip has a given frame)."""
    B, T = mask.shape
    index = torch.arange(T, device=mask.device).expand(B, T)
    before = torch.where(mask, -1, index).cummax(1).values
    after = torch.where(mask, T, index).flip(1).cummin(1).values.flip(1)
    before = torch.where(before < 0, after, before)
    after = torch.where(after >= T, before, after)
    return before, after


def _match_level(first, last, a, base, scale, radius, window, smoothness, temperature, cell, max_elements, values,
                 features=None):
    """One pyramid level: candidates base + delta (|delta| <= radius cells) at every position, in this level's cells.
    first, last: [N, C, H, W]; a: [N, 1, 1, 1]; base: [N, 2, H, W] displacement (x, y) first -> last, in cells;
    scale: [N, 1, 1, 1] the costs' unit; cell: fine cells per cell here (the smoothness term counts fine cells).
    Returns the softmax-expected displacement [N, 2, H, W] and, if values, the softmax-weighted matched frames
    [N, 2C, H, W] (first carried forward, last carried back); displacements go in chunks of at most max_elements
    values with a running (online) softmax. features: (of first, of last) [N, D, H, W] or None; their mean squared
    difference is added to the cost (model.motion.estimate=learned); the matched values stay the frames' own."""
    N, C, H, W = first.shape
    steps = torch.arange(-radius, radius + 1, device=first.device, dtype=torch.float32)
    dy, dx = (d.flatten()[None, :, None, None] for d in torch.meshgrid(steps, steps, indexing="ij"))  # [1, S, 1, 1]
    ys, xs = torch.meshgrid(torch.arange(H, device=first.device) + 0.5, torch.arange(W, device=first.device) + 0.5,
                            indexing="ij")                                                 # cell centres [H, W]
    channels = C + (0 if features is None else features[0].shape[1])
    chunk = max(1, max_elements // max(1, N * channels * H * W))
    best = torch.full((N, 1, H, W), -float("inf"), device=first.device)                    # running max of logits
    total = torch.zeros(N, 1, H, W, device=first.device)                                   # running sum of weights
    flow = torch.zeros(N, 2, H, W, device=first.device)                                    # running weighted d
    matched = torch.zeros(N, 2 * C, H, W, device=first.device) if values else None      # running weighted pairs

    def grid(sx, sy):  # sampling positions p + (sx, sy): sx, sy [N, s, H, W] -> [N, s H, W, 2] for grid_sample
        return torch.stack([(xs + sx) / W * 2 - 1, (ys + sy) / H * 2 - 1], -1).flatten(1, 2)

    def at(frames, where):  # frames [N, c, H, W] sampled at grid(...) -> [N, c, s, H, W]
        out = F.grid_sample(frames, where, mode="bilinear", padding_mode="border", align_corners=False)
        return out.unflatten(2, (-1, H))

    def windowed_mse(x, y):  # [N, c, s, H, W] pairs -> [N, s, H, W], mean over channels and the window
        difference = x - y  # squared in place where no gradient needs it: a quarter less time on the CPU
        squared = difference * difference if difference.requires_grad else difference.mul_(difference)
        return F.avg_pool2d(squared.mean(1), window, 1, window // 2, count_include_pad=False)

    for start in range(0, dx.shape[1], chunk):
        cx = base[:, :1] + dx[:, start:start + chunk]                                      # [N, s, H, W]
        cy = base[:, 1:] + dy[:, start:start + chunk]
        from_first, from_last = grid(-a * cx, -a * cy), grid((1 - a) * cx, (1 - a) * cy)  # first at p - a d, ...
        before, after = at(first, from_first), at(last, from_last)                          # [N, C, s, H, W]
        cost = windowed_mse(before, after) / scale
        if features is not None:  # sampled apart from the frames, whose values need no gradient: a learned step's
            # matcher a third faster on the CPU than with the two concatenated (same values)
            cost = cost + windowed_mse(at(features[0], from_first), at(features[1], from_last))
        logits = -(cost + smoothness * cell * cell * (cx * cx + cy * cy)) / temperature  # [N, s, H, W]
        new_best = torch.maximum(best, logits.amax(1, keepdim=True))
        rescale, weights = torch.exp(best - new_best), torch.exp(logits - new_best)        # [N, 1|s, H, W]
        total = total * rescale + weights.sum(1, keepdim=True)
        flow = flow * rescale + torch.cat([(weights * cx).sum(1, keepdim=True), (weights * cy).sum(1, keepdim=True)], 1)
        if values:  # each side weighted apart: no [N, 2C, s, H, W] copy of the pairs
            carried = [(x * weights[:, None]).sum(2) for x in (before, after)]              # [N, C, H, W] each
            matched = matched * rescale + torch.cat(carried, 1)
        best = new_best
    return flow / total, (matched / total if values else None)


def bilateral_estimate(first: torch.Tensor, last: torch.Tensor, fraction: torch.Tensor, radius: int = 2,
                       levels: int = 3, window: int = 5, smoothness: float = 3e-3, temperature: float = 0.06,
                       max_elements: int = 2**26, pair: bool = False,
                       features: tuple[torch.Tensor, torch.Tensor] | None = None,
                       coarse_radius: int = 0) -> torch.Tensor:
    """first, last: [N, C, H, W]; fraction: [N] in (0, 1). Returns the estimate [N, C, H, W] (fp32), or with pair
    [N, 3C, H, W]: the estimate, first carried forward, last carried back. features: (of first, of last)
    [N, D, H, W], compared in the cost beside the frames (model.motion.estimate=learned).

    Coarse to fine: the frames are box-averaged 2^l times (l = levels-1 .. 0, while both sides divide and keep >= 4
    cells); each level searches +-radius cells around the displacement found one level coarser (doubled, bilinearly
    upsampled), so displacements up to radius * (2^levels - 1) fine cells are found with (2 radius + 1)^2 candidates
    per level; the finest level also carries the frames along the matched displacements. coarse_radius (0: radius)
    searches the levels above the finest wider: together they hold under a third of its positions (1/4 + 1/16 + ...),
    so the reach grows to coarse_radius * (2^levels - 2) + radius cells for a fraction of what a wider finest level
    costs (a soft match falls short of the edge of its search, so more room at every coarse level helps)."""
    first, last = first.float(), last.float()
    a = fraction.float().to(first.device)[:, None, None, None]                                # [N, 1, 1, 1]
    N, _, H, W = first.shape
    # Costs in units of the pair's variance: one temperature serves any latent scale (identity or VAE latents).
    scale = 0.5 * (first.var((1, 2, 3), keepdim=True) + last.var((1, 2, 3), keepdim=True)) + 1e-6  # [N, 1, 1, 1]
    depth = 0  # the coarsest level: both sides divisible by its factor and at least 4 cells
    while depth + 1 < levels and all(n % 2 ** (depth + 1) == 0 and n // 2 ** (depth + 1) >= 4 for n in (H, W)):
        depth += 1
    flow = None
    for level in range(depth, -1, -1):
        f = 2**level
        lo_first, lo_last = box_downsample(first, f), box_downsample(last, f)  # the project's one box filter
        lo_features = None if features is None else tuple(box_downsample(x.float(), f) for x in features)
        h, w = lo_first.shape[-2:]
        flow = torch.zeros(N, 2, h, w, device=first.device) if flow is None else \
            2 * F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
        level_radius = coarse_radius if level > 0 and coarse_radius else radius
        flow, matched = _match_level(lo_first, lo_last, a, flow, scale, level_radius, window, smoothness, temperature,
                                     f, max_elements, values=level == 0, features=lo_features)
    forward, backward = matched.chunk(2, dim=1)                                               # [N, C, H, W] each
    estimate = (1 - a) * forward + a * backward
    return torch.cat([estimate, forward, backward], 1) if pair else estimate


def motion_estimate(z: torch.Tensor, mask: torch.Tensor, radius: int = 2, levels: int = 3, window: int = 5,
                    smoothness: float = 3e-3, temperature: float = 0.06, pair: bool = False,
                    features: torch.Tensor | None = None, compact: bool | None = None,
                    coarse_radius: int = 0) -> torch.Tensor:
    """z: [B, T, C, H, W] latents (values of generated frames are ignored); mask: [B, T] (True = generated).
    Returns [B, T, C, H, W] in z's dtype: generated frames between two given frames by bilateral matching, other
    generated frames a copy of the nearest given frame, given frames themselves (exactly). With pair [B, T, 3C, H, W]:
    the estimate, then the two matched frames (copies of the estimate where there is no pair). features: [B, T, D, H, W]
    matching features of the frames (only the given frames' are read), compared in the cost beside them. compact:
    match only the frames between two given frames (the same values; None: on the CPU when not compiling, with
    features only if some frame is matched). coarse_radius: the search of the levels above the finest
    (bilateral_estimate)."""
    B, T = mask.shape

    def widen(x):  # a frame as its own estimate and both matched sides: three copies with pair
        return x.repeat(1, 1, 3, 1, 1) if pair else x

    before, after = nearest_given(mask)
    rows = torch.arange(B, device=z.device)[:, None]
    first, last = z[rows, before], z[rows, after]                # nearest given frame on each side [B, T, C, H, W]
    between = mask & (before < after)                            # generated with a given frame on both sides
    span = (after - before).clamp_min(1)
    fraction = torch.where(between, (torch.arange(T, device=z.device) - before) / span, 0.5).flatten()  # [B T]
    # On a GPU every frame goes through the matcher, not only those between two given frames: fixed shapes, so the
    # queue never waits for the host to count them (the others' results are discarded below). On the CPU counting
    # costs nothing and the matcher is a quarter of a default-job training step (a third with learned features):
    # only those frames go. With learned features, only when some frame is matched: else they would get no gradient,
    # which DDP refuses.
    if compact is None:
        compact = z.device.type == "cpu" and not torch.compiler.is_compiling() and \
            (features is None or bool(between.any()))

    def matched(picked):  # the matcher on the picked [B T] rows (slice or indices) -> [picked, C', H, W], z's dtype
        pair_features = None if features is None else \
            (features[rows, before].flatten(0, 1)[picked], features[rows, after].flatten(0, 1)[picked])
        return bilateral_estimate(first.flatten(0, 1)[picked], last.flatten(0, 1)[picked], fraction[picked],
                                  radius, levels, window, smoothness, temperature, pair=pair,
                                  features=pair_features, coarse_radius=coarse_radius).to(z.dtype)

    nearest = widen(first)  # what a generated frame without a given frame on both sides gets
    if compact:  # the matched frames written among the others (none: every generated frame keeps its nearest)
        pick = between.flatten().nonzero().squeeze(1)
        out = nearest.flatten(0, 1).index_copy(0, pick, matched(pick)).unflatten(0, (B, T)) if len(pick) else nearest
    else:
        out = torch.where(between[:, :, None, None, None], matched(slice(None)).unflatten(0, (B, T)), nearest)
    return torch.where(mask[:, :, None, None, None], out, widen(z))


def between_given(mask: torch.Tensor) -> torch.Tensor:
    """mask [B, T] (True = generated) -> [B, T] True for generated frames with a given frame on each side: the
    frames the matcher estimates (the others copy the nearest given frame)."""
    before, after = nearest_given(mask)
    return mask & (before < after)


class MatchFeatures(nn.Module):
    """Features of a latent frame for the matching cost (model.motion.estimate=learned).

    Why: where a uniform object crosses a smooth background, the raw latents pair like with like both along the
    object's path and on the still background, and the small-motion prior picks the background. Dilated convolutions
    see ~31 cells around each cell, so "background with the object to its left" and "... to its right" differ.
    Trained by the model's motion loss (reconstructing the frames between given ones through the soft matcher).
    [N, C, H, W] -> [N, dim, H, W]."""

    def __init__(self, channels: int, width: int = 32, dim: int = 16):
        super().__init__()
        layers, c = [], channels
        for dilation in (1, 2, 4, 8):
            layers += [nn.Conv2d(c, width, 3, padding=dilation, dilation=dilation), nn.GELU()]
            c = width
        self.net = nn.Sequential(*layers, nn.Conv2d(width, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
