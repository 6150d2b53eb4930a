"""Real photographs in motion: camera moves and moving cut-outs over the photographs bundled with scikit-image.

No video dataset can be downloaded here, so this renders one. A virtual camera pans, zooms and rotates over a real
photograph, and cut-out layers (crops of other photographs behind a soft elliptical or rounded-rectangle mask)
cross the frame or move with parallax. Motion is smooth (constant velocity or a gentle ease-in-out), so the frames
between two given frames are largely determined by them: real textures for testing video interpolation.

Clip ``(split, index)`` is a pure function of ``(seed, split, index)``. The photographs are split once, by name,
into ``TRAIN_PHOTOS`` and ``VAL_PHOTOS``; a clip uses photographs of its own split only (background and every
layer) and records their names in ``PhotoClip.photos``.

Sampling is trilinear mip-mapping: bilinear lookups in a pyramid of 2x box-reduced copies of the photo, blended
per frame between the two levels around log2(scale), so zooming out is anti-aliased and level changes never pop.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# The split, fixed by name (documented in the README). skimage.data.cat() is chelsea() under another name, so it is
# not listed; stereo_motorcycle() gives two near-identical views of one scene and only the left one is used.
# colorwheel and logo are drawings, not photographs, and are left out.
TRAIN_PHOTOS = (
    "astronaut", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "motorcycle",  # colour
    "brick", "cell", "clock", "grass", "gravel", "moon", "page", "text", "microaneurysms",  # greyscale
)
VAL_PHOTOS = ("chelsea", "rocket", "camera", "coins")  # validation only: 2 colour, 2 greyscale
SPLITS = {"train": TRAIN_PHOTOS, "val": VAL_PHOTOS}
MOTIONS = ("pan", "zoom", "rotate", "combo", "layers")
MOTION_PROBS = (0.25, 0.15, 0.10, 0.20, 0.30)

MIN_SCALE = 0.7  # least photo pixels per output pixel: closer zooms would only show upsampling blur
MAX_SCALE_PER_SIDE = 3  # photos are stored with their short side at most 3x the output's long side


@dataclass
class PhotoClip:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    photos: tuple  # names of the photographs used: background first, then the layers
    motion: str  # pan | zoom | rotate | combo | layers-parallax | layers-cross
    easing: str  # linear | ease (gentle ease-in-out of the camera path)


# ---------------------------------------------------------------------------------------------------------------
# Photographs and anti-aliased sampling
# ---------------------------------------------------------------------------------------------------------------


def load_photo(name: str) -> np.ndarray:
    """A bundled photograph as uint8 [H, W, 3] (greyscale repeated into RGB); no download."""
    import skimage.data

    if name not in TRAIN_PHOTOS + VAL_PHOTOS:
        raise ValueError(f"unknown photo {name!r}; known: {TRAIN_PHOTOS + VAL_PHOTOS}")
    img = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def _bilinear(img: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """img float32 [C, H, W]; y, x float [...] (pixel centres at integers, clamped to the border) -> [C, ...]."""
    coords = np.stack([y, x])  # converted once, not once per channel
    out = np.empty((img.shape[0],) + y.shape, np.float32)
    for c in range(img.shape[0]):
        ndimage.map_coordinates(img[c], coords, output=out[c], order=1, mode="nearest")
    return out


class Mipmap:
    """A photo as float32 [3, H, W] plus 2x box-reduced copies, for sampling without aliasing at any zoom."""

    def __init__(self, img: np.ndarray):
        """img: [H, W, 3] (uint8 or float)."""
        self.levels = [np.ascontiguousarray(np.moveaxis(np.asarray(img, dtype=np.float32), -1, 0))]
        while min(self.levels[-1].shape[1:]) >= 16:
            x = self.levels[-1]
            x = x[:, : x.shape[1] // 2 * 2, : x.shape[2] // 2 * 2]
            self.levels.append(0.25 * (x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2]))

    @property
    def shape(self) -> tuple[int, int]:
        return self.levels[0].shape[1:]

    def detail(self, x: float, y: float, radius: float) -> float:
        """Grey-level standard deviation of the photo within radius of (x, y) (level-0 pixels), on a coarse level:
        how much there is to see there (used to avoid framing blank sky or empty microscope slide)."""
        k = int(np.clip(np.log2(max(radius / 8, 1.0)), 0, len(self.levels) - 1))
        f = 0.5**k
        r, cx, cy = max(int(radius * f), 1), int(x * f), int(y * f)
        patch = self.levels[k][:, max(cy - r, 0) : cy + r + 1, max(cx - r, 0) : cx + r + 1]
        return float(patch.mean(0).std())

    def sample(self, y: np.ndarray, x: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """y, x: float [T, H, W] level-0 coordinates; scale: [T] level-0 pixels per output pixel -> [T, H, W, 3].

        Level k is weighted by a hat function of log2(scale) - k (trilinear filtering): the weights sum to one
        and move continuously with the zoom.
        """
        lod = np.clip(np.log2(np.maximum(scale, 1.0)), 0, len(self.levels) - 1)  # [T]
        out = np.zeros((3,) + y.shape, np.float32)
        for k in range(int(lod.min()), min(int(math.ceil(lod.max())), len(self.levels) - 1) + 1):
            weight = np.maximum(0.0, 1.0 - np.abs(lod - k)).astype(np.float32)  # [T]
            frames = np.nonzero(weight)[0]
            if frames.size == 0:
                continue
            f = 0.5**k  # level-0 pixel centre p sits at (p + 0.5) * f - 0.5 in level k
            values = _bilinear(self.levels[k], (y[frames] + 0.5) * f - 0.5, (x[frames] + 0.5) * f - 0.5)
            out[:, frames] += weight[frames, None, None] * values
        return np.moveaxis(out, 0, -1)


@functools.lru_cache(maxsize=64)
def photo_mipmap(name: str, max_short_side: int) -> Mipmap:
    """The photo resized (Lanczos, anti-aliased) so its short side is at most max_short_side, as a Mipmap."""
    from PIL import Image

    img = load_photo(name)
    h, w = img.shape[:2]
    if min(h, w) > max_short_side:
        f = max_short_side / min(h, w)
        img = np.asarray(Image.fromarray(img).resize((round(w * f), round(h * f)), Image.LANCZOS))
    return Mipmap(img)


# ---------------------------------------------------------------------------------------------------------------
# Camera paths
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Camera:
    """A camera path over one photo. Output pixel (u, v) (pixels from the frame centre) of frame t shows photo point

        centre + scale * (shift[t] + zoom[t] * R(angle[t]) @ (u, v))

    so ``scale`` is photo pixels per output pixel at zoom 1 and ``shift`` is in output pixels.
    """

    shift: np.ndarray  # float [T, 2]: (x, y) in output pixels
    zoom: np.ndarray  # float [T]: relative zoom (> 1 shows more of the photo)
    angle: np.ndarray  # float [T]: radians
    centre: tuple = (0.0, 0.0)  # (x, y) in photo pixels
    scale: float = 1.0  # photo pixels per output pixel at zoom 1

    def extent(self, height: int, width: int) -> tuple[float, float, float, float]:
        """(xmin, xmax, ymin, ymax) of the frame corners over the clip, before centre and scale are applied."""
        u = np.array([-1, 1, -1, 1]) * width / 2
        v = np.array([-1, -1, 1, 1]) * height / 2
        c, s = np.cos(self.angle)[:, None], np.sin(self.angle)[:, None]
        x = self.shift[:, :1] + self.zoom[:, None] * (c * u - s * v)  # [T, 4]
        y = self.shift[:, 1:] + self.zoom[:, None] * (s * u + c * v)
        return x.min(), x.max(), y.min(), y.max()

    def place(self, mip: Mipmap, height: int, width: int, rng: np.random.Generator, tries: int = 3) -> bool:
        """Choose scale and centre so every frame stays inside the photo; False when that needs a scale below
        MIN_SCALE (visible upsampling blur: the caller shrinks the move and tries again).

        Of `tries` random centres, the one whose mid-clip view has the most detail is kept.
        """
        xmin, xmax, ymin, ymax = self.extent(height, width)
        ph, pw = mip.shape
        largest = min((pw - 1) / (xmax - xmin), (ph - 1) / (ymax - ymin))  # whole path just fits
        lo = min(max(1.0, 0.4 * largest), largest)  # mostly zoomed out a little: sharp, detailed frames
        self.scale = float(np.exp(rng.uniform(np.log(lo), np.log(largest))))
        s, mid = self.scale, len(self.zoom) // 2
        radius = s * self.zoom[mid] * min(height, width) / 2
        candidates = [(_between(rng, -s * xmin, pw - 1 - s * xmax), _between(rng, -s * ymin, ph - 1 - s * ymax))
                      for _ in range(tries)]
        self.centre = max(candidates, key=lambda c: mip.detail(c[0] + s * self.shift[mid, 0],
                                                               c[1] + s * self.shift[mid, 1], radius))
        return self.scale * self.zoom.min() >= MIN_SCALE

    def render(self, mip: Mipmap, height: int, width: int) -> np.ndarray:
        """The frames float32 [T, height, width, 3] in [0, 255]."""
        u, v = _grid(height, width)
        c, s = np.cos(self.angle)[:, None, None], np.sin(self.angle)[:, None, None]
        z = self.zoom[:, None, None]
        x = self.centre[0] + self.scale * (self.shift[:, 0, None, None] + z * (c * u - s * v))
        y = self.centre[1] + self.scale * (self.shift[:, 1, None, None] + z * (s * u + c * v))
        return mip.sample(y, x, self.scale * self.zoom)


def _between(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Uniform in [lo, hi], tolerating hi < lo by rounding error (a path that fits exactly)."""
    return lo + rng.random() * max(hi - lo, 0.0)


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Output pixel offsets from the frame centre: u [1, 1, W], v [1, H, 1]."""
    u = np.arange(width, dtype=np.float64) - (width - 1) / 2
    v = np.arange(height, dtype=np.float64) - (height - 1) / 2
    return u[None, None, :], v[None, :, None]


def _easing(num_frames: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Path position p [T], centred on 0, in frames: linear (constant velocity) or a gentle ease-in-out."""
    tau = np.linspace(0.0, 1.0, num_frames)
    if rng.random() < 0.5:
        p, name = tau, "linear"
    else:  # at most 1.9x faster in the middle than at the ends: a camera operator's move, not a jump
        a = rng.uniform(0.3, 0.6)
        p, name = (1 - a) * tau + a * (0.5 - 0.5 * np.cos(np.pi * tau)), "ease"
    return (p - 0.5) * (num_frames - 1), name


def _camera_path(kind: str, p: np.ndarray, side: float, strength: float, rng: np.random.Generator) -> Camera:
    """A camera of one motion kind; speeds are per frame, in fractions of the frame side (p from _easing)."""
    sign = lambda: rng.choice([-1.0, 1.0])  # noqa: E731
    direction = rng.uniform(0, 2 * np.pi)
    pan = {"pan": 1.0, "zoom": 0.25, "rotate": 0.15, "combo": 0.6, "static": 0.0}[kind]
    zoom = {"pan": 0.0, "zoom": 1.0, "rotate": 0.0, "combo": 0.6, "static": 0.0}[kind]
    spin = {"pan": 0.0, "zoom": 0.0, "rotate": 1.0, "combo": 0.6, "static": 0.0}[kind]
    speed = strength * pan * rng.uniform(0.004, 0.02) * side  # output pixels per frame
    shift = np.stack([np.cos(direction) * speed * p, np.sin(direction) * speed * p], axis=-1)
    log_zoom = strength * zoom * sign() * rng.uniform(0.006, 0.02) * p  # per frame: 1.3x to 2.5x over 48 frames
    angle = rng.normal(0.0, 0.03) + strength * spin * sign() * np.deg2rad(rng.uniform(0.3, 1.2)) * p
    return Camera(shift=shift, zoom=np.exp(log_zoom), angle=angle)


# ---------------------------------------------------------------------------------------------------------------
# Cut-out layers
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Layer:
    """A crop of a photo behind a soft superellipse mask, moving rigidly over the frame."""

    photo: str
    half: tuple  # (a, b): half width and half height of the mask, output pixels
    power: float  # superellipse exponent: 2 = ellipse, larger = rounder rectangle
    feather: float  # width of the soft edge, output pixels
    pos: np.ndarray  # float [T, 2]: the mask's centre, (x, y) output pixels from the frame centre
    angle: np.ndarray  # float [T]: radians (the content turns with the mask)
    src_centre: tuple  # (x, y) in the layer photo's pixels
    src_scale: float  # layer photo pixels per output pixel

    def local(self, height: int, width: int, offset=(0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
        """Output pixels in the layer's own (unrotated) frame: two float [T, H, W]."""
        u, v = _grid(height, width)
        du = u - self.pos[:, 0, None, None] - offset[0]
        dv = v - self.pos[:, 1, None, None] - offset[1]
        c, s = np.cos(self.angle)[:, None, None], np.sin(self.angle)[:, None, None]
        return c * du + s * dv, -s * du + c * dv

    def alpha(self, lu: np.ndarray, lv: np.ndarray, feather: float) -> np.ndarray:
        """Soft mask float32 [T, H, W] in [0, 1] from layer-frame coordinates (signed distance ~ 0 at the edge)."""
        a, b = self.half
        r = (np.abs(lu / a) ** self.power + np.abs(lv / b) ** self.power) ** (1.0 / self.power)
        return np.clip(0.5 + (1.0 - r) * min(a, b) / feather, 0.0, 1.0).astype(np.float32)

    def composite(self, frames: np.ndarray, mip: Mipmap) -> np.ndarray:
        """Lay this layer (with a faint drop shadow) over frames float32 [T, H, W, 3]; returns the new frames."""
        _, height, width, _ = frames.shape
        shadow_offset = (0.02 * width, 0.03 * height)
        shadow = self.alpha(*self.local(height, width, shadow_offset), feather=3 * self.feather)
        frames = frames * (1.0 - 0.35 * shadow[..., None])
        lu, lv = self.local(height, width)
        alpha = self.alpha(lu, lv, self.feather)[..., None]
        scale = np.full(len(self.pos), self.src_scale)
        content = mip.sample(self.src_centre[1] + self.src_scale * lv, self.src_centre[0] + self.src_scale * lu, scale)
        return frames + alpha * (content - frames)


def _make_layer(photo: str, mip: Mipmap, velocity: np.ndarray, tau: np.ndarray, side: float,
                rng: np.random.Generator) -> Layer:
    """A layer at pos = mid + velocity * tau: velocity [2] in output pixels per unit of tau [T] (frames, centred on
    mid-clip, or the camera's eased path), mid near the frame centre."""
    a, b = rng.uniform(0.14, 0.32, size=2) * side
    power = 2.0 if rng.random() < 0.5 else rng.uniform(4.0, 8.0)
    mid = rng.uniform(-0.25, 0.25, size=2) * side
    spin = np.deg2rad(rng.uniform(-0.6, 0.6)) if rng.random() < 0.5 else 0.0
    radius = math.hypot(a, b) + 1
    ph, pw = mip.shape
    largest = (min(ph, pw) - 2) / (2 * radius)  # the rotated crop must stay inside the photo
    src_scale = float(np.exp(rng.uniform(np.log(min(0.8, largest)), np.log(min(2.2, largest)))))
    r = radius * src_scale
    candidates = [(_between(rng, r, pw - 1 - r), _between(rng, r, ph - 1 - r)) for _ in range(3)]
    src_centre = max(candidates, key=lambda c: mip.detail(c[0], c[1], r))  # the most detailed of three crops
    return Layer(photo=photo, half=(a, b), power=power, feather=rng.uniform(0.6, 2.0) * side / 128,
                 pos=mid + velocity[None] * tau[:, None], angle=rng.normal(0, 0.1) + spin * tau,
                 src_centre=src_centre, src_scale=src_scale)


# ---------------------------------------------------------------------------------------------------------------
# Clips
# ---------------------------------------------------------------------------------------------------------------


def clip_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The only randomness of clip (split, index); the split is part of the key, so train and val differ."""
    return np.random.default_rng([seed, list(SPLITS).index(split), index])


def background_photos(split: str, height: int, width: int) -> tuple:
    """The split's photos large enough to fill a frame at MIN_SCALE with room to move (others: layers only)."""
    need = 1.5 * MIN_SCALE * max(height, width)
    side = MAX_SCALE_PER_SIDE * max(height, width)
    return tuple(n for n in SPLITS[split] if min(photo_mipmap(n, side).shape) >= need)


def render_clip(seed: int, index: int, split: str = "train", height: int = 128, width: int = 128,
                num_frames: int = 48) -> PhotoClip:
    """Clip `index` of a split: uint8 frames [num_frames, height, width, 3] plus what made them."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if num_frames < 2 or min(height, width) < 8:
        raise ValueError(f"need num_frames >= 2 and a frame of at least 8x8, got {num_frames} x {height}x{width}")
    rng = clip_rng(seed, split, index)
    photos = SPLITS[split]
    side = float(min(height, width))
    max_short = MAX_SCALE_PER_SIDE * max(height, width)
    backgrounds = background_photos(split, height, width)
    if not backgrounds:
        raise ValueError(f"no {split} photo is large enough for {height}x{width} frames")
    background = backgrounds[rng.integers(len(backgrounds))]
    motion = MOTIONS[rng.choice(len(MOTIONS), p=MOTION_PROBS)]
    p, easing = _easing(num_frames, rng)
    mip = photo_mipmap(background, max_short)

    camera_kind = motion
    if motion == "layers":  # a slower camera under the layers: a pan (parallax), a gentle zoom, or none
        camera_kind = rng.choice(["pan", "zoom", "static"], p=[0.5, 0.25, 0.25])
    strength = 0.6 if motion == "layers" else 1.0
    for _ in range(12):  # shrink the move until it fits the photo at a sharp scale
        camera = _camera_path(camera_kind, p, side, strength, rng)
        if camera.place(mip, height, width, rng):
            break
        strength *= 0.7
    else:  # a still shot always fits (backgrounds are at least 1.5 * MIN_SCALE frames large)
        camera = _camera_path("static", p, side, 0.0, rng)
        camera.place(mip, height, width, rng)
    frames = camera.render(mip, height, width)

    used = [background]
    if motion == "layers":
        others = [n for n in photos if n != background] or [background]
        count = 1 if rng.random() < 0.6 else 2
        names = [others[i] for i in rng.choice(len(others), size=min(count, len(others)), replace=False)]
        parallax = camera_kind == "pan"
        motion = "layers-parallax" if parallax else "layers-cross"
        # Parallax layers keep the camera's timing (its easing); crossing objects move at constant velocity.
        tau = p if parallax else np.arange(num_frames) - (num_frames - 1) / 2
        # The background's content moves across the screen opposite to the camera (a pan: zoom 1, shift linear in p).
        bg_screen_velocity = -(camera.shift[-1] - camera.shift[0]) / (p[-1] - p[0])
        for name in names:
            if parallax:  # nearer than the background: same direction, 1.5-3x faster, a little drift
                velocity = rng.uniform(1.5, 3.0) * bg_screen_velocity + rng.normal(0, 0.002 * side, size=2)
            else:  # crossing the frame on its own
                direction = rng.uniform(0, 2 * np.pi)
                velocity = rng.uniform(0.008, 0.03) * side * np.array([np.cos(direction), np.sin(direction)])
            layer_mip = photo_mipmap(name, max_short)
            frames = _make_layer(name, layer_mip, velocity, tau, side, rng).composite(frames, layer_mip)
            used.append(name)
    frames = np.clip(np.rint(frames), 0, 255).astype(np.uint8)
    return PhotoClip(frames=frames, photos=tuple(used), motion=motion, easing=easing)
