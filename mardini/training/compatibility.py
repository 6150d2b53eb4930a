"""Whether weights trained under one config may start or continue a run under another.

Fine-tuning (train.init_from) and resuming (train.resume) read weights a run trained; each check here compares the
config that run recorded with this run's and refuses, or warns, naming the settings to pass: weights that would
load into another network (or not load at all), another objective, other latents. Why apart from the trainer: the
rules (which settings change what the weights mean) are one idea, and the trainer only asks them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .. import export as export_format
from ..dicts import dotted, dotted_plain, undotted
from ..models import MarDini

log = logging.getLogger("mardini.train")


def trained_config(source: str | Path) -> dict:
    """The run config an export (config.json) or a checkpoint (config.yaml) recorded; {} if it has neither."""
    path = Path(source)
    if (path / export_format.CONFIG_FILE).exists():
        try:
            return json.loads((path / export_format.CONFIG_FILE).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path / export_format.CONFIG_FILE} is not valid JSON ({e})") from None
    if (path / "config.yaml").exists():
        return OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))
    return {}


def check_same_objective(source: str, diffusion, how: str = "train.init_from") -> None:
    """Fine-tuning keeps the objective the weights learned: their output means x0, velocity, epsilon or v, and
    training it as another would silently start the output over; nor does it change what the network reads
    (input_data_std: a network trained on x_t fed the scaled x_t, or the reverse, starts from wrong inputs).
    Compares the export's or the checkpoint's diffusion formulation, prediction and input scaling with this run's
    (a config from before input_data_std existed trained with 0)."""
    trained = trained_config(source).get("diffusion", {})
    if trained:
        trained = {"input_data_std": 0.0, **trained}
    keys = ("formulation", "prediction", "input_data_std")
    differ = [(key, trained.get(key), getattr(diffusion, key)) for key in keys
              if trained.get(key) is not None and trained.get(key) != getattr(diffusion, key)]
    if differ:  # all of them at once: a formulation fixed alone would then fail on its prediction or sampler
        theirs = " ".join(f"diffusion.{key}={value}" for key, value, _ in differ)
        ours = " ".join(f"diffusion.{key}={value}" for key, _, value in differ)
        raise ValueError(f"{how}={source} was trained with {theirs}; this run has {ours}: set "
                         f"{_objective_fix(trained, differ)} to "
                         f"{'fine-tune' if how == 'train.init_from' else 'continue'} it")


def _objective_fix(trained: dict, differ: list) -> str:
    """The overrides that give a run the objective `trained`: the keys that differ, or, where the formulation does,
    the diffusion= option with its formulation and prediction (it brings a sampler that fits them) and any key
    that option sets otherwise."""
    from omegaconf import OmegaConf

    from ..cli import CONFIG_DIR

    plain = " ".join(f"diffusion.{key}={value}" for key, value, _ in differ)
    if all(key != "formulation" for key, _, _ in differ):
        return plain
    for path in sorted((CONFIG_DIR / "diffusion").glob("*.yaml")):
        option = OmegaConf.load(path)
        if all(option.get(key) == trained.get(key) for key in ("formulation", "prediction")):
            std = trained["input_data_std"]
            return f"diffusion={path.stem}" + ("" if option.get("input_data_std") == std else
                                               f" diffusion.input_data_std={std}")
    return plain


# Model keys that choose how the same network is computed or trained, not what it computes: a run may continue
# from weights trained under other values of these.
HOW_NOT_WHAT_KEYS = ("attn_backend", "sdpa_kernel", "generator.identity_impl", "max_frames", "plan_dropout",
                     "motion.loss_weight")
# Keys added after runs were saved, with the value every earlier run had: a resume compares against it. (The
# planner's loss adds its read-out's weights, so a run resumes only under the loss weight it was saved with.)
ADDED_KEYS = {"planner.loss_weight": 0.0, "motion.plan_layout": False}
# Keys that leave every weight's shape alone but change what the weights compute: the attention projections are
# learned per head, so weights loaded under another head split are scrambled without any loading error; with
# motion.residual the generator's output is the (scaled) difference from the motion estimate, not the frame.
SAME_SHAPE_KEYS = ("planner.num_heads", "generator.num_heads", "motion.residual", "motion.residual_scale")
# Weights that only a training loss needs (the planner's read-out, model.planner.loss_weight > 0; with
# model.motion.plan_layout the generator reads it too, and a fresh one is trained by that loss): fine-tuning may start
# from weights without them (they start fresh) or drop them.
TRAINING_ONLY_WEIGHTS = ("planner.readout.",)
# Weights fine-tuning may also add or drop: the null plan of classifier-free guidance (model.plan_dropout > 0) starts
# as zeros, its initial value, so guidance can be learned from weights trained without it.
FINE_TUNING_OPTIONAL_WEIGHTS = TRAINING_ONLY_WEIGHTS + ("null_plan",)


def check_same_network(source: str | Path, model_cfg, keys: tuple[str, ...] | None, how: str) -> None:
    """Refuse to load weights into a network that computes something else with them, naming each differing key.
    `keys`: the model keys to compare (None: every key but HOW_NOT_WHAT_KEYS, for resuming a run, which must
    continue the network it trained). Keys the source's config lacks (written before they existed) pass, except
    ADDED_KEYS, which read as the value they had then."""
    differ = _differing_model_keys(source, model_cfg, keys)
    if differ:
        settings, found = differ
        raise ValueError(f"{how}={source} was trained with {settings}; this run has {found}: pass {settings} "
                         f"(the same weights would compute another network)")
    if keys is None:  # a resume: HOW_NOT_WHAT_KEYS may change, unless the change adds or drops a weight
        _check_same_weights(source, model_cfg)


def _check_same_weights(source: str | Path, model_cfg) -> None:
    """Refuse a resume under a setting of how the network is trained that adds or drops weights (model.plan_dropout
    from 0 to > 0 adds the null plan): the checkpoint's parameters and optimizer state would not fit. Fine-tuning
    from the checkpoint (train.init_from) starts such weights fresh."""
    trained, ours = _model_settings(source, model_cfg)
    differ = [k for k in HOW_NOT_WHAT_KEYS if k in trained and k in ours and trained[k] != ours[k]]
    base = _weight_shapes(ours) if differ else None  # no model is built where nothing differs (every resume)
    changed = [k for k in differ if _weight_shapes({**ours, k: trained[k]}) != base]
    if changed:
        theirs = " ".join(f"model.{k}={trained[k]}" for k in changed)
        raise ValueError(f"train.resume={source} was trained with {theirs}; this run has "
                         f"{', '.join(f'model.{k}={ours[k]}' for k in changed)}, which adds or drops weights: pass "
                         f"{theirs} to resume, or start a new run from it with train.init_from={source} (where those "
                         f"weights start fresh)")


def warn_other_latent_space(source: str | Path, ae_cfg, how: str) -> None:
    """Warn when the weights at source learned other latents than this run's autoencoder gives (another
    autoencoder, or the identity's scale / shift): the shapes may fit, so the weights load and silently start from
    inputs they never saw, as when a run's scale was changed to match a latent cache made with another. A warning,
    not a refusal: moving to another VAE may be meant. VAE folders are not compared (they move between machines)."""
    trained = trained_config(source).get("autoencoder") or {}
    ours = OmegaConf.to_container(ae_cfg, resolve=True)
    if trained.get("name", ours["name"]) != ours["name"]:
        keys = ["name"]
    elif ours["name"] == "identity":
        keys = ["patch_size", "scale", "shift"]
    else:
        keys = ["subfolder", "vae_class", "scaling_factor", "shift_factor"]
    differ = [k for k in keys if k in trained and trained[k] != ours[k]]
    if differ:
        log.warning("%s=%s was trained on other latents (%s; this run has %s): pass those settings to go on in the "
                    "latent space its weights learned (and a latent cache made with them)", how, source,
                    " ".join(f"autoencoder.{k}={trained[k]}" for k in differ),
                    " ".join(f"autoencoder.{k}={ours[k]}" for k in differ))


def _model_settings(source: str | Path, model_cfg) -> tuple[dict, dict]:
    """(the model settings the weights at source were trained with, this run's), by dotted key; ADDED_KEYS read as
    the value they had before they existed."""
    trained = {**ADDED_KEYS, **dotted(trained_config(source).get("model") or {})}
    return trained, dotted(OmegaConf.to_container(model_cfg, resolve=True))


def _weight_shapes(model: dict) -> dict | None:
    """{name: shape} of the weights a model config (a dict by dotted key) builds, TRAINING_ONLY_WEIGHTS left out:
    what loading compares. Built on the meta device (no memory, no initialisation; milliseconds at the paper's
    size). None for a config that is not a valid one."""
    try:
        with torch.device("meta"):
            net = MarDini(undotted(model))
    except (ValueError, TypeError):
        return None
    return {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.startswith(TRAINING_ONLY_WEIGHTS)}


def not_loadable(source: str | Path, model_cfg, err: ValueError) -> ValueError:
    """The error for weights at source that do not fit this run's model: the model settings loading needs as trained
    first, then err (a few of the tensors). Needed: each setting whose value alone changes a weight's name or shape
    (found by building the model both ways), and SAME_SHAPE_KEYS (without them the weights load scrambled, and the
    run refuses them next). Other differing settings are named apart, as fine-tuning may change them; HOW_NOT_WHAT_KEYS
    (how the network is computed) only where they change a shape. err as it is where no setting explains it."""
    trained, ours = _model_settings(source, model_cfg)
    differ = [k for k in ours if k in trained and trained[k] != ours[k]]
    base = _weight_shapes(ours)
    needed = [k for k in differ if k in SAME_SHAPE_KEYS or _weight_shapes({**ours, k: trained[k]}) != base]
    as_trained = _weight_shapes({**ours, **{k: trained[k] for k in differ}})
    if as_trained is None or _weight_shapes({**ours, **{k: trained[k] for k in needed}}) != as_trained:
        needed = [k for k in differ if k not in HOW_NOT_WHAT_KEYS or k in needed]  # settings that act together
    if not needed:
        return err
    others = [k for k in differ if k not in needed and k not in HOW_NOT_WHAT_KEYS]
    theirs = " ".join(f"model.{k}={trained[k]}" for k in needed)
    also = (f" ({' '.join(f'model.{k}={trained[k]}' for k in others)} differ{'s' if len(others) == 1 else ''} too; "
            f"loading does not need {'it' if len(others) == 1 else 'them'})") if others else ""
    return ValueError(f"train.init_from={source} was trained with {theirs}; this run has "
                      f"{', '.join(f'model.{k}={ours[k]}' for k in needed)}: pass {theirs} to fine-tune it{also}."
                      f"\n{err}")


def _differing_model_keys(source: str | Path, model_cfg, keys: tuple[str, ...] | None = None) -> tuple[str, str] | None:
    """The model keys (of `keys`; None: all but HOW_NOT_WHAT_KEYS) whose values differ between the run or export at
    source and model_cfg, as ("model.k=theirs ...", "model.k=ours, ...") (None if none)."""
    trained = {**ADDED_KEYS, **dotted_plain(trained_config(source).get("model") or {})}  # {"planner.num_heads": 6, ...}
    ours = dotted_plain(OmegaConf.to_container(model_cfg, resolve=True))
    compared = keys if keys is not None else [k for k in ours if k not in HOW_NOT_WHAT_KEYS]
    differ = [k for k in compared if k in trained and k in ours and trained[k] != ours[k]]
    if not differ:
        return None
    return " ".join(f"model.{k}={trained[k]}" for k in differ), ", ".join(f"model.{k}={ours[k]}" for k in differ)
