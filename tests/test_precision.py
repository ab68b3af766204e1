"""The CUDA precision path on the CPU: bf16 autocast and channels_last, which the code turns on only
on CUDA, forced here (torch supports both on the CPU) for a training step and a sampling loop of
every model, so dtype and memory-format mismatches surface without a GPU."""

import sys

import pytest
import torch

import histosynth.device
import histosynth.training.loop

ORIGINALS = {"autocast": histosynth.device.autocast, "prepare_model": histosynth.device.prepare_model,
             "make_accelerator": histosynth.training.loop.make_accelerator}


def _bf16_autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _channels_last(model, device):
    return model.to(device).to(memory_format=torch.channels_last)


def _bf16_accelerator(settings, find_unused_parameters=False):
    from accelerate import Accelerator

    return Accelerator(cpu=True, mixed_precision="bf16", step_scheduler_with_optimizer=False)


@pytest.fixture
def cuda_precision_on_cpu(monkeypatch):
    """Every histosynth module's autocast, prepare_model and make_accelerator behave as on CUDA."""
    forced = {"autocast": _bf16_autocast, "prepare_model": _channels_last, "make_accelerator": _bf16_accelerator}
    for name, module in list(sys.modules.items()):
        if name.startswith("histosynth") and module is not None:
            for attr, original in ORIGINALS.items():
                if getattr(module, attr, None) is original:
                    monkeypatch.setattr(module, attr, forced[attr])
    seen = []
    real = torch.autocast.__enter__

    def counting_enter(self):
        if self.fast_dtype == torch.bfloat16 and self._enabled:
            seen.append(self.device)
        return real(self)

    monkeypatch.setattr(torch.autocast, "__enter__", counting_enter)
    # accelerate keeps one process-wide state; an earlier fp32 Accelerator would refuse bf16
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield seen
    AcceleratorState._reset_state(True)


def test_diffusion_trains_and_samples_in_bf16(cuda_precision_on_cpu, tmp_path):
    import test_diffusion

    test_diffusion.test_pixel_training_writes_model_previews_and_loads_for_sampling(tmp_path)
    assert cuda_precision_on_cpu  # the training loop and the preview sampling ran under bf16


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver++"])
def test_every_sampler_loops_in_bf16_channels_last(cuda_precision_on_cpu, sampler):
    from test_diffusion import tiny_model

    from histosynth.generators.diffusion import train_scheduler
    from histosynth.generators.sampling import make_sampler, sample

    model = tiny_model(num_classes=2).to(memory_format=torch.channels_last)
    cond = torch.rand(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sample(model, make_sampler(sampler, train_scheduler({}).config), cond, torch.tensor([0, 1]), steps=3,
                     guidance=2.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all() and out.abs().max() <= 1


def test_autoencoder_trains_in_bf16(cuda_precision_on_cpu, tmp_path):
    import test_autoencoder

    test_autoencoder.test_kl_training_logs_the_kl_term(tmp_path)
    assert cuda_precision_on_cpu


def test_gan_trains_and_generates_in_bf16(cuda_precision_on_cpu, tmp_path):
    import test_gan

    test_gan.test_training_writes_model_losses_and_class_rows_of_previews(tmp_path)
    assert cuda_precision_on_cpu
