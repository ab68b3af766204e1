"""Device and precision: picked once per job, the same code on CPU and CUDA."""

from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger(__name__)


def pick_device(requested: str = "auto"):
    """The torch device a job uses: CUDA when available (respecting CUDA_VISIBLE_DEVICES, as set
    by Snakemake/SLURM for the job's `gpu` resource), else CPU; 'cpu' or 'cuda' force one. Logged."""
    import torch

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "device 'cuda' requested but torch sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); use 'auto' or 'cpu'"
        )
    device = torch.device(requested)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if device.type == "cuda":
        log.info(
            "device: %s (%s; CUDA_VISIBLE_DEVICES=%s), bf16 autocast and channels_last on",
            device,
            torch.cuda.get_device_name(device),
            visible,
        )
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
