"""Nested dicts by dotted key ({"dataset": {"config": {"num_frames": 17}}} -> {"dataset.config.num_frames": 17}).

Why: settings are compared and reported by the key a user would type (a latent cache's against a rerun's, a
checkpoint's model against a run's) and trackers take flat configs; one definition serves them all.
"""

from __future__ import annotations


def dotted(d: dict, prefix: str = "") -> dict:
    """The leaves of a nested dict by dotted key, values as they are."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
