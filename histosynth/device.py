"""Device, precision and seeding: picked once per job, the same code on CPU and CUDA."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import zlib

import numpy as np

log = logging.getLogger(__name__)


def derive_seed(master: int, *names: object) -> int:
    """A stable 31-bit seed for one unit of work (e.g. a slide), derived from the master seed and
    its names; unlike hash(), it does not change between Python processes."""
    key = ":".join([str(master), *map(str, names)]).encode()
    return zlib.crc32(key) & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for a deterministic run."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(requested: str = "auto"):
    """The torch device a job uses: CUDA when available (respecting CUDA_VISIBLE_DEVICES, as set
    by Snakemake/SLURM for the job's `gpu` resource), else CPU; 'cpu' or 'cuda' force one. Logged."""
    import torch

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); use 'auto' or 'cpu'")
    device = torch.device(requested)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if device.type == "cuda":
        log.info("device: %s (%s; CUDA_VISIBLE_DEVICES=%s), bf16 autocast and channels_last on",
                 device, torch.cuda.get_device_name(device), visible)
    else:
        note = f"; CUDA_VISIBLE_DEVICES={visible} but torch sees no CUDA device" if visible else ""
        log.info("device: cpu (%d threads), fp32%s", torch.get_num_threads(), note)
    return device


def autocast(device):
    """bf16 autocast on CUDA; a no-op context on CPU."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model, device):
    """Move a model to the device, in channels_last memory format on CUDA."""
    import torch

    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model
