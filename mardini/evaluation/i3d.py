"""I3D (Inflated Inception-v1, Kinetics-400 RGB): the video classifier whose outputs define FVD.

Written for this project from the architecture of Carreira & Zisserman (2017), laid out so that its
``state_dict`` keys are exactly those of the public PyTorch release used by VideoGPT-style FVD code
(``i3d_pretrained_400.pt``: the TF-hub ``deepmind/i3d-kinetics-400/1`` module, converted to PyTorch).
A second backend wraps the TorchScript port used by StyleGAN-V (``i3d_torchscript.pt``).

Contents, in reading order:
  constants      input size, frame-count floor, feature sizes
  layers         tf_same_pad (TensorFlow "SAME" padding), Unit3D, MaxPool3dSame, InceptionBlock
  network        InceptionI3d (+ ARCHITECTURE, the layer table) and expected_state_dict_keys
  settings       FVDSettings, FVD_SETTINGS, DEFAULT_FVD_SETTINGS: how each published FVD lineage runs its file
  loading        load_i3d_state_dict (every key checked, errors name the key), TorchScriptI3D, load_i3d
  preprocessing  preprocess_for_i3d
  extractor      I3DFeatureExtractor: videos [B, T, 3, H, W] in [-1, 1] -> features [B, 400] (float64)

The public state_dict layout (``i3d_pretrained_400.pt``), established by reading VideoGPT's ``pytorch_i3d.py`` /
``fvd.py`` and TATS' ``convert_tf_pretrained.py``:
  * one entry per Unit3D (conv -> batch norm -> ReLU): ``<unit>.conv3d.weight`` [out, in, kt, kh, kw] (no conv
    bias) and ``<unit>.bn.{weight, bias, running_mean, running_var}``. The TF batch norm has no scale, so the
    converter wrote ``bn.weight`` as ones. The file has no ``num_batches_tracked`` entries (they never existed in
    TF); they are accepted when present and ignored.
  * stem units ``Conv3d_1a_7x7``, ``Conv3d_2b_1x1``, ``Conv3d_2c_3x3``; inception blocks ``Mixed_3b ... Mixed_5c``
    each with units ``b0`` (1x1), ``b1a`` (1x1) -> ``b1b`` (3x3x3), ``b2a`` (1x1) -> ``b2b`` (3x3x3), and ``b3b``
    (1x1 after the parameter-free 3x3x3 max pool ``b3a``); max pools ``MaxPool3d_2a_3x3``, ``MaxPool3d_3a_3x3``,
    ``MaxPool3d_4a_3x3``, ``MaxPool3d_5a_2x2`` hold no parameters.
  * the classifier ``logits.conv3d.weight`` [400, 1024, 1, 1, 1] and ``logits.conv3d.bias`` [400] (no batch norm).
  57 Unit3D x 5 tensors + 2 = 287 tensors; 12,697,264 parameters.

Padding: every convolution and max pool uses TensorFlow "SAME" padding computed from the input size, with the
odd pixel at the end (``pad_total = max(k - s, 0)`` if ``size % s == 0`` else ``max(k - size % s, 0)``;
front ``pad_total // 2``). Max pools pad with zeros: their inputs are ReLU outputs (>= 0), so this equals TF's
padding with -inf. Logits: average pool over a [2, 7, 7] window (stride 1, no padding), dropout (identity in
eval), 1x1x1 conv with bias, then the mean over the remaining time steps -> [B, 400]. This is the tensor
``RGB/inception_i3d/Mean:0`` that the reference TF FVD (google-research ``frechet_video_distance.py``) reads,
and what StyleGAN-V's TorchScript returns with ``return_features=True`` ("raw features before the softmax").

Settings follow the lineage of each weights file (FVD_SETTINGS), because FVD is only comparable with numbers
computed the same way. ``i3d_pretrained_400.pt`` is the file of the PyTorch lineage (VideoGPT, TATS and the tools
built on them), whose pytorch_i3d.py runs it with BatchNorm eps 1e-5 (piergiaj's pytorch-i3d and the TF/Sonnet
original use 1e-3) and whose FVD uses the unbiased covariance: that is the default for this file ("videogpt"). The
TF value 1e-3 moves FVD by about 20 % on the same file and inputs; it stays available as "tf". StyleGAN-V's
TorchScript detector defaults to StyleGAN-V's own call (uint8 input, rescale + resize inside the network, biased
covariance: "stylegan_v").
"""

from __future__ import annotations

import logging
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------- constants
INPUT_SIZE = 224  # spatial size the network was trained at; 224 -> 7x7 before the [2, 7, 7] average pool
MIN_FRAMES = 9  # fewest frames: time shrinks to ceil(T / 8) before the 2-frame average pool, so T >= 9
NUM_CLASSES = 400  # Kinetics-400
LOGITS_DIM = 400  # the FVD feature (time-averaged pre-softmax logits)
POOL_DIM = 1024  # the average-pooled Mixed_5c features (used by some non-reference FVD variants)
TF_BN_EPS = 1e-3  # Sonnet's BatchNorm default, used by the TF-hub network the weights come from
VIDEOGPT_BN_EPS = 1e-5  # the value in VideoGPT's / TATS's pytorch_i3d.py
STATE_DICT_FILE = "i3d_pretrained_400.pt"  # file name of the public state_dict (VideoGPT-style FVD)
TORCHSCRIPT_FILE = "i3d_torchscript.pt"  # file name of StyleGAN-V's TorchScript detector


# ---------------------------------------------------------------------------------------------------- layers
def tf_same_pad(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """Zero-pad x [B, C, T, H, W] as TensorFlow's "SAME" would for this kernel and stride (extra pixel at the end)."""
    pads = []
    for size, k, s in zip(x.shape[2:], kernel, stride):
        total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
        pads.append((total // 2, total - total // 2))
    # F.pad takes the last dimension first: (w_front, w_back, h_front, h_back, t_front, t_back)
    flat = [p for pair in reversed(pads) for p in pair]
    return F.pad(x, flat) if any(flat) else x


class Unit3D(nn.Module):
    """Conv3d (no bias) -> BatchNorm3d -> ReLU, or for the classifier a plain Conv3d with bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel=(1, 1, 1), stride=(1, 1, 1),
                 batch_norm: bool = True, activation: bool = True, bias: bool = False, bn_eps: float = TF_BN_EPS):
        super().__init__()
        self.kernel, self.stride, self.activation = tuple(kernel), tuple(stride), activation
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, padding=0, bias=bias)
        self.bn = nn.BatchNorm3d(out_channels, eps=bn_eps) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(tf_same_pad(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class MaxPool3dSame(nn.Module):
    """Max pool with TF "SAME" padding (zeros: inputs are ReLU outputs). No parameters."""

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(tf_same_pad(x, self.kernel, self.stride), self.kernel, self.stride)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}"


class InceptionBlock(nn.Module):
    """Four branches concatenated on channels: 1x1 | 1x1 -> 3x3x3 | 1x1 -> 3x3x3 | 3x3x3 max pool -> 1x1.

    widths = (b0, b1a, b1b, b2a, b2b, b3b) output channels; the block outputs b0 + b1b + b2b + b3b channels.
    """

    def __init__(self, in_channels: int, widths: Sequence[int], bn_eps: float = TF_BN_EPS):
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3b = widths
        self.b0 = Unit3D(in_channels, w0, bn_eps=bn_eps)
        self.b1a = Unit3D(in_channels, w1a, bn_eps=bn_eps)
        self.b1b = Unit3D(w1a, w1b, kernel=(3, 3, 3), bn_eps=bn_eps)
        self.b2a = Unit3D(in_channels, w2a, bn_eps=bn_eps)
        self.b2b = Unit3D(w2a, w2b, kernel=(3, 3, 3), bn_eps=bn_eps)
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, w3b, bn_eps=bn_eps)
        self.out_channels = w0 + w1b + w2b + w3b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


# ---------------------------------------------------------------------------------------------------- network
# The layer table, in order: (module name, kind, arguments). Channel widths are those of Inception-v1.
ARCHITECTURE = (
    ("Conv3d_1a_7x7", "unit", dict(out=64, kernel=(7, 7, 7), stride=(2, 2, 2))),
    ("MaxPool3d_2a_3x3", "pool", dict(kernel=(1, 3, 3), stride=(1, 2, 2))),
    ("Conv3d_2b_1x1", "unit", dict(out=64, kernel=(1, 1, 1), stride=(1, 1, 1))),
    ("Conv3d_2c_3x3", "unit", dict(out=192, kernel=(3, 3, 3), stride=(1, 1, 1))),
    ("MaxPool3d_3a_3x3", "pool", dict(kernel=(1, 3, 3), stride=(1, 2, 2))),
    ("Mixed_3b", "mixed", (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", "mixed", (128, 128, 192, 32, 96, 64)),
    ("MaxPool3d_4a_3x3", "pool", dict(kernel=(3, 3, 3), stride=(2, 2, 2))),
    ("Mixed_4b", "mixed", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", "mixed", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", "mixed", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", "mixed", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", "mixed", (256, 160, 320, 32, 128, 128)),
    ("MaxPool3d_5a_2x2", "pool", dict(kernel=(2, 2, 2), stride=(2, 2, 2))),
    ("Mixed_5b", "mixed", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", "mixed", (384, 192, 384, 48, 128, 128)),
)
LOGITS_POOL = (2, 7, 7)  # average-pool window before the classifier (stride 1, no padding)


class InceptionI3d(nn.Module):
    """I3D RGB stream. x: [B, 3, T, 224, 224] in [-1, 1], T >= 9 -> logits [B, num_classes] (time-averaged).

    ``features(x, "logits")`` is the FVD feature (same as forward); ``features(x, "pool")`` the 1024-d average-
    pooled Mixed_5c output (time-averaged), which some non-reference FVD code uses instead.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = 3, bn_eps: float = TF_BN_EPS,
                 dropout: float = 0.5):
        super().__init__()
        channels = in_channels
        self.layer_names: list[str] = []
        for name, kind, args in ARCHITECTURE:
            if kind == "unit":
                module = Unit3D(channels, args["out"], args["kernel"], args["stride"], bn_eps=bn_eps)
                channels = args["out"]
            elif kind == "pool":
                module = MaxPool3dSame(args["kernel"], args["stride"])
            else:
                module = InceptionBlock(channels, args, bn_eps=bn_eps)
                channels = module.out_channels
            self.add_module(name, module)
            self.layer_names.append(name)
        self.dropout = nn.Dropout(dropout)  # a no-op in eval mode; kept for the architecture's sake
        self.logits = Unit3D(channels, num_classes, batch_norm=False, activation=False, bias=True)
        self.num_classes = num_classes

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] -> Mixed_5c output average-pooled over [2, 7, 7]: [B, 1024, t, h, w]."""
        if x.ndim != 5:
            raise ValueError(f"I3D input must be [B, 3, T, H, W], got shape {tuple(x.shape)}")
        for name in self.layer_names:
            x = getattr(self, name)(x)
        if x.shape[2] < LOGITS_POOL[0] or x.shape[3] < LOGITS_POOL[1] or x.shape[4] < LOGITS_POOL[2]:
            raise ValueError(f"I3D input too small: Mixed_5c output {tuple(x.shape[2:])} is smaller than the "
                             f"{LOGITS_POOL} average pool (need >= {MIN_FRAMES} frames at {INPUT_SIZE}x{INPUT_SIZE})")
        return F.avg_pool3d(x, LOGITS_POOL, stride=1)

    def features(self, x: torch.Tensor, layer: str = "logits") -> torch.Tensor:
        pooled = self.trunk(x)
        if layer == "pool":
            return pooled.mean(dim=(2, 3, 4))
        if layer != "logits":
            raise ValueError(f"layer must be 'logits' or 'pool', got {layer!r}")
        logits = self.logits(self.dropout(pooled))  # [B, C, t, h, w]; h = w = 1 at 224x224
        return logits.mean(dim=(3, 4)).mean(dim=2)  # spatial squeeze, then the mean over time (TF's "Mean")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x, "logits")


def expected_state_dict_keys(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The keys (and shapes) a public-layout file must hold for this model: every parameter and batch-norm
    running statistic, but not ``num_batches_tracked`` (absent from the converted TF weights)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


# ---------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class FVDSettings:
    """How one FVD lineage runs its detector: which weights file, the state-dict network's batch-norm eps, how
    the TorchScript is called, the resize to 224 (this project's preprocessing) and the covariance normalisation."""

    weights: str  # "state_dict" (i3d_pretrained_400.pt) | "torchscript" (i3d_torchscript.pt)
    bn_eps: float | None  # state_dict: BatchNorm eps; None for the TorchScript
    native: bool  # torchscript: uint8 input, the network rescales and resizes itself (StyleGAN-V's call)
    resize: str  # "bilinear" | "tf_legacy" (ignored when native)
    ddof: int  # covariance: 1 = unbiased (divide by N - 1), 0 = biased (divide by N)
    reproduces: str  # which published numbers it reproduces (README's FVD table)


FVD_SETTINGS = {
    "videogpt": FVDSettings("state_dict", VIDEOGPT_BN_EPS, False, "bilinear", 1,
                            "FVD of the PyTorch lineage: VideoGPT's / TATS' fvd code with i3d_pretrained_400.pt "
                            "(eps 1e-5, unbiased covariance, [-1, 1] input as TATS fixed it) and the tools that "
                            "copy it"),
    "tf": FVDSettings("state_dict", TF_BN_EPS, False, "tf_legacy", 1,
                      "the TF/Sonnet network's own eps (1e-3) with TF1 resizing: the closest this file gets to "
                      "google-research's frechet_video_distance.py (its example: about 131)"),
    "stylegan_v": FVDSettings("torchscript", None, True, "bilinear", 0,
                              "StyleGAN-V's compute_fvd with i3d_torchscript.pt (uint8 in, rescale=True, "
                              "resize=True, biased covariance) and works using its metrics code"),
    "torchscript_preprocessed": FVDSettings("torchscript", None, False, "bilinear", 1,
                                            "i3d_torchscript.pt fed this project's preprocessing ([-1, 1], 224) "
                                            "with rescale=False, resize=False and an unbiased covariance"),
}
DEFAULT_FVD_SETTINGS = {"state_dict": "videogpt", "torchscript": "stylegan_v"}  # by the file's lineage


def resolve_fvd_settings(path: str | Path, settings: str | None = None) -> tuple[str, FVDSettings]:
    """(name, FVDSettings) for a weights file: the named settings, or the default of the file's lineage."""
    kind = "torchscript" if is_torchscript_file(path) else "state_dict"
    name = settings or DEFAULT_FVD_SETTINGS[kind]
    if name not in FVD_SETTINGS:
        raise ValueError(f"unknown FVD settings {name!r}; choose one of {sorted(FVD_SETTINGS)}")
    if FVD_SETTINGS[name].weights != kind:
        raise ValueError(f"FVD settings {name!r} are for the {FVD_SETTINGS[name].weights} file, but {path} is a "
                         f"{kind} file; use one of {[n for n, s in FVD_SETTINGS.items() if s.weights == kind]}")
    return name, FVD_SETTINGS[name]


# ---------------------------------------------------------------------------------------------------- loading
def _unwrap_state_dict(obj) -> Mapping[str, torch.Tensor]:
    """Accept a bare state_dict, one under 'state_dict' / 'model', and strip a DataParallel 'module.' prefix."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state_dict (a mapping of names to tensors), got {type(obj).__name__}")
    keys = list(obj)
    if keys and all(k.startswith("module.") for k in keys):
        obj = OrderedDict((k[len("module."):], v) for k, v in obj.items())
    return obj


def load_i3d_state_dict(model: InceptionI3d, state_dict: Mapping[str, torch.Tensor], source: str = "state_dict"):
    """Copy a public-layout state_dict into model, checking every key.

    A missing key, an unexpected key or a shape mismatch raises ValueError naming the key(s) (all of them, not
    just the first). ``num_batches_tracked`` entries are optional.
    """
    state_dict = _unwrap_state_dict(state_dict)
    expected = expected_state_dict_keys(model)
    optional = {k for k in model.state_dict() if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected) - optional)
    wrong_shape = sorted(f"{k}: file {tuple(state_dict[k].shape)} vs model {expected[k]}"
                         for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != expected[k])
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches ({len(wrong_shape)}): {'; '.join(wrong_shape)}")
    if problems:
        raise ValueError(f"{source} does not match the I3D layout: " + " | ".join(problems))
    tensors = {k: torch.as_tensor(v) for k, v in state_dict.items() if k in expected}
    model.load_state_dict(tensors, strict=False)  # every expected key is present (checked above)
    return model


def is_torchscript_file(path: str | Path) -> bool:
    """A TorchScript archive is a zip with a code/ folder; torch.save's zip files have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.startswith("code/") for name in archive.namelist())


class TorchScriptI3D(nn.Module):
    """StyleGAN-V's TorchScript I3D (``i3d_torchscript.pt``, class ``src.i3dpt_jit.I3D``), whose forward is
    ``forward(x, rescale=False, resize=False, return_features=False)``; x is [B, 3, T, H, W].

    * native=False (default): x is already preprocessed by preprocess_for_i3d ([-1, 1], 224x224); called with
      ``rescale=False, resize=False, return_features=True``, as universome/fvd-comparison (which checked it
      against the TF-hub module) and common_metrics_on_video_quality call it.
    * native=True: x holds 0..255 values at any size; called with ``rescale=True, resize=True,
      return_features=True``, exactly as StyleGAN-V's ``compute_fvd`` does (the network rescales to [-1, 1]
      and resizes to 224 itself).
    Both return the 400-d pre-softmax logits.
    """

    def __init__(self, module: torch.jit.ScriptModule, native: bool = False):
        super().__init__()
        self.module, self.native = module, native

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x, rescale=self.native, resize=self.native, return_features=True)


def load_i3d(path: str | Path, device="cpu", bn_eps: float | None = None,
             native_torchscript: bool | None = None) -> nn.Module:
    """Load either public weight file: a state_dict (``i3d_pretrained_400.pt`` layout) into InceptionI3d, or
    StyleGAN-V's TorchScript detector (``i3d_torchscript.pt``). Returns an eval-mode module on device.
    bn_eps / native_torchscript default to the file's lineage (DEFAULT_FVD_SETTINGS)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"I3D weights not found: {path}")
    _, default = resolve_fvd_settings(path)
    bn_eps = default.bn_eps if bn_eps is None else bn_eps
    native_torchscript = default.native if native_torchscript is None else native_torchscript
    if is_torchscript_file(path):
        module = torch.jit.load(str(path), map_location=device).eval()
        return TorchScriptI3D(module, native=native_torchscript).eval()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a clearer message than the unpickler's
        raise ValueError(f"{path} is neither a TorchScript archive nor a loadable state_dict: {exc}") from exc
    model = load_i3d_state_dict(InceptionI3d(bn_eps=bn_eps), obj, source=str(path))
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------------- preprocessing
def _resize_tf_legacy(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF1 ``tf.image.resize_bilinear`` (align_corners=False, half_pixel_centers=False): source = dest * in/out.
    x: [N, C, H, W] float."""
    out = x
    for dim, new in ((2, size[0]), (3, size[1])):
        old = out.shape[dim]
        if old == new:
            continue
        src = torch.arange(new, dtype=torch.float64, device=x.device) * (old / new)
        lo = src.floor().long().clamp(max=old - 1)
        hi = (lo + 1).clamp(max=old - 1)
        w = (src - lo.double()).to(x.dtype)
        shape = [1, 1, 1, 1]
        shape[dim] = new
        w = w.view(shape)
        out = out.index_select(dim, lo) * (1 - w) + out.index_select(dim, hi) * w
    return out


def _to_byte_range(videos: torch.Tensor) -> torch.Tensor:
    """[B, T, 3, H, W] float in [-1, 1] or uint8 [B, T, H, W, 3] -> float [B, T, 3, H, W] holding integers 0..255."""
    if videos.dtype == torch.uint8:
        if videos.ndim != 5 or videos.shape[-1] != 3:
            raise ValueError(f"uint8 videos must be [B, T, H, W, 3], got {tuple(videos.shape)}")
        return videos.permute(0, 1, 4, 2, 3).float()
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"float videos must be [B, T, 3, H, W] in [-1, 1], got {tuple(videos.shape)}")
    return ((videos.float().clamp(-1, 1) + 1) * 127.5).round()


def temporal_indices(num_frames: int, target: int) -> torch.Tensor:
    """Nearest-frame indices that stretch num_frames to target (each frame repeated about target/num_frames times)."""
    return torch.div(torch.arange(target) * num_frames, target, rounding_mode="floor")


def preprocess_for_i3d(videos: torch.Tensor, size: int = INPUT_SIZE, resize: str = "bilinear",
                       short_clips: str = "error", stretch_to: int = 16) -> torch.Tensor:
    """Videos -> the I3D input [B, 3, T, size, size] float32 in [-1, 1], as the reference FVD code prepares it.

    videos: [B, T, 3, H, W] float in [-1, 1] (this project's convention) or uint8 [B, T, H, W, 3].

    1. Quantise to 8 bits (round((x + 1) * 127.5)). Reason: every reference implementation feeds uint8 videos
       (TF FVD: "values are expected to be in the range 0-255"; StyleGAN-V converts generator output to uint8
       before the detector), and it makes FVD of in-memory outputs equal FVD of the same videos saved as frames.
    2. Resize every frame to size x size (224: the resolution the network was trained at, which makes the final
       feature map exactly 7x7 for the [2, 7, 7] pool), stretching rather than cropping, as the TF reference
       (``tf.image.resize_bilinear`` to (224, 224)) and TATS do. No antialiasing, like the reference.
       ``resize='bilinear'``: PyTorch bilinear with align_corners=False (half-pixel centres; TATS, StyleGAN-V-
       style PyTorch code). ``resize='tf_legacy'``: TF1's resize_bilinear sampling (no half-pixel offset), the
       exact reference arithmetic. (VideoGPT's own code instead scales the short side and centre-crops; inputs
       of the protocols here are square, where the two agree.)
    3. Scale to [-1, 1] as 2 * x / 255 - 1 (TF reference ``preprocess``; the TF-hub module asserts this range),
       clamped to [-1, 1] to drop the float rounding of the resize (a convex combination: nothing else is cut).
       VideoGPT's original preprocessing left [-0.5, 0.5] here, a bug later copies (TATS, common_metrics) fixed
       by multiplying by 2.
    4. Frames: the network needs T >= 9 (time is halved three times with SAME padding, ceil(T / 8), before a
       2-frame average pool). The reference protocols use 16 frames (FVD-16). Shorter clips raise unless
       ``short_clips='stretch'``, which repeats frames (nearest index) to ``stretch_to`` frames — a documented
       deviation used for the 7-frame interpolation protocol, applied identically to both compared sets.
    """
    x = _to_byte_range(videos)
    B, T = x.shape[:2]
    if T < MIN_FRAMES:
        if short_clips != "stretch":
            raise ValueError(f"I3D needs at least {MIN_FRAMES} frames, got {T}; pass short_clips='stretch' to "
                             f"repeat frames up to {stretch_to} (a deviation from the reference protocol)")
        x = x[:, temporal_indices(T, max(stretch_to, MIN_FRAMES))]
        T = x.shape[1]
    frames = x.reshape(B * T, *x.shape[2:])
    if frames.shape[-2:] != (size, size):
        if resize == "bilinear":
            frames = F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False)
        elif resize == "tf_legacy":
            frames = _resize_tf_legacy(frames, (size, size))
        else:
            raise ValueError(f"resize must be 'bilinear' or 'tf_legacy', got {resize!r}")
    frames = (frames * (2.0 / 255.0) - 1.0).clamp_(-1.0, 1.0)  # the resize may overshoot 255 by float rounding
    return frames.reshape(B, T, 3, size, size).permute(0, 2, 1, 3, 4).contiguous()


# ---------------------------------------------------------------------------------------------------- extractor
class I3DFeatureExtractor:
    """FVD features: videos [B, T, 3, H, W] in [-1, 1] (or uint8 [B, T, H, W, 3]) -> float64 array [B, 400].

    Runs preprocess_for_i3d and the network in chunks of batch_size on device. Any callable with this signature
    can stand in for it wherever the evaluation code takes an ``extractor`` (tests use cheap ones).
    """

    def __init__(self, network: nn.Module, device="cpu", batch_size: int = 16, resize: str = "bilinear",
                 short_clips: str = "error", stretch_to: int = 16, layer: str = "logits",
                 autocast_dtype: torch.dtype | None = None, ddof: int = 1, settings: str = "custom"):
        """ddof: the covariance normalisation FVD computed from these features uses (the lineage's); settings:
        the FVD_SETTINGS name it follows, recorded with results."""
        self.ddof, self.settings = ddof, settings
        self.device = torch.device(device)
        self.network = network.to(self.device).eval().requires_grad_(False)
        self.batch_size, self.resize, self.layer = int(batch_size), resize, layer
        self.short_clips, self.stretch_to = short_clips, stretch_to
        self.autocast_dtype = autocast_dtype
        self.native = isinstance(network, TorchScriptI3D) and network.native
        if layer != "logits" and not isinstance(network, InceptionI3d):
            raise ValueError("only the state_dict network exposes layer='pool'; the TorchScript gives logits")
        self.feature_dim = POOL_DIM if layer == "pool" else LOGITS_DIM

    @classmethod
    def from_file(cls, path: str | Path, device="cpu", settings: str | None = None, bn_eps: float | None = None,
                  native_torchscript: bool | None = None, resize: str | None = None, ddof: int | None = None, **kw):
        """The extractor of a weights file with the settings of its lineage (settings=None: DEFAULT_FVD_SETTINGS
        for the file's kind) or named ones; bn_eps / native_torchscript / resize / ddof override single fields
        (then the settings are reported as "<name>+custom")."""
        name, s = resolve_fvd_settings(path, settings)
        overrides = {k: v for k, v in dict(bn_eps=bn_eps, native=native_torchscript, resize=resize, ddof=ddof).items()
                     if v is not None and v != getattr(s, k)}
        if overrides:
            from dataclasses import replace

            s, name = replace(s, **overrides), f"{name}+custom"
        network = load_i3d(path, device, bn_eps=s.bn_eps if s.bn_eps is not None else TF_BN_EPS,
                           native_torchscript=s.native)
        return cls(network, device, resize=s.resize, ddof=s.ddof, settings=name, **kw)

    @classmethod
    def random(cls, device="cpu", seed: int = 0, **kw):
        """Random weights (for throughput benchmarks and tests; its FVD means nothing)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = InceptionI3d()
        return cls(network, device, **kw)

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor | np.ndarray) -> np.ndarray:
        videos = torch.as_tensor(videos)
        out = []
        for start in range(0, videos.shape[0], self.batch_size):
            chunk = videos[start:start + self.batch_size]
            if self.native:  # StyleGAN-V feeds uint8 [B, 3, T, H, W]; the TorchScript rescales and resizes
                x = _to_byte_range(chunk).to(torch.uint8).permute(0, 2, 1, 3, 4).contiguous()
            else:
                x = preprocess_for_i3d(chunk, resize=self.resize, short_clips=self.short_clips,
                                       stretch_to=self.stretch_to)
            x = x.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                if isinstance(self.network, InceptionI3d):
                    feats = self.network.features(x, self.layer)
                else:
                    feats = self.network(x)
            out.append(feats.float().cpu().numpy().astype(np.float64))
        if not out:
            return np.zeros((0, self.feature_dim))
        return np.concatenate(out, axis=0)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

