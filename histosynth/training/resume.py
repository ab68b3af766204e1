"""Which run configs a checkpoint may resume, torch-free (the workflow's DAG parse hashes them):
config_differences names the keys two run configs differ in, resume_key names a training's
checkpoint folder by the keys a resume must match."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

# Dotted keys of the run config that may change between a checkpoint and its resumption: how far
# to train and how to report it, not what is trained.
RESUME_IGNORED = frozenset(
    {
        "train.steps",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.log_every",
        "train.num_workers",
        "train.device",
        "train.sample_every",
        "train.sample_count",
        "train.sample_steps",
        "train.sample_sampler",
        "train.sample_guidance",
        "train.eval_every",
        "train.eval_images",
        "autoencoder.path",
        "scale_items",
        "val_items",
    }
)


def flatten(config: Mapping, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def plain(config: Mapping) -> dict:
    """As JSON would give it back (tuples become lists), so saved and current configs compare."""
    return json.loads(json.dumps(config, default=str))


def config_differences(saved: Mapping, current: Mapping, ignore=RESUME_IGNORED) -> list[str]:
    """Dotted keys whose values differ between two run configs, ignoring `ignore`."""
    a, b = flatten(plain(saved)), flatten(plain(current))
    missing = object()
    return sorted(k for k in a.keys() | b.keys() if k not in ignore and a.get(k, missing) != b.get(k, missing))


def resume_key(section: Mapping, *context) -> str:
    """12 hex digits naming a training's checkpoint folder: a hash of its config section's keys a
    resume must match (all but RESUME_IGNORED) and of the data settings in `context`, so a changed
    config starts in a fresh folder and an unchanged one resumes."""
    flat = {k: v for k, v in flatten(plain(section)).items() if k not in RESUME_IGNORED}
    return hashlib.sha256(json.dumps([flat, plain(list(context))], sort_keys=True).encode()).hexdigest()[:12]
