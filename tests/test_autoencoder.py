"""Autoencoder stage: model building from config, scaled encode/decode, a short real training run
with its outputs, and the LPIPS loader (weights from a file only, never downloaded)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from PIL import Image

from histosynth.files import content_hash
from histosynth.generators.autoencoder import (
    build_autoencoder,
    decode,
    encode,
    latent_factor,
    load_autoencoder,
    main,
    raw_latents,
    train_autoencoder,
)
from histosynth.nets import WeightsError, load_lpips
from histosynth.training.errors import TrainingError

from helpers import Shapes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**over) -> dict:
    config = {
        "channels": [8, 16, 16],
        "norm_groups": 4,
        "codebook_size": 32,
        "latent_channels": 4,
        "factor": 4,
        "scale_items": 8,
        "val_items": 8,
        "train": {"steps": 12, "batch_size": 4, "lr": 3e-3, "log_every": 1, "checkpoint_every": 100},
    }
    return {**config, **over}


@pytest.mark.parametrize("kind,factor,latent", [("vq", 4, 4), ("vq", 8, 8), ("kl", 4, 4), ("kl", 8, 8)])
def test_encode_decode_shapes(kind, factor, latent):
    channels = [8] * (len(bin(factor)) - 2)  # log2(factor) + 1 blocks
    ae = build_autoencoder(tiny(kind=kind, factor=factor, latent_channels=latent, channels=channels), 3, 32).eval()
    assert latent_factor(ae) == factor
    ae.register_to_config(scaling_factor=2.5)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = encode(ae, images)
        assert z.shape == (2, latent, 32 // factor, 32 // factor)
        raw = raw_latents(ae, images)
        out = decode(ae, z)
        unscaled = ae.decode(raw).sample.clamp(-1, 1)
    # encode scales the latents by the scaling factor and decode undoes it exactly
    torch.testing.assert_close(z, 2.5 * raw)
    assert out.shape == images.shape
    torch.testing.assert_close(out, unscaled)
    assert not torch.allclose(z, raw)


def test_vq_encode_returns_codebook_entries_scaled():
    ae = build_autoencoder(tiny(), 3, 16).eval()
    ae.register_to_config(scaling_factor=2.0)
    with torch.no_grad():
        z = encode(ae, torch.rand(1, 3, 16, 16)) / 2.0
    codes = ae.quantize.embedding.weight
    vectors = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    assert torch.cdist(vectors, codes).min(dim=1).values.max() < 1e-4


def test_block_widths_must_match_the_factor():
    with pytest.raises(TrainingError, match=r"log2\(factor\) \+ 1 = 4"):
        build_autoencoder(tiny(factor=8, channels=[8, 16, 16]))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1], on the [0, 1] scale, from the mean squared error over all pixels."""
    return 10 * math.log10(1 / float((((a + 1) / 2 - (b + 1) / 2) ** 2).mean()))


def test_training_reduces_the_loss_and_writes_model_csv_metrics_grid(tmp_path):
    config = tiny(train={"steps": 60, "batch_size": 4, "lr": 3e-3, "log_every": 1, "checkpoint_every": 100})
    summary = train_autoencoder(Shapes(n=12), tmp_path, config, seed=0, val_dataset=Shapes(n=4))
    with open(tmp_path / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 60 and {"recon", "vq"} <= set(rows[0])
    first = sum(float(r["loss"]) for r in rows[:3]) / 3
    last = sum(float(r["loss"]) for r in rows[-3:]) / 3
    assert last < 0.8 * first, (first, last)

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["n_images"] == 4
    assert summary["psnr"] == metrics["psnr"] and -1 <= metrics["ssim"] <= 1
    # the recorded PSNR is the saved model's on the validation images, and it beats predicting the
    # training set's mean image for every one of them (about 10 dB here) by a clear margin
    val = torch.stack([Shapes(n=4)[i]["image"] for i in range(4)])
    train_mean = torch.stack([Shapes(n=12)[i]["image"] for i in range(12)]).mean(0, keepdim=True).expand_as(val)
    with torch.no_grad():
        trained = load_autoencoder(tmp_path / "model")
        reconstruction = decode(trained, encode(trained, val))
    assert metrics["psnr"] == pytest.approx(psnr(reconstruction, val), abs=1e-3)
    assert metrics["psnr"] > psnr(train_mean, val) + 2, (metrics["psnr"], psnr(train_mean, val))
    grid = Image.open(tmp_path / "reconstructions.png")
    assert grid.size[1] == 2 * 16 + 3 * 2  # two rows (real, reconstruction) of 16 px with padding

    ae = load_autoencoder(tmp_path / "model")
    assert ae.config.scaling_factor == pytest.approx(metrics["scaling_factor"]) and ae.config.scaling_factor != 1.0
    assert len(content_hash(tmp_path / "model")) == 64


def test_kl_training_logs_the_kl_term(tmp_path):
    train_autoencoder(
        Shapes(n=4), tmp_path, tiny(kind="kl", train={"steps": 2, "batch_size": 2, "log_every": 1}), seed=0
    )
    with open(tmp_path / "loss.csv") as f:
        assert {"recon", "kl"} <= set(next(csv.DictReader(f)))
    assert load_autoencoder(tmp_path / "model").__class__.__name__ == "AutoencoderKL"


def test_lpips_from_a_backbone_file_is_used_in_the_loss(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)  # squeezenet: the smallest LPIPS backbone, quick to build
    backbone = {
        f"features.{k}": v for k, v in torchvision.models.squeezenet1_1(weights=None).features.state_dict().items()
    }
    torch.save(backbone, tmp_path / "squeeze.pth")
    lpips = load_lpips(tmp_path / "squeeze.pth", "squeeze")
    assert torch.equal(lpips.net.slices[0][0].weight, backbone["features.0.weight"])
    assert torch.equal(getattr(lpips.net.slices[1], "3").squeeze.weight, backbone["features.3.squeeze.weight"])

    def first_row(name, **over):
        config = tiny(channels=[8, 16, 16], train={"steps": 1, "batch_size": 2, "log_every": 1}, **over)
        train_autoencoder(Shapes(n=2, size=32), tmp_path / name, config, seed=0)
        with open(tmp_path / name / "loss.csv") as f:
            return {k: float(v) for k, v in next(csv.DictReader(f)).items() if k in ("loss", "recon", "vq", "lpips")}

    with_lpips = first_row("run", lpips_weights=str(tmp_path / "squeeze.pth"), lpips_net="squeeze", lpips_weight=2.5)
    without = first_row("plain")
    assert "lpips" not in without and with_lpips["lpips"] > 0
    # the same first step (same seed, same batch) except for the perceptual term, weighted in the loss
    assert with_lpips["recon"] == without["recon"] and with_lpips["vq"] == without["vq"]
    assert without["loss"] == pytest.approx(without["recon"] + without["vq"], rel=1e-4)  # vq_weight 1
    assert with_lpips["loss"] == pytest.approx(
        with_lpips["recon"] + with_lpips["vq"] + 2.5 * with_lpips["lpips"], rel=1e-4
    )
    assert with_lpips["loss"] - without["loss"] == pytest.approx(2.5 * with_lpips["lpips"], rel=1e-3)


def test_lpips_path_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_lpips(tmp_path / "missing.pth")


def test_command_line_entry_point(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"seed": 1, "autoencoder": tiny(train={"steps": 1, "batch_size": 2})}))
    args = [
        "train",
        "--config",
        str(config),
        "--out",
        str(tmp_path / "out"),
        "--dataset",
        "helpers:shapes_factory",
        "--index",
        "unused.parquet",
        "--checkpoints",
        str(tmp_path / "ckpt"),
        "--threads",
        "1",
    ]
    assert main(args) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["split"] == "val"
    assert (tmp_path / "ckpt" / "step-1" / "trainer.pt").is_file() and not (tmp_path / "out" / "checkpoints").exists()
    config.write_text(json.dumps({"autoencoder": tiny(norm_groups=5)}))
    assert main(args) == 2
    assert "norm_groups=5 must divide" in capsys.readouterr().err
