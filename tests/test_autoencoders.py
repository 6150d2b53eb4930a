"""The autoencoder interface, through the identity autoencoder."""

import pytest
import torch

from mardini.models import lowres_from_hires as lowres_latents

from mardini.autoencoders import (
    IdentityAutoencoder,
    VideoAutoencoder,
    build_autoencoder,
)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_identity_round_trip_and_shapes(p):
    ae = IdentityAutoencoder(patch_size=p, scale=0.7, shift=0.1)
    assert isinstance(ae, VideoAutoencoder)
    assert ae.latent_channels == 3 * p * p and ae.spatial_compression == p
    video = torch.rand(2, 5, 3, 16, 24) * 2 - 1
    z = ae.encode(video)
    assert z.shape == (2, 5, 3 * p * p, 16 // p, 24 // p)
    assert z.shape[2:] == ae.latent_shape(5, 16, 24)[1:]
    torch.testing.assert_close(ae.decode(z), video)


def test_identity_applies_shift_then_scale():
    ae = IdentityAutoencoder(patch_size=1, scale=2.0, shift=0.5)
    video = torch.rand(1, 2, 3, 4, 4) * 2 - 1
    torch.testing.assert_close(ae.encode(video), (video - 0.5) * 2.0)


def test_patching_is_space_to_depth():
    ae = IdentityAutoencoder(patch_size=2)
    video = torch.arange(3 * 4 * 4, dtype=torch.float32).reshape(1, 1, 3, 4, 4)
    z = ae.encode(video)
    # channel (c, p1, p2) of latent cell (i, j) is pixel (c, 2i + p1, 2j + p2)
    assert z[0, 0, 0 * 4 + 1 * 2 + 0, 1, 0] == video[0, 0, 0, 3, 0]
    assert z[0, 0, 2 * 4 + 0 * 2 + 1, 0, 1] == video[0, 0, 2, 0, 3]


def test_decode_clamps_and_chunking_matches():
    ae = IdentityAutoencoder(patch_size=2, frames_per_chunk=3)
    video = torch.rand(2, 5, 3, 8, 8) * 2 - 1
    torch.testing.assert_close(ae.encode(video), IdentityAutoencoder(patch_size=2).encode(video))
    out = ae.decode(ae.encode(video) * 3)
    assert out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(out, (video * 3).clamp(-1, 1))  # each chunk decoded in place, then clamped


def test_encode_rejects_indivisible_size():
    with pytest.raises(ValueError, match="divisible"):
        IdentityAutoencoder(patch_size=4).encode(torch.zeros(1, 2, 3, 10, 8))
    with pytest.raises(ValueError, match=r"\[B, T, C, H, W\]"):
        IdentityAutoencoder().encode(torch.zeros(2, 3, 8, 8))


def test_lowres_latents_is_cell_mean():
    z = torch.randn(2, 3, 4, 6, 8)
    low = lowres_latents(z, 2)
    assert low.shape == (2, 3, 4, 3, 4)
    expected = (z[..., 2, 4] + z[..., 2, 5] + z[..., 3, 4] + z[..., 3, 5]) / 4  # cell (1, 2)
    torch.testing.assert_close(low[..., 1, 2], expected)
    assert lowres_latents(z, 1) is z


@pytest.mark.parametrize("factor", [0, -2, 4, 5, 1.5])
def test_lowres_latents_bad_factor(factor):
    with pytest.raises(ValueError, match="factor"):
        lowres_latents(torch.zeros(1, 2, 3, 6, 8), factor)


def test_build_autoencoder():
    ae = build_autoencoder("identity", patch_size=2, scale=0.5)
    assert isinstance(ae, IdentityAutoencoder) and ae.patch_size == 2 and ae.scaling_factor == 0.5
    with pytest.raises(ValueError, match="identity"):
        build_autoencoder("nope")
