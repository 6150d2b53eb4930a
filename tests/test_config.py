"""The Hydra config tree under configs/: it composes, validates, fails loudly on bad keys, and stays documented."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import mardini.cli as cli
from mardini.cli import compose_config
from mardini.diffusion.config import DiffusionConfig
from mardini.masking import (
    CurriculumConfig,
    CurriculumStage,
    curriculum_from_dict,
    i2v_finetune,
    interpolation_only,
)
from mardini.models.config import MODEL_SIZES, MarDiniConfig
from mardini.training.config import AutoencoderConfig, DataConfig, TrainConfig, latent_space

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
GROUPS = ("model", "diffusion", "curriculum", "autoencoder", "data", "train", "experiment")
# Group options that need a VAE autoencoder (16 latent channels), which does not exist yet: validate_config must
# reject them naming model.latent_channels. Remove entries once a VAE option joins configs/autoencoder/.
NEEDS_VAE = {("model", "paper")}
# Options that need a path only the user has: each must fail naming that key.
NEEDS_PATH = {("autoencoder", "kl"): r"autoencoder\.pretrained", ("data", "video"): r"data\.video\.root",
              ("data", "cache"): r"data\.cache_dir", ("experiment", "paper_i2v_finetune"): r"train\.init_from"}
# The schema class behind each group, for the "every field is set" check.
SCHEMA = {"model": MarDiniConfig, "diffusion": DiffusionConfig, "autoencoder": AutoencoderConfig,
          "data": DataConfig, "train": TrainConfig, "curriculum": CurriculumConfig}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def all_options() -> list[tuple[str, str]]:
    return [(g, o) for g in GROUPS for o in options(g)]


def to_curriculum(node) -> CurriculumConfig:
    return curriculum_from_dict(OmegaConf.to_container(node, resolve=True))


# ------------------------------------------------------------------------------------------------ composition


def test_default_config_composes_and_validates():
    cfg = compose_config([])
    assert cfg.experiment == "tiny_synthetic"
    assert OmegaConf.select(cfg, "run_name")  # the timestamp resolves
    tiny = MODEL_SIZES["tiny"]
    for part, values in tiny.items():
        if isinstance(values, dict):
            for key, value in values.items():
                assert cfg.model[part][key] == value, f"model.{part}.{key}"
        else:
            assert cfg.model[part] == values, f"model.{part}"
    assert cfg.model.latent_channels == latent_space(cfg.autoencoder)["latent_channels"] == 12
    assert (cfg.data.synthetic.num_frames, cfg.data.synthetic.height, cfg.data.synthetic.width) == (9, 32, 32)
    assert cfg.diffusion.formulation == "rectified_flow"
    # the default job trains the task it is judged on, its generator given a motion estimate (issue 11)
    assert len(cfg.curriculum.stages) == 1 and cfg.curriculum.stages[0].strategies[0].name == "interpolation"
    assert cfg.model.motion.estimate == "bilateral" and cfg.data.synthetic.hue_drift == 0
    assert cfg.train.mixed_precision == "auto" and cfg.train.checkpoint_every <= cfg.train.max_steps
    assert set(cfg.train.trackers) == {"tensorboard", "wandb"} and cfg.train.wandb_mode == "auto"


def test_groups_chosen_on_the_command_line_apply_as_written():
    """The default preset (tiny_synthetic) sets model, data and train values; a command line that chooses one of
    those groups gets the group's values, not the preset's (before: `model=small data=synthetic_large train=gpu`
    trained at the tiny job's batch 8, lr 3e-3 and 400 steps, with its motion estimate). Value overrides, other
    groups and an explicitly named preset keep the preset."""
    gpu = OmegaConf.load(CONFIGS / "train" / "gpu.yaml")
    small = OmegaConf.load(CONFIGS / "model" / "small.yaml")
    cfg = compose_config(["model=small", "data=synthetic_large", "train=gpu"])
    assert cli.default_preset_clashes(["model=small", "data=synthetic_large", "train=gpu"]) == \
        ("tiny_synthetic", ["data", "model", "train"])
    assert cfg.experiment == "custom"
    for key in ("batch_size", "lr", "max_steps", "warmup_steps", "lr_schedule"):
        assert cfg.train[key] == gpu[key], key
    assert cfg.model.motion.estimate == small.motion.estimate == "none"
    preset = compose_config([])
    assert preset.train.batch_size != gpu.batch_size  # the preset does set what the groups above got back
    assert cli.with_groups_as_written(["--config-name", "other", "model=small"]) == \
        ["--config-name", "other", "model=small"]  # another primary config keeps its own defaults
    assert cli.with_groups_as_written(["-m", "model=small,base", "seed=1"]) == \
        ["-m", "model=small,base", "~experiment", "seed=1"]  # beside the overrides, after Hydra's flags
    for kept in (["train.max_steps=40"], ["curriculum=paper"], ["model=small", "experiment=tiny_synthetic"]):
        cfg = compose_config(kept)
        assert cfg.experiment == "tiny_synthetic" and cfg.train.batch_size == preset.train.batch_size, kept
        assert cfg.model.motion.estimate == preset.model.motion.estimate, kept


def test_mardini_train_prints_the_groups_as_written(tmp_path):
    """The same rule in the entry point (`--cfg job` prints the composed config without training)."""
    import subprocess
    import yaml

    result = subprocess.run([sys.executable, "-m", "mardini.train", "model=small", "train=gpu", "--cfg", "job"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = yaml.safe_load(result.stdout)
    assert printed["train"]["batch_size"] == OmegaConf.load(CONFIGS / "train" / "gpu.yaml").batch_size
    assert printed["experiment"] == "custom"
    assert printed["model"]["generator"]["dim"] == MODEL_SIZES["small"]["generator"]["dim"]


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"configs/{group}/ has no options"


@pytest.mark.parametrize("group,option", all_options(), ids=lambda x: x)
def test_every_group_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if (group, option) in NEEDS_VAE:
        with pytest.raises(ValueError, match=r"model\.latent_channels \(16\) must equal the autoencoder"):
            compose_config(overrides)
        return
    if (group, option) in NEEDS_PATH:
        with pytest.raises(Exception, match=NEEDS_PATH[group, option]):
            compose_config(overrides)
        return
    cfg = compose_config(overrides)
    assert cfg.model.latent_channels == latent_space(cfg.autoencoder)["latent_channels"]
    if group == "experiment":
        assert cfg.experiment == option, f"experiment/{option}.yaml must set `experiment: {option}`"
    # the option is applied: every value its file sets is in the composed config (not a preset's, nor a default's)
    body = OmegaConf.load(CONFIGS / group / f"{option}.yaml")
    body.pop("defaults", None)
    node = cfg if group == "experiment" else cfg[group]
    assert OmegaConf.merge(node, body) == node, f"{group}={option}: values of configs/{group}/{option}.yaml lost"


def test_hydra_run_dir_under_outputs_and_no_chdir():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=small_synthetic", "run_name=abc"],
                      return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert cfg.hydra.run.dir == "outputs/small_synthetic/abc"
    assert cfg.hydra.sweep.dir.startswith("outputs/small_synthetic/")
    assert cfg.hydra.job.chdir is False


# ------------------------------------------------------------------------------------------ bad keys / values


def _message(excinfo) -> str:
    """An exception's text with its causes (Hydra wraps OmegaConf's errors)."""
    parts, e = [], excinfo.value
    while e is not None:
        parts.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


def test_unknown_key_override_fails_naming_it():
    with pytest.raises(ConfigCompositionException) as excinfo:
        compose_config(["train.lrr=1"])
    assert "train.lrr" in _message(excinfo)


@pytest.mark.parametrize("override,key", [("+train.foo=1", r"train\.foo"),
                                          ("+model.planner.x=2", r"model\.planner\.x"),
                                          ("+curriculum.stages.0.strategies.0.bar=1",
                                           r"curriculum\.stages\[0\]\.strategies\[0\]\.bar")])
def test_unknown_key_added_with_plus_fails_naming_it(override, key):
    # Hydra's `+key=value` opens the struct flag; validate_config walks the tree against the schema.
    with pytest.raises(ValueError, match=key):
        compose_config([override])


@pytest.mark.parametrize("override,key", [("train.max_steps=abc", "train.max_steps"),
                                          ("model.qk_norm=maybe", "model.qk_norm"),
                                          ("data.synthetic.height=tall", "data.synthetic.height")])
def test_wrong_type_fails_naming_the_key(override, key):
    with pytest.raises(ConfigCompositionException) as excinfo:
        compose_config([override])
    assert key in _message(excinfo)


@pytest.fixture
def config_copy(tmp_path, monkeypatch) -> Path:
    """A private copy of configs/ that compose_config reads instead of the real one."""
    root = tmp_path / "configs"
    shutil.copytree(CONFIGS, root)
    monkeypatch.setattr(cli, "CONFIG_DIR", root)
    return root


def test_unknown_key_in_a_group_yaml_fails_naming_it(config_copy):
    with open(config_copy / "train" / "default.yaml", "a") as f:
        f.write("lrr: 0.1  # a typo\n")
    with pytest.raises(ConfigCompositionException) as excinfo:
        compose_config([])
    message = _message(excinfo)
    assert "train.lrr" in message and "train/default" in message


def test_unknown_key_in_a_curriculum_stage_fails_naming_it(config_copy):
    path = config_copy / "curriculum" / "interpolation.yaml"
    path.write_text(path.read_text().replace("    end: null", "    end_stpe: null"))
    with pytest.raises(ConfigCompositionException) as excinfo:
        compose_config(["curriculum=interpolation"])
    assert "end_stpe" in _message(excinfo)


def test_wrong_type_in_a_group_yaml_fails_naming_it(config_copy):
    path = config_copy / "data" / "synthetic.yaml"
    path.write_text(re.sub(r"(?m)^  num_frames: 9 ", "  num_frames: nine ", path.read_text()))
    with pytest.raises(ConfigCompositionException) as excinfo:
        compose_config([])
    assert "data.synthetic.num_frames" in _message(excinfo)


@pytest.mark.parametrize("override,key", [
    ("train.lr=-1", "train.lr"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.noise_draws=0", "train.noise_draws"),
    ("train.ema_warmup=1", "train.ema_warmup"),
    ("train.compile_scope=model", "train.compile_scope"),
    ("train.trackers=[tensorbord]", "train.trackers"),
    ("diffusion.prediction=epsilon", "diffusion.prediction"),
    ("model.planner.num_heads=5", "model.planner.dim"),
    ("data.synthetic.height=30", "data.synthetic.height"),
])
def test_bad_value_fails_validation_naming_the_key(override, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        compose_config([override])


def test_init_from_goes_with_resume_auto_but_not_with_a_checkpoint_path():
    """A fine-tuning run requeued by one command (resume=auto) is valid; init_from beside an explicit checkpoint to
    resume from is ambiguous and refused by name."""
    compose_config(["train.init_from=/some/export", "train.resume=auto"])
    with pytest.raises(ValueError, match=r"train\.init_from cannot be combined with train\.resume=<checkpoint>"):
        compose_config(["train.init_from=/some/export", "train.resume=/some/checkpoint"])


def test_whole_network_compilation_goes_with_unwrapped_blocks_only():
    """train.compile_scope=networks compiles the planner and generator whole; FSDP2 and activation checkpointing wrap
    each block, so either with it is refused by name (without compile the scope means nothing and passes)."""
    base = ["train.compile=true", "train.compile_scope=networks"]
    assert compose_config(base).train.compile_scope == "networks"
    for other in ("train.parallel=fsdp", "train.activation_checkpointing=true"):
        with pytest.raises(ValueError, match=r"train\.compile_scope=networks .* use train\.compile_scope=blocks"):
            compose_config([*base, other])
    compose_config(["train.compile=false", "train.compile_scope=networks", "train.parallel=fsdp"])
    from mardini.models import MarDini, model_config
    from mardini.training.parallel import parallelize

    with pytest.raises(ValueError, match=r"train\.compile_scope=networks .* use train\.compile_scope=blocks"):
        parallelize(MarDini(model_config("tiny", latent_channels=12)), "ddp", activation_checkpointing=True,
                    compile=True, compile_scope="networks")  # a library caller meets the same refusal


def test_a_value_a_preset_marks_required_must_be_given():
    """`???` in an experiment preset (the weights a fine-tuning preset starts from) merges over the schema's
    default as that default, silently: the key is checked by name instead."""
    base = ["experiment=paper_i2v_finetune", "model=tiny", "model.latent_channels=12"]
    with pytest.raises(ValueError, match=r"train\.init_from is required by experiment=paper_i2v_finetune"):
        compose_config(base)
    assert compose_config(base + ["train.init_from=/some/export"]).train.init_from == "/some/export"


def test_curriculum_stage_without_steps_fails_naming_the_stage():
    with pytest.raises(ValueError, match=r"curriculum\.stages\[2\] \(start=0\.5, end=0\.75\) gets no step at "
                                         r"train\.max_steps=3"):
        compose_config(["train.max_steps=3", "curriculum=paper"])


@pytest.mark.parametrize("override", ["model.latent_channels=4", "autoencoder.patch_size=4", "model=paper"])
def test_latent_channel_mismatch_names_model_latent_channels(override):
    with pytest.raises(ValueError, match=r"model\.latent_channels"):
        compose_config([override])


# ----------------------------------------------------------------------------------- group files vs the code


@pytest.mark.parametrize("size", sorted(MODEL_SIZES))
def test_model_files_mirror_model_sizes(size):
    node = OmegaConf.load(CONFIGS / "model" / f"{size}.yaml")
    for part, values in MODEL_SIZES[size].items():
        if not isinstance(values, dict):
            assert node[part] == values, f"configs/model/{size}.yaml {part} != MODEL_SIZES[{size!r}]"
            continue
        for key, value in values.items():
            assert node[part][key] == value, f"configs/model/{size}.yaml {part}.{key} != MODEL_SIZES[{size!r}]"


def test_named_curricula_mirror_masking_presets():
    def load(name):  # the raw file (test_every_group_option_composes composes each one against the schema)
        return to_curriculum(OmegaConf.load(CONFIGS / "curriculum" / f"{name}.yaml"))

    assert load("interpolation") == interpolation_only()
    assert load("i2v_finetune") == i2v_finetune()


def test_paper_curriculum_is_written_once_and_presets_use_it_at_their_length():
    """The progression lives in curriculum/paper.yaml only (fractions of train.max_steps); presets select it and
    copy nothing, so every run length gets the same progression."""
    paper = to_curriculum(OmegaConf.load(CONFIGS / "curriculum" / "paper.yaml"))
    for path in sorted(CONFIGS.rglob("*.yaml")):
        if path != CONFIGS / "curriculum" / "paper.yaml":
            assert "stages" not in OmegaConf.to_container(OmegaConf.load(path)).get("curriculum", {}), \
                f"{path.relative_to(ROOT)} copies curriculum stages"
    for overrides, steps in ((["experiment=tiny_synthetic", "curriculum=paper"], [0, 80, 160, 240]),
                             (["experiment=small_synthetic", "curriculum=paper"], [0, 1500, 3000, 4500]),
                             (["experiment=small_synthetic", "curriculum=paper", "train.max_steps=20000"],
                              [0, 5000, 10000, 15000])):
        cfg = compose_config(overrides)
        assert to_curriculum(cfg.curriculum) == paper
        from mardini.masking import stage_steps

        assert stage_steps(paper, cfg.train.max_steps) == steps


def test_short_default_run_composes_and_trains(tmp_path):
    """`mardini-train train.max_steps=40` was refused (stages in absolute steps up to 225); now the stages scale."""
    from mardini.training.trainer import Trainer

    cfg = compose_config(["train.max_steps=40", f"train.output_dir={tmp_path / 'run'}", "train.trackers=[]",
                          "train.progress=false", "curriculum=paper"])
    trainer = Trainer(cfg)
    assert trainer.mask_sampler.stage_starts == [0, 10, 20, 30]
    with pytest.raises(ValueError, match=r"curriculum\.stages\[\d\].*gets no step at train\.max_steps=3"):
        compose_config(["train.max_steps=3", "curriculum=paper"])


def _missing_fields(node, cls, path: str) -> list[str]:
    """Schema fields of dataclass `cls` (recursively) that the YAML mapping `node` does not set."""
    missing = []
    for f in dataclasses.fields(cls):
        key = f"{path}.{f.name}"
        if f.name not in node:
            missing.append(key)
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            missing += _missing_fields(node[f.name], type(default), key)
    return missing


@pytest.mark.parametrize("group,option", [(g, o) for g, o in all_options() if g in SCHEMA], ids=lambda x: x)
def test_group_files_set_every_schema_field(group, option):
    """Each option is the whole truth for its node: a field added to the schema must be added (with a comment)."""
    node = OmegaConf.to_container(OmegaConf.load(CONFIGS / group / f"{option}.yaml"))
    if group == "curriculum":
        missing = []
        for i, stage in enumerate(node["stages"]):
            missing += _missing_fields(stage, CurriculumStage, f"stages[{i}]")
    else:
        missing = _missing_fields(node, SCHEMA[group], group)
    assert not missing, f"configs/{group}/{option}.yaml does not set {missing}"


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    from mardini.models import generator, planner

    expected = {"single_gpu": (1, 1, None), "fsdp_2gpu": (2, 1, 2), "fsdp_8gpu": (8, 1, 2), "multi_node": (16, 2, 2)}
    assert sorted(expected) == options("accelerate")
    for name, (processes, machines, fsdp_version) in expected.items():
        cfg = load_config_from_file(str(CONFIGS / "accelerate" / f"{name}.yaml"))
        assert (cfg.num_processes, cfg.num_machines) == (processes, machines), name
        assert cfg.fsdp_config.get("fsdp_version") == fsdp_version, name
        for cls in cfg.fsdp_config.get("fsdp_transformer_layer_cls_to_wrap", "").split(","):
            if cls:
                assert hasattr(planner, cls) or hasattr(generator, cls), f"{name}: no block class {cls}"


# ------------------------------------------------------------------------------------------------- docs, YAML


def _load_reference_script():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses defined by the script look their module up
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_up_to_date():
    ok, diff = _load_reference_script().check()
    assert ok, "docs/CONFIG.md is stale: run `python scripts/config_reference.py`\n" + diff


def test_config_reference_names_a_field_without_comment():
    ref = _load_reference_script()

    @dataclasses.dataclass
    class Documented:
        fine: int = 1  # has a comment
        bare: int = 2

    with pytest.raises(ref.MissingCommentError, match=r"bare: Documented\.bare"):
        ref.collect_sections(Documented)


def test_config_reference_keeps_a_wrapped_comment_with_its_field():
    """A trailing comment wrapped onto the next line ("#" then aligned text) continues the field above it; a comment
    block above a field describes that field. (Wrapped text once moved to the next field's row.)"""
    ref = _load_reference_script()

    @dataclasses.dataclass
    class Wrapped:
        mode: str = "a"  # a | b (the first two)
        #                  | c (the third)
        after: int = 1  # the next field
        # described from above
        above: int = 2

    comments = {name: text for name, (_, text) in ref.field_comments(Wrapped).items()}
    assert comments == {"mode": "a | b (the first two) | c (the third)", "after": "the next field",
                        "above": "described from above"}


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_yaml_line_has_a_comment(path):
    """Every line that is not blank or a comment carries a non-empty trailing `# comment`: values, list items and
    the `key:` lines that open a mapping alike (the YAML files double as the documentation of a run)."""
    bad = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not re.search(r"\s#\s*\S", line):
            bad.append(f"{path.relative_to(ROOT)}:{number}: {line}")
    assert not bad, "lines without a comment:\n" + "\n".join(bad)
