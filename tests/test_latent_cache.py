"""The latent cache: equals on-the-fly encoding, resumes after an interruption, loads deterministically."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from torch.utils.data import DataLoader

from mardini.autoencoders import IdentityAutoencoder, KLAutoencoder, build_autoencoder
from mardini.data.counter_videos import write_test_video
from mardini.data.latent_cache import (
    CachedLatentDataset,
    LatentCacheWriter,
    build_latent_cache,
    encode_hi_lo,
    read_cache_meta,
    shard_name,
)
from mardini.data.synthetic import SyntheticVideoConfig, SyntheticVideoDataset
from mardini.data.transforms import lowres_pixels
from mardini.data.video import VideoDataConfig, VideoDataset
from mardini.models.mardini import lowres_from_hires

ROOT = Path(__file__).resolve().parent.parent
TINY_KL = dict(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, layers_per_block=1,
               scaling_factor=0.7, shift_factor=0.05)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    for k, (name, n, fps) in enumerate([("a.mp4", 40, 30), ("b.webm", 30, 24), ("c.mp4", 50, 25), ("d.mkv", 36, 30),
                                         ("e.mp4", 30, 30)]):
        write_test_video(root / name, num_frames=n, fps=fps, height=40 + 8 * k, width=56)
    (root / "broken.mp4").write_bytes(b"not a video")  # replaced deterministically, recorded as skipped
    return root


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("vae")
    AutoencoderKL(**TINY_KL).save_pretrained(root)
    return root


def dataset(folder) -> VideoDataset:
    return VideoDataset(VideoDataConfig(root=str(folder), num_frames=3, height=16, width=16, fps=10, crop="random",
                                        max_failure_fraction=1.0))


@pytest.mark.parametrize("lowres_mode", ["latents", "pixels"])
def test_cache_equals_on_the_fly_encoding(folder, vae_dir, tmp_path, lowres_mode):
    ds, ae = dataset(folder), KLAutoencoder(str(vae_dir))
    meta = build_latent_cache(tmp_path / "cache", ds, ae, lowres_factor=2, lowres_mode=lowres_mode, shard_size=4,
                              dtype="float32", batch_size=3, progress=False)
    assert meta["complete"] and meta["num_shards"] == 2 and meta["shapes"] == {"z_hi": [3, 4, 8, 8],
                                                                                 "z_lo": [3, 4, 4, 4]}
    assert meta["autoencoder"]["scaling_factor"] == 0.7 and meta["dataset"]["config"]["num_frames"] == 3
    cached = CachedLatentDataset(tmp_path / "cache")
    assert len(cached) == len(ds) == 6
    batch = next(iter(DataLoader(cached, batch_size=6)))
    video = torch.stack([ds[i]["video"] for i in range(6)])
    with torch.no_grad():
        z_hi = ae.encode(video)
        z_lo = lowres_from_hires(z_hi, 2) if lowres_mode == "latents" else ae.encode(lowres_pixels(video, 2))
    torch.testing.assert_close(batch["z_hi"], z_hi, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batch["z_lo"], z_lo, rtol=1e-4, atol=1e-5)
    assert batch["index"].tolist() == list(range(6))
    # what was cached, per item: source file, clip start, frames
    for i in range(6):
        info, item = cached.sample_metadata(i), ds[i]
        assert info["path"] == item["path"] and info["frame_indices"] == item["frame_indices"].tolist()
        assert info["clip_start"] == pytest.approx(item["clip_start"])
    broken = [i for i in range(6) if cached.sample_metadata(i)["skipped"]]
    assert len(broken) >= 1 and all(cached.sample_metadata(i)["skipped"].endswith("broken.mp4") for i in broken)


def test_interrupted_run_resumes_and_completes(folder, tmp_path):
    ds, ae = dataset(folder), IdentityAutoencoder(patch_size=2)
    root = tmp_path / "cache"
    writer = LatentCacheWriter(root, ds, ae, lowres_factor=2, shard_size=2, dtype="float32")
    writer.write_meta()
    assert writer.run(max_shards=1, progress=False) == [0]  # "killed" after one shard
    with pytest.raises(RuntimeError, match="incomplete"):
        CachedLatentDataset(root)
    with pytest.raises(RuntimeError, match="missing"):
        writer.finalize()
    assert writer.run(progress=False) == [1, 2]  # a rerun writes only what is missing
    writer.finalize()
    reference = [CachedLatentDataset(root)[i]["z_hi"] for i in range(len(ds))]

    # a lost shard, a half-written temporary file and a truncated shard: the rerun redoes exactly those
    (root / shard_name(1)).unlink()
    (root / f".{shard_name(1)}.deadbeef.tmp").write_bytes(b"half")
    data = (root / shard_name(2)).read_bytes()
    (root / shard_name(2)).write_bytes(data[: len(data) // 2])
    writer = LatentCacheWriter(root, ds, ae, lowres_factor=2, shard_size=2, dtype="float32")
    writer.write_meta()  # settings match: accepted
    assert writer.run(progress=False) == [1, 2]
    writer.finalize()
    assert not list(root.glob(".*.tmp"))
    again = CachedLatentDataset(root)
    for i in range(len(ds)):
        assert torch.equal(again[i]["z_hi"], reference[i])
    # other settings into the same folder are refused, naming the difference
    with pytest.raises(ValueError, match="lowres_factor"):
        LatentCacheWriter(root, ds, ae, lowres_factor=4, shard_size=2, dtype="float32").write_meta()


@pytest.mark.timeout(120)
def test_a_file_that_never_opens_stops_the_writer_naming_it_and_keeps_the_shards_written(tmp_path):
    """A file whose opening never returns (a named pipe with no writer, as a hung network file system) held the
    cache writer forever in its decoding worker. Now the batch's wait ends after the timeout with a LatentCacheError
    naming the file, and the shards written before it stay complete."""
    from mardini.data.latent_cache import LatentCacheError

    videos = tmp_path / "videos"
    for name in ("a.mp4", "b.mp4", "c.mp4", "d.mp4"):
        write_test_video(videos / name, num_frames=12, fps=10, height=16, width=16)
    os.mkfifo(videos / "z_stuck.mp4")  # the folder is read in name order: the third shard's first item
    ds = VideoDataset(VideoDataConfig(root=str(videos), num_frames=3, height=16, width=16, fps=10))
    assert ds.manifest[4].path.endswith("z_stuck.mp4")
    writer = LatentCacheWriter(tmp_path / "cache", ds, IdentityAutoencoder(patch_size=2), lowres_factor=2,
                               shard_size=2, dtype="float32")
    writer.write_meta()
    with pytest.raises(LatentCacheError, match=r"no batch from the decoding workers in 3 s \(the files .*"
                                               r"z_stuck\.mp4\).*2 shard\(s\) written by this run stay"):
        writer.run(batch_size=2, num_workers=1, progress=False, timeout=3)
    assert [writer.shard_complete(k) for k in range(3)] == [True, True, False]


def test_multi_process_split_and_workers_deterministic(tmp_path):
    ds = SyntheticVideoDataset(SyntheticVideoConfig(num_videos=10, num_frames=3, height=8, width=8))
    ae = IdentityAutoencoder(patch_size=2)
    root = tmp_path / "cache"
    writers = [LatentCacheWriter(root, ds, ae, lowres_factor=2, shard_size=3, dtype="float16") for _ in range(2)]
    writers[0].write_meta()
    assert writers[0].run(rank=0, world_size=2, progress=False) == [0, 2]  # shards k = rank mod world size
    assert writers[1].run(rank=1, world_size=2, progress=False) == [1, 3]
    writers[0].finalize()
    cached = CachedLatentDataset(root)
    a = torch.cat([b["z_hi"] for b in DataLoader(cached, batch_size=4, num_workers=0)])
    b = torch.cat([b["z_hi"] for b in DataLoader(cached, batch_size=4, num_workers=2)])
    assert torch.equal(a, b) and a.dtype == torch.float32
    expected = torch.stack([ds[i]["video"] for i in range(10)])
    z_hi, z_lo = encode_hi_lo(ae, expected, 2)
    torch.testing.assert_close(a, z_hi.half().float())  # stored as float16
    torch.testing.assert_close(cached[7]["z_lo"], z_lo[7].half().float())
    assert CachedLatentDataset(root, dtype=None)[7]["z_hi"].dtype == torch.float16  # the storage dtype
    cached.check_compatible(ae, lowres_factor=2)
    with pytest.raises(ValueError, match="latent_channels"):
        cached.check_compatible(IdentityAutoencoder(patch_size=4))


def test_cache_latents_script(folder, vae_dir, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import cache_latents
    finally:
        sys.path.pop(0)
    out = tmp_path / "cache"
    args = [str(folder), str(out), "--autoencoder", "kl", "--pretrained", str(vae_dir), "--num-frames", "3",
            "--height", "16", "--width", "16", "--fps", "10", "--shard-size", "4", "--batch-size", "2",
            "--num-workers", "0", "--dtype", "float32", "--max-failure-fraction", "1", "--cpu", "--quiet"]
    assert cache_latents.main(args + ["--max-shards", "1"]) is None  # stopped early: not complete yet
    meta = cache_latents.main(args)
    assert meta["complete"] and read_cache_meta(out)["num_items"] == 6
    assert json.loads((out / "cache.json").read_text())["extra"]["source"] == str(folder)
    cached = CachedLatentDataset(out)
    ae = KLAutoencoder(str(vae_dir))
    cached.check_compatible(ae, lowres_factor=2)
    assert cached[5]["z_hi"].shape == (3, 4, 8, 8) and cached[5]["z_lo"].shape == (3, 4, 4, 4)
    # the clips the command line asked for (the script's defaults for the rest), encoded as on the fly
    ds = VideoDataset(VideoDataConfig(root=str(folder), num_frames=3, height=16, width=16, fps=10,
                                      max_failure_fraction=1.0))
    with torch.no_grad():
        z_hi, z_lo = encode_hi_lo(ae, torch.stack([ds[i]["video"] for i in range(6)]), 2)
    batch = next(iter(DataLoader(cached, batch_size=6)))
    torch.testing.assert_close(batch["z_hi"], z_hi, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batch["z_lo"], z_lo, rtol=1e-4, atol=1e-5)


def test_a_cache_records_its_vae_folder_absolute(folder, vae_dir, tmp_path, monkeypatch):
    """Made with a VAE folder relative to the working directory, the cache records it absolute, so that a run started
    elsewhere (which records its own folder absolute) matches it; a cache of an older version, recorded relative,
    is read relative to the working directory."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import cache_latents
    finally:
        sys.path.pop(0)
    monkeypatch.chdir(vae_dir.parent)
    out = tmp_path / "cache"
    cache_latents.main([str(folder), str(out), "--autoencoder", "kl", "--pretrained", vae_dir.name, "--num-frames",
                        "3", "--height", "16", "--width", "16", "--num-videos", "2", "--num-workers", "0", "--dtype",
                        "float32", "--max-failure-fraction", "1", "--cpu", "--quiet"])
    assert read_cache_meta(out)["autoencoder"]["pretrained"] == str(vae_dir)
    monkeypatch.chdir(tmp_path)
    CachedLatentDataset(out).check_compatible(KLAutoencoder(str(vae_dir)), lowres_factor=2)
    meta = json.loads((out / "cache.json").read_text())
    meta["autoencoder"]["pretrained"] = os.path.relpath(vae_dir)  # as older versions wrote it
    (out / "cache.json").write_text(json.dumps(meta))
    CachedLatentDataset(out).check_compatible(KLAutoencoder(str(vae_dir)), lowres_factor=2)
    shutil.copytree(vae_dir, tmp_path / "other")  # the same VAE in another folder: named, as before
    with pytest.raises(ValueError, match="pretrained: cached"):
        CachedLatentDataset(out).check_compatible(KLAutoencoder(str(tmp_path / "other")), lowres_factor=2)


def test_caches_made_from_relative_sources_in_other_folders_share_files_detected(folder, tmp_path, monkeypatch):
    """A relative source (folder or manifest) is recorded absolute, root and clips: a validation cache made from
    another working directory that holds clips of a training file is refused (the paths were recorded as given and
    compared relative to the reader's working directory, so the leak went unseen)."""
    from mardini.data.latent_cache import split_cache
    from mardini.data.manifest import write_manifest

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import cache_latents
    finally:
        sys.path.pop(0)
    common = ["--autoencoder", "identity", "--num-frames", "3", "--height", "16", "--width", "16", "--num-videos",
              "2", "--num-workers", "0", "--dtype", "float32", "--max-failure-fraction", "1", "--cpu", "--quiet"]
    monkeypatch.chdir(folder.parent)
    cache_latents.main([folder.name, str(tmp_path / "train"), *common])
    write_manifest(folder / "val.csv", [{"path": "a.mp4"}])  # relative to the manifest's folder
    monkeypatch.chdir(folder)
    try:
        cache_latents.main(["val.csv", str(tmp_path / "val"), *common])
    finally:
        (folder / "val.csv").unlink()
    assert read_cache_meta(tmp_path / "train")["dataset"]["config"]["root"] == str(folder)
    assert read_cache_meta(tmp_path / "val")["extra"]["source"] == str(folder / "val.csv")
    monkeypatch.chdir(tmp_path)
    assert CachedLatentDataset(tmp_path / "val").source_paths() == [str(folder / "a.mp4")]
    with pytest.raises(ValueError, match=r"shares 1 source files with data\.cache_dir"):
        split_cache(tmp_path / "train", 0.05, tmp_path / "val")


def test_an_old_unfinished_cache_of_a_relative_source_is_finished_from_there(folder, tmp_path, monkeypatch):
    """A cache begun by an older version recorded its source (and root) as given, relative; the script now records
    them absolute, and finishing such a cache with the same relative source was refused (absolute != relative). The
    recorded relative paths are read relative to the working directory: the same folder is accepted, another one is
    still refused by name."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import cache_latents
    finally:
        sys.path.pop(0)
    out = tmp_path / "cache"
    common = ["--autoencoder", "identity", "--num-frames", "3", "--height", "16", "--width", "16", "--num-videos",
              "2", "--shard-size", "1", "--num-workers", "0", "--dtype", "float32", "--max-failure-fraction", "1",
              "--cpu", "--quiet"]
    monkeypatch.chdir(folder.parent)
    assert cache_latents.main([folder.name, str(out), *common, "--max-shards", "1"]) is None  # stopped part-way
    meta = json.loads((out / "cache.json").read_text())
    meta["extra"]["source"] = meta["dataset"]["config"]["root"] = folder.name  # as an older version wrote them
    (out / "cache.json").write_text(json.dumps(meta))
    other = tmp_path / "other_videos"
    shutil.copytree(folder, other)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"other settings \(.*extra\.source: cached "):
        cache_latents.main([other.name, str(out), *common])
    monkeypatch.chdir(folder.parent)
    meta = cache_latents.main([folder.name, str(out), *common])
    assert meta["complete"] and meta["num_items"] == 2


def test_the_writer_records_paths_absolute(folder, tmp_path, monkeypatch):
    """LatentCacheWriter itself (not only scripts/cache_latents.py) records a relative source, the dataset's root
    and each clip's file absolute: a cache made through the Python API from a relative folder is read, compared and
    completed alike from another working directory."""
    monkeypatch.chdir(folder.parent)
    ds = VideoDataset(VideoDataConfig(root=folder.name, num_videos=2, num_frames=3, height=16, width=16,
                                      max_failure_fraction=1.0))
    out = tmp_path / "cache"
    writer = LatentCacheWriter(out, ds, IdentityAutoencoder(patch_size=2), shard_size=1, dtype="float32",
                               extra={"source": folder.name})
    writer.write_meta()
    writer.run(max_shards=1, progress=False)
    meta = read_cache_meta(out)
    assert meta["extra"]["source"] == meta["dataset"]["config"]["root"] == str(folder)
    monkeypatch.chdir(tmp_path)  # the same settings given absolute, from elsewhere: accepted, and completed
    same = VideoDataset(VideoDataConfig(root=str(folder), num_videos=2, num_frames=3, height=16, width=16,
                                        max_failure_fraction=1.0))
    writer = LatentCacheWriter(out, same, IdentityAutoencoder(patch_size=2), shard_size=1, dtype="float32",
                               extra={"source": str(folder)})
    writer.write_meta()
    assert writer.run(progress=False) == [1]
    writer.finalize()
    files = CachedLatentDataset(out).source_paths()
    assert len(files) == 2 and all(os.path.isabs(f) and os.path.dirname(f) == str(folder) for f in files), files


def test_cache_latents_script_builds_the_identity_autoencoder_a_run_configures(folder, tmp_path):
    """--scaling-factor / --shift-factor set the identity autoencoder's scale and shift (they were ignored, so no
    cache matched an identity config other than scale 1, shift 0), and a mismatch names the run's keys to set."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import cache_latents
    finally:
        sys.path.pop(0)
    out = tmp_path / "identity"
    cache_latents.main([str(folder), str(out), "--autoencoder", "identity", "--scaling-factor", "3.5",
                        "--shift-factor", "-0.38", "--num-frames", "3", "--height", "16", "--width", "16", "--fps",
                        "10", "--num-workers", "0", "--dtype", "float32", "--max-failure-fraction", "1", "--cpu",
                        "--quiet"])
    cached = CachedLatentDataset(out)
    cached.check_compatible(build_autoencoder("identity", patch_size=2, scale=3.5, shift=-0.38), lowres_factor=2)
    with pytest.raises(ValueError, match=r"scaling_factor: cached 3.5 != 1.0.*autoencoder\.scale / "
                                         r"autoencoder\.shift for the identity autoencoder"):
        cached.check_compatible(build_autoencoder("identity", patch_size=2), lowres_factor=2)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    """A complete cache of 4 synthetic clips in 2 shards, to be copied and damaged."""
    root = tmp_path_factory.mktemp("small") / "cache"
    ds = SyntheticVideoDataset(SyntheticVideoConfig(num_videos=4, num_frames=3, height=8, width=8))
    build_latent_cache(root, ds, IdentityAutoencoder(patch_size=2), shard_size=2, dtype="float32", progress=False)
    return root


def _set_meta(root, **values):
    meta = json.loads((root / "cache.json").read_text())
    (root / "cache.json").write_text(json.dumps({**meta, **values}))


@pytest.mark.parametrize("damage, named", [
    ("incomplete", r"cache is incomplete .*: run scripts/cache_latents.py again with the same arguments"),
    ("version", r"cache has version 0; this version of mardini reads version 1"),
    ("truncated shard", rf"cache: {shard_name(1)} cannot be read \(.*\): run scripts/cache_latents.py again"),
    ("missing shard", rf"cache: {shard_name(1)} is missing \(run scripts/cache_latents.py again"),
    ("bad cache.json", r"cache/cache.json is not valid JSON"),
])
def test_a_cache_that_cannot_be_trained_from_is_a_one_line_user_error(small_cache, tmp_path, capsys, damage, named):
    """mardini-train prints such a cache as one line (status 2) naming the cache, the file and what to run: an
    incomplete cache, one of another version and a truncated shard ended in a traceback (status 1), and a damaged
    cache.json in a JSON parser's message naming no file."""
    from mardini.cli import user_errors
    from mardini.data.latent_cache import split_cache

    root = tmp_path / "cache"
    shutil.copytree(small_cache, root)
    if damage == "incomplete":
        _set_meta(root, complete=False)
    elif damage == "version":
        _set_meta(root, version=0)
    elif damage == "truncated shard":
        data = (root / shard_name(1)).read_bytes()
        (root / shard_name(1)).write_bytes(data[: len(data) // 2])
    elif damage == "missing shard":
        (root / shard_name(1)).unlink()
    else:
        (root / "cache.json").write_text("{")
    with pytest.raises(SystemExit) as stopped, user_errors("mardini-train"):
        split_cache(root, 0.25)  # what the trainer calls at start: it reads every shard's records
    assert stopped.value.code == 2
    first, hint = capsys.readouterr().err.strip().splitlines()
    assert first.startswith("mardini-train: error: ") and str(root) in first and re.search(named, first), first


def test_cache_latents_script_defaults_to_the_runs_identity_and_names_what_differs(folder, tmp_path):
    """`--autoencoder identity` without factors caches the latents of a run's autoencoder=identity (it used scale 1,
    shift 0, which no run's identity config has, so its caches were refused); other settings into an existing cache
    name the one value that differs (not two whole dicts), in one line with status 2."""
    from mardini.cli import compose_config

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import cache_latents
    finally:
        sys.path.pop(0)
    out = tmp_path / "identity"
    args = [str(folder), str(out), "--autoencoder", "identity", "--num-frames", "3", "--height", "16", "--width",
            "16", "--fps", "10", "--num-workers", "0", "--dtype", "float32", "--max-failure-fraction", "1", "--cpu",
            "--quiet"]
    cache_latents.main(args)
    ae = compose_config(["data=cache", "data.cache_dir=x"]).autoencoder
    run_ae = build_autoencoder("identity", patch_size=ae.patch_size, scale=ae.scale, shift=ae.shift)
    CachedLatentDataset(out).check_compatible(run_ae, lowres_factor=2)
    args[args.index("--num-frames") + 1] = "5"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "cache_latents.py"), *args], capture_output=True,
                            text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 2, result.stderr[-2000:]
    assert lines[0].startswith(f"cache_latents.py: error: the latent cache in {out} was built with other settings "
                               f"(dataset.config.num_frames: cached 3 != now 5); use another folder"), lines[0]


def test_a_cache_of_another_autoencoder_names_the_settings_that_match_it(folder, vae_dir, tmp_path):
    """A VAE's cache for an identity run (and the reverse): the hint was the scale / shift keys, which cannot fix it;
    it now names the run settings of the cache's autoencoder."""
    ds = dataset(folder)
    build_latent_cache(tmp_path / "kl", ds, KLAutoencoder(str(vae_dir)), dtype="float32", progress=False)
    with pytest.raises(ValueError, match=rf"class: cached 'KLAutoencoder' != 'IdentityAutoencoder'.* \(train with "
                                         rf"the cache's autoencoder, autoencoder=kl autoencoder.pretrained={vae_dir} "
                                         rf"model.latent_channels=4, or cache the videos with the run's\)"):
        CachedLatentDataset(tmp_path / "kl").check_compatible(IdentityAutoencoder(patch_size=2), lowres_factor=2)
    build_latent_cache(tmp_path / "p4", ds, IdentityAutoencoder(patch_size=4), dtype="float32", progress=False)
    with pytest.raises(ValueError, match=r"autoencoder=identity autoencoder.patch_size=4 autoencoder.scale=1.0 "
                                         r"autoencoder.shift=0.0 model.latent_channels=48"):
        CachedLatentDataset(tmp_path / "p4").check_compatible(IdentityAutoencoder(patch_size=2), lowres_factor=2)
