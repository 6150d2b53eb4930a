"""Console entry points. Hydra lives here only: the library below takes plain config objects.

Errors a user can fix (a bad value, a missing or unreadable file, a run folder in use, bad data, a missing
package) print one line naming the key or file, and exit with status 2; ``--debug`` or ``HYDRA_FULL_ERROR=1``
shows the traceback instead. mardini-sample and mardini-eval use the same ``user_errors``, and ``ArgumentParser``
for their command-line errors.

Exit status of mardini-train: 0 finished; 2 a user error; 75 (PREEMPTED_EXIT_CODE) stopped by SIGTERM after
saving a checkpoint; 130 (INTERRUPTED_EXIT_CODE) stopped by Ctrl-C (SIGINT), after saving a checkpoint if it
came during training (continue either with train.resume=auto); 1 any other failure.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import logging.handlers
import os
import signal
import sys
import traceback
from pathlib import Path

CONFIG_DIR = Path(os.environ.get("MARDINI_CONFIG_DIR", Path(__file__).resolve().parent.parent / "configs"))
USER_ERROR_EXIT_CODE = 2
# Exit status after Ctrl-C (SIGINT): the shell's 128 + SIGINT, so that a wrapper that requeues a pre-empted run (75,
# trainer.PREEMPTED_EXIT_CODE) leaves a run its user stopped alone.
INTERRUPTED_EXIT_CODE = 130
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's default job log format
# Exceptions that are the user's to fix, beside ValueError and OSError, by module (checked only once the module
# is loaded: an exception of a module that was never imported cannot have been raised).
USER_ERRORS = {
    "mardini.data.backends": ("MissingBackendError",),
    "mardini.data.decode": ("VideoDecodeError",),
    "mardini.data.latent_cache": ("LatentCacheError",),
    "mardini.data.video": ("TooManyFailuresError",),
    "mardini.training.runlock": ("RunLockedError",),
    "mardini.training.trainer": ("DataLoaderError", "NonFiniteLossError", "RankFailedError",
                                 "TrainingOutOfMemoryError"),
}


def is_user_error(error: BaseException) -> bool:
    types = [ValueError, OSError]
    for module, names in USER_ERRORS.items():
        if module in sys.modules:
            types += [getattr(sys.modules[module], name) for name in names]
    return isinstance(error, tuple(types))


def error_message(error: BaseException) -> str:
    """The message on one line; for an error re-raised from a DataLoader worker, the worker's own message."""
    text = str(error).strip() or type(error).__name__
    if text.startswith("Caught ") and "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split("\n"))


@contextlib.contextmanager
def user_errors(prog: str, debug: bool = False, hint: str = "--debug shows the traceback"):
    """Turn a user error into one line on stderr and exit status 2; other errors keep their traceback."""
    try:
        yield
    except Exception as e:
        if debug or os.environ.get("HYDRA_FULL_ERROR") == "1" or not is_user_error(e):
            raise
        rank = f" (rank {os.environ.get('RANK')})" if _world_size() > 1 else ""
        print(f"{prog}: error{rank}: {error_message(e)}\n({hint})", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT_CODE) from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, like the other user errors, instead of the whole usage block first."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}\n({self.prog} --help shows the options)", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT_CODE)


@contextlib.contextmanager
def interrupts(prog: str, debug: bool = False):
    """Ctrl-C where nothing catches it (mardini-train's start-up, end-of-run videos and export, a second Ctrl-C;
    anywhere in mardini-sample and mardini-eval): one line and status 130 instead of a KeyboardInterrupt traceback."""
    try:
        yield
    except KeyboardInterrupt as e:
        if debug:
            raise
        print(_interrupted_line(prog, e), file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None


def _interrupted_line(prog: str, error: KeyboardInterrupt) -> str:
    return f"{prog}: interrupted" + (f" ({error})" if str(error) else "")


def take_flag(argv: list[str], flag: str) -> bool:
    """Remove `flag` from argv (Hydra would reject it as an override); True when it was there."""
    found = flag in argv
    while flag in argv:
        argv.remove(flag)
    return found


def default_preset_clashes(overrides: list[str] | tuple[str, ...]) -> tuple[str, list[str]]:
    """(the default experiment preset, the config groups chosen in `overrides` whose values it would overwrite).

    Why: config.yaml composes the groups first and the preset last, so that `mardini-train` alone runs the default
    job; the default preset (tiny_synthetic) also sets values of the model, data and train groups (batch size,
    learning rate, steps, motion estimate), which would silently replace those of a group the command line chose
    (`model=small train=gpu` would train at the tiny job's batch 8). Such a group is one whose name is a top-level
    key of the preset's body; an override naming the experiment keeps the preset."""
    from omegaconf import OmegaConf

    entries = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "config.yaml")).get("defaults", [])
    preset = next((e["experiment"] for e in entries if isinstance(e, dict) and "experiment" in e), None)
    keys = [_override_key(o) for o in overrides if not o.startswith("-")]
    other_config = any(o.split("=", 1)[0] in ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd")
                       for o in overrides)  # another primary config: its own defaults, not config.yaml's
    if preset is None or "experiment" in keys or other_config:
        return preset, []
    body = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "experiment" / f"{preset}.yaml"))
    groups = [k for k in body if k not in ("defaults", "experiment") and (CONFIG_DIR / k).is_dir()]
    return preset, sorted({k for k in keys if k in groups})


def _override_key(override: str) -> str:
    """`+model=small` -> `model`: the key a Hydra override sets (or deletes, `~key`)."""
    return override.split("=", 1)[0].lstrip("+~")


def with_groups_as_written(overrides: list[str]) -> list[str]:
    """overrides, plus `~experiment` (no preset) when they choose a group the default preset would overwrite
    (default_preset_clashes): `mardini-train model=small data=synthetic_large train=gpu` then trains what those
    groups say. `mardini-train` alone, value overrides (train.lr=...) and other groups (curriculum=paper) keep the
    default job."""
    clashes = default_preset_clashes(overrides)[1]
    if not clashes:
        return list(overrides)
    # right after a clashing override, so that it joins the positional overrides wherever Hydra's flags stand
    at = next(i for i, o in enumerate(overrides) if _override_key(o) in clashes) + 1
    return [*overrides[:at], "~experiment", *overrides[at:]]


def compose_config(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config", validate: bool = True):
    """Compose (and validate) the run config without starting a run (tests, notebooks, tools), as mardini-train
    would (with_groups_as_written)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .training.config import register_configs, validate_config

    register_configs()
    GlobalHydra.instance().clear()
    if config_name == "config":
        overrides = with_groups_as_written(list(overrides))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    if validate:
        validate_config(cfg)
    return cfg


def check_overrides(prog: str, overrides: list[str]) -> None:
    """Compose the config once before Hydra does: an unknown key or option is then one line that names it and the
    nearest valid one, instead of Hydra's block (whose suggestion, `+key=value`, would only fail later)."""
    import difflib
    import re

    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    if any(o.startswith("-") for o in overrides):  # Hydra's own flags (--config-name X, -m, ...): leave it to Hydra
        return
    overrides = [o for o in overrides if not o.startswith(("hydra.", "+hydra.", "++hydra.", "~hydra."))]
    if not overrides:
        return
    bare = next((o for o in overrides if "=" not in o and not o.startswith("~")), None)
    if bare is not None:  # Hydra's own words: "Error parsing override"
        print(f"{prog}: error: {bare}: an override is key=value or group=option (e.g. train.lr=1e-3, model=small)\n"
              f"(--debug shows Hydra's message)", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT_CODE)
    launcher = next((o for o in overrides if _override_key(o) == "accelerate"), None)
    if launcher is not None:  # configs/accelerate/ sits beside the groups, so Hydra lists it as one
        name = launcher.split("=", 1)[-1] or "<name>"
        print(f"{prog}: error: {launcher}: configs/accelerate/ holds launcher configs, not a config group; launch "
              f"with them: accelerate launch --config_file configs/accelerate/{name}.yaml -m mardini.train ...\n"
              f"(the README's GPUs section shows such launches)", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT_CODE)
    try:
        compose_config(overrides, validate=False)
    except HydraException as e:
        message = f"{e}\n{e.__cause__ or ''}"
        first = message.strip().splitlines()[0]
        key = re.search(r"full_key: (\S+)", message)
        group = re.search(r"Could not find '([^/']+)/([^']+)'", message)
        bad_value = re.search(r"Value '(.*)' (?:of type '\w+' could not be converted to (\w+)|is not a valid (\w+))",
                              message)
        if key and bad_value:  # a known key given a value of the wrong type
            wanted = (bad_value.group(2) or bad_value.group(3)).lower()
            first = f"{key.group(1)}={bad_value.group(1)}: not a valid {wanted}"
        elif key:
            parent = key.group(1).rpartition(".")[0]
            node = compose_config(validate=False)
            node = OmegaConf.select(node, parent) if parent else node
            known = [f"{parent}.{k}" if parent else str(k) for k in (node.keys() if node is not None else [])]
            near = difflib.get_close_matches(key.group(1), known, n=1)
            first = f"unknown config key {key.group(1)}" + (f" (did you mean {near[0]}?)" if near else "")
            if key.group(1) in known and f"~{key.group(1)}" in overrides:  # it exists: Hydra cannot delete it
                first = (f"~{key.group(1)}: the run config's keys cannot be deleted; set a value instead "
                         f"({key.group(1)}=...)")
        elif group:
            options = sorted(p.stem for p in (CONFIG_DIR / group.group(1)).glob("*.yaml"))
            first = f"{group.group(1)}={group.group(2)}: no such option (choose one of {', '.join(options)})"
        where = "; docs/CONFIG.md lists the keys and their types" if key else ""
        print(f"{prog}: error: {first}{where}\n(--debug shows Hydra's message)", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT_CODE) from None


def train_main() -> None:
    """`mardini-train [--debug] [hydra overrides]`: train; the default runs the tiny synthetic experiment on CPU."""
    debug = take_flag(sys.argv, "--debug")
    with interrupts("mardini-train", debug):
        import hydra

        from .training.config import register_configs

        register_configs()
        preset, clashes = default_preset_clashes(sys.argv[1:])
        sys.argv[1:] = with_groups_as_written(sys.argv[1:])
        if not (debug or os.environ.get("HYDRA_FULL_ERROR") == "1"):
            check_overrides("mardini-train", sys.argv[1:])

        @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
        def app(cfg) -> None:
            logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stdout, force=True)
            if clashes:
                logging.getLogger("mardini.train").info(
                    "the default preset experiment=%s is not applied: it would overwrite the values of %s chosen "
                    "on the command line (name a preset with experiment=... to apply one)", preset,
                    ", ".join(f"{g}={_override_value(g)}" for g in clashes))
            try:
                with user_errors("mardini-train", debug, "--debug or HYDRA_FULL_ERROR=1 shows the traceback"):
                    status = _train(cfg)
            except BaseException as e:
                if _world_size() > 1:
                    _exit_at_once(e)
                raise
            _end_process_group()
            if status:
                sys.exit(status)

        app()


def _override_value(group: str) -> str:
    """The option of `group` chosen on the command line (for the log line)."""
    return next((o.split("=", 1)[1] for o in sys.argv[1:] if "=" in o and _override_key(o) == group), "?")


def _train(cfg) -> int:
    """Build the Trainer (it validates the config, locks the run folder and checks what the run will need), and
    only then record the run in its folder (.hydra/, <job>.log, with the log lines of the start-up): a refused
    run writes nothing there, and the folder Hydra made for it is removed (the Trainer released its lock). Train;
    returns the exit status: 0, or that of a run stopped by SIGTERM / SIGINT after its checkpoint."""
    from hydra.core.hydra_config import HydraConfig

    from .training.trainer import PREEMPTED_EXIT_CODE, Trainer

    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    startup = logging.handlers.MemoryHandler(capacity=10**6, flushLevel=logging.CRITICAL + 1)
    logging.getLogger().addHandler(startup)
    try:
        trainer = Trainer(cfg)
    except BaseException:
        _remove_if_empty(hydra_dir)  # Hydra made it for this run
        raise
    finally:
        logging.getLogger().removeHandler(startup)
    if trainer.run_dir != hydra_dir.resolve():  # train.output_dir chose another folder
        _remove_if_empty(hydra_dir)
    if trainer.accelerator.is_main_process:
        _record_run(cfg, trainer.run_dir, startup)
    startup.close()
    export = trainer.fit()
    if not trainer.preempted:
        if trainer.accelerator.is_main_process:  # after the trackers' own closing lines, so that it is seen
            logging.getLogger("mardini.train").info(
                "finished: the export is %s; score it on held-out clips with `python benchmarks/demo_quality.py %s`, "
                "generate with `mardini-sample --model %s --task ...`", *[_shown_path(export)] * 3)
        return 0
    return INTERRUPTED_EXIT_CODE if trainer.stop_signal == signal.SIGINT else PREEMPTED_EXIT_CODE


def _shown_path(path: Path) -> str:
    """The path relative to the working directory where it lies below it (what the user would type), else as is."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _record_run(cfg, run_dir: Path, startup: logging.handlers.MemoryHandler) -> None:
    """What Hydra writes at the start of a job (it is told not to: configs/config.yaml): .hydra/config.yaml,
    hydra.yaml, overrides.yaml, and the job log, starting with the lines held back during start-up."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    hydra_cfg = HydraConfig.instance().cfg  # {"hydra": ...}
    folder = run_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    OmegaConf.save(hydra_cfg, folder / "hydra.yaml")
    OmegaConf.save(hydra_cfg.hydra.overrides.task, folder / "overrides.yaml")
    handler = logging.FileHandler(run_dir / f"{hydra_cfg.hydra.job.name}.log")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    startup.setTarget(handler)
    startup.flush()
    logging.getLogger().addHandler(handler)


class FoldersAsFound:
    """Hydra callback (configs/config.yaml, hydra.callbacks): before Hydra makes the run folder with its parents,
    note the deepest of them that exists, so that a refused run (or one whose train.output_dir is elsewhere) removes
    the empty folders Hydra made for it (outputs/<experiment>/ too) and no folder that was there before."""

    deepest_existing: Path | None = None

    def on_run_start(self, config, **kwargs) -> None:
        from omegaconf import OmegaConf

        run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir"))).absolute()
        FoldersAsFound.deepest_existing = next(p for p in run_dir.parents if p.exists())

    def _nothing(self, *args, **kwargs) -> None:  # Hydra calls each of its callback's hooks
        pass

    on_run_end = on_multirun_start = on_multirun_end = on_job_start = on_job_end = _nothing


def _remove_if_empty(folder: Path) -> None:
    """Remove `folder` if empty, then its parents while empty, up to the deepest one that existed before the run."""
    folder, stop = folder.absolute(), FoldersAsFound.deepest_existing
    while True:
        try:
            folder.rmdir()
        except OSError:
            return
        if stop is None or folder.parent == stop or stop not in folder.parents:
            return
        folder = folder.parent


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _end_process_group() -> None:
    """Every rank got here: leave the process group together (quiets torch's warning, frees NCCL cleanly)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _exit_at_once(error: BaseException) -> None:
    """A failed rank of a distributed job leaves now, skipping the interpreter's shutdown: that can block in a
    process group's destructor (NCCL), and then the launcher never learns of the failure while the other ranks
    wait at a collective. Once this process is gone, torchrun stops the others."""
    if isinstance(error, SystemExit):
        code = error.code if isinstance(error.code, int) else 1
    elif isinstance(error, KeyboardInterrupt):
        print(_interrupted_line("mardini-train", error), file=sys.stderr)
        code = INTERRUPTED_EXIT_CODE
    else:
        traceback.print_exc()
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
