"""Console entry points. Hydra lives here only: the library below takes plain config objects."""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_DIR = Path(os.environ.get("MARDINI_CONFIG_DIR", Path(__file__).resolve().parent.parent / "configs"))


def compose_config(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config"):
    """Compose and validate the run config without starting a run (tests, notebooks, tools)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .training.config import register_configs, validate_config

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    validate_config(cfg)
    return cfg


def train_main() -> None:
    """`mardini-train [hydra overrides]`: train; the default runs the tiny synthetic experiment on CPU."""
    import hydra

    from .training.config import register_configs

    register_configs()

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
    def app(cfg) -> None:
        from .training.trainer import train

        train(cfg)

    app()
