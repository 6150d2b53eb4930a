"""Deterministic, resumable data order and per-sample randomness.

The training stream is a sequence of global sample positions 0, 1, 2, ...; position p maps to dataset index
``perm_epoch[p % N]`` with one seeded permutation per epoch. Optimizer step s, micro-step a, rank r reads the
contiguous slice of positions ``[(s * A + a) * W * b + r * b, ... + b)`` (A micro-steps, W ranks, b samples each).
Everything random about a sample (its mask, noise level, plan dropout and noise) is drawn from a generator
seeded by (seed, step, position). So the run is a function of the seed alone: resuming at step s, or splitting
the same global batch over a different number of ranks, reproduces exactly the same samples. A run resumed with
another global batch (G' = A' W' b' instead of G) goes on from the samples it has seen, not from s * G': its
positions are shifted by ``offset = seen - s * G'`` (no sample repeated, none skipped).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Sampler

from ..masking import MaskSampler, mask_generator
from ..models.generator import frame_counts
from ..models.mardini import check_mask


@dataclass(frozen=True)
class StreamLayout:
    micro_batch: int   # b: samples per rank per micro-step
    grad_accum: int    # A
    world_size: int    # W
    rank: int
    offset: int = 0    # shifts every position: set when a run resumes with another global batch

    @property
    def samples_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def samples_before(self, step: int) -> int:
        """Stream positions used by steps 0 .. step - 1 (the first position of `step`)."""
        return self.offset + step * self.samples_per_step

    def positions(self, step: int, micro_step: int) -> list[int]:
        start = self.samples_before(step) + micro_step * self.world_size * self.micro_batch
        start += self.rank * self.micro_batch
        return list(range(start, start + self.micro_batch))


class EpochPermutation(Dataset):
    """Wraps a dataset so that item p is the sample at stream position p (a fresh permutation every epoch)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self._epoch, self._perm = None, None

    def __len__(self) -> int:  # the stream is unbounded; this is the epoch length
        return len(self.dataset)

    def index_of(self, position: int) -> int:
        n = len(self.dataset)
        epoch = position // n
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(n, generator=g), epoch
        return int(self._perm[position % n])

    def __getitem__(self, position: int) -> dict:
        item = dict(self.dataset[self.index_of(position)])
        item["position"] = position
        return item


class StreamBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches of positions from `start_step` on, forever."""

    def __init__(self, layout: StreamLayout, start_step: int = 0):
        self.layout, self.start_step = layout, start_step

    def __iter__(self):
        step = self.start_step
        while True:
            for micro in range(self.layout.grad_accum):
                yield self.layout.positions(step, micro)
            step += 1

    def __len__(self) -> int:  # DataLoader asks; the stream has no end
        return 2**62


@dataclass
class SampleRandomness:
    mask: torch.Tensor       # [B, T] bool
    t: torch.Tensor          # [B * draws]: each sample's noise draws consecutive
    drop_plan: torch.Tensor  # [B] bool
    noise: torch.Tensor      # [B * draws, T, C, H, W]
    frame_counts: tuple[int, int] | None = None  # the most generated and reference frames of a sample (host ints)


def draw_randomness(positions: list[int], step: int, seed: int, mask_sampler: MaskSampler, diffusion,
                    num_frames: int, latent_shape: tuple[int, int, int], plan_dropout: float,
                    device: torch.device, dtype=torch.float32, draws: int = 1) -> SampleRandomness:
    """Per-sample draws from generator(seed, step, position), in a fixed order: mask, t, plan drop, noise seed.
    draws: noise levels and noises per sample (train.noise_draws; stratified levels, Diffusion.sample_t); 1 draws
    what it always did."""
    masks, ts, drops, noises = [], [], [], []
    for position in positions:
        g = mask_generator(seed, step, position)
        masks.append(mask_sampler.sample(step, num_frames, g))
        ts.append(diffusion.sample_t(1, generator=g, draws=draws))
        drops.append(torch.rand(1, generator=g) < plan_dropout)
        noise_seed = int(torch.randint(0, 2**62, (1,), generator=g))
        g_dev = torch.Generator(device=device).manual_seed(noise_seed)
        noises.append(torch.randn((draws, num_frames, *latent_shape), generator=g_dev, device=device, dtype=dtype))
    mask = torch.stack(masks)
    check_mask(mask, num_frames)  # here, on the host: the model's forward does not read a device mask's values
    return SampleRandomness(
        mask=_to_device(mask, device),
        t=_to_device(torch.cat(ts), device),
        drop_plan=_to_device(torch.cat(drops), device),
        noise=torch.cat(noises),
        frame_counts=training_frame_counts(mask),  # on the host: the gather attention's shapes without a wait
    )


def training_frame_counts(mask: torch.Tensor) -> tuple[int, int]:
    """frame_counts(mask) of a training batch [B, T], each raised to at least 2 (at most T). torch.compile
    specialises sizes 0 and 1, so an image-to-video batch (one reference frame) needed a graph of its own beside the
    symbolic one of the other masks; computing a spare frame (the gather attention is exact with counts larger than
    needed) lets one graph serve every mask of the curriculum once the counts first change. On 2 H200s each
    recompilation of the paper generator block stalled a step by 15-17 s."""
    T = mask.shape[1]
    return tuple(min(max(count, 2), T) for count in frame_counts(mask))


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without waiting: a copy from pageable memory makes the host wait for the device's queue (the
    trainer prepares the next batch while the GPU runs a backward), one from pinned memory does not."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)
