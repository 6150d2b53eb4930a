"""The diffusers KL autoencoder wrappers, on tiny random-weight VAEs saved to and loaded from a folder."""

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLCogVideoX

from mardini.autoencoders import AUTOENCODERS, KLAutoencoder, VideoAutoencoder, VideoKLAutoencoder, build_autoencoder
from mardini.autoencoders.kl import latent_properties, read_vae_config

TINY_KL = dict(
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    norm_num_groups=8,
    layers_per_block=1,
    scaling_factor=0.5,
    shift_factor=0.1,
)
TINY_COGVIDEOX = dict(
    block_out_channels=(16, 16, 16),
    down_block_types=("CogVideoXDownBlock3D",) * 3,
    up_block_types=("CogVideoXUpBlock3D",) * 3,
    latent_channels=4,
    norm_num_groups=8,
    layers_per_block=1,
    temporal_compression_ratio=4,
)


@pytest.fixture(scope="module")
def saved_kl(tmp_path_factory):
    """A tiny AutoencoderKL saved like a pipeline's VAE: <root>/vae/{config.json, *.safetensors}."""
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_KL).eval()
    root = tmp_path_factory.mktemp("pipeline")
    vae.save_pretrained(root / "vae")
    return root, vae


def video(b=2, t=3, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, t, 3, h, w, generator=g) * 2 - 1


def test_a_vae_folder_that_is_not_here_fails_in_one_line_without_a_hub_lookup(saved_kl, tmp_path, monkeypatch):
    """A path that is not a local VAE folder (moved, mistyped, or a hub id) used to reach diffusers, which asked the
    Hugging Face hub for it and failed with a message about the internet connection."""
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    root, _ = saved_kl
    (tmp_path / "empty").mkdir()
    for pretrained, subfolder, message in ((tmp_path / "gone", "", "does not exist"),
                                           (tmp_path / "empty", "", "holds no config.json"),
                                           (root, "unet", "does not exist"),
                                           ("stabilityai/sd-vae-ft-mse", "", "does not exist")):
        with pytest.raises(FileNotFoundError, match=f"VAE folder .* {message}: give the local folder of a diffusers "
                                                    f"VAE"):
            build_autoencoder("kl", pretrained=str(pretrained), subfolder=subfolder)
    assert build_autoencoder("kl", pretrained=str(root / "vae")).latent_channels == 4  # its own folder, no subfolder


def test_registered():
    assert AUTOENCODERS["kl"] is KLAutoencoder and AUTOENCODERS["kl_video"] is VideoKLAutoencoder


def test_load_from_folder_with_subfolder_shapes_and_normalisation(saved_kl):
    root, raw = saved_kl
    ae = build_autoencoder("kl", pretrained=str(root), subfolder="vae")
    assert isinstance(ae, VideoAutoencoder)
    assert (ae.latent_channels, ae.spatial_compression, ae.temporal_compression) == (4, 2, 1)
    assert (ae.scaling_factor, ae.shift_factor) == (0.5, 0.1)  # from the VAE config
    assert not any(p.requires_grad for p in ae.parameters()) and not ae.vae.training
    x = video()
    with torch.no_grad():
        z = ae.encode(x)
        assert z.shape == (2, 3, 4, 8, 8) and z.shape[1:] == ae.latent_shape(3, 16, 16)
        frames = x.flatten(0, 1)
        expected = (raw.encode(frames).latent_dist.mean - 0.1) * 0.5  # the posterior mean, shifted and scaled
        torch.testing.assert_close(z.flatten(0, 1), expected, rtol=1e-4, atol=1e-5)
        decoded = ae.decode(z)
        assert decoded.shape == x.shape and decoded.abs().max() <= 1
        torch.testing.assert_close(decoded.flatten(0, 1), raw.decode(z.flatten(0, 1) / 0.5 + 0.1).sample.clamp(-1, 1),
                                   rtol=1e-4, atol=1e-5)


def test_overrides_and_config_construction(saved_kl):
    root, raw = saved_kl
    ae = KLAutoencoder(str(root), subfolder="vae", scaling_factor=2.0, shift_factor=0.0)
    x = video(b=1)
    with torch.no_grad():
        torch.testing.assert_close(ae.encode(x)[0], raw.encode(x[0]).latent_dist.mean * 2.0, rtol=1e-4, atol=1e-5)
    # from a config dict: random weights, seeded, the caller's RNG untouched
    state = torch.random.get_rng_state()
    a, b = KLAutoencoder(config=TINY_KL, seed=3), KLAutoencoder(config=TINY_KL, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert a.describe()["vae_config"]["latent_channels"] == 4 and a.describe()["pretrained"] == ""
    with pytest.raises(ValueError, match="exactly one"):
        KLAutoencoder()
    # config.json alone tells the latent size (for start-up checks)
    props = latent_properties(read_vae_config(str(root), "vae"))
    assert props == {"latent_channels": 4, "spatial_compression": 2, "temporal_compression": 1}


def test_chunked_equals_unchunked(saved_kl):
    root, _ = saved_kl
    whole = KLAutoencoder(str(root), subfolder="vae", frames_per_chunk=None)
    chunked = KLAutoencoder(str(root), subfolder="vae", frames_per_chunk=2)
    x = video(b=2, t=3)  # 6 frames: chunks of 2, 2, 2
    calls = []
    chunked.vae.register_forward_pre_hook(lambda m, a: calls.append(1))
    with torch.no_grad():
        z_whole, z_chunked = whole.encode(x), chunked.encode(x)
        torch.testing.assert_close(z_chunked, z_whole, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(chunked.decode(z_whole), whole.decode(z_whole), rtol=1e-4, atol=1e-5)
    encoder_calls = []
    chunked.vae.encoder.register_forward_pre_hook(lambda m, a: encoder_calls.append(a[0].shape[0]))
    with torch.no_grad():
        chunked.encode(x)
    assert encoder_calls == [2, 2, 2]


def test_sampled_posterior_is_reproducible(saved_kl):
    root, _ = saved_kl
    ae = KLAutoencoder(str(root), subfolder="vae", sample_posterior=True, frames_per_chunk=None)
    mean = KLAutoencoder(str(root), subfolder="vae")
    x = video(b=1)
    with torch.no_grad():
        ae.generator = torch.Generator().manual_seed(0)
        a = ae.encode(x)
        ae.generator = torch.Generator().manual_seed(0)
        b = ae.encode(x)
        assert torch.equal(a, b) and not torch.allclose(a, mean.encode(x))


def test_video_vae_temporal_compression(tmp_path):
    torch.manual_seed(0)
    raw = AutoencoderKLCogVideoX(**TINY_COGVIDEOX).eval()
    raw.save_pretrained(tmp_path / "vae")
    ae = build_autoencoder("kl_video", pretrained=str(tmp_path), subfolder="vae", frames_per_chunk=1)
    assert (ae.latent_channels, ae.spatial_compression, ae.temporal_compression) == (4, 4, 4)
    assert ae.scaling_factor == pytest.approx(1.15258426) and ae.shift_factor == 0.0
    assert ae.latent_shape(9, 16, 16) == (3, 4, 4, 4)
    x = video(b=2, t=9, h=16, w=16)
    with torch.no_grad():
        z = ae.encode(x)  # one video per VAE call
        assert z.shape == (2, 3, 4, 4, 4)
        for i in range(2):
            expected = raw.encode(x[i : i + 1].permute(0, 2, 1, 3, 4)).latent_dist.mean * ae.scaling_factor
            torch.testing.assert_close(z[i : i + 1], expected.permute(0, 2, 1, 3, 4), rtol=1e-4, atol=1e-5)
        out = ae.decode(z[1:])
        assert out.shape == x[:1].shape and out.abs().max() <= 1
        expected = raw.decode(z[1:].permute(0, 2, 1, 3, 4) / ae.scaling_factor).sample.clamp(-1, 1)
        torch.testing.assert_close(out, expected.permute(0, 2, 1, 3, 4), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="1 \\+ 4\\*k"):
        ae.encode(video(b=1, t=8))


def test_kwargs_from_run_config(saved_kl):
    from omegaconf import OmegaConf

    from mardini.autoencoders.kl import kl_kwargs_from_config

    root, _ = saved_kl
    node = OmegaConf.create({"name": "kl", "pretrained": str(root), "subfolder": "vae", "scaling_factor": None,
                             "shift_factor": 0.0, "frames_per_chunk": 0, "dtype": "float32"})
    ae = build_autoencoder(node.name, **kl_kwargs_from_config(node))
    assert ae.scaling_factor == 0.5 and ae.shift_factor == 0.0 and ae.frames_per_chunk is None
    with pytest.raises(ValueError, match="autoencoder.pretrained"):
        kl_kwargs_from_config({"name": "kl"})


@pytest.mark.parametrize("lowres_mode", ["latents", "pixels"])
def test_encode_given_encodes_only_the_given_frames(saved_kl, lowres_mode):
    """Inference inputs: each row's given frames encoded (and nothing else), the generated frames' latents zero,
    equal to encoding the whole clips and zeroing the generated frames."""
    from mardini.data.latent_cache import encode_given, encode_hi_lo

    root, _ = saved_kl
    ae = KLAutoencoder(str(root), subfolder="vae")
    x = video(b=2, t=4)
    mask = torch.tensor([[False, True, True, False], [True, False, True, True]])  # 2 + 1 frames given
    frames_seen = []
    ae.vae.encoder.register_forward_pre_hook(lambda m, a: frames_seen.append(len(a[0])))
    with torch.no_grad():
        z, z_lo = encode_given(ae, x, mask, lowres_factor=2, lowres_mode=lowres_mode)
        assert sum(frames_seen) == 3 * (2 if lowres_mode == "pixels" else 1)
        whole, whole_lo = encode_hi_lo(ae, x, lowres_factor=2, lowres_mode=lowres_mode)
    keep = ~mask[:, :, None, None, None]
    torch.testing.assert_close(z, whole * keep, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z_lo, whole_lo * keep, rtol=1e-4, atol=1e-5)


def test_a_run_records_the_vae_folder_absolute_so_its_export_samples_from_anywhere(saved_kl, tmp_path, monkeypatch):
    """Trained with a VAE folder relative to the working directory, the export still finds its VAE when it is
    loaded from another directory: the run records the folder as an absolute path."""
    import json
    import os
    import shutil

    from helpers_training import tiny_config
    from mardini.inference import MarDiniPipeline
    from mardini.training.trainer import Trainer

    root, _ = saved_kl
    shutil.copytree(root, tmp_path / "sd")
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path / "run", max_steps=1)
    cfg.autoencoder.update(name="kl", pretrained="sd", subfolder="vae", dtype="float32")
    cfg.model.latent_channels = 4
    Trainer(cfg).fit()
    recorded = json.loads((tmp_path / "run" / "export" / "config.json").read_text())["autoencoder"]["pretrained"]
    assert recorded == str(tmp_path / "sd"), recorded
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert not os.path.exists("sd")
    pipe = MarDiniPipeline.from_pretrained(tmp_path / "run" / "export")
    assert pipe.autoencoder.latent_channels == 4
