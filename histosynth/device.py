"""Device, precision and memory format: picked once per job, the same code on CPU and CUDA.

What runs on each device was chosen by measurement (benchmarks/train_step.py, docs/benchmarks.md):
- CUDA: bf16 autocast and channels_last.
- CPU: channels_last too (faster for every model the demo trains on 2 AVX2 cores: segmentation
  U-Net step 16 %, classifier 10 %, diffusion 3 % and its sampling 7 %), but fp32: bf16 autocast
  on a CPU without native bf16 instructions is emulated (the demo's diffusion step measured over
  15x slower), and no torch.compile (2 min to compile, then a slower step: 2.35 s against 1.92 s).
"""

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
        log.info(
            "device: cpu (%s)%s; channels_last on, fp32 (CPU bf16 autocast is emulated without native "
            "bf16 instructions: measured over 15x slower), no torch.compile (slower on CPU; see histosynth.device)",
            "1 thread" if torch.get_num_threads() == 1 else f"{torch.get_num_threads()} threads",
            note,
        )
    return device


def autocast(device):
    """bf16 autocast on CUDA; a no-op context on CPU."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model, device):
    """Move a model to the device, in channels_last memory format (on CPU and CUDA)."""
    import torch

    return model.to(device).to(memory_format=torch.channels_last)


def channels_last(images):
    """A batch of images (N, C, H, W) in channels_last memory format, as prepare_model's models take them."""
    import torch

    return images.contiguous(memory_format=torch.channels_last)
