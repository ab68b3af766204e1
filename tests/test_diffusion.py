"""Diffusion stage: SpadeUNet and concat U-Net shapes, save/load round trips, the sampling loop
with each scheduler, determinism, latent space with its autoencoder, preview grids."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from histosynth.generators.autoencoder import build_autoencoder
from histosynth.generators.diffusion import (
    SpadeUNet,
    build_model,
    load_diffusion,
    model_output,
    parameter_count,
    train_scheduler,
)
from histosynth.generators.sampling import SAMPLERS, guided_output, make_sampler, sample
from histosynth.generators.train_diffusion import train_diffusion
from histosynth.training.errors import TrainingError

from helpers import Shapes, tiny, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("conditioning", ["spade", "concat"])
@pytest.mark.parametrize("channels,num_classes", [(3, 0), (4, 0), (3, 2), (8, 2)])
def test_forward_shapes_pixel_and_latent_with_and_without_classes(conditioning, channels, num_classes):
    model = tiny_model(conditioning, channels, 3, num_classes)
    x, cond = torch.randn(2, channels, 16, 16), torch.rand(2, 3, 16, 16)
    labels = torch.tensor([0, 1]) if num_classes else None
    with torch.no_grad():
        eps = model_output(model, x, torch.tensor([3, 999]), cond, labels)
        eps_scalar_t = model_output(model, x, 10, cond)  # scalar timestep, null class
    assert eps.shape == eps_scalar_t.shape == x.shape


@pytest.mark.parametrize("conditioning", ["spade", "concat"])
def test_conditioning_and_class_change_the_prediction(conditioning):
    model = tiny_model(conditioning, num_classes=2)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([500, 500])
    cond = Shapes(n=2)[0]["cond"].expand(2, -1, -1, -1)
    with torch.no_grad():
        base = model_output(model, x, t, cond, torch.tensor([0, 0]))
        assert not torch.allclose(base, model_output(model, x, t, torch.zeros_like(cond), torch.tensor([0, 0])))
        assert not torch.allclose(base, model_output(model, x, t, cond, torch.tensor([1, 1])))


def test_spade_unet_gradients_reach_encoder_and_spade_convs():
    model = tiny_model().train()
    model_output(
        model, torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.rand(2, 3, 16, 16)
    ).square().mean().backward()
    assert model.conv_in.weight.grad.abs().sum() > 0
    assert model.up[0][0].norm1.gamma.weight.grad.abs().sum() > 0
    assert model.mid_attention.to_q.weight.grad.abs().sum() > 0


def test_spade_unet_rejects_sizes_it_cannot_halve():
    with pytest.raises(ValueError, match="divisible by 2"):
        tiny_model()(torch.randn(1, 3, 15, 15), 1, torch.rand(1, 3, 15, 15))


def test_save_pretrained_round_trip_gives_identical_outputs(tmp_path):
    model = tiny_model(num_classes=2)
    model.save_pretrained(tmp_path)
    loaded = SpadeUNet.from_pretrained(tmp_path).eval()
    assert json.loads((tmp_path / "config.json").read_text())["out_channels"] == 3
    x, cond, t, labels = (
        torch.randn(2, 3, 16, 16),
        torch.rand(2, 3, 16, 16),
        torch.tensor([5, 700]),
        torch.tensor([1, 0]),
    )
    with torch.no_grad():
        assert torch.equal(model(x, t, cond, labels), loaded(x, t, cond, labels))


def test_thesis_preset_is_about_90m_parameters():
    from histosynth.config import load_preset
    from histosynth.nuclei.conditioning import channel_names

    config = load_preset("thesis")  # config/thesis.yaml layered on config/config.yaml, as the workflow reads it
    thesis, autoencoder = config["diffusion"], config["autoencoder"]
    assert thesis["space"] == "latent" and thesis["conditioning"] == "spade"
    cond = config["conditioning"]
    cond_channels = len(
        channel_names(
            config["classes"], use_regions=cond["regions"], use_nuclei=cond["nuclei"], use_boundaries=cond["boundaries"]
        )
    )
    with torch.device("meta"):  # on the latents of the thesis autoencoder: 4 x 32 x 32 for 256 px patches
        model = build_model(
            thesis, autoencoder["latent_channels"], cond_channels, config["patches"]["size"] // autoencoder["factor"]
        )
    assert 85e6 < parameter_count(model) < 95e6
    assert len(model.down) == 5 and model.mid_attention is not None  # 4 downsamplings, attention at the bottleneck


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_sampler_runs_through_sample_with_guidance(sampler):
    model, cond, labels = tiny_model(num_classes=2), torch.rand(2, 3, 16, 16), torch.tensor([0, 1])
    config = train_scheduler({}).config
    out = sample(
        model,
        make_sampler(sampler, config),
        cond,
        labels,
        steps=3,
        guidance=2.0,
        generator=torch.Generator().manual_seed(0),
    )
    # the same run written out: standard normal start, the scheduler's 3 steps on the guided output
    # u + 2 (c - u) (u: mask zeroed and the null class 2), clamped to [-1, 1] at the end
    scheduler, generator = make_sampler(sampler, config), torch.Generator().manual_seed(0)
    scheduler.set_timesteps(3)
    x = torch.randn(2, 3, 16, 16, generator=generator) * scheduler.init_noise_sigma
    assert len(scheduler.timesteps) == 3
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            c = model_output(model, x_in, t, cond, labels)
            u = model_output(model, x_in, t, torch.zeros_like(cond), torch.tensor([2, 2]))
            x = scheduler.step(u + 2.0 * (c - u), t, x, generator=generator).prev_sample
    torch.testing.assert_close(out, x.clamp(-1, 1), rtol=1e-4, atol=1e-4)
    unguided = sample(
        model, make_sampler(sampler, config), cond, labels, steps=3, generator=torch.Generator().manual_seed(0)
    )
    assert not torch.allclose(out, unguided)


def test_same_generator_seed_gives_identical_samples_and_other_seeds_differ():
    model, cond = tiny_model("concat"), torch.rand(2, 3, 16, 16)
    scheduler = make_sampler("ddpm", train_scheduler({}).config)
    run = lambda seed: sample(model, scheduler, cond, steps=4, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_guidance_one_is_the_conditional_prediction():
    model, x, cond = tiny_model(num_classes=2), torch.randn(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(guided_output(model, x, 5, cond, None, 1.0), model_output(model, x, 5, cond))
        t = torch.tensor([5, 800])
        eps = guided_output(model, x, t, cond, torch.tensor([1, 0]), 3.0)
        c, u = model_output(model, x, t, cond, torch.tensor([1, 0])), model_output(model, x, t, torch.zeros_like(cond))
    torch.testing.assert_close(eps, u + 3.0 * (c - u), rtol=1e-4, atol=1e-5)


def test_pixel_training_writes_model_previews_and_loads_for_sampling(tmp_path):
    config = {**tiny(steps=2, sample_every=2, sample_steps=2, sample_count=3), "conditioning": "concat"}
    summary = train_diffusion(Shapes(n=4), tmp_path, config, seed=0, val_dataset=Shapes(n=3))
    assert summary["steps"] == 2
    grid = Image.open(tmp_path / "samples" / "step-2.png")
    assert grid.size == (3 * 18 + 2, 2 * 18 + 2)  # real row + sample row, 3 columns of 16 px + padding
    loaded = load_diffusion(tmp_path / "model")
    assert loaded.meta["conditioning"] == "concat" and loaded.autoencoder is None and loaded.meta["weights"] == "ema"
    assert loaded.scheduler.config.beta_start == 1e-4 and loaded.scheduler.config.num_train_timesteps == 1000
    out = sample(loaded.model, make_sampler("ddim", loaded.scheduler.config), Shapes(n=1)[0]["cond"][None], steps=2)
    assert out.shape == (1, 3, 16, 16)


def test_latent_training_records_its_autoencoder_and_needs_it_to_load(tmp_path):
    ae = build_autoencoder({"channels": [8, 8, 8], "norm_groups": 4, "codebook_size": 16, "factor": 4}, 3, 32)
    ae.register_to_config(scaling_factor=3.0)
    ae.save_pretrained(tmp_path / "ae")
    config = {**tiny(steps=1, sample_every=1, sample_steps=2, sample_count=2), "space": "latent", "multipliers": [1, 1]}
    with pytest.raises(TrainingError, match="no autoencoder"):
        train_diffusion(Shapes(n=2, size=32), tmp_path / "d", config)
    train_diffusion(Shapes(n=2, size=32), tmp_path / "d", config, autoencoder=tmp_path / "ae")

    meta = json.loads((tmp_path / "d" / "model" / "histosynth.json").read_text())
    assert meta["space"] == "latent" and len(meta["autoencoder"]["sha256"]) == 64
    loaded = load_diffusion(tmp_path / "d" / "model")
    assert loaded.model.config.in_channels == 4 and loaded.autoencoder is not None
    out = sample(
        loaded.model,
        make_sampler("dpmsolver++", loaded.scheduler.config),
        Shapes(n=1, size=32)[0]["cond"][None],
        steps=2,
        autoencoder=loaded.autoencoder,
    )
    assert out.shape == (1, 3, 32, 32)  # decoded back to pixels
    assert Image.open(tmp_path / "d" / "samples" / "step-1.png").size[0] == 2 * 34 + 2

    shutil.move(tmp_path / "ae", tmp_path / "moved")
    with pytest.raises(TrainingError, match="latent-space model trained on the autoencoder"):
        load_diffusion(tmp_path / "d" / "model")
    assert load_diffusion(tmp_path / "d" / "model", autoencoder=tmp_path / "moved").autoencoder is not None
    other = build_autoencoder({"channels": [8, 8, 8], "norm_groups": 4, "codebook_size": 16, "factor": 4}, 3, 32)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(TrainingError, match="sha256"):
        load_diffusion(tmp_path / "d" / "model", autoencoder=tmp_path / "other")


def test_noise_from_v_prediction_recovers_the_noise():
    from histosynth.generators.sampling import noise_from_output

    torch.manual_seed(0)
    x0, noise, a = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8), torch.tensor([0.9, 0.5, 0.01])
    shape = (-1, 1, 1, 1)
    x_t = a.sqrt().view(shape) * x0 + (1 - a).sqrt().view(shape) * noise
    v = a.sqrt().view(shape) * noise - (1 - a).sqrt().view(shape) * x0
    torch.testing.assert_close(noise_from_output(v, x_t, a, "v_prediction"), noise, rtol=1e-5, atol=1e-5)
    assert noise_from_output(noise, x_t, a, "epsilon") is noise
    with pytest.raises(ValueError, match="prediction"):
        noise_from_output(v, x_t, a, "sample")


def test_min_snr_weights_cap_the_low_noise_steps():
    from histosynth.generators.train_diffusion import loss_weights

    a = torch.tensor([0.99, 0.5, 0.01])  # SNR 99, 1, ~0.0101
    assert torch.equal(loss_weights(a, "epsilon", None), torch.ones(3))
    torch.testing.assert_close(loss_weights(a, "epsilon", 5.0), torch.tensor([5 / 99, 1.0, 1.0]))
    snr = a / (1 - a)
    torch.testing.assert_close(loss_weights(a, "v_prediction", 5.0), snr.clamp(max=5) / (snr + 1))


def test_strength_starts_from_the_noised_source():
    model, cond = tiny_model(), torch.rand(2, 3, 16, 16)
    init = torch.linspace(-0.8, 0.8, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)
    for sampler in SAMPLERS:
        scheduler = make_sampler(sampler, train_scheduler({}).config)
        run = lambda **kw: sample(model, scheduler, cond, steps=20, generator=torch.Generator().manual_seed(0), **kw)  # noqa: E731
        light = run(init=init, strength=0.05)  # one step from the source noised to t ~ 50 of 1000
        assert (light - init).abs().mean() < 0.2, sampler
        assert (run() - init).abs().mean() > 0.3, sampler  # from pure noise: nothing of the source
        assert torch.equal(run(init=init, strength=1.0), run()), sampler
    with pytest.raises(ValueError, match="strength"):
        sample(model, scheduler, cond, steps=2, init=init, strength=0.0)


def test_v_prediction_training_learns_the_mask_to_colour_mapping(tmp_path):
    """On the toy squares (red inside the mask, blue outside), a few hundred v-prediction steps
    give samples whose red channel follows the mask; the loss falls on the way."""
    import pandas as pd

    config = {
        **tiny(steps=150, batch_size=8, lr=3e-3, lr_warmup=10, checkpoint_every=150, log_every=10, ema_decay=0.95),
        "prediction": "v_prediction",
        "min_snr_gamma": 5.0,
        "num_classes": 0,
        "cond_dropout": 0.0,
    }
    train_diffusion(Shapes(n=32), tmp_path, config, seed=0)
    losses = pd.read_csv(tmp_path / "loss.csv")["loss"]
    assert losses.iloc[-3:].mean() < 0.5 * losses.iloc[:3].mean()
    loaded = load_diffusion(tmp_path / "model")
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    items = [Shapes(n=40)[i] for i in range(32, 40)]  # masks not seen in training
    cond, masks = torch.stack([it["cond"] for it in items]), torch.stack([it["cond"][1] for it in items]).bool()
    out = sample(
        loaded.model,
        make_sampler("ddim", loaded.scheduler.config),
        cond,
        steps=20,
        generator=torch.Generator().manual_seed(0),
    )
    red = out[:, 0]
    assert red[masks].mean() - red[~masks].mean() > 1.0  # targets: +1 inside, -1 outside


def test_epsilon_training_lowers_the_loss_on_the_toy_squares(tmp_path):
    """The thesis objective (epsilon, uniform MSE) on a learnable toy: 60 steps cut the logged loss
    several times over (from ~1, the untrained model's error on unit-variance noise)."""
    import pandas as pd

    config = {
        **tiny(steps=60, batch_size=8, lr=3e-3, checkpoint_every=60, log_every=5, ema_decay=None),
        "num_classes": 0,
        "cond_dropout": 0.0,
    }
    assert config.get("prediction", "epsilon") == "epsilon" and config.get("min_snr_gamma") is None
    train_diffusion(Shapes(n=32), tmp_path, config, seed=0)
    losses = pd.read_csv(tmp_path / "loss.csv")["loss"]
    assert len(losses) == 12 and losses.iloc[:3].mean() > 0.7
    assert losses.iloc[-3:].mean() < 0.4 * losses.iloc[:3].mean()
