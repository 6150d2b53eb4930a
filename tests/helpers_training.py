"""Shared utilities for tests/test_training.py: tiny run configs built without Hydra, readers for what a run
writes (metrics.jsonl, checkpoints, exports), and a runner for small training scripts in a subprocess.

Everything is sized for a 2-core CPU: the "tiny" model (planner dim 64 depth 2, generator dim 48 depth 2), the
identity autoencoder with patch 2 (12 latent channels) and 9-frame 32x32 synthetic clips (smaller clips would
break the end-of-run validation videos, which ignore the configured clip size: see
test_validation_clips_follow_data_config_and_val_seed).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from mardini.masking import CurriculumConfig, CurriculumStage, MaskStrategyConfig, interpolation_only
from mardini.training.config import Config

REPO = Path(__file__).resolve().parent.parent
NUM_FRAMES, HEIGHT, WIDTH = 9, 32, 32


def tiny_config(output_dir, *, max_steps: int = 4, curriculum=None, **train) -> "OmegaConf":
    """A resolved DictConfig (the schema's structured config) for a tiny CPU run into `output_dir`.

    Keyword arguments override `train.*` fields. No trackers, no progress bar, no periodic checkpoint or
    sample unless asked, 2 sampling steps for the validation videos.
    """
    cfg = OmegaConf.structured(Config)
    cfg.model = OmegaConf.merge(cfg.model, dict(
        latent_channels=12, max_frames=NUM_FRAMES,
        planner=dict(dim=64, depth=2, num_heads=4), generator=dict(dim=48, depth=2, num_heads=4)))
    cfg.data.synthetic = OmegaConf.merge(cfg.data.synthetic, dict(
        num_frames=NUM_FRAMES, height=HEIGHT, width=WIDTH, num_videos=64))
    cfg.data.pin_memory = False
    cfg.curriculum = OmegaConf.structured(curriculum if curriculum is not None else interpolation_only())
    cfg.diffusion.num_inference_steps = 2
    defaults = dict(output_dir=str(output_dir), max_steps=max_steps, batch_size=2, grad_accum=1, lr=1e-3,
                    warmup_steps=1, trackers=[], progress=False, checkpoint_every=1000, log_every=1000,
                    num_sample_videos=1, sample_steps=2, keep_last=2)
    defaults.update(train)
    for key, value in defaults.items():
        cfg.train[key] = value
    cfg.train.max_steps = max_steps
    return cfg


def two_stage_curriculum(switch_step: int, max_steps: int) -> CurriculumConfig:
    """Interpolation before `switch_step` of a max_steps-step run, image-to-video (random reference) from it on
    (stage boundaries are fractions of the run)."""
    switch = switch_step / max_steps
    return CurriculumConfig(stages=[
        CurriculumStage(start=0.0, end=switch, strategies=[MaskStrategyConfig(name="interpolation")],
                        mask_ratio=[0.1, 0.99]),
        CurriculumStage(start=switch, end=None,
                        strategies=[MaskStrategyConfig(name="i2v", position="random")], mask_ratio=[0.1, 0.95]),
    ])


def paper_curriculum() -> CurriculumConfig:
    """configs/curriculum/paper.yaml, the one definition of the paper's progression, as dataclasses."""
    from mardini.masking import curriculum_from_dict

    return curriculum_from_dict(OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "curriculum" / "paper.yaml")))


def cfg_to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


# --------------------------------------------------------------------------------------------------- outputs
def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoint(run_dir, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def checkpoint_names(run_dir) -> list[str]:
    root = Path(run_dir) / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def model_weights(ckpt_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(ckpt_dir) / "model.safetensors"))


def ema_weights(ckpt_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(ckpt_dir) / "ema.safetensors"))


def export_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "export" / "model.safetensors"))


def optimizer_state(ckpt_dir) -> dict:
    path = Path(ckpt_dir) / "optimizer.bin"
    return torch.load(path, map_location="cpu", weights_only=False)


def trainer_state(ckpt_dir) -> dict:
    return json.loads((Path(ckpt_dir) / "trainer_state.json").read_text())


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str = "tensors") -> None:
    assert a.keys() == b.keys(), f"{what}: different keys {sorted(a.keys() ^ b.keys())}"
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what} differ in {len(different)} tensors, e.g. {different[:3]}"


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def assert_optimizer_equal(a: dict, b: dict) -> None:
    """Compare two saved optimizer state dicts: every buffer of every parameter (AdamW: step counts, exp_avg and
    exp_avg_sq; Muon: the momentum buffer)."""
    sa, sb = a["state"], b["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for idx in sa:
        assert sa[idx].keys() == sb[idx].keys() and len(sa[idx]) > 0, f"optimizer state {idx} holds other buffers"
        for key in sa[idx]:
            assert torch.equal(torch.as_tensor(sa[idx][key]), torch.as_tensor(sb[idx][key])), \
                f"optimizer state {idx}.{key} differs"


def unwrapped_state(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ subprocess
def subprocess_env(tmp_path) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1",
               WANDB_MODE="disabled", WANDB_DIR=str(tmp_path), TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    for key in list(env):  # never inherit a distributed launch from the test runner
        if key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
            del env[key]
    return env


def run_script(tmp_path, name: str, body: str, args=(), *, launcher=(sys.executable,), timeout: float = 240,
               check: bool = True) -> subprocess.CompletedProcess:
    """Write `body` (dedented) to tmp_path/name and run it with `launcher`; fail with its output if asked."""
    script = Path(tmp_path) / name
    script.write_text(textwrap.dedent(body))
    proc = subprocess.run([*launcher, str(script), *map(str, args)], cwd=str(tmp_path), env=subprocess_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} exited with {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-6000:]}")
    return proc


# Prepended to subprocess scripts: builds the same tiny config from a YAML dump of it.
SCRIPT_PRELUDE = """
import sys
from omegaconf import OmegaConf
from mardini.training.config import Config

def load_cfg(path, **train):
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
    for key, value in train.items():
        cfg.train[key] = value
    return cfg
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int = 2) -> tuple[str, ...]:
    """The command that launches a script on `nproc` local CPU processes (gloo), on a free port."""
    return (sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()))


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread in every test module that imports this fixture: identical float reductions here and in
    the subprocess runs (OMP_NUM_THREADS=1), and no oversubscription on a 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def record_times(trainer) -> dict[str, list[dict]]:
    """Record, per training step (str, as JSON keys are), the dtype and value of the model time that the generator
    receives for each sample's generated frames; the dict fills in as the trainer runs."""
    from mardini.models.generator import Generator

    times, state = {}, {"step": None}
    original = trainer._micro_step

    def micro_step(batch, step):
        state["step"] = step
        try:
            return original(batch, step)
        finally:
            state["step"] = None

    def hook(module, args, out):
        if state["step"] is not None:
            mt, mask = args[2], args[1]
            times.setdefault(str(state["step"]), []).extend(
                [{"dtype": str(mt.dtype), "t": float(mt[b][mask[b]].max())} for b in range(mt.shape[0])])

    trainer._micro_step = micro_step
    next(m for m in trainer.model.modules() if isinstance(m, Generator)).register_forward_hook(hook)
    return times
