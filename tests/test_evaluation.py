"""Evaluation: Fréchet distance, streaming statistics, I3D loading, PSNR/SSIM, benchmark protocols.

Fast on CPU: one I3D forward with random weights; the protocol tests use tiny videos and the baselines. The
real-weights test runs only when the public file is present at the configured path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mardini.data.video_io import write_video
from mardini.evaluation import benchmarks as bm
from mardini.evaluation import fvd as fvd_mod
from mardini.evaluation import i3d as i3d_mod
from mardini.evaluation.cli import main as eval_main
from mardini.evaluation.data import list_videos, read_frames, to_model_frames
from mardini.evaluation.metrics import PSNR_MAX_DB, masked_frame_metrics, psnr_frames, ssim_frames
from mardini.evaluation.weights import default_weights_dir, find_i3d_weights


# ============================================================================ Fréchet distance
def _random_orthogonal(d, rng):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def _fd_eig(mu1, s1, mu2, s2):
    """Independent float64 Fréchet distance: Tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), via eigh only."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = fvd_mod.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_frechet_distance_commuting_closed_form_and_general_case():
    rng = np.random.default_rng(1)
    d = 20
    q = _random_orthogonal(d, rng)
    e1, e2 = rng.uniform(0.05, 4, size=d), rng.uniform(0.05, 4, size=d)
    s1, s2 = (q * e1) @ q.T, (q * e2) @ q.T  # same eigenbasis: Tr sqrt(S1 S2) = sum sqrt(e1 e2)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(e1) - np.sqrt(e2)) ** 2)
    assert fvd_mod.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # non-commuting covariances: against the eigendecomposition route
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T / d + 0.1 * np.eye(d), b @ b.T / d + 0.1 * np.eye(d)
    assert fvd_mod.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_fd_eig(mu1, s1, mu2, s2), rel=1e-8)


def test_fvd_self_zero_symmetric_and_grows_with_noise():
    rng = np.random.default_rng(2)
    n, d = 400, 16
    feats = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.5 + rng.normal(size=d)
    assert abs(fvd_mod.fvd_from_features(feats, feats)) < 1e-8
    other = feats + rng.normal(size=feats.shape) * 0.3
    ab, ba = fvd_mod.fvd_from_features(feats, other), fvd_mod.fvd_from_features(other, feats)
    assert ab == pytest.approx(ba, rel=1e-8)
    noise = rng.normal(size=feats.shape)
    values = [fvd_mod.fvd_from_features(feats, feats + s * noise) for s in (0.0, 0.1, 0.3, 1.0, 3.0)]
    assert values[0] < 1e-8
    assert all(b > a for a, b in zip(values, values[1:])), values


def test_frechet_distance_singular_covariances():
    """Fewer samples than dimensions (rank-deficient covariances), as with small validation sets."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(6, 32)), rng.normal(size=(6, 32)) + 1.0
    value = fvd_mod.fvd_from_features(a, b)
    assert np.isfinite(value) and value > 0
    assert abs(fvd_mod.fvd_from_features(a, a)) < 1e-4
    # identical rows: zero covariance, the distance is the squared mean difference
    assert fvd_mod.fvd_from_features(np.ones((4, 5)), np.zeros((4, 5))) == pytest.approx(5.0)


def test_streaming_statistics_match_numpy_for_any_split():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(257, 9)) * rng.uniform(0.5, 2, size=9) + 1000.0  # large mean: cancellation-prone
    for splits in ([257], [1, 256], [100, 57, 100], [7] * 36 + [5], list(np.full(257, 1))):
        stats, start = fvd_mod.FeatureStats(), 0
        for size in splits:
            stats.update(x[start:start + size])
            start += size
        assert stats.n == 257
        np.testing.assert_allclose(stats.mean, np.mean(x, axis=0), rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(stats.cov(), np.cov(x, rowvar=False), rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(stats.cov(ddof=0), np.cov(x, rowvar=False, bias=True), rtol=1e-9, atol=1e-10)
    merged = fvd_mod.FeatureStats.of(x[:50]).merge(fvd_mod.FeatureStats.of(x[50:] - 0.0))
    np.testing.assert_allclose(merged.cov(), np.cov(x, rowvar=False), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(merged.mean, x.mean(0), rtol=1e-12)


def test_feature_stats_save_load(tmp_path):
    """Two batches and a large offset: the mean depends on the saved shift and s1, which cov alone does not."""
    x = np.random.default_rng(5).normal(size=(20, 4)) + 100.0
    stats = fvd_mod.FeatureStats().update(x[:7]).update(x[7:])
    loaded = fvd_mod.FeatureStats.load(stats.save(tmp_path / "s.npz"))
    np.testing.assert_array_equal(loaded.cov(), stats.cov())
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    np.testing.assert_allclose(loaded.mean, x.mean(0), rtol=1e-12)
    assert loaded.n == 20


# ============================================================================ I3D
def _hand_listed_keys() -> set[str]:
    """The public i3d_pretrained_400.pt key set, written out from the published layout (not from the model)."""
    units = ["Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3"]
    for block in ("3b", "3c", "4b", "4c", "4d", "4e", "4f", "5b", "5c"):
        units += [f"Mixed_{block}.{b}" for b in ("b0", "b1a", "b1b", "b2a", "b2b", "b3b")]
    keys = {"logits.conv3d.weight", "logits.conv3d.bias"}
    for u in units:
        keys |= {f"{u}.conv3d.weight", f"{u}.bn.weight", f"{u}.bn.bias", f"{u}.bn.running_mean",
                 f"{u}.bn.running_var"}
    return keys


def test_i3d_layout_matches_public_keys_and_shapes():
    model = i3d_mod.InceptionI3d()
    expected = i3d_mod.expected_state_dict_keys(model)
    assert set(expected) == _hand_listed_keys()
    assert len(expected) == 287
    assert expected["Conv3d_1a_7x7.conv3d.weight"] == (64, 3, 7, 7, 7)
    assert expected["Mixed_3b.b1b.conv3d.weight"] == (128, 96, 3, 3, 3)
    assert expected["Mixed_5c.b0.conv3d.weight"] == (384, 832, 1, 1, 1)
    assert expected["logits.conv3d.weight"] == (400, 1024, 1, 1, 1)
    assert expected["logits.conv3d.bias"] == (400,)
    assert i3d_mod.num_parameters(model) == 12_697_264


def _public_layout_file(tmp_path: Path, mutate=None) -> tuple[Path, dict]:
    """A random model's weights saved as the public file is: a plain dict of tensors, no num_batches_tracked."""
    torch.manual_seed(0)
    model = i3d_mod.InceptionI3d()
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    for k in state:
        if k.endswith("running_var"):
            state[k] = torch.rand_like(state[k]) + 0.5
        elif k.endswith("running_mean"):
            state[k] = torch.randn_like(state[k]) * 0.1
    if mutate:
        mutate(state)
    path = tmp_path / "i3d_pretrained_400.pt"
    torch.save(state, path)
    return path, state


def test_i3d_state_dict_loader_maps_every_key(tmp_path):
    path, state = _public_layout_file(tmp_path)
    model = i3d_mod.load_i3d(path)
    assert isinstance(model, i3d_mod.InceptionI3d) and not model.training
    loaded = model.state_dict()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    # a DataParallel prefix and a {'state_dict': ...} wrapper are accepted
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    model2 = i3d_mod.load_i3d_state_dict(i3d_mod.InceptionI3d(), wrapped)
    assert torch.equal(model2.state_dict()["Mixed_4d.b2b.bn.running_var"], state["Mixed_4d.b2b.bn.running_var"])


@pytest.mark.parametrize("change, named", [
    (lambda s: s.pop("Mixed_4c.b1b.bn.running_mean"), "missing keys (1): Mixed_4c.b1b.bn.running_mean"),
    (lambda s: s.update({"Mixed_5b.b3a.conv3d.weight": torch.zeros(1)}), "unexpected keys (1): Mixed_5b.b3a.conv3d"),
    (lambda s: s.update({"logits.conv3d.weight": torch.zeros(600, 1024, 1, 1, 1)}), "logits.conv3d.weight: file (600"),
])
def test_i3d_loader_errors_name_the_key(tmp_path, change, named):
    path, _ = _public_layout_file(tmp_path, mutate=change)
    with pytest.raises(ValueError) as err:
        i3d_mod.load_i3d(path)
    assert named in str(err.value)


def test_i3d_forward_on_cpu_random_weights():
    """The I3D forwards of the suite: a [1, 16, 3, 64, 64] video -> preprocessing -> [1, 3, 16, 224, 224]
    -> 400-d logits, and the batch [video, -video]: its rows differ (the features depend on the input) and its
    row 0 is the single run (no mixing across the batch). He-initialised convolutions: with PyTorch's default
    init the activations vanish and the logits are the classifier's bias whatever the input."""
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    extractor = i3d_mod.I3DFeatureExtractor.random(seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in extractor.network.modules():
            if isinstance(m, torch.nn.Conv3d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
    video = torch.rand(1, 16, 3, 64, 64, generator=g)  # [0, 1]: -video is not a sample of the same noise
    x = i3d_mod.preprocess_for_i3d(video)
    assert x.shape == (1, 3, 16, 224, 224) and x.min() >= -1 and x.max() <= 1
    feats = extractor(video)
    assert feats.shape == (1, i3d_mod.LOGITS_DIM) and feats.dtype == np.float64 and np.isfinite(feats).all()
    pair = extractor(torch.cat([video, -video]))
    assert pair.shape == (2, i3d_mod.LOGITS_DIM) and np.isfinite(pair).all()
    scale = np.abs(feats).mean()
    assert np.abs(pair[0] - pair[1]).mean() > 0.1 * scale, (np.abs(pair[0] - pair[1]).mean(), scale)
    np.testing.assert_allclose(pair[0], feats[0], rtol=1e-5, atol=1e-5 * np.abs(feats).max())


def test_i3d_preprocessing_rules():
    # 8-bit quantisation, value range, 224x224
    full = torch.rand(1, 9, 3, 224, 224) * 2 - 1  # no resize at 224: the output holds exactly the 8-bit levels
    levels = (i3d_mod.preprocess_for_i3d(full) + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.min() >= 0 and levels.max() <= 255
    video = torch.linspace(-1, 1, 10 * 3 * 8 * 8).reshape(1, 10, 3, 8, 8)
    x = i3d_mod.preprocess_for_i3d(video)
    assert x.shape == (1, 3, 10, 224, 224) and x.min() >= -1 and x.max() <= 1
    # uint8 input [B, T, H, W, 3] gives the same as the float form
    u8 = ((video + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2)
    assert torch.allclose(i3d_mod.preprocess_for_i3d(u8), x)
    # frame floor: 8 frames fail, unless stretched (nearest repetition)
    with pytest.raises(ValueError, match="at least 9 frames"):
        i3d_mod.preprocess_for_i3d(video[:, :8])
    stretched = i3d_mod.preprocess_for_i3d(video[:, :7], short_clips="stretch")
    assert stretched.shape[2] == 16
    assert i3d_mod.temporal_indices(7, 16).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 5, 5, 6, 6]
    # white 3x3 frames: both resizes give 255.00003 here; the output is clamped to [-1, 1]
    white = torch.ones(1, 9, 3, 3, 3)
    for mode in ("bilinear", "tf_legacy"):
        top = i3d_mod.preprocess_for_i3d(white, resize=mode).max().item()
        assert top == 1.0, (mode, top)
    # TF1 legacy bilinear: source = dest * in / out (no half-pixel offset)
    row = torch.tensor([0.0, 100.0]).view(1, 1, 1, 2)
    assert i3d_mod._resize_tf_legacy(row, (1, 4)).flatten().tolist() == [0.0, 50.0, 100.0, 100.0]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_detector_called_with_reference_kwargs(tmp_path):
    """A stand-in with the StyleGAN-V detector's signature: load_i3d recognises TorchScript and calls it with
    rescale/resize as documented and return_features=True."""

    class FakeDetector(torch.nn.Module):
        def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                    return_features: bool = False) -> torch.Tensor:
            flags = torch.tensor([float(rescale), float(resize), float(return_features)])
            is_uint8 = 1.0 if x.dtype == torch.uint8 else 0.0
            stats = torch.stack([x.float().amin(), x.float().amax(), torch.tensor(float(x.shape[-1])),
                                 torch.tensor(float(x.shape[2])), torch.tensor(is_uint8)])
            return torch.cat([flags, stats]).expand(x.shape[0], 8)

    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(FakeDetector()).save(str(path))
    assert i3d_mod.is_torchscript_file(path)
    video = torch.full((2, 16, 3, 32, 32), 1.0)
    video[:, :, :, 0, 0] = -1.0
    # the file's lineage by default: StyleGAN-V's call, uint8 at the native size, the network rescales and resizes
    native = i3d_mod.I3DFeatureExtractor.from_file(path)
    assert native.settings == "stylegan_v" and native.ddof == 0
    np.testing.assert_allclose(native(video)[0], [1, 1, 1, 0, 255, 32, 16, 1])
    # the named alternative: preprocessed here (float [-1, 1], 224), called with rescale=resize=False
    feats = i3d_mod.I3DFeatureExtractor.from_file(path, settings="torchscript_preprocessed")(video)
    assert feats.shape == (2, 8)
    np.testing.assert_allclose(feats[0], [0, 0, 1, -1, 1, 224, 16, 0])


def test_fvd_settings_follow_the_lineage_of_the_weights_file(tmp_path):
    """i3d_pretrained_400.pt is the PyTorch (VideoGPT / TATS) lineage's file: it runs with BatchNorm eps 1e-5 and an
    unbiased covariance there, so that is its default; the TF eps stays a named option. Pinned here."""
    path = tmp_path / "i3d_pretrained_400.pt"
    torch.manual_seed(0)
    torch.save(i3d_mod.InceptionI3d().state_dict(), path)

    def eps_of(extractor):
        return {m.eps for m in extractor.network.modules() if isinstance(m, torch.nn.BatchNorm3d)}

    default = i3d_mod.I3DFeatureExtractor.from_file(path)
    assert default.settings == "videogpt" and default.ddof == 1 and default.resize == "bilinear"
    assert eps_of(default) == {1e-5}
    tf = i3d_mod.I3DFeatureExtractor.from_file(path, settings="tf")
    assert (tf.settings, tf.ddof, tf.resize, eps_of(tf)) == ("tf", 1, "tf_legacy", {1e-3})
    custom = i3d_mod.I3DFeatureExtractor.from_file(path, bn_eps=1e-3)
    assert custom.settings == "videogpt+custom" and eps_of(custom) == {1e-3}
    assert {m.eps for m in i3d_mod.load_i3d(path).modules() if isinstance(m, torch.nn.BatchNorm3d)} == {1e-5}
    with pytest.raises(ValueError, match=r"'stylegan_v' are for the torchscript file"):
        i3d_mod.I3DFeatureExtractor.from_file(path, settings="stylegan_v")
    assert i3d_mod.DEFAULT_FVD_SETTINGS == {"state_dict": "videogpt", "torchscript": "stylegan_v"}
    assert i3d_mod.FVD_SETTINGS["stylegan_v"].ddof == 0 and i3d_mod.FVD_SETTINGS["stylegan_v"].native

    # FVD uses the extractor's covariance normalisation
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 4)), rng.normal(size=(6, 4)) + 0.5

    class Biased:
        ddof = 0

        def __call__(self, videos):
            return videos.flatten(1).numpy()

    videos_a, videos_b = torch.from_numpy(a), torch.from_numpy(b)
    assert fvd_mod.fvd_between([videos_a], [videos_b], Biased()) == pytest.approx(
        fvd_mod.fvd_from_features(a, b, ddof=0), rel=1e-9)
    assert fvd_mod.fvd_between([videos_a], [videos_b], lambda v: v.flatten(1).numpy()) == pytest.approx(
        fvd_mod.fvd_from_features(a, b, ddof=1), rel=1e-9)
    assert fvd_mod.fvd_from_features(a, b, ddof=0) != pytest.approx(fvd_mod.fvd_from_features(a, b, ddof=1))


def test_weights_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("MARDINI_WEIGHTS", str(tmp_path))
    assert default_weights_dir() == tmp_path
    assert find_i3d_weights() is None
    (tmp_path / "i3d_torchscript.pt").write_bytes(b"x")
    assert find_i3d_weights() == tmp_path / "i3d_torchscript.pt"
    assert default_weights_dir(tmp_path / "other") == tmp_path / "other"
    monkeypatch.delenv("MARDINI_WEIGHTS")
    assert default_weights_dir().parts[-2:] == ("shared", "weights")


def test_i3d_real_weights_sane_prediction():
    """With the public weights at the configured path: the TF reference's own example (16 black vs 16 white
    15-frame videos, FVD "around 131" per google-research's example.py) and sane logits."""
    path = find_i3d_weights()
    if path is None:
        pytest.skip(f"no I3D weights in {default_weights_dir()} (i3d_pretrained_400.pt / i3d_torchscript.pt); "
                    f"get them with scripts/download_weights.py")
    # the TF reference's numbers need the TF network's settings (or the TorchScript fed the TF preprocessing)
    settings = "torchscript_preprocessed" if i3d_mod.is_torchscript_file(path) else "tf"
    extractor = i3d_mod.I3DFeatureExtractor.from_file(path, settings=settings)
    black = -torch.ones(1, 15, 3, 64, 64)
    feats = extractor(torch.cat([black, -black]))
    assert feats.shape == (2, 400) and np.isfinite(feats).all()
    assert feats.std(axis=1).min() > 0.1  # not degenerate
    value = fvd_mod.fvd_from_features(np.repeat(feats[:1], 16, 0), np.repeat(feats[1:], 16, 0))
    assert 110 < value < 150, value
    probs = torch.softmax(torch.from_numpy(feats), dim=1)
    assert torch.allclose(probs.sum(1), torch.ones(2, dtype=torch.float64))
    assert probs.max() > 5 / 400  # confident beyond uniform


# ============================================================================ PSNR / SSIM
def test_psnr_ssim_identical_and_known_values():
    torch.manual_seed(0)
    a = torch.rand(3, 3, 16, 16) * 2 - 1
    assert torch.equal(psnr_frames(a, a), torch.full((3,), PSNR_MAX_DB, dtype=torch.float64))  # capped, not inf
    assert torch.allclose(ssim_frames(a, a), torch.ones(3, dtype=torch.float64))
    # a uniform offset of 0.2 on [-1, 1] is 0.1 on [0, 1]: MSE 0.01 -> 20 dB
    b = torch.zeros(2, 3, 12, 12)
    assert torch.allclose(psnr_frames(b + 0.2, b), torch.full((2,), 20.0, dtype=torch.float64))
    # constant frames x = p, y = q on [0, 1]: SSIM = (2pq + C1) / (p^2 + q^2 + C1)
    p, q = 0.3, 0.7
    x, y = torch.full((1, 3, 16, 16), 2 * p - 1), torch.full((1, 3, 16, 16), 2 * q - 1)
    c1 = 0.01 ** 2
    assert ssim_frames(x, y).item() == pytest.approx((2 * p * q + c1) / (p * p + q * q + c1), rel=1e-6)


def test_ssim_matches_independent_scipy_computation():
    from scipy.ndimage import correlate

    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=(20, 24)), rng.uniform(size=(20, 24))
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2))
    k = np.outer(g, g) / np.outer(g, g).sum()

    def valid(img):
        return correlate(img, k, mode="constant")[5:-5, 5:-5]

    mx, my = valid(x), valid(y)
    vx, vy, cxy = valid(x * x) - mx ** 2, valid(y * y) - my ** 2, valid(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    expected = np.mean((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    tx = torch.from_numpy(x * 2 - 1).expand(1, 3, 20, 24)
    ty = torch.from_numpy(y * 2 - 1).expand(1, 3, 20, 24)
    assert ssim_frames(tx, ty).item() == pytest.approx(expected, rel=1e-9)


def test_ssim_and_psnr_decrease_with_noise():
    torch.manual_seed(1)
    clean = torch.rand(1, 3, 32, 32) * 1.6 - 0.8
    noise = torch.randn_like(clean)
    levels = [0.02, 0.05, 0.1, 0.2, 0.4]
    ssims = [ssim_frames((clean + s * noise).clamp(-1, 1), clean).item() for s in levels]
    psnrs = [psnr_frames((clean + s * noise).clamp(-1, 1), clean).item() for s in levels]
    assert all(b < a for a, b in zip(ssims, ssims[1:])), ssims
    assert all(b < a for a, b in zip(psnrs, psnrs[1:])), psnrs


# ============================================================================ protocols
def _moving_frames(num_frames: int, h: int, w: int, seed: int) -> np.ndarray:
    """uint8 [T, H, W, 3]: a smooth gradient with a moving square."""
    rng = np.random.default_rng(seed)
    base = rng.integers(30, 200, size=3)
    yy, xx = np.mgrid[0:h, 0:w]
    frames = []
    for t in range(num_frames):
        img = np.empty((h, w, 3), np.float64)
        for c in range(3):
            img[..., c] = base[c] + 40 * np.sin(xx / w * 3 + c) + 20 * np.cos(yy / h * 2)
        x0 = (3 * t + seed * 5) % (w - 8)
        img[8:16, x0:x0 + 8] = 255 - base
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(frames)


def _davis_root(tmp_path: Path, static: bool = False) -> Path:
    from PIL import Image

    root = tmp_path / ("davis_static" if static else "davis")
    for v, n in (("bear", 14), ("car", 10), ("dog", 6)):  # dog is too short for 7-frame clips at stride 1? no: 6 < 7
        folder = root / v
        folder.mkdir(parents=True)
        frames = _moving_frames(n, 24, 32, seed=len(v) + n)
        if static:
            frames = np.repeat(frames[:1], n, axis=0)
        for i, f in enumerate(frames):
            Image.fromarray(f).save(folder / f"{i:05d}.jpg", quality=95)
    return root


def _ucf_root(tmp_path: Path) -> Path:
    root = tmp_path / "ucf"
    for cls, name, n in (("Jump", "v_Jump_g01_c01.mp4", 20), ("Run", "v_Run_g02_c03.mp4", 24)):
        frames = _moving_frames(n, 32, 48, seed=n)
        write_video(root / cls / name, frames, fps=8)
    return root


def test_data_listing_and_reading(tmp_path):
    davis, ucf = _davis_root(tmp_path), _ucf_root(tmp_path)
    sources = list_videos(davis)
    assert [s.id for s in sources] == ["bear", "car", "dog"] and {s.kind for s in sources} == {"frames"}
    davis_frames = read_frames(sources[0], [0, 3])
    assert davis_frames.shape == (2, 24, 32, 3)
    vids = list_videos(ucf)
    assert [s.id for s in vids] == ["Jump/v_Jump_g01_c01.mp4", "Run/v_Run_g02_c03.mp4"]
    frames = read_frames(vids[0], [0, 5, 19])
    assert frames.shape == (3, 32, 48, 3) and frames.dtype == np.uint8
    # the frames written at those indices, up to compression (mean absolute difference in grey levels; measured:
    # mp4 <= 2.9 and JPEG <= 3.4, while the frames next to those are >= 5.0 and >= 6.2 away)
    for got, written, bound in ((frames, _moving_frames(20, 32, 48, seed=20)[[0, 5, 19]], 4.0),
                                (davis_frames, _moving_frames(14, 24, 32, seed=len("bear") + 14)[[0, 3]], 5.0)):
        mad = np.abs(got.astype(np.int16) - written.astype(np.int16)).mean(axis=(1, 2, 3))
        assert (mad < bound).all(), mad
    x = to_model_frames(frames, 16, 16)
    assert x.shape == (3, 3, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_clip_selection_deterministic_and_rereadable(tmp_path):
    root = _davis_root(tmp_path)
    proto = bm.ProtocolConfig(num_frames=7, height=16, width=16, clips_per_video=3, seed=0)
    a, b = bm.select_clips(root, proto), bm.select_clips(root, proto)
    assert a == b and len(a) == 6  # bear: 3 clips, car: 3 clips, dog: too short
    assert all(c.video != "dog" for c in a)
    other = bm.select_clips(root, bm.ProtocolConfig(num_frames=7, height=16, width=16, clips_per_video=3, seed=1))
    assert other != a
    f1, f2 = bm.save_clips(tmp_path / "c1.json", a, proto, root), bm.save_clips(tmp_path / "c2.json", b, proto, root)
    assert f1.read_bytes() == f2.read_bytes()
    clips, proto_back = bm.load_clips(f1)
    assert clips == a and proto_back == proto
    assert clips[0].frames == list(range(clips[0].start, clips[0].start + 7))
    subset = bm.select_clips(root, bm.ProtocolConfig(num_frames=7, clips_per_video=3, max_clips=4, seed=0))
    assert len(subset) == 4
    with pytest.raises(ValueError, match="unknown protocol key"):
        bm.ProtocolConfig.from_dict({"num_frame": 7})


def test_baselines():
    T = 7
    gt = torch.rand(T, 3, 4, 4) * 2 - 1
    mask = bm.ProtocolConfig(num_frames=T).mask()
    assert mask.tolist() == [False, True, True, True, True, True, False]
    given = gt.masked_fill(mask[:, None, None, None], 0)
    rep = bm.repeat_nearest(given, mask)
    assert torch.equal(rep[1], gt[0]) and torch.equal(rep[3], gt[0]) and torch.equal(rep[4], gt[6])
    blend = bm.linear_blend(given, mask)
    assert torch.allclose(blend[2], gt[0] * 4 / 6 + gt[6] * 2 / 6)
    i2v_mask = bm.PROTOCOLS["i2v_middle17"].mask()
    assert i2v_mask.shape == (17,) and (~i2v_mask).nonzero().flatten().tolist() == [8]


def test_interpolation_protocol_defaults_to_vidim_bench():
    """VIDIM-Bench (Jain et al. 2024): 9-frame clips, first and last given, the 7 middle frames generated, 256x256;
    `mardini-eval interpolation` uses it unless told otherwise."""
    vidim = bm.PROTOCOLS["vidim"]
    assert (vidim.task, vidim.num_frames, vidim.height, vidim.width) == ("interpolation", 9, 256, 256)
    assert (~vidim.mask()).nonzero().flatten().tolist() == [0, 8] and int(vidim.mask().sum()) == 7
    assert bm.ProtocolConfig().num_frames == 9 and bm.DEFAULT_PRESETS["interpolation"] == "vidim"
    assert set(bm.PROTOCOLS) == {"vidim", "i2v_middle17"}  # presets are named after what they reproduce


def test_vidim_reads_the_official_bench_folders_whole(tmp_path):
    """VIDIM's scripts write DAVIS-7 / UCF101-7 as one folder of 9 frames per example (frame_000.png ...): the vidim
    preset takes every example whole, pixel for pixel at the protocol's size."""
    from dataclasses import replace

    from PIL import Image

    rng = np.random.default_rng(0)
    frames = {}
    for example in ("0000", "0001"):
        (tmp_path / example).mkdir()
        frames[example] = rng.integers(0, 256, (9, 16, 16, 3), dtype=np.uint8)
        for i, f in enumerate(frames[example]):
            Image.fromarray(f).save(tmp_path / example / f"frame_{i:03d}.png")
    proto = replace(bm.PROTOCOLS["vidim"], height=16, width=16)
    clips = bm.select_clips(tmp_path, proto)
    assert [(c.video, c.frames) for c in clips] == [("0000", list(range(9))), ("0001", list(range(9)))]
    sources = {s.id: s for s in list_videos(tmp_path)}
    for clip in clips:
        expected = torch.from_numpy(frames[clip.video]).permute(0, 3, 1, 2).float() / 127.5 - 1
        assert torch.equal(bm.load_clip(tmp_path, clip, proto, sources), expected)
def test_vidim_fvd_uses_the_full_9_frame_clips_and_the_files_lineage_settings(tmp_path):
    """VIDIM does not publish how its FVD was computed (README, Evaluate). The vidim preset computes it on the whole
    9-frame clips, the two given frames included (I3D's minimum length: no frame is repeated), for the ground
    truth and every method alike, with the weights file's default settings (videogpt for i3d_pretrained_400.pt,
    the TATS/VideoGPT code), named in the results."""
    from dataclasses import replace

    seen = []

    def extractor(videos):  # a stand-in for I3D that keeps what it was given
        seen.append(videos.clone())
        return videos.float().mean(dim=(2, 3, 4))

    extractor.settings = "videogpt"
    root, proto = _davis_root(tmp_path), replace(bm.PROTOCOLS["vidim"], height=16, width=16)
    res = bm.run_benchmark(root, bm.BASELINES, tmp_path / "out", protocol=proto, extractor=extractor, num_grids=0)
    videos = [v for batch in seen for v in batch]
    assert all(v.shape == (9, 3, 16, 16) for v in videos) and len(videos) == res["num_clips"] * 3
    sources = {s.id: s for s in list_videos(root)}
    for clip in bm.select_clips(root, proto):
        gt = bm.load_clip(root, clip, proto, sources)
        assert any(torch.equal(v, gt) for v in videos), f"the ground truth of {clip.name} was not fed whole"
    assert res["methods"]["linear_blend"]["fvd"] is not None
    assert any("FVD settings: videogpt" in n for n in res["notes"]) and not any("repeated" in n for n in res["notes"])
    assert i3d_mod.MIN_FRAMES == 9 and i3d_mod.DEFAULT_FVD_SETTINGS["state_dict"] == "videogpt"


def test_benchmark_static_video_repeat_is_perfect_and_runs_are_identical(tmp_path):
    root = _davis_root(tmp_path, static=True)
    proto = bm.ProtocolConfig(num_frames=7, height=16, width=16, clips_per_video=2, seed=3)
    r1 = bm.run_benchmark(root, bm.BASELINES, tmp_path / "run1", protocol=proto, clips_file=tmp_path / "clips.json",
                          num_grids=1)
    assert r1["methods"]["repeat_nearest"]["psnr"] == PSNR_MAX_DB and r1["methods"]["repeat_nearest"]["ssim"] == 1.0
    assert r1["methods"]["linear_blend"]["psnr"] > 150  # a blend of identical frames is the frame (float32 rounding)
    # the second run reuses the clips file and gives a byte-identical results.json
    bm.run_benchmark(root, bm.BASELINES, tmp_path / "run2", clips_file=tmp_path / "clips.json", num_grids=1)
    j1, j2 = (tmp_path / "run1" / "results.json").read_text(), (tmp_path / "run2" / "results.json").read_text()
    assert j1 == j2
    assert json.loads(j1)["methods"]["repeat_nearest"]["psnr"] == 200.0
    assert "| repeat_nearest | 200.00 | 1.0000 |" in (tmp_path / "run1" / "results.md").read_text()
    assert len(list((tmp_path / "run1" / "samples").glob("*.mp4"))) == 1


def test_benchmark_davis_and_ucf_with_fvd_and_model_like_method(tmp_path):
    davis, ucf = _davis_root(tmp_path), _ucf_root(tmp_path)

    def toy_extractor(videos):  # cheap stand-in for I3D: per-frame colour means and spreads
        return torch.cat([videos.float().mean(dim=(3, 4)), videos.float().std(dim=(3, 4))], dim=2).flatten(1)

    calls = []

    def noisy_model(given, mask):  # any callable (given, mask) -> video is a method
        calls.append(mask.clone())
        out = bm.linear_blend(given, mask)
        return (out + 0.05 * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)

    def oracle(noise: float):  # sees the ground truth (looked up by its given first frame), plus noise
        def method(given, mask):
            gt = truth[given[0].numpy().tobytes()]
            g = torch.Generator().manual_seed(1)
            return (gt + noise * torch.randn(gt.shape, generator=g)).clamp(-1, 1) if noise else gt.clone()
        return method

    methods = {**bm.BASELINES, "model": noisy_model, "oracle": oracle(0.0), "oracle_0.1": oracle(0.1),
               "oracle_0.4": oracle(0.4)}
    for root in (davis, ucf):
        proto = bm.ProtocolConfig(num_frames=7, height=16, width=16, clips_per_video=2, seed=0)
        sources = {v.id: v for v in list_videos(root)}
        truth = {}
        for clip in bm.select_clips(root, proto):
            gt = bm.load_clip(root, clip, proto, sources)
            truth[gt[0].numpy().tobytes()] = gt
        res = bm.run_benchmark(root, methods, tmp_path / f"out_{root.name}", protocol=proto,
                               extractor=toy_extractor, num_grids=2)
        m = res["methods"]
        # the ground truth scores perfectly (FVD of a set with itself ~0); noise lowers PSNR/SSIM and raises FVD
        assert m["oracle"]["psnr"] == PSNR_MAX_DB and m["oracle"]["ssim"] == 1.0 and abs(m["oracle"]["fvd"]) < 1e-6
        assert m["oracle"]["psnr"] > m["oracle_0.1"]["psnr"] > m["oracle_0.4"]["psnr"]
        assert m["oracle"]["ssim"] > m["oracle_0.1"]["ssim"] > m["oracle_0.4"]["ssim"]
        assert m["oracle"]["fvd"] < m["oracle_0.1"]["fvd"] < m["oracle_0.4"]["fvd"]
        assert m["linear_blend"]["psnr"] > m["model"]["psnr"]
        assert res["num_clips"] == 4 and len(res["per_clip"]) == 4
    assert all(m.tolist() == [False] + [True] * 5 + [False] for m in calls)
    # image-to-video protocol: 17 frames, middle given
    proto = bm.ProtocolConfig(task="i2v", num_frames=17, height=16, width=16, seed=0)
    res = bm.run_benchmark(ucf, bm.BASELINES, tmp_path / "i2v", protocol=proto, num_grids=0)
    assert res["generated_frames"] == [i for i in range(17) if i != 8]
    assert res["methods"]["repeat_nearest"]["psnr"] == res["methods"]["linear_blend"]["psnr"]


def test_cli_interpolation_reuses_clips(tmp_path, capsys):
    """An existing clips file fixes the protocol and the clips: a second call with another --seed (which alone
    would draw other clips) gives the same results."""
    from dataclasses import replace

    root, clips_file = _davis_root(tmp_path), tmp_path / "clips.json"
    args = ["interpolation", "--data", str(root), "--height", "16", "--width", "16", "--fvd", "off",
            "--clips", str(clips_file), "--num-grids", "0"]
    assert eval_main(args + ["--seed", "5", "--out", str(tmp_path / "a")]) == 0
    clips, protocol = bm.load_clips(clips_file)
    assert protocol.seed == 5
    assert bm.select_clips(root, replace(protocol, seed=6)) != clips  # seed 6 alone would pick other clips
    assert eval_main(args + ["--seed", "6", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "results.json").read_text() == (tmp_path / "b" / "results.json").read_text()
    assert bm.load_clips(tmp_path / "b" / "clips.json") == (clips, protocol)
    assert "repeat_nearest" in capsys.readouterr().out


def test_cli_baselines_default_per_task(tmp_path):
    """Interpolation scores the copy and the blend; image-to-video only the copy, since a blend of one given frame
    is that frame repeated (the same row twice); --baselines still chooses."""
    root = _davis_root(tmp_path)
    common = ["--data", str(root), "--height", "16", "--width", "16", "--fvd", "off", "--num-grids", "0",
              "--num-frames", "5", "--no-progress"]
    methods = {}
    for name, extra in (("interpolation", []), ("i2v", []), ("i2v_both", ["--baselines", "repeat_nearest",
                                                                           "linear_blend"])):
        assert eval_main([name.split("_")[0], *common, "--out", str(tmp_path / name), *extra]) == 0
        methods[name] = list(json.loads((tmp_path / name / "results.json").read_text())["methods"])
    assert methods == {"interpolation": ["repeat_nearest", "linear_blend"], "i2v": ["repeat_nearest"],
                       "i2v_both": ["repeat_nearest", "linear_blend"]}, methods


def test_fvd_folders_and_model_vs_reference(tmp_path, capsys):
    from PIL import Image

    def toy_extractor(videos):
        return videos.float().mean(dim=(3, 4)).flatten(1)

    a, b = tmp_path / "a", tmp_path / "b"
    for i in range(5):
        frames = _moving_frames(10, 16, 16, seed=i)
        write_video(a / f"{i}.mp4", frames)
        folder = b / f"v{i}"
        folder.mkdir(parents=True)
        for t, f in enumerate(frames):
            Image.fromarray(f).save(folder / f"{t:05d}.png")
    res = fvd_mod.fvd_folders(a, b, toy_extractor, num_frames=8, batch_size=2)
    # mp4 vs lossless, the same frames: measured 0.0029; the mp4 frames read in reverse give 0.027
    assert res["num_videos_a"] == res["num_videos_b"] == 5 and res["fvd"] < 0.01, res["fvd"]
    capsys.readouterr()
    same = fvd_mod.fvd_folders(b, b, toy_extractor, num_frames=8, progress=True)
    assert abs(same["fvd"]) < 1e-6
    bars = capsys.readouterr().err.replace("\r", "\n")
    assert bars.count(f"I3D features of {b}: 5 videos") == 2, bars  # one bar per folder, counting its videos
    with pytest.raises(ValueError, match=r"0 \(5 too short\)"):
        fvd_mod.fvd_folders(a, b, toy_extractor, num_frames=12)

    reference = torch.stack([to_model_frames(_moving_frames(9, 16, 16, seed=i)) for i in range(6)])
    mask = bm.ProtocolConfig(num_frames=9).mask()
    perfect = fvd_mod.fvd_model_vs_reference(lambda g, m: reference[: g.shape[0]] if g.shape[0] == 6 else None,
                                             reference, mask, toy_extractor, batch_size=6)
    assert abs(perfect) < 1e-6
    blend = fvd_mod.fvd_model_vs_reference(lambda g, m: torch.stack([bm.linear_blend(x, y) for x, y in zip(g, m)]),
                                           reference, mask, toy_extractor, batch_size=4)
    assert blend > 1e-4


def test_periodic_fvd_returns_metrics_and_caches_reference():
    torch.manual_seed(0)
    videos = torch.stack([to_model_frames(_moving_frames(9, 16, 16, seed=i)) for i in range(5)])
    calls = []

    def toy_extractor(v):
        calls.append(v.shape[0])
        return v.float().mean(dim=(3, 4)).flatten(1)

    def generate(given, mask):
        assert given.shape == videos[: given.shape[0]].shape and mask.dtype == torch.bool
        assert (given[mask] == 0).all()  # the frames to generate are hidden
        return torch.stack([bm.repeat_nearest(g, m) for g, m in zip(given, mask)])

    cache = {}
    m1 = fvd_mod.periodic_fvd(generate, videos, toy_extractor, batch_size=2, cache=cache)
    assert set(m1) == {f"val/{t}_{k}" for t in ("interpolation", "i2v") for k in ("psnr", "ssim", "fvd")}
    assert m1["val/interpolation_psnr"] > m1["val/i2v_psnr"]
    n_calls = len(calls)
    m2 = fvd_mod.periodic_fvd(generate, videos, toy_extractor, batch_size=2, cache=cache)
    assert m1 == m2 and len(calls) - n_calls < n_calls  # reference features were not recomputed
    no_fvd = fvd_mod.periodic_fvd(generate, videos, None, tasks=("interpolation",))
    assert set(no_fvd) == {"val/interpolation_psnr", "val/interpolation_ssim"}


def _tiny_export(path: Path, max_frames: int = 17) -> Path:
    """A random-weight tiny MarDini export (16x16, training window 17 > the protocol's 9 frames by default)."""
    import dataclasses

    from mardini.autoencoders import build_autoencoder
    from mardini.diffusion import Diffusion
    from mardini.diffusion.config import DiffusionConfig
    from mardini.inference.pipeline import MarDiniPipeline
    from mardini.models import MarDini, model_config

    torch.manual_seed(0)
    diffusion_cfg = DiffusionConfig(num_inference_steps=2)
    config = {"height": 16, "width": 16, "num_frames": max_frames, "diffusion": dataclasses.asdict(diffusion_cfg),
              "autoencoder": {"name": "identity", "patch_size": 2, "scale": 1.0, "shift": 0.0}}
    model = MarDini(model_config("tiny", latent_channels=12, max_frames=max_frames))
    pipe = MarDiniPipeline(model, Diffusion(diffusion_cfg),
                           build_autoencoder("identity", patch_size=2), config)
    return pipe.save_pretrained(path)


def test_cli_with_model_scores_model_and_baselines_alike(tmp_path, capsys):
    root = _davis_root(tmp_path)
    export = _tiny_export(tmp_path / "export")
    out = tmp_path / "model_run"
    assert eval_main(["interpolation", "--data", str(root), "--out", str(out), "--height", "16", "--width", "16",
                      "--max-clips", "2", "--fvd", "off", "--model", str(export), "--steps", "2",
                      "--num-grids", "1", "--device", "cpu"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["methods"]) == ["repeat_nearest", "linear_blend", "mardini"]
    model, blend = res["methods"]["mardini"], res["methods"]["linear_blend"]
    # the model is scored as the baselines are: run by hand on the written clips (given frames only, the rest
    # zeroed), it gives the same per-clip numbers; with random weights its PSNR is far below the blend's
    clips, protocol = bm.load_clips(out / "clips.json")
    method, mask = bm.PipelineMethod.from_pretrained(export, num_steps=2), protocol.mask()
    sources = {s.id: s for s in list_videos(root)}
    for clip in clips:
        gt = bm.load_clip(root, clip, protocol, sources)
        scores = masked_frame_metrics(method(gt.masked_fill(mask[:, None, None, None], 0), mask), gt, mask)
        for k in ("psnr", "ssim"):
            assert res["per_clip"][clip.name]["mardini"][k] == pytest.approx(float(np.mean(scores[k])), rel=1e-4)
    assert model["psnr"] < blend["psnr"] - 3, (model, blend)
    assert res["num_clips"] == 2 and all(set(v) == set(res["methods"]) for v in res["per_clip"].values())
    grid = read_frames(list_videos(out / "samples")[0])
    assert grid.shape[0] == 9  # ground truth | 3 methods, side by side, 9 frames (VIDIM-Bench clips)
    # a bar over the clips with each method's running PSNR (its last state: the results); --no-progress: none
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    last = [line for line in bar if "interpolation clips: 100%" in line][-1]
    assert "2/2" in last and f"mardini {model['psnr']:.2f} dB" in last and f"linear_blend {blend['psnr']:.2f} dB" \
        in last, last
    assert eval_main(["interpolation", "--data", str(root), "--out", str(tmp_path / "quiet"), "--height", "16",
                      "--width", "16", "--max-clips", "2", "--fvd", "off", "--num-grids", "0", "--no-progress"]) == 0
    assert "clips:" not in capsys.readouterr().err


def test_a_model_at_another_resolution_is_scored_without_distortion_and_keeps_the_given_frames():
    """A model that works at 8x8 evaluated on 16x32 clips: it is handed whole frames resized to its size (not the
    centre crop its pipeline would cut, which no resize back undoes: rows came back stretched 2x), its video comes
    back at the protocol's size, the given frames are returned exactly (as by every baseline), and the notes say so."""
    class CopyFirstFrame:  # a "model" at 8x8 that repeats the first given frame
        height, width = 8, 8

        def __call__(self, frames, num_frames, **kwargs):
            first = frames[min(frames)]
            assert first.shape[-2:] == (8, 8)
            return first.expand(num_frames, -1, -1, -1).clone()

    ramp = torch.linspace(-1, 1, 16)[:, None].expand(16, 32)  # rows from -1 to 1
    gt = ramp.expand(5, 3, 16, 32).clone()
    gt[4] = -gt[4]
    mask = torch.tensor([False, True, True, True, False])
    method = bm.PipelineMethod(CopyFirstFrame())
    out = method(gt.masked_fill(mask[:, None, None, None], 0), mask)
    assert out.shape == gt.shape and torch.equal(out[[0, 4]], gt[[0, 4]])
    rows, truth = out[2].mean(dim=(0, 2)), gt[0].mean(dim=(0, 2))
    assert (rows - truth).abs().max() < 0.15, (rows, truth)  # the ramp's rows where they were: no crop, no stretch
    assert "ran at its own 8x8" in method.note(16, 32) and "aspect changed" in method.note(16, 32)
    assert method.note(8, 8) is None


class ColourStats(torch.nn.Module):  # a cheap TorchScript stand-in for the I3D detector
    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        x = x.float()
        return torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4))], dim=1)


def _colour_stats_detector(folder: Path) -> Path:
    detector = folder / "i3d_torchscript.pt"
    detector.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(ColourStats()).save(str(detector))
    return detector


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cli_fvd_between_folders(tmp_path, monkeypatch, capsys):
    detector = _colour_stats_detector(tmp_path / "weights")
    a, b = tmp_path / "a", tmp_path / "b"
    for i in range(3):
        write_video(a / f"{i}.mp4", _moving_frames(16, 32, 32, seed=i))
        write_video(b / f"{i}.mp4", 255 - _moving_frames(16, 32, 32, seed=i))
    out = tmp_path / "fvd.json"
    monkeypatch.setenv("MARDINI_WEIGHTS", str(detector.parent))
    assert eval_main(["fvd", str(a), str(b), "--output", str(out), "--device", "cpu"]) == 0
    res = json.loads(out.read_text())
    assert res["num_videos_a"] == res["num_videos_b"] == 3
    assert res["i3d_weights"] == str(detector) and res["fvd_settings"] == "stylegan_v"
    # FVD of a set with itself is ~0 and grows as the second set drifts away
    noisy = tmp_path / "noisy"
    for i in range(3):
        frames = _moving_frames(16, 32, 32, seed=i).astype(np.int16)
        write_video(noisy / f"{i}.mp4", np.clip(frames + 40, 0, 255).astype(np.uint8))
    values = []
    for other in (a, noisy, b):
        assert eval_main(["fvd", str(a), str(other), "--output", str(out), "--device", "cpu"]) == 0
        values.append(json.loads(out.read_text())["fvd"])
    assert abs(values[0]) < 1e-6 * max(values) and values[0] < values[1] < values[2], values
    monkeypatch.setenv("MARDINI_WEIGHTS", str(tmp_path / "empty"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:  # a user error: one line, status 2
        eval_main(["fvd", str(a), str(b)])
    assert stopped.value.code == 2 and "no I3D weights" in capsys.readouterr().err


def _eval_error(argv: list[str], capsys) -> str:
    """Run mardini-eval expecting a user error: its status must be 2, its message one line (the hint after it)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        eval_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 2 and err[0].startswith("mardini-eval: error: "), err
    return err[0]


def test_cli_refuses_a_preset_or_clips_file_of_the_other_task(tmp_path, capsys):
    """The subcommand picks the baselines, a preset or clips file the protocol: `i2v --preset vidim` ran
    interpolation with the i2v baselines, `interpolation --clips <i2v clips>` ran i2v. Refused up front, naming
    the subcommand, the other task and the fix; nothing is written."""
    root, out = _davis_root(tmp_path), tmp_path / "out"
    common = ["--data", str(root), "--out", str(out), "--fvd", "off", "--num-grids", "0", "--no-progress"]
    err = _eval_error(["i2v", "--preset", "vidim", *common], capsys)
    assert "i2v: --preset vidim is an interpolation protocol" in err and "mardini-eval interpolation --preset " \
        "vidim" in err and "i2v_middle17" in err, err
    err = _eval_error(["interpolation", "--preset", "i2v_middle17", *common], capsys)
    assert "interpolation: --preset i2v_middle17 is an i2v protocol" in err and "mardini-eval i2v" in err, err
    proto = bm.ProtocolConfig(task="i2v", num_frames=5, height=16, width=16)
    clips = bm.save_clips(tmp_path / "i2v_clips.json", bm.select_clips(root, proto), proto, root)
    err = _eval_error(["interpolation", "--clips", str(clips), *common], capsys)
    assert f"interpolation: --clips {clips} holds i2v clips" in err and f"mardini-eval i2v --clips {clips}" in err
    assert not out.exists()
    assert eval_main(["i2v", "--clips", str(clips), *common]) == 0  # the same task: used
    assert json.loads((out / "results.json").read_text())["protocol"]["task"] == "i2v"


def test_psnr_of_exact_matches_is_capped_not_inf(tmp_path, capsys):
    """One identical frame (a static clip, a duplicated frame: common in UCF101) made a method's whole PSNR inf, in
    results and progress bar. Capped at PSNR_MAX_DB per frame, as the learning benchmark's per-clip PSNR is."""
    from mardini.evaluation.learning import clip_psnr

    x = torch.rand(2, 5, 3, 8, 8) * 1.4 - 0.8  # room for +0.2 inside [-1, 1]
    mask = torch.tensor([False, True, True, True, False])
    y = x.clone()
    y[1] += 0.2  # one clip off by 0.1 on [0, 1]: 20 dB; the other exact
    assert clip_psnr(x, x, mask).tolist() == [PSNR_MAX_DB] * 2
    assert psnr_frames(x[0, mask], y[0, mask]).tolist() == [PSNR_MAX_DB] * 3
    assert psnr_frames(x[1, mask], y[1, mask]).tolist() == pytest.approx([20.0] * 3)
    root = _davis_root(tmp_path, static=True)
    out = tmp_path / "out"
    assert eval_main(["interpolation", "--data", str(root), "--out", str(out), "--height", "16", "--width", "16",
                      "--num-frames", "5", "--fvd", "off", "--num-grids", "0", "--baselines", "repeat_nearest"]) == 0
    assert json.loads((out / "results.json").read_text())["methods"]["repeat_nearest"]["psnr"] == PSNR_MAX_DB
    bar = capsys.readouterr().err
    assert "repeat_nearest 200.00 dB" in bar and "inf" not in bar


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cli_lpips_asked_for_by_name_must_load(tmp_path, capsys):
    """--lpips FILE that does not load (missing, not weights) stops the run before any work, naming the reason; a
    file only found in --weights-dir is skipped and results.md gives the real reason; one that loads is used."""
    root, out = _davis_root(tmp_path), tmp_path / "out"
    common = ["interpolation", "--data", str(root), "--out", str(out), "--height", "16", "--width", "16",
              "--num-frames", "5", "--fvd", "off", "--num-grids", "0", "--no-progress"]
    err = _eval_error([*common, "--lpips", str(tmp_path / "nope.pt")], capsys)
    assert f"--lpips {tmp_path / 'nope.pt'}: LPIPS weights {tmp_path / 'nope.pt'} do not exist" in err, err
    junk = tmp_path / "weights" / "alex.pth"
    junk.parent.mkdir()
    junk.write_text("not weights")
    err = _eval_error([*common, "--lpips", str(junk)], capsys)
    assert f"--lpips {junk}: {junk} is " in err and "TorchScript" in err, err
    assert not out.exists()
    assert eval_main([*common, "--weights-dir", str(junk.parent)]) == 0  # found, not asked for: skipped
    note = (out / "results.md").read_text()
    assert f"LPIPS not computed ({junk} is " in note and "no local LPIPS weights" not in note, note

    class MeanAbs(torch.nn.Module):  # a TorchScript stand-in for LPIPS
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return (a - b).abs().mean(dim=(1, 2, 3))

    scripted = tmp_path / "lpips.pt"
    torch.jit.script(MeanAbs()).save(str(scripted))
    assert eval_main([*common, "--out", str(tmp_path / "with"), "--lpips", str(scripted)]) == 0
    assert json.loads((tmp_path / "with" / "results.json").read_text())["methods"]["linear_blend"]["lpips"] > 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cli_fvd_size_is_both_or_neither_and_recorded(tmp_path, capsys):
    """--height without --width was silently ignored (native size, not in the JSON): refused; the size used is
    recorded. --i3d-batch-size 0 and an undecodable video are refused naming the flag / the file."""
    weights = _colour_stats_detector(tmp_path / "weights").parent
    a, b = tmp_path / "a", tmp_path / "b"
    for i in range(2):
        write_video(a / f"{i}.mp4", _moving_frames(9, 32, 32, seed=i))
        write_video(b / f"{i}.mp4", _moving_frames(9, 32, 32, seed=i + 5))
    common = ["fvd", str(a), str(b), "--weights-dir", str(weights), "--num-frames", "9", "--device", "cpu",
              "--no-progress"]
    err = _eval_error([*common, "--height", "24"], capsys)
    assert "--height and --width resize together" in err and "only --height" in err, err
    with pytest.raises(ValueError, match="both height and width"):
        to_model_frames(_moving_frames(2, 16, 16, seed=0), height=4)
    for size, expected in (([], (None, None)), (["--height", "24", "--width", "16"], (24, 16))):
        assert eval_main([*common, *size, "--output", str(tmp_path / "fvd.json")]) == 0
        res = json.loads((tmp_path / "fvd.json").read_text())
        assert (res["height"], res["width"]) == expected, res
    assert "--i3d-batch-size 0: give at least 1" in _eval_error([*common, "--i3d-batch-size", "0"], capsys)
    (b / "bad.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    err = _eval_error(common, capsys)
    assert f"cannot decode the video {b / 'bad.mp4'}" in err and "remove it from the folder or re-encode it" in err


def test_cli_validates_before_making_the_output_folder(tmp_path, capsys):
    """A refused run leaves no empty --out folder: a missing --data, a root without videos, --steps 0 (named)."""
    out = tmp_path / "ev2"
    common = ["interpolation", "--out", str(out), "--fvd", "off", "--no-progress"]
    assert "--data /nope is not a folder" in _eval_error([*common, "--data", "/nope"], capsys)
    (tmp_path / "empty").mkdir()
    assert "no frame folders" in _eval_error([*common, "--data", str(tmp_path / "empty")], capsys)
    root = _davis_root(tmp_path)
    assert "--steps 0: the model's sampler needs at least 1 step" in _eval_error(
        [*common, "--data", str(root), "--steps", "0", "--model", str(tmp_path / "any")], capsys)
    assert not out.exists()


def test_cli_model_window_shorter_than_the_clips_says_to_shorten_them(tmp_path, capsys):
    """A model whose max_frames is below the clip length: the fix here is --num-frames, not long_video()."""
    root, export = _davis_root(tmp_path), _tiny_export(tmp_path / "export", max_frames=5)
    common = ["interpolation", "--data", str(root), "--out", str(tmp_path / "out"), "--height", "16", "--width",
              "16", "--fvd", "off", "--num-grids", "0", "--no-progress", "--model", str(export), "--steps", "1"]
    err = _eval_error(common, capsys)
    assert "at most 5 frames (its max_frames), but the interpolation clips have 9: pass --num-frames <= 5" in err
    assert "long_video" not in err and not (tmp_path / "out").exists()
    assert eval_main([*common, "--num-frames", "5", "--max-clips", "1"]) == 0


def test_eval_config_rejects_unknown_keys():
    from mardini.evaluation.config import EvalConfig

    cfg = EvalConfig.from_any({"weights_dir": "/w", "fvd_every": 500, "tasks": ["i2v"]})
    assert cfg.weights_dir == "/w" and cfg.tasks == ("i2v",)
    with pytest.raises(ValueError, match="weight_dir"):
        EvalConfig.from_any({"weight_dir": "/w"})
    with pytest.raises(ValueError, match="fvd_num_videos"):
        EvalConfig.from_any({"fvd_num_videos": 0})
