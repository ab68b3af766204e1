"""Checkpoints of `fit`: model (and EMA) weights, optimiser and LR-schedule states, the step counter,
each process's RNG states and the run config a resume must match, written atomically."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from histosynth.files import atomic_dir
from histosynth.training.errors import ConfigMismatchError, NonFiniteLossError, TrainingError
from histosynth.training.resume import config_differences, flatten, plain


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    directory = Path(directory)
    found = [
        p for p in directory.glob("step-*") if p.is_dir() and p.name[5:].isdigit() and (p / "trainer.pt").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _weights_file(model_dir: Path) -> Path:
    files = sorted(model_dir.glob("*.safetensors"))
    if len(files) != 1:
        raise TrainingError(f"{model_dir}: expected one .safetensors weights file, found {[f.name for f in files]}")
    return files[0]


def save_weights(model: nn.Module, folder: Path) -> None:
    """The default weights hook of `fit`: save_pretrained where the model has it (a diffusers
    ModelMixin: its config beside the weights), else the state dict as folder/model.safetensors."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder)
        return
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")


def load_weights(model: nn.Module, model_dir: Path) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(_weights_file(model_dir), device="cpu"))


def all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@dataclass
class Progress:
    step: int = 0
    seconds: float = 0.0  # training wall time over all runs


def _states(objects: dict, key: str) -> dict:
    """trainer.pt's entries for optimisers or LR schedules ({name: object}): one under `key` (the
    file as it was before fit took several optimisers), several under `key + 's'` by name."""
    if len(objects) == 1:
        return {key: next(iter(objects.values())).state_dict()}
    return {f"{key}s": {name: obj.state_dict() for name, obj in objects.items()}}


def _load_states(objects: dict, state: dict, key: str, path: Path) -> None:
    saved = state[f"{key}s"] if f"{key}s" in state else {next(iter(objects)): state[key]} if len(objects) == 1 else {}
    if set(saved) != set(objects):
        raise TrainingError(
            f"{path} holds the {key} states of {sorted(saved) or 'one unnamed ' + key}, this training "
            f"has {sorted(objects)}; delete {path.parent} to start over"
        )
    for name, obj in objects.items():
        obj.load_state_dict(saved[name])


def save_checkpoint(
    directory: Path,
    progress: Progress,
    model,
    ema,
    optimizers: dict,
    lr_schedules: dict,
    run_config,
    rngs,
    loss_csv,
    keep,
    save_model: Callable[[nn.Module, Path], None] = save_weights,
):
    """Write `directory/step-<n>/` atomically (model/ and ema/ by `save_model`, trainer.pt, config.json,
    loss.csv); then drop all but the newest `keep`. optimizers, lr_schedules: {update name: object}."""
    if not all_finite(model):
        raise NonFiniteLossError(f"refusing to checkpoint step {progress.step}: the model has non-finite weights")
    with atomic_dir(directory / f"step-{progress.step}") as tmp:
        save_model(model, tmp / "model")
        if ema is not None:
            save_model(ema.model, tmp / "ema")
        torch.save(
            {
                "step": progress.step,
                "seconds": progress.seconds,
                **_states(optimizers, "optimizer"),
                **_states(lr_schedules, "lr_schedule"),
                "ema_updates": ema.updates if ema else 0,
                "rng": rngs,
            },
            tmp / "trainer.pt",
        )
        (tmp / "config.json").write_text(json.dumps(plain(run_config), indent=2, sort_keys=True))
        if Path(loss_csv).is_file():
            shutil.copy2(loss_csv, tmp / "loss.csv")
    for old in checkpoints(directory)[: -max(1, int(keep))]:
        shutil.rmtree(old, ignore_errors=True)
    return directory / f"step-{progress.step}"


def load_checkpoint(path: Path, run_config, model, ema, optimizers: dict, lr_schedules: dict, rank: int) -> Progress:
    """Restore everything `save_checkpoint` wrote, after checking the run config matches."""
    saved = json.loads((path / "config.json").read_text())
    differing = config_differences(saved, run_config)
    if differing:
        details = "; ".join(
            f"{k}: {flatten(saved).get(k, '<absent>')!r} -> {flatten(plain(run_config)).get(k, '<absent>')!r}"
            for k in differing
        )
        raise ConfigMismatchError(
            f"checkpoint {path} was made with a different config; differing keys: "
            f"{', '.join(differing)} ({details}). Restore those values, or delete "
            f"{path.parent} to start over."
        )
    state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    load_weights(model, path / "model")
    if ema is not None:
        load_weights(ema.model, path / "ema")
        ema.updates = state["ema_updates"]
    _load_states(optimizers, state, "optimizer", path)
    _load_states(lr_schedules, state, "lr_schedule", path)
    rngs = state["rng"]
    if rank >= len(rngs):
        raise TrainingError(
            f"{path} holds RNG states of {len(rngs)} processes; cannot resume process {rank} "
            "(resume with the same number of processes)"
        )
    set_rng_state(rngs[rank])
    return Progress(step=state["step"], seconds=state["seconds"])
