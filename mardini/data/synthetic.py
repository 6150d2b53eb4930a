"""Procedural synthetic videos: the default training data, needing no download.

Each clip shows a few shapes (discs, rings, ellipses, rectangles, triangles, regular polygons) that glide
across a slowly turning two-colour background gradient, drawn in a fixed depth order. Motion is smooth and
mostly linear: each shape has a constant velocity plus a small acceleration, turns at a constant rate, grows or
shrinks steadily and drifts in hue. So the frames between two given frames are largely determined by them (a
model that tracks the shapes beats a blend of the ends by a wide margin, see tests/test_synthetic_data.py),
while one frame alone leaves the motion open (image-to-video has many answers). Paths that curve within a clip
(sums of sinusoids, the first design) made interpolation ill-posed: even an oracle that knew every shape's end
states could not beat the blend on 17-frame clips.

Everything a clip needs is drawn from a numpy generator seeded by ``(seed, index)`` only, so a clip is the
same bit-for-bit in any process and in any order. Parameters are drawn in the same order whatever the clip
size: a clip with more frames continues the shorter one (frame t is the same), and positions, speeds and sizes
are fractions of the frame, so other resolutions show the same scene. Rendering is vectorised numpy over
``[T, H, W]``, with anti-aliased edges from a signed distance (in pixels) passed through a one-pixel smoothstep.
A clip's parameters are drawn first (draw_scene -> Scene: its Background and Shapes) and rendered after, so that
what given frames leave open can be redrawn from the same prior: the first and last frame leave accelerations and
symmetric shapes' turns open (interpolation_posterior), one frame every rate (image_to_video_posterior). Rendered and
averaged, such draws are the learning benchmark's ceiling on these clips (mardini.evaluation.learning.ceiling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPE_KINDS = ("disc", "ring", "ellipse", "rect", "triangle", "polygon")


@dataclass
class SyntheticVideoConfig:
    """Size and content of the synthetic dataset (also an OmegaConf structured config)."""

    num_videos: int = 2048  # dataset length (index -> video is deterministic)
    num_frames: int = 9  # frames per clip, T
    height: int = 32  # frame height in pixels, H
    width: int = 32  # frame width in pixels, W
    min_shapes: int = 1  # fewest shapes in a clip
    max_shapes: int = 3  # most shapes in a clip
    seed: int = 0  # with the index, the only source of randomness
    hue_drift: float = 0.03  # most hue change of a shape per frame, in turns (0: shapes keep their colour)
    # > 1: each clip shows every k-th frame of its scene, k drawn uniformly from 1..max_frame_stride per clip (the
    # same scene as at k = 1, faster): windows whose frames lie several frames apart, as a long video's plan makes
    max_frame_stride: int = 1


def _read_config(cfg: Any) -> SyntheticVideoConfig:
    """Copy the fields from a dataclass or a DictConfig (attribute access), then check their values."""
    values = {}
    for f in fields(SyntheticVideoConfig):
        value = getattr(cfg, f.name, f.default)
        is_float = f.type in (float, "float")  # a string under `from __future__ import annotations`
        kinds = (int, float, np.integer, np.floating) if is_float else (int, np.integer)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ValueError(f"data.synthetic.{f.name} must be {'a number' if is_float else 'an int'}, "
                             f"got {value!r}")
        values[f.name] = float(value) if is_float else int(value)
    out = SyntheticVideoConfig(**values)
    if not 0.0 <= out.hue_drift <= 0.5:
        raise ValueError(f"data.synthetic.hue_drift must be in [0, 0.5] turns per frame, got {out.hue_drift}")
    lower_bounds = {"num_videos": 1, "num_frames": 1, "height": 1, "width": 1, "min_shapes": 0, "seed": 0,
                    "max_frame_stride": 1}
    for name, low in lower_bounds.items():
        if getattr(out, name) < low:
            raise ValueError(f"data.synthetic.{name} must be >= {low}, got {getattr(out, name)}")
    if out.max_shapes < out.min_shapes:
        raise ValueError(
            f"data.synthetic.max_shapes ({out.max_shapes}) must be >= data.synthetic.min_shapes ({out.min_shapes})"
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# Small vectorised helpers. Arrays of per-frame parameters have shape [T, 1, 1] so that they broadcast
# against pixel grids [T, H, W].
# ----------------------------------------------------------------------------------------------------------


def _hsv_to_rgb(h: np.ndarray, s: float, v: float) -> np.ndarray:
    """Hue h [T] (in turns, any real number), scalar saturation and value -> rgb [T, 3] in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0]) + 6.0 * (h[:, None] % 1.0)) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _coverage(sdf: np.ndarray) -> np.ndarray:
    """Signed distance in pixels (negative inside) -> coverage in [0, 1], a smoothstep one pixel wide."""
    x = np.clip(0.5 - sdf, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


SPEED = (0.008, 0.032)  # |velocity| of a shape's centre along each axis, fraction of the frame per frame
ACCELERATION = 0.001  # |acceleration| at most, fraction of the frame per frame^2
TURN = 0.12  # |turn rate| at most, radians per frame
GROWTH = 0.015  # |growth of a shape's size| at most, fraction per frame
BACKGROUND_HUE_RATE = 0.02  # |hue drift of the background's colours| at most, turns per frame
BACKGROUND_TURN = 0.1  # |turn rate of the background's gradient| at most, radians per frame


def _draw_path(rng: np.random.Generator, extent: float) -> tuple[float, float, float]:
    """A smooth 1-D path along an axis of `extent` pixels -> (start, velocity, acceleration) in pixels and frames.

    Speeds of 0.8-3.2 % of the frame per frame (signed), accelerations up to 0.1 %: a shape crosses a fair part
    of the frame in 17 frames, and its path bends by at most about 2 % of the frame over 8 frames.
    """
    start = rng.uniform(0.15, 0.85) * extent
    velocity = rng.uniform(*SPEED) * rng.choice([-1.0, 1.0]) * extent
    return start, velocity, rng.uniform(-ACCELERATION, ACCELERATION) * extent


def _per_frame(x: np.ndarray) -> np.ndarray:
    """[T] float64 -> [T, 1, 1] float32, to broadcast against pixel grids and keep the maths in float32."""
    return x.astype(np.float32)[:, None, None]


def _sdf(kind: str, lx: np.ndarray, ly: np.ndarray, r: np.ndarray, aspect: float, sides: int) -> np.ndarray:
    """Signed distance (pixels) of a shape centred at the origin, in its own rotated frame.

    lx, ly: [T, H, W] local coordinates; r: [T, 1, 1] size (circumradius / half-width); aspect in (0, 1]
    squashes rect and ellipse, and sets a ring's thickness; sides is the polygon's side count.
    """
    if kind == "disc":
        return np.hypot(lx, ly) - r
    if kind == "ring":
        return np.abs(np.hypot(lx, ly) - r) - 0.35 * aspect * r
    if kind == "rect":
        qx = np.abs(lx) - r
        qy = np.abs(ly) - aspect * r
        outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
        return outside + np.minimum(np.maximum(qx, qy), 0.0)
    if kind == "ellipse":
        # f = |p / axes| - 1 divided by |grad f| is a first-order distance; the ratio is bounded by the axes,
        # and clipping it also handles the centre, where both norms vanish.
        a, b = r, aspect * r
        k0 = np.hypot(lx / a, ly / b)
        k1 = np.hypot(lx / (a * a), ly / (b * b))
        ratio = np.clip(k0 / np.maximum(k1, 1e-6), b, a)
        return (k0 - 1.0) * ratio
    if kind in ("triangle", "polygon"):
        # Intersection of half-planes: exact on the outline, which is all anti-aliasing needs.
        n = 3 if kind == "triangle" else sides
        d = None
        for k in range(n):
            angle = 2.0 * math.pi * k / n + math.pi / 2
            edge = lx * math.cos(angle) + ly * math.sin(angle)
            d = edge if d is None else np.maximum(d, edge)
        return d - r * math.cos(math.pi / n)
    raise ValueError(f"unknown shape kind {kind!r}; known: {SHAPE_KINDS}")


# ----------------------------------------------------------------------------------------------------------
# The renderer.
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Background:
    """Two slowly drifting colours blended along a slowly turning direction: the drawn parameters."""

    hue1: float  # hue of the first colour at t = 0 (turns); the second's is hue1 + offset
    offset: float
    saturation: tuple[float, float]
    value: tuple[float, float]
    hue_rate: float  # both hues' drift, turns per frame
    angle: float  # direction of the gradient at t = 0, then a constant turn rate per frame
    turn: float


def _draw_background(rng: np.random.Generator) -> Background:
    """Draw the background's parameters (in the order the renderer always drew them)."""
    hue1, offset = rng.uniform(0.0, 1.0), rng.uniform(0.15, 0.5)
    saturation, value = tuple(rng.uniform(0.2, 0.6, 2)), tuple(rng.uniform(0.15, 0.55, 2))
    hue_rate = rng.uniform(-BACKGROUND_HUE_RATE, BACKGROUND_HUE_RATE)
    angle, turn = rng.uniform(0.0, 2.0 * math.pi), rng.uniform(-BACKGROUND_TURN, BACKGROUND_TURN)
    return Background(hue1, offset, saturation, value, hue_rate, angle, turn)


def _render_background(b: Background, t: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """-> [T, 3, H, W] in [0, 1]."""
    height, width = ys.shape[1], xs.shape[2]
    angle = _per_frame(b.angle + b.turn * t)
    c1 = _hsv_to_rgb(b.hue1 + b.hue_rate * t, b.saturation[0], b.value[0]).astype(np.float32)  # [T, 3]
    c2 = _hsv_to_rgb(b.hue1 + b.offset + b.hue_rate * t, b.saturation[1], b.value[1]).astype(np.float32)
    proj = (xs - width / 2) * np.cos(angle) + (ys - height / 2) * np.sin(angle)  # [T, H, W]
    u = np.clip(0.5 + proj / math.hypot(height, width), 0.0, 1.0)
    return c1[:, :, None, None] + (c2 - c1)[:, :, None, None] * u[:, None]


@dataclass
class Shape:
    """One shape's drawn parameters (pixels, frames, radians, hue turns); its state at time t follows from them."""

    kind: str
    radius: float  # circumradius / half-width at t = 0
    aspect: float  # squashes rect and ellipse, sets a ring's thickness
    sides: int  # a polygon's side count
    x: float  # centre at t = 0, then velocity and acceleration per frame
    vx: float
    ax: float
    y: float
    vy: float
    ay: float
    theta: float  # angle at t = 0, then a constant turn rate per frame
    turn: float
    growth: float  # size factor 1 + growth * t (at least 0.3)
    hue: float  # hue at t = 0, then a constant drift per frame
    hue_rate: float
    saturation: float
    value: float


def _draw_shape(rng: np.random.Generator, height: int, width: int, hue_drift: float) -> Shape:
    """Draw one shape's parameters. Every parameter is drawn for every kind, so the stream of random numbers does
    not depend on the kind."""
    kind = SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))]
    radius, aspect, sides = rng.uniform(0.10, 0.22) * min(height, width), rng.uniform(0.4, 0.9), int(rng.integers(4, 7))
    (x, vx, ax), (y, vy, ay) = _draw_path(rng, width), _draw_path(rng, height)
    theta, turn = rng.uniform(0.0, 2.0 * math.pi), rng.uniform(-TURN, TURN)
    growth = rng.uniform(-GROWTH, GROWTH)  # steady growth or shrinking
    hue, hue_rate = rng.uniform(0.0, 1.0), rng.uniform(-hue_drift, hue_drift)
    return Shape(kind, radius, aspect, sides, x, vx, ax, y, vy, ay, theta, turn, growth, hue, hue_rate,
                 rng.uniform(0.5, 1.0), rng.uniform(0.65, 1.0))


def _render_shape(s: Shape, t: np.ndarray, xs: np.ndarray, ys: np.ndarray, img: np.ndarray):
    """Draw shape s over img [T, 3, H, W] in place (later shapes occlude earlier ones)."""
    cx = s.x + s.vx * t + 0.5 * s.ax * t * t
    cy = s.y + s.vy * t + 0.5 * s.ay * t * t
    theta = s.theta + s.turn * t
    pulse = np.maximum(1.0 + s.growth * t, 0.3)
    color = _hsv_to_rgb(s.hue + s.hue_rate * t, s.saturation, s.value).astype(np.float32)  # [T, 3]

    # Local coordinates: translate to the centre, then rotate by -theta. dx [T, 1, W], dy [T, H, 1].
    dx, dy = xs - _per_frame(cx), ys - _per_frame(cy)
    cos, sin = np.cos(_per_frame(theta)), np.sin(_per_frame(theta))
    lx = cos * dx + sin * dy  # [T, H, W]
    ly = cos * dy - sin * dx
    alpha = _coverage(_sdf(s.kind, lx, ly, _per_frame(s.radius * pulse), s.aspect, s.sides))  # [T, H, W]
    img += (color[:, :, None, None] - img) * alpha[:, None]


@dataclass
class Scene:
    """A clip's content: its times (in frames of the scene), its size, its background and its shapes in depth order."""

    t: np.ndarray  # [T] float64
    height: int
    width: int
    background: Background
    shapes: list[Shape]
    hue_drift: float  # the prior's bound on the shapes' hue drift (data.synthetic.hue_drift)

    def render(self, shapes: list[Shape] | None = None, background: Background | None = None) -> np.ndarray:
        """-> float32 [T, 3, H, W] in [-1, 1]; shapes, background: others in place of the scene's."""
        xs, ys = _pixel_centres(self.height, self.width)
        img = _render_background(self.background if background is None else background, self.t, xs, ys)
        for shape in self.shapes if shapes is None else shapes:
            _render_shape(shape, self.t, xs, ys, img)
        return np.clip(img * 2.0 - 1.0, -1.0, 1.0, dtype=np.float32)


def _pixel_centres(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """xs [1, 1, W], ys [1, H, 1]."""
    xs = (np.arange(width, dtype=np.float32) + 0.5)[None, None, :]
    return xs, (np.arange(height, dtype=np.float32) + 0.5)[None, :, None]


def draw_scene(cfg: SyntheticVideoConfig, index: int) -> Scene:
    """Clip `index`'s scene, drawn from a generator seeded by (cfg.seed, index) only."""
    rng = np.random.default_rng([cfg.seed, index])
    stride = 1
    if cfg.max_frame_stride > 1:  # its own stream: the scene is the one stride 1 renders
        stride = int(np.random.default_rng([cfg.seed, index, 1]).integers(1, cfg.max_frame_stride + 1))
    t = np.arange(cfg.num_frames, dtype=np.float64) * stride  # time in frames of the scene
    background = _draw_background(rng)
    num_shapes = int(rng.integers(cfg.min_shapes, cfg.max_shapes + 1))
    shapes = [_draw_shape(rng, cfg.height, cfg.width, cfg.hue_drift) for _ in range(num_shapes)]
    return Scene(t, cfg.height, cfg.width, background, shapes, cfg.hue_drift)


# ----------------------------------------------------------------------------------------------------------
# What the given frames leave open: the ceiling of interpolation and image-to-video on these clips.
# ----------------------------------------------------------------------------------------------------------

# Angles a shape cannot be told apart at (radians; 0: any angle). A polygon's is 2 pi / sides.
_SYMMETRY = {"disc": 0.0, "ring": 0.0, "ellipse": math.pi, "rect": math.pi, "triangle": 2.0 * math.pi / 3.0}


def turn_rates_matching_ends(shape: Shape, span: float) -> np.ndarray:
    """Turn rates within the prior whose end angle after `span` frames looks like the shape's true one: the true
    rate plus whole symmetry periods over the span (a rectangle turned by pi looks the same); a disc's or ring's
    turn does not show, so its own rate stands for all."""
    period = 2.0 * math.pi / shape.sides if shape.kind == "polygon" else _SYMMETRY[shape.kind]
    if period == 0.0:
        return np.array([shape.turn])
    step = period / span
    k = np.arange(-math.ceil(2 * TURN / step), math.ceil(2 * TURN / step) + 1)
    rates = shape.turn + k * step
    return rates[np.abs(rates) <= TURN]


def why_ceiling_inexact(cfg: SyntheticVideoConfig) -> str:
    """"" where the posteriors below are exact for cfg's clips, else the reason they may not be: over a long enough
    span a slow drift can wrap around (a hue by a whole turn, an angle by 2 pi), so that several rates end alike, or a
    shape shrinks to its floor; neither posterior draws those."""
    span = (cfg.num_frames - 1) * cfg.max_frame_stride
    limits = {"the background's hue drift": 2 * BACKGROUND_HUE_RATE * span < 1.0,
              "the background's turn": 2 * BACKGROUND_TURN * span < 2 * math.pi,
              "the shapes' hue drift (data.synthetic.hue_drift)": 2 * cfg.hue_drift * span < 1.0,
              "the shapes' shrinking": 1.0 - GROWTH * span > 0.3}
    wrapped = [name for name, ok in limits.items() if not ok]
    return (f"over {span} frames of the scene, {', '.join(wrapped)} may end alike from several rates (or shrink to "
            f"the floor)") if wrapped else ""


def interpolation_posterior(scene: Scene, rng: np.random.Generator) -> list[Shape]:
    """One draw of the scene's shapes given its first and last frames only (exact under the renderer's prior).

    What the two frames fix: every shape's kind, size, colours and its state at both ends; the background (its hue
    and angle change too little over a clip to wrap around). What they leave open: along each axis only the
    combination velocity + acceleration * span / 2 is seen, so the acceleration is drawn uniformly from its range,
    with the velocity that keeps both ends, kept where that velocity lies within the prior's speeds (rejection); and
    the turn rate among those that end at an angle the shape cannot be told from (turn_rates_matching_ends).
    Exact where why_ceiling_inexact(cfg) is "" (17-frame clips of the presets: yes).
    Rendering many draws and averaging gives the posterior mean: the best guess in the mean-squared sense of a model
    that also knew every shape's exact parameters at the ends, so its PSNR bounds any model's best guess from above.
    """
    span = float(scene.t[-1] - scene.t[0])
    drawn = []
    for shape in scene.shapes:
        changes = {}
        for axis in ("x", "y"):
            extent = _axis_extent(scene, axis)
            seen = getattr(shape, "v" + axis) + 0.5 * span * getattr(shape, "a" + axis)
            for _ in range(10_000):  # the true pair is valid, so the accepted set is never empty
                a = rng.uniform(-ACCELERATION, ACCELERATION) * extent
                v = seen - 0.5 * span * a
                if SPEED[0] * extent <= abs(v) <= SPEED[1] * extent:
                    changes["a" + axis], changes["v" + axis] = a, v
                    break
        changes["turn"] = rng.choice(turn_rates_matching_ends(shape, span))
        drawn.append(replace(shape, **changes))
    return drawn


def image_to_video_posterior(scene: Scene, given: int, rng: np.random.Generator) -> tuple[Background, list[Shape]]:
    """One draw of the scene given its frame `given` only (exact under the renderer's prior, where
    why_ceiling_inexact is ""): every rate (velocity, acceleration, turn, growth, hue drift; the background's drift
    and turn) is drawn from its prior, and each start value is set so that frame `given` stays as it is; where that
    start leaves the prior's range (a shape's position or size at t = 0) the rates are drawn again (rejection)."""
    tg = float(scene.t[given])
    b = scene.background
    hue_rate = rng.uniform(-BACKGROUND_HUE_RATE, BACKGROUND_HUE_RATE)
    turn = rng.uniform(-BACKGROUND_TURN, BACKGROUND_TURN)
    background = replace(b, hue1=b.hue1 + (b.hue_rate - hue_rate) * tg, hue_rate=hue_rate,
                         angle=b.angle + (b.turn - turn) * tg, turn=turn)
    drawn = []
    for shape in scene.shapes:
        changes = {}
        for axis in ("x", "y"):
            extent = _axis_extent(scene, axis)
            at = getattr(shape, axis) + getattr(shape, "v" + axis) * tg + 0.5 * getattr(shape, "a" + axis) * tg * tg
            for _ in range(10_000):  # the true rates are valid, so the accepted set is never empty
                v = rng.uniform(*SPEED) * rng.choice([-1.0, 1.0]) * extent
                a = rng.uniform(-ACCELERATION, ACCELERATION) * extent
                start = at - v * tg - 0.5 * a * tg * tg
                if 0.15 * extent <= start <= 0.85 * extent:
                    changes.update({axis: start, "v" + axis: v, "a" + axis: a})
                    break
        size = shape.radius * (1.0 + shape.growth * tg)  # seen at the given frame
        for _ in range(10_000):
            growth = rng.uniform(-GROWTH, GROWTH)
            radius = size / (1.0 + growth * tg)
            if 0.10 * min(scene.height, scene.width) <= radius <= 0.22 * min(scene.height, scene.width):
                changes.update(radius=radius, growth=growth)
                break
        turn = rng.uniform(-TURN, TURN)
        hue_rate = rng.uniform(-scene.hue_drift, scene.hue_drift)
        changes.update(theta=shape.theta + (shape.turn - turn) * tg, turn=turn,
                       hue=shape.hue + (shape.hue_rate - hue_rate) * tg, hue_rate=hue_rate)
        drawn.append(replace(shape, **changes))
    return background, drawn


def _axis_extent(scene: Scene, axis: str) -> float:
    """The frame's size along x (width) or y (height), pixels: the unit of the prior's speeds."""
    return float(scene.width if axis == "x" else scene.height)


def render_synthetic_video(cfg: SyntheticVideoConfig, index: int) -> np.ndarray:
    """Render clip `index` of the dataset described by cfg -> float32 [T, 3, H, W] in [-1, 1]."""
    return draw_scene(cfg, index).render()


class SyntheticVideoDataset(Dataset):
    """Map-style dataset of procedural clips: item i is always the same video for a given seed."""

    def __init__(self, cfg: Any):
        # A plain dataclass copy: cheap to pickle into DataLoader workers, independent of OmegaConf.
        self.cfg = _read_config(cfg)

    def __len__(self) -> int:
        return self.cfg.num_videos

    def __getitem__(self, index: int) -> dict:
        """-> {"video": float32 [T, 3, H, W] in [-1, 1], "index": int}."""
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} synthetic videos")
        video = torch.from_numpy(render_synthetic_video(self.cfg, index))
        return {"video": video, "index": index}
