"""The trainer on real video files (decoded by workers, bad files skipped) and on a latent cache."""


import pytest
import torch
from omegaconf import OmegaConf

from helpers_training import single_thread  # noqa: F401 (single_thread: autouse fixture)
from helpers_training import SCRIPT_PRELUDE, checkpoint_names, export_weights, read_metrics, run_script, tiny_config
from helpers_training import cfg_to_yaml, torchrun
from mardini.autoencoders import build_autoencoder
from mardini.data.counter_videos import write_test_video
from mardini.data.latent_cache import CachedLatentDataset, build_latent_cache, encode_hi_lo
from mardini.data.video import VideoDataConfig, VideoDataset
from mardini.training.trainer import Trainer


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    for i in range(6):
        write_test_video(root / f"clip{i}.mp4", num_frames=40, fps=24, height=48, width=64)
    (root / "empty.mp4").write_bytes(b"")
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    write_test_video(root / "short.mp4", num_frames=3, fps=24, height=48, width=64)
    return root


def video_config(run_dir, root, **train):
    cfg = tiny_config(run_dir, **train)
    cfg.data.source = "video"
    cfg.data.video = OmegaConf.merge(cfg.data.video, dict(root=str(root), num_frames=9, height=32, width=32,
                                                          fps=12.0, min_failures=100))
    cfg.data.num_workers = 2
    return cfg


@pytest.mark.slow
def test_video_training_skips_bad_files_and_resumes_exactly(tmp_path, video_folder):
    straight = Trainer(video_config(tmp_path / "a", video_folder, max_steps=4))
    straight.fit()
    assert straight.skip_stats.log_dict()["data/skipped_total"] >= 1  # bad files were met, counted, not fatal
    stopped = Trainer(video_config(tmp_path / "b", video_folder, max_steps=4))
    original = stopped.train_step

    def stop_after_two(batches):
        result = original(batches)
        stopped.stop_requested = stopped.step + 1 >= 2
        return result

    stopped.train_step = stop_after_two
    stopped.fit()
    # the run stopped at step 2 with a checkpoint, so the second half really resumes (not an already finished run)
    assert checkpoint_names(tmp_path / "b") == ["step_000002"] and not (tmp_path / "b" / "export").exists()
    resumed = Trainer(video_config(tmp_path / "b", video_folder, max_steps=4, resume="auto"))
    assert resumed.step == 2
    resumed.fit()
    assert [m["loss"] for m in read_metrics(tmp_path / "a")] == [m["loss"] for m in read_metrics(tmp_path / "b")]
    a, b = export_weights(tmp_path / "a"), export_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(180)
def test_video_training_decoding_with_pyav_finishes(tmp_path, video_folder):
    """The validation clips are decoded in the main process before the data workers fork; with PyAV (>= 17) that
    once left each worker waiting forever for the scaler threads it had not inherited (a 2-step run never ended)."""
    cfg = video_config(tmp_path, video_folder, max_steps=2)
    cfg.data.video.backend = "pyav"
    trainer = Trainer(cfg)
    trainer.fit()
    assert trainer.step == 2 and (tmp_path / "export").is_dir()


def test_a_stuck_batch_is_named_by_its_files(tmp_path, video_folder):
    """The error of a worker stuck past data.timeout names the files of the batch the run waits for: those the
    loader gives for that step (here the first two steps' micro-batches)."""
    trainer = Trainer(video_config(tmp_path, video_folder, batch_size=2, max_steps=2))
    trainer.cfg.data.num_workers = 0
    batches = iter(trainer._dataloader())
    for step in range(2):
        files = [trainer.dataset.manifest[int(i)].path for i in next(batches)["index"]]
        assert len(set(files)) == 2 and all(f.endswith(".mp4") for f in files)
        assert trainer._samples_of(step, 0) == "the files " + ", ".join(files)


def test_unreadable_validation_videos_stop_the_run_at_start_naming_them(tmp_path, video_folder):
    """Validation reads only held-out files; when none of them decodes, the run stops before training (it once
    trained to the end and then failed writing the end-of-run videos, with no export) with a message that says
    these are the validation clips and how to choose others, and writes nothing into the run folder."""
    from mardini.data.video import TooManyFailuresError

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "corrupt.mp4").write_bytes((video_folder / "corrupt.mp4").read_bytes())
    cfg = video_config(tmp_path / "run", video_folder)
    cfg.data.video.val_root = str(broken)
    with pytest.raises(TooManyFailuresError, match=r"validation clips \(data.video.val_root=.*broken\).*corrupt"):
        Trainer(cfg)
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_cache_training_gives_the_batches_of_on_the_fly_encoding(tmp_path, video_folder):
    data_cfg = VideoDataConfig(root=str(video_folder), num_frames=9, height=32, width=32, fps=12.0,
                               clip_start="first", min_failures=100)
    dataset = VideoDataset(data_cfg)
    ae = build_autoencoder("identity", patch_size=2)
    build_latent_cache(tmp_path / "cache", dataset, ae, lowres_factor=2, dtype="float32", progress=False)
    cached = CachedLatentDataset(tmp_path / "cache")
    for i in range(3):
        z_hi, z_lo = encode_hi_lo(ae, dataset[i]["video"][None], 2)
        assert torch.allclose(cached[i]["z_hi"], z_hi[0], atol=1e-6) and torch.allclose(cached[i]["z_lo"], z_lo[0])

    cfg = tiny_config(tmp_path / "run", max_steps=3)
    cfg.data.source, cfg.data.cache_dir = "cache", str(tmp_path / "cache")
    trainer = Trainer(cfg)
    assert (trainer.num_frames, trainer.height, trainer.width) == (9, 32, 32)
    # the trainer's first micro-batch: items of training files (data=video's hold-out rule keeps the others for
    # validation) with the latents that encoding their clips on the fly gives
    batch = next(iter(trainer._dataloader()))
    z_hi, z_lo, _ = trainer._prepare(batch, 0)
    held_out = set(VideoDataset(data_cfg, split="val").manifest.paths)
    assert len(batch["index"]) == 2 and held_out
    for row, index in enumerate(batch["index"].tolist()):
        assert cached.sample_metadata(index)["path"] not in held_out, f"held-out item {index} in a training batch"
        hi, lo = encode_hi_lo(ae, dataset[index]["video"][None], 2)
        torch.testing.assert_close(z_hi[row], hi[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(z_lo[row], lo[0], rtol=0, atol=1e-6)
    trainer.fit()
    assert len(read_metrics(tmp_path / "run")) == 3 and (tmp_path / "run" / "export").is_dir()

    wrong = tiny_config(tmp_path / "run2", max_steps=3)
    wrong.data.source, wrong.data.cache_dir = "cache", str(tmp_path / "cache")
    wrong.model.lowres_factor = 4
    with pytest.raises(ValueError, match="lowres_factor"):
        Trainer(wrong)
    # the cached clips' size is checked against the model at start, as a config's clip size is (a 9-frame cache
    # once passed the start-up checks of a model of 8 frames and failed in the first step, naming neither)
    short = tiny_config(tmp_path / "run3", max_steps=3)
    short.data.source, short.data.cache_dir = "cache", str(tmp_path / "cache")
    short.model.max_frames = 8
    with pytest.raises(ValueError, match=r"the clips of data.cache_dir=.*cache \(num_frames\) \(9, 9 latent frames\) "
                                         r"exceeds model.max_frames \(8\)"):
        Trainer(short)
    assert not (tmp_path / "run3" / "config.yaml").exists()


def test_a_checkpoint_of_a_cache_run_whose_cache_is_gone(tmp_path):
    """A checkpoint takes its clip size from the cache it was trained on. With the cache moved away, mardini-sample
    said only "[Errno 2] ... cache.json" and fine-tuning from a sharded (FSDP) checkpoint failed the same way, though
    its weights need no cache: the first names the cache and the way out, the second loads."""
    from mardini.data.synthetic import SyntheticVideoConfig, SyntheticVideoDataset
    from mardini.export import read_config

    cfg = tiny_config(tmp_path / "run", max_steps=1, parallel="fsdp")
    synthetic = SyntheticVideoConfig(**OmegaConf.to_container(cfg.data.synthetic))
    build_latent_cache(tmp_path / "cache", SyntheticVideoDataset(synthetic),
                       build_autoencoder("identity", patch_size=2), dtype="float32", progress=False)
    cfg.data.source, cfg.data.cache_dir = "cache", str(tmp_path / "cache")
    Trainer(cfg).fit()
    source = tmp_path / "run" / "checkpoints" / "step_000001"
    assert (source / "sharded").is_dir()
    (tmp_path / "cache").rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=rf"{source} was trained from the latent cache data.cache_dir="
                                                rf"{tmp_path / 'cache'}, which is gone: .* put the cache back there, "
                                                rf"or use the run's export"):
        read_config(source)
    trainer = Trainer(tiny_config(tmp_path / "ft", init_from=str(source)))
    trainer._release_lock()
    weights = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert all(torch.equal(weights[k], v) for k, v in export_weights(tmp_path / "run").items())  # the EMA weights


def test_clip_settings_a_cache_decides_are_named_when_given_otherwise(tmp_path, caplog):
    """With data=cache the clips are the cache's: data.video.num_frames / height / ... given otherwise had no effect
    and said nothing. They are named with the cache's values in a warning; the defaults (which a cache of other clips
    always differs from) and a value equal to the cache's say nothing."""
    import logging

    from mardini.data.synthetic import SyntheticVideoConfig, SyntheticVideoDataset

    cfg = tiny_config(tmp_path / "run", max_steps=1)
    synthetic = SyntheticVideoConfig(**dict(OmegaConf.to_container(cfg.data.synthetic), num_videos=4))
    build_latent_cache(tmp_path / "cache", SyntheticVideoDataset(synthetic),
                       build_autoencoder("identity", patch_size=2), dtype="float32", progress=False)

    def warnings(out, **video):
        cfg = tiny_config(tmp_path / out, max_steps=1)
        cfg.data.source, cfg.data.cache_dir = "cache", str(tmp_path / "cache")
        cfg.data.video = OmegaConf.merge(cfg.data.video, video)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mardini.train"):
            Trainer(cfg)._release_lock()
        return [r.getMessage() for r in caplog.records if "the cache decides" in r.getMessage()]

    assert warnings("default") == []
    assert synthetic.num_frames != 5 and synthetic.height != 64
    found = warnings("other", num_frames=5, height=64, width=synthetic.width)
    assert len(found) == 1 and found[0].startswith("data.source=cache: data.video.num_frames=5 "
                                                   "data.video.height=64 are not read"), found
    assert f"holds clips of num_frames={synthetic.num_frames} height={synthetic.height} (" in found[0], found
    assert "data.video.width" not in found[0]


def test_a_run_records_its_data_paths_absolute(tmp_path, video_folder, monkeypatch):
    """Given relative to the working directory, the data folders are recorded absolute, so that the export's held-out
    clips (what the learning benchmark scores) load from any other directory."""
    import json

    from mardini.evaluation.learning import held_out_clips

    monkeypatch.chdir(video_folder.parent)
    cfg = video_config(tmp_path / "run", video_folder.name, max_steps=1)
    cfg.data.video.max_failure_fraction = 1.0
    Trainer(cfg).fit()
    data = json.loads((tmp_path / "run" / "export" / "config.json").read_text())["data"]
    assert data["video"]["root"] == str(video_folder), data["video"]
    monkeypatch.chdir(tmp_path)
    assert held_out_clips(data, 1).shape[:2] == (1, 9)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_log_the_run_once_and_each_skipped_file(tmp_path, video_folder):
    """Under 2 processes rank 0 logs the run (each line once); every rank still reports the video files its own
    loaders skip (its data logger stays at WARNING) and its errors."""
    import json
    import re

    cfg = video_config(tmp_path / "run", video_folder, max_steps=3, checkpoint_every=3)
    cfg.data.video.max_failure_fraction = 1.0
    (tmp_path / "run.yaml").write_text(cfg_to_yaml(cfg))
    proc = run_script(tmp_path, "run.py", SCRIPT_PRELUDE + """
import json, logging
import torch.distributed as dist
from mardini.training.trainer import Trainer
trainer = Trainer(load_cfg(sys.argv[1]))
levels = {name: logging.getLevelName(logging.getLogger(name).getEffectiveLevel())
          for name in ("mardini.train", "mardini.training.checkpoint", "mardini.data")}
open(f"{sys.argv[1]}.rank{dist.get_rank()}.json", "w").write(json.dumps(levels))
trainer.fit()
""", [tmp_path / "run.yaml"], launcher=torchrun(), timeout=300)
    output = proc.stdout + proc.stderr
    assert output.count("model parameters:") == 1 and output.count("saved checkpoint") == 1, output[-3000:]
    assert re.search(r"data: \d+ of \d+ video loads failed", output) and "skipping video" in output, output[-3000:]
    levels = [json.loads((tmp_path / f"run.yaml.rank{rank}.json").read_text()) for rank in range(2)]
    assert levels[0] == {"mardini.train": "INFO", "mardini.training.checkpoint": "INFO", "mardini.data": "INFO"}
    assert levels[1] == {"mardini.train": "ERROR", "mardini.training.checkpoint": "ERROR", "mardini.data": "WARNING"}
