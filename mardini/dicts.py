"""Nested dicts by dotted key ({"dataset": {"config": {"num_frames": 17}}} -> {"dataset.config.num_frames": 17}).

Why: settings are compared and reported by the key a user would type (a latent cache's against a rerun's, a
checkpoint's model against a run's) and trackers take flat configs; one definition serves them all. ``undotted``
turns such a dict back into a nested one (a model built from a run's settings with one of them changed).
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


def dotted_plain(d: dict) -> dict:
    """dotted(d) with values a tracker can store, anything but a number, string, bool or None as its string (a
    list compares as its text, the way a tracker's config would show it)."""
    return {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for k, v in dotted(d).items()}


def undotted(d: dict) -> dict:
    """The inverse of dotted: {"a.b": 1} -> {"a": {"b": 1}} (to build an object from settings compared by key)."""
    out: dict = {}
    for key, value in d.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out
