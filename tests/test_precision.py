"""The CUDA precision path on the CPU: bf16 autocast and channels_last, which the code turns on only
on CUDA, forced here (torch supports both on the CPU) for a training step and a sampling loop of
every model, so dtype and memory-format mismatches surface without a GPU."""

import sys

import pytest
import torch

import histosynth.device
import histosynth.training.loop

from helpers import Shapes, Toy, tiny, tiny_model

ORIGINALS = {
    "autocast": histosynth.device.autocast,
    "prepare_model": histosynth.device.prepare_model,
    "make_accelerator": histosynth.training.loop.make_accelerator,
}


def _bf16_autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _channels_last(model, device):
    return model.to(device).to(memory_format=torch.channels_last)


def _bf16_accelerator(settings, find_unused_parameters=False):
    from accelerate import Accelerator

    return Accelerator(cpu=True, mixed_precision="bf16", step_scheduler_with_optimizer=False)


def _histosynth_caller() -> str:
    """module:function of the innermost histosynth frame that entered the autocast context, with
    ' in fit' when the training loop (histosynth.training.loop.fit) runs it."""
    frame, caller, in_fit = sys._getframe(2), "outside histosynth", False
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("histosynth") and caller == "outside histosynth":
            caller = f"{module}:{frame.f_code.co_name}"
        in_fit |= module == "histosynth.training.loop" and frame.f_code.co_name == "fit"
        frame = frame.f_back
    return caller + (" in fit" if in_fit else "")


@pytest.fixture
def cuda_precision_on_cpu(monkeypatch):
    """Every histosynth module's autocast, prepare_model and make_accelerator behave as on CUDA;
    yields the set of module:function places that ran under bf16 autocast."""
    forced = {"autocast": _bf16_autocast, "prepare_model": _channels_last, "make_accelerator": _bf16_accelerator}
    for name, module in list(sys.modules.items()):
        if name.startswith("histosynth") and module is not None:
            for attr, original in ORIGINALS.items():
                if getattr(module, attr, None) is original:
                    monkeypatch.setattr(module, attr, forced[attr])
    seen = set()
    real = torch.autocast.__enter__

    def recording_enter(self):
        if self.fast_dtype == torch.bfloat16 and self._enabled:
            seen.add(_histosynth_caller())
        return real(self)

    monkeypatch.setattr(torch.autocast, "__enter__", recording_enter)
    # accelerate keeps one process-wide state; an earlier fp32 Accelerator would refuse bf16
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield seen
    AcceleratorState._reset_state(True)


def test_diffusion_trains_and_samples_in_bf16(cuda_precision_on_cpu, tmp_path):
    from histosynth.generators.diffusion import load_diffusion
    from histosynth.generators.train_diffusion import train_diffusion

    config = {**tiny(steps=2, sample_every=2, sample_steps=2, sample_count=2), "conditioning": "concat"}
    train_diffusion(Shapes(n=4), tmp_path, config, seed=0)
    assert torch.isfinite(load_diffusion(tmp_path / "model").model.conv_in.weight).all()
    # the training step (accelerate's bf16 forward inside fit) and the preview sampling
    assert {
        "histosynth.generators.diffusion:model_output in fit",
        "histosynth.generators.train_diffusion:on_step in fit",
    } <= cuda_precision_on_cpu, cuda_precision_on_cpu


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver++"])
def test_every_sampler_loops_in_bf16_channels_last(cuda_precision_on_cpu, sampler):
    from histosynth.generators.diffusion import train_scheduler
    from histosynth.generators.sampling import make_sampler, sample

    model = tiny_model(num_classes=2).to(memory_format=torch.channels_last)
    cond = torch.rand(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sample(
            model,
            make_sampler(sampler, train_scheduler({}).config),
            cond,
            torch.tensor([0, 1]),
            steps=3,
            guidance=2.0,
            generator=torch.Generator().manual_seed(0),
        )
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all() and out.abs().max() <= 1


def test_autoencoder_trains_and_evaluates_in_bf16(cuda_precision_on_cpu, tmp_path):
    from histosynth.generators.autoencoder import load_autoencoder, train_autoencoder

    config = {
        "kind": "kl",
        "channels": [8, 16, 16],
        "norm_groups": 4,
        "latent_channels": 4,
        "factor": 4,
        "scale_items": 8,
        "val_items": 8,
        "train": {"steps": 2, "batch_size": 2, "lr": 3e-3, "log_every": 1, "checkpoint_every": 100},
    }
    train_autoencoder(Shapes(n=4), tmp_path, config, seed=0)
    assert load_autoencoder(tmp_path / "model").__class__.__name__ == "AutoencoderKL"
    # the training step, the latent scale measurement and the reconstruction metrics
    assert {
        "histosynth.generators.autoencoder:loss_fn in fit",
        "histosynth.generators.autoencoder:_measure_scale",
        "histosynth.generators.autoencoder:evaluate",
    } <= cuda_precision_on_cpu, cuda_precision_on_cpu


def test_gan_trains_and_generates_in_bf16(cuda_precision_on_cpu, tmp_path):
    from histosynth.generators.gan import generate, load_gan, train

    settings = {
        "ch_max": 32,
        "width": 8,
        "size": 16,
        "attention_g": [8],
        "attention_d": [16],
        "train": {
            "steps": 2,
            "batch_size": 4,
            "checkpoint_every": 2,
            "log_every": 1,
            "sample_every": 2,
            "sample_count": 2,
            "ema_decay": 0.9,
            "diffaugment": True,
            "class_balance": 0.0,
        },
    }
    train([Toy()[i] for i in range(6)], tmp_path, settings, seed=1, labels=["red", "blue"])
    images = generate(load_gan(tmp_path / "model"), torch.tensor([0, 1]), [1, 2])
    assert images.shape == (2, 16, 16, 3)
    # the discriminator and generator steps, the preview grid and generation from the saved model
    assert {
        "histosynth.generators.gan:d_loss in fit",
        "histosynth.generators.gan:g_loss in fit",
        "histosynth.generators.gan:preview in fit",
        "histosynth.generators.gan:generate",
    } <= cuda_precision_on_cpu, cuda_precision_on_cpu
